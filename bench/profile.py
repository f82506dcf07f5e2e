"""Sample a running sigil server with py-spy and summarise where its time goes.

``py-spy record`` (blocking mode: it pauses the process for each sample, so stacks are
complete; throughput while profiling is not reported) writes collapsed stacks; we fold them
into the share of samples spent inside a few named areas and the top functions.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Areas of the request path, matched against ``function (file)`` frames; a sample counts
#: toward every area one of its frames matches (so areas may overlap a little).
AREAS: tuple[tuple[str, str], ...] = (
    ("request log line (structlog + sigil.logs)", r"\((structlog/|sigil/logs\.py)"),
    ("prometheus metrics", r"\(prometheus_client/"),
    ("request id (uuid4)", r"^uuid4 "),
    ("sigil handler (routes.dispatch)", r"^dispatch \(sigil/server/routes\.py"),
    ("  of which Mirror.manifest", r"^Mirror\.manifest \(sigil/mirror\.py"),
    ("  of which Mirror.blob / Download", r"^(Mirror\.blob|Download\.\w+) \(sigil/"),
    ("aiohttp URL routing", r"^UrlDispatcher\.resolve "),
    ("aiohttp response write (headers+send)", r"^RequestHandler\.finish_response "),
    ("socket send syscall (transport.write)", r"^_SelectorSocketTransport\.write "),
    ("socket recv + HTTP parse", r"^_SelectorSocketTransport\._read_ready "),
    ("file read (os.pread)", r"^Download\.stream .*downloads\.py"),
    ("staging write + sha256 (StagingFile.write)", r"^StagingFile\.write "),
    ("epoll wait (idle)", r"^EpollSelector\.select "),
)


@dataclass
class Profile:
    """What :func:`summarise` found."""

    samples: int
    areas: list[tuple[str, float]]
    top_inclusive: list[tuple[str, float]]
    top_self: list[tuple[str, float]]

    def lines(self, top: int = 8) -> list[str]:
        out = [f"{self.samples} samples (py-spy, all threads, parked pool threads left out)"]
        out += [f"  {share:5.1f}%  {name}" for name, share in self.areas if share >= 0.5]
        out.append("  top functions by self time:")
        out += [f"  {share:5.1f}%  {name}" for name, share in self.top_self[:top]]
        return out


def available() -> bool:
    return shutil.which("py-spy") is not None


def record(pid: int, seconds: float, output: Path, *, rate: int = 200) -> subprocess.Popen[str]:
    """Start ``py-spy record`` on ``pid`` for ``seconds``; the caller waits on the process."""
    argv = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(rate), "--format", "raw", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _frame(raw: str) -> str:
    # "name (path/to/file.py:123)" -> "name (path/to/file.py)"
    return re.sub(r":\d+\)$", ")", raw.strip())


_RUNNER = re.compile(r"^(_run_module_as_main|_run_code|<module>|main|_serve|run|Runner\.run|"
                     r"BaseEventLoop\.\w+|Handle\._run) ")


# Thread-pool workers parked in ``queue.get`` (a C call, so the Python leaf frame is the loop
# itself): py-spy does not always recognise them as idle.
_IDLE = re.compile(r"^_worker \(concurrent/futures/thread\.py\)$")


def summarise(path: Path) -> Profile:
    """Fold a py-spy ``--format raw`` file (``frame;frame;... count`` lines)."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if frames and _IDLE.match(frames[-1]):
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            self_time[frames[-1]] += count
        for name, pattern in AREAS:
            if any(re.search(pattern, f) for f in frames):
                areas[name] += count
    if total == 0:
        return Profile(0, [], [], [])

    def share(counter: Counter[str], key: str) -> float:
        return 100.0 * counter[key] / total

    return Profile(
        total,
        [(name, share(areas, name)) for name, _ in AREAS],
        [(f, share(inclusive, f)) for f, _ in inclusive.most_common(40)
         if not _RUNNER.match(f)][:15],
        [(f, share(self_time, f)) for f, _ in self_time.most_common(15)],
    )
