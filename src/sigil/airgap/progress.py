"""Progress of an export or import: bytes, items, rate and ETA.

On a terminal one status line is redrawn in place; otherwise a plain log line is written at
most every ``interval`` seconds and at the end, so CI logs stay readable. (A shared progress
module may replace this one; it is kept small and local to ``airgap/`` on purpose.)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


class Progress:
    """Counts done/total bytes and items for one phase and renders them."""

    def __init__(self, phase: str, *, stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.phase = phase
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.total_bytes = 0
        self.done_bytes = 0
        self.total_items = 0
        self.done_items = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def expect(self, items: int = 0, nbytes: int = 0) -> None:
        """Grow the totals (they are learnt while walking the plan)."""
        self.total_items += items
        self.total_bytes += nbytes
        self.show()

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        """Count work done."""
        self.done_items += items
        self.done_bytes += nbytes
        self.show()

    def line(self) -> str:
        """The status text: ``phase: items, bytes, rate, ETA``."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        text = (f"{self.phase}: {self.done_items}/{self.total_items} items, "
                f"{_size(self.done_bytes)}/{_size(self.total_bytes)}, {_size(rate)}/s")
        left = self.total_bytes - self.done_bytes
        if rate > 0 and left > 0:
            text += f", ETA {int(left / rate)} s"
        return text

    def show(self, *, force: bool = False) -> None:
        """Render now if the interval has passed (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._shown < self.interval:
            return
        self._shown = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Render the final state (and end the terminal line)."""
        self.show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
