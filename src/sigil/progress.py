"""Progress and end-of-run summaries for long CLI work (``sigil gc``, ``sigil fsck``,
``sigil export`` and ``sigil import``).

A job reports its work as *phases* (``with progress.phase("hashing", total=n, unit="bytes")
as step: step.advance(size)``) or, when it moves bytes and items at once and learns its totals
as it goes (the air-gap export and import), as a *transfer* (``with progress.transfer("export")
as job: job.expect(items=1, nbytes=size); job.advance(nbytes=len(chunk))``). It knows nothing
about where they go:

- on a terminal, :class:`RichProgress` draws a progress bar per phase or transfer (rich; a
  transfer shows bytes, items, rate and ETA), which stays on screen as one finished line when
  it ends;
- otherwise :class:`LineProgress` writes plain lines: when a phase starts, each time it
  crosses another tenth of its total (or every ``interval`` seconds when the total is not
  known, and always for a transfer, whose total keeps growing) and when it ends, so a log
  collector gets a bounded number of lines;
- :data:`NO_PROGRESS` reports nothing (the server's own gc passes).

Progress goes to stderr, so that stdout carries only the result (``--json`` output is the
same as without progress). :func:`print_summary` prints the closing table to stdout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

# rich is imported where a terminal needs it, not here: the server imports this module (through
# storage.gc) and has no use for it.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, TaskID

#: Either kind of plain-line step (phase or transfer), for LineProgress._reported.
_Step = TypeVar("_Step", "_LinePhase", "_LineTransfer")

#: Units a phase can count in; "bytes" is shown as KiB/MiB/GiB.
BYTES = "bytes"


class Phase:
    """One phase of a job; :meth:`advance` it as work gets done. This base reports nothing."""

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units of work done."""


class Transfer:
    """Bytes and items moved at once, totals learnt on the way (an export or import): grow
    the totals with :meth:`expect`, count work with :meth:`advance`. This base reports
    nothing."""

    def expect(self, items: int = 0, nbytes: int = 0) -> None:
        """``items`` more items and ``nbytes`` more bytes are to be done."""

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        """``items`` more items and ``nbytes`` more bytes are done."""


class ProgressReporter:
    """Where a job's phases are reported. This base reports nothing (:data:`NO_PROGRESS`)."""

    @contextmanager
    def phase(self, description: str, total: int | None = None, *,
              unit: str = "objects") -> Iterator[Phase]:
        """Report a phase of ``total`` units (None: not known in advance) while the block
        runs. The phase ends when the block does, also on an error."""
        yield Phase()

    @contextmanager
    def transfer(self, description: str) -> Iterator[Transfer]:
        """Report a transfer (bytes, items, rate, ETA) while the block runs; it ends when the
        block does, also on an error."""
        yield Transfer()


NO_PROGRESS = ProgressReporter()


