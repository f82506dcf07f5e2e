"""Progress and end-of-run summaries for long CLI work (``sigil gc``, ``sigil fsck``, and the
air-gap export/import commands).

A job reports its work as *phases* (``with progress.phase("hashing", total=n, unit="bytes")
as step: step.advance(size)``) and knows nothing about where it goes:

- on a terminal, :class:`RichProgress` draws a progress bar per phase (rich), which stays on
  screen as one finished line when the phase ends;
- otherwise :class:`LineProgress` writes plain lines: when a phase starts, each time it
  crosses another tenth of its total (or every ``interval`` seconds when the total is not
  known) and when it ends, so a log collector gets a bounded number of lines;
- :data:`NO_PROGRESS` reports nothing (the server's own gc passes).

Progress goes to stderr, so that stdout carries only the result (``--json`` output is the
same as without progress). :func:`print_summary` prints the closing table to stdout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

# rich is imported where a terminal needs it, not here: the server imports this module (through
# storage.gc) and has no use for it.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

#: Units a phase can count in; "bytes" is shown as KiB/MiB/GiB.
BYTES = "bytes"


class Phase:
    """One phase of a job; :meth:`advance` it as work gets done. This base reports nothing."""

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units of work done."""


class ProgressReporter:
    """Where a job's phases are reported. This base reports nothing (:data:`NO_PROGRESS`)."""

    @contextmanager
    def phase(self, description: str, total: int | None = None, *,
              unit: str = "objects") -> Iterator[Phase]:
        """Report a phase of ``total`` units (None: not known in advance) while the block
        runs. The phase ends when the block does, also on an error."""
        yield Phase()


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
        step = _LinePhase(self, description, total, unit)
        started = time.monotonic()
        self.line(f"{description}: started" + (
            f" ({format_amount(total, unit)})" if total is not None else ""))
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


class RichProgress(ProgressReporter):
    """A rich progress bar per phase on a terminal; each stays as one line when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def phase(self, description: str, total: int | None = None, *,
              unit: str = "objects") -> Iterator[Phase]:
        """See :meth:`ProgressReporter.phase`."""
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        count: ProgressColumn = (DownloadColumn(binary_units=True) if unit == BYTES
                                 else MofNCompleteColumn())
        columns: list[ProgressColumn] = [SpinnerColumn(finished_text="[green]✓"),
                                         TextColumn("[bold]{task.description}"), BarColumn(),
                                         count]
        if unit != BYTES:
            columns.append(TextColumn(unit))
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        # One live display per phase, stopped when it ends: log lines written between phases
        # (gc.collected, fsck.corrupt) then never tear a bar that is being redrawn.
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield _RichPhase(bar, task)
            if total is None:  # an open-ended phase shows a full bar once it is over
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