def format_amount(amount: int, unit: str) -> str:
    """``amount`` for a human: bytes in binary units (``1.5 MiB``), other units as a count."""
    if unit != BYTES:
        return f"{amount:,} {unit}"
    if amount < 1024:
        return f"{amount} B"
    value = amount / 1024
    for prefix in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {prefix}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_duration(seconds: float) -> str:
    """A duration for a human: ``42s``, ``3m05s``, ``2h07m``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class _LinePhase(Phase):
    def __init__(self, out: LineProgress, description: str, total: int | None,
                 unit: str) -> None:
        self._out, self._description, self._total, self._unit = out, description, total, unit
        self.done = 0
        self._tenths = 0  # tenths of the total already reported
        self._last = time.monotonic()

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self._total:
            tenths = min(10, self.done * 10 // self._total)
            if tenths > self._tenths and tenths < 10:  # 100% is said once, by finish()
                self._tenths = tenths
                self._out.line(f"{self._description}: {tenths * 10}% "
                               f"({self._amounts()})")
        elif time.monotonic() - self._last >= self._out.interval:
            self._last = time.monotonic()
            self._out.line(f"{self._description}: {format_amount(self.done, self._unit)}")

    def _amounts(self) -> str:
        if self._total is None:
            return format_amount(self.done, self._unit)
        return (f"{format_amount(self.done, self._unit)} of "
                f"{format_amount(self._total, self._unit)}")

    def finish(self, started: float, failed: bool) -> None:
        state = "failed" if failed else "done"
        self._out.line(f"{self._description}: {state}, {self._amounts()} "
                       f"in {time.monotonic() - started:.1f}s")


class _LineTransfer(Transfer):
    def __init__(self, out: LineProgress, description: str) -> None:
        self._out, self._description = out, description
        self.items = self.total_items = self.bytes = self.total_bytes = 0
        self._started = self._last = time.monotonic()

    def expect(self, items: int = 0, nbytes: int = 0) -> None:
        self.total_items += items
        self.total_bytes += nbytes

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self._out.interval:
            self._last = now
            self._out.line(f"{self._description}: {self.status(now)}")

    def status(self, now: float) -> str:
        """``3/10 items, 1.0 MiB of 4.0 MiB, 512.0 KiB/s, ETA 6s``."""
        rate = self.bytes / max(now - self._started, 1e-6)
        text = (f"{self.items}/{self.total_items} items, {format_amount(self.bytes, BYTES)} of "
                f"{format_amount(self.total_bytes, BYTES)}, {format_amount(int(rate), BYTES)}/s")
        left = self.total_bytes - self.bytes
        if rate > 0 and left > 0:
            text += f", ETA {format_duration(left / rate)}"
        return text

    def finish(self, started: float, failed: bool) -> None:
        now = time.monotonic()
        self._out.line(f"{self._description}: {'failed' if failed else 'done'}, "
                       f"{self.status(now)} in {now - started:.1f}s")


class LineProgress(ProgressReporter):
    """Plain progress lines (``<prefix>: <phase>: 40% (4.0 MiB of 10.0 MiB)``) on ``stream``,
    for logs and pipes: no control characters, a bounded number of lines per phase."""

    def __init__(self, stream: TextIO, prefix: str, *, interval: float = 10.0) -> None:
        self.stream, self.prefix, self.interval = stream, prefix, interval

    def line(self, text: str) -> None:
        """Write one line now (flushed: a pipe reader sees it at once)."""
        self.stream.write(f"{self.prefix}: {text}\n")
        self.stream.flush()

    @contextmanager
    def phase(self, description: str, total: int | None = None, *,
              unit: str = "objects") -> Iterator[Phase]:
        """See :meth:`ProgressReporter.phase`."""
        started = (f" ({format_amount(total, unit)})" if total is not None else "")
        with self._reported(description, _LinePhase(self, description, total, unit),
                            started) as step:
            yield step

    @contextmanager
    def transfer(self, description: str) -> Iterator[Transfer]:
        """See :meth:`ProgressReporter.transfer`: a line at the start, one every
        ``interval`` seconds with items, bytes, rate and ETA, and one at the end."""
        with self._reported(description, _LineTransfer(self, description), "") as step:
            yield step

    @contextmanager
    def _reported(self, description: str, step: _Step, started_note: str) -> Iterator[_Step]:
        started = time.monotonic()
        self.line(f"{description}: started{started_note}")
        try:
            yield step
        except BaseException:
            step.finish(started, failed=True)
            raise
        step.finish(started, failed=False)


class _RichPhase(Phase):
    def __init__(self, bar: Progress, task: TaskID) -> None:
        self._bar, self._task = bar, task

    def advance(self, amount: int = 1) -> None:
        self._bar.update(self._task, advance=amount)


class _RichTransfer(Transfer):
    def __init__(self, bar: Progress, task: TaskID) -> None:
        self._bar, self._task = bar, task
        self.items = self.total_items = self.total_bytes = 0

    def expect(self, items: int = 0, nbytes: int = 0) -> None:
        self.total_items += items
        self.total_bytes += nbytes
        self._bar.update(self._task, total=self.total_bytes or None, items=self._items())

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        self.items += items
        self._bar.update(self._task, advance=nbytes, items=self._items())

    def _items(self) -> str:
        return f"{self.items}/{self.total_items}"


class RichProgress(ProgressReporter):
    """A rich progress bar per phase on a terminal; each stays as one line when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def phase(self, description: str, total: int | None = None, *,
              unit: str = "objects") -> Iterator[Phase]:
        """See :meth:`ProgressReporter.phase`."""
        from rich.progress import DownloadColumn, MofNCompleteColumn, TextColumn

        count: list[ProgressColumn] = (
            [DownloadColumn(binary_units=True)] if unit == BYTES
            else [MofNCompleteColumn(), TextColumn(unit)])
        with self._live(description, total, count) as (bar, task):
            yield _RichPhase(bar, task)

    @contextmanager
    def transfer(self, description: str) -> Iterator[Transfer]:
        """See :meth:`ProgressReporter.transfer`: bytes, rate, items and ETA on one bar."""
        from rich.progress import DownloadColumn, TextColumn, TransferSpeedColumn

        with self._live(description, None, [DownloadColumn(binary_units=True),
                                            TransferSpeedColumn(),
                                            TextColumn("{task.fields[items]} items")],
                        items="0/0") as (bar, task):
            yield _RichTransfer(bar, task)

    @contextmanager
    def _live(self, description: str, total: int | None, count: list[ProgressColumn],
              **fields: Any) -> Iterator[tuple[Progress, TaskID]]:
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[ProgressColumn] = [SpinnerColumn(finished_text="[green]✓"),
                                         TextColumn("[bold]{task.description}"), BarColumn(),
                                         *count, TimeElapsedColumn(), TimeRemainingColumn()]
        # One live display per phase, stopped when it ends: log lines written between phases
        # (gc.collected, fsck.corrupt) then never tear a bar that is being redrawn.
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, **fields)
            yield bar, task
            if bar.tasks[0].total is None:  # open-ended: a full bar once it is over
                done = bar.tasks[0].completed
                bar.update(task, total=max(done, 1), completed=max(done, 1))


def progress_for(stream: TextIO, prefix: str) -> ProgressReporter:
    """The reporter for a CLI job writing progress to ``stream``: bars on a terminal, plain
    lines otherwise. ``prefix`` names the job in plain lines (``sigil gc``)."""
    if stream.isatty():
        from rich.console import Console

        return RichProgress(Console(file=stream))
    return LineProgress(stream, prefix)


def print_summary(title: str, rows: Sequence[tuple[str, str]], stream: TextIO) -> None:
    """A two-column summary table: drawn by rich on a terminal, aligned plain text (one
    ``name  value`` row per line, no box characters) otherwise, so scripts can still read it.
    """
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        for name, value in rows:
            table.add_row(name, value)
        Console(file=stream).print(table)
        return
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
    stream.write("\n".join(lines) + "\n")
    stream.flush()
