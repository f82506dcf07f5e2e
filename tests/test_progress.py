"""Progress and summaries of long CLI work: ``sigil gc``, ``sigil fsck`` and ``sigil export``
run as real processes on a real store (export from a real docker-registry), once on a
pseudo-terminal (rich bars and a drawn table) and once on pipes (plain bounded lines, an
aligned table, no control characters); ``--json`` stays the JSON report alone. Plus the
reporters themselves and the gc pass metrics."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from sigil import metrics
from sigil.oci.digest import Digest
from sigil.progress import (
    BYTES,
    NO_PROGRESS,
    LineProgress,
    format_amount,
    format_duration,
    print_summary,
    progress_for,
)
from sigil.storage import BlobStore, Index, collect
from sigil.storage.gc import DEFAULT_GRACE, FsckReport, GcStats
from tests.realparts import RealRegistry, RegistryPusher

OBJECTS = 12
ANSI = "\x1b["
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def make_store(root: Path, *, aged: bool = False) -> tuple[Path, list[Digest]]:
    """A store of OBJECTS unindexed blobs and its config file (max_bytes 1: everything is
    over budget). ``aged``: their mtimes are older than the gc grace period, so gc deletes
    them (nothing references them)."""
    store = BlobStore(root / "store")
    Index(root / "store" / "index.sqlite").close()
    digests = []
    for n in range(OBJECTS):
        data = f"object {n} ".encode() * 2000
        digest = Digest.of(data)
        store.put_bytes(digest, data)
        if aged:
            old = time.time() - 2 * DEFAULT_GRACE
            os.utime(store.path(digest), (old, old))
        digests.append(digest)
    config = root / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(root / "store"), "max_bytes": 1},
        "upstreams": [{"name": "registry.test", "url": "http://127.0.0.1:9", "default": True}],
        "log": {"level": "warning", "format": "json"}}))
    return config, digests


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIGIL_") and k not in {"NO_COLOR", "FORCE_COLOR", "COLUMNS"}}
    env["TERM"] = "xterm-256color"
    return env


def has_row(text: str, name: str, value: object) -> bool:
    """The plain summary table has the row ``name  value``."""
    return re.search(rf"^  {re.escape(name)}\s+{re.escape(str(value))}$", text, re.M) is not None


def run_piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigil", *args], capture_output=True,
                          text=True, timeout=120, env=cli_env(), stdin=subprocess.DEVNULL)


def run_on_tty(*args: str, timeout: float = 120.0) -> tuple[int, str]:
    """Run sigil with stdin, stdout and stderr on a pseudo-terminal; (exit code, output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "sigil", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=cli_env(), close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"sigil {args} on a tty did not finish in {timeout}s")
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


# --- the reporters ---------------------------------------------------------------------------

def test_line_progress_is_bounded_and_says_each_tenth_once() -> None:
    out = io.StringIO()
    progress = LineProgress(out, "job")
    with progress.phase("hashing", 1000) as step:
        for _ in range(1000):
            step.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "job: hashing: started (1,000 objects)"
    assert [line.split(": ")[2].split(" ")[0] for line in lines[1:-1]] == [
        f"{p}%" for p in range(10, 100, 10)]
    assert re.fullmatch(r"job: hashing: done, 1,000 objects of 1,000 objects in \d+\.\ds",
                        lines[-1])


def test_line_progress_open_ended_phase_and_failure() -> None:
    out = io.StringIO()
    progress = LineProgress(out, "job", interval=3600)
    with pytest.raises(RuntimeError), progress.phase("listing", unit="files") as step:
        step.advance(7)
        raise RuntimeError("disk gone")
    # No total: no percentages; one line at the start and one at the (failed) end.
    assert out.getvalue().splitlines()[0] == "job: listing: started"
    assert out.getvalue().splitlines()[1].startswith("job: listing: failed, 7 files in ")
    assert len(out.getvalue().splitlines()) == 2


def test_progress_for_a_pipe_is_plain_lines() -> None:
    assert isinstance(progress_for(io.StringIO(), "x"), LineProgress)
    with NO_PROGRESS.phase("anything", 3) as step:  # reports nothing, accepts everything
        step.advance(3)


def test_line_transfer_says_items_bytes_rate_and_eta() -> None:
    out = io.StringIO()
    progress = LineProgress(out, "sigil", interval=0)
    with progress.transfer("export") as job:
        job.expect(items=2, nbytes=4 * 1024 * 1024)
        job.advance(items=1, nbytes=1024 * 1024)
        job.expect(nbytes=1024 * 1024)   # totals grow while the plan is walked
        job.advance(items=1, nbytes=4 * 1024 * 1024)
    lines = out.getvalue().splitlines()
    assert lines[0] == "sigil: export: started"
    assert re.fullmatch(r"sigil: export: 1/2 items, 1\.0 MiB of 4\.0 MiB, [0-9.]+ [KMG]?i?B/s, "
                        r"ETA [0-9hms]+", lines[1]), lines[1]
    assert lines[2].startswith("sigil: export: 2/2 items, 5.0 MiB of 5.0 MiB, ")
    assert "ETA" not in lines[2]   # nothing left
    assert re.fullmatch(r"sigil: export: done, 2/2 items, 5\.0 MiB of 5\.0 MiB, .*/s in "
                        r"\d+\.\ds", lines[-1]), lines[-1]
    assert len(lines) == 4 and ANSI not in out.getvalue() and "\r" not in out.getvalue()


def test_line_transfer_is_bounded_by_its_interval_and_reports_failure() -> None:
    out = io.StringIO()
    progress = LineProgress(out, "sigil", interval=3600)
    with pytest.raises(RuntimeError), progress.transfer("import a.tar") as job:
        job.expect(items=1000, nbytes=1000 * 4096)
        for _ in range(1000):
            job.advance(items=1, nbytes=4096)
        raise RuntimeError("archive refused")
    lines = out.getvalue().splitlines()
    assert lines[0] == "sigil: import a.tar: started"
    assert lines[1].startswith("sigil: import a.tar: failed, 1000/1000 items, 3.9 MiB of ")
    assert len(lines) == 2
    with NO_PROGRESS.transfer("anything") as job:   # reports nothing, accepts everything
        job.expect(items=1, nbytes=1)
        job.advance(items=1, nbytes=1)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.9, 185, 7620)] == ["0s", "42s", "3m05s",
                                                                   "2h07m"]


def test_format_amount() -> None:
    assert format_amount(512, BYTES) == "512 B"
    assert format_amount(1536, BYTES) == "1.5 KiB"
    assert format_amount(3 * 1024**3, BYTES) == "3.0 GiB"
    assert format_amount(12345, "objects") == "12,345 objects"


def test_summary_on_a_pipe_is_an_aligned_plain_table() -> None:
    out = io.StringIO()
    print_summary("sigil fsck", [("objects checked", "3"), ("missing", "0")], out)
    assert out.getvalue() == ("sigil fsck\n"
                              "  objects checked  3\n"
                              "  missing          0\n")


# --- sigil fsck / sigil gc as processes ------------------------------------------------------

def test_fsck_on_a_pipe_prints_lines_and_a_table(tmp_path: Path) -> None:
    config, _ = make_store(tmp_path)
    done = run_piped("fsck", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert ANSI not in done.stdout and ANSI not in done.stderr
    assert "sigil fsck: listing store: started" in done.stderr
    assert f"sigil fsck: listing store: done, {OBJECTS} objects" in done.stderr
    assert re.search(r"^sigil fsck: hashing: started \(\d+\.\d KiB\)$", done.stderr, re.M)
    assert re.search(r"^sigil fsck: hashing: done, ", done.stderr, re.M)
    assert has_row(done.stdout, "objects checked", OBJECTS)
    assert has_row(done.stdout, "unindexed", OBJECTS)
    assert has_row(done.stdout, "result", "ok")


def test_fsck_reports_corrupt_objects_by_digest_and_exits_1(tmp_path: Path) -> None:
    config, digests = make_store(tmp_path)
    victim = BlobStore(tmp_path / "store").path(digests[3])
    victim.write_bytes(b"not what was stored")
    done = run_piped("fsck", "--config", str(config))
    assert done.returncode == 1, done.stderr
    assert has_row(done.stdout, "corrupt (quarantined)", "1")
    assert has_row(done.stdout, "result", "PROBLEMS FOUND")
    assert f"corrupt: {digests[3]}\n" in done.stdout


def test_json_output_is_the_report_alone(tmp_path: Path) -> None:
    config, _ = make_store(tmp_path, aged=True)
    fsck_done = run_piped("fsck", "--config", str(config), "--json")
    assert fsck_done.returncode == 0, fsck_done.stderr
    report = json.loads(fsck_done.stdout)  # nothing but the JSON document on stdout
    assert set(report) == set(asdict(FsckReport()))
    assert report["objects_checked"] == OBJECTS
    gc_done = run_piped("gc", "--config", str(config), "--json")
    assert gc_done.returncode == 0, gc_done.stderr
    stats = json.loads(gc_done.stdout)
    assert set(stats) == set(asdict(GcStats()))
    assert stats["objects_deleted"] == OBJECTS and stats["objects_after"] == 0


def test_gc_on_a_pipe_prints_phases_and_a_table(tmp_path: Path) -> None:
    config, _ = make_store(tmp_path, aged=True)
    done = run_piped("gc", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert ANSI not in done.stdout and ANSI not in done.stderr
    for phase in ("reading index", "scanning store"):
        assert f"sigil gc: {phase}: started" in done.stderr
    assert f"sigil gc: deleting: started ({OBJECTS} objects)" in done.stderr
    assert f"sigil gc: deleting: done, {OBJECTS} objects of {OBJECTS} objects" in done.stderr
    assert has_row(done.stdout, "objects deleted", OBJECTS)
    assert re.search(rf"^  store before\s+{OBJECTS} objects, ", done.stdout, re.M)
    assert has_row(done.stdout, "store after", "0 objects, 0 B")
    assert has_row(done.stdout, "over budget", "no")


def test_fsck_on_a_terminal_draws_bars_and_a_table(tmp_path: Path) -> None:
    config, _ = make_store(tmp_path)
    code, output = run_on_tty("fsck", "--config", str(config))
    assert code == 0, output
    assert ANSI in output  # drawn, not plain
    assert "listing store" in output and "hashing" in output
    assert "sigil fsck: hashing: started" not in output  # no plain lines on a terminal
    text = ESCAPES.sub("", output)
    assert re.search(rf"│ objects checked\s+│\s+{OBJECTS} │", text), text  # a drawn table
    assert re.search(r"│ result\s+│\s+ok │", text), text
    assert f"{OBJECTS}/{OBJECTS} objects" in text  # the listing bar, complete


def test_gc_on_a_terminal_draws_bars_and_a_table(tmp_path: Path) -> None:
    config, _ = make_store(tmp_path, aged=True)
    code, output = run_on_tty("gc", "--config", str(config))
    assert code == 0, output
    assert ANSI in output
    for phase in ("reading index", "scanning store", "deleting"):
        assert phase in output
    text = ESCAPES.sub("", output)
    assert "sigil gc: deleting: started" not in text
    assert re.search(rf"deleting\s+━+\s+{OBJECTS}/{OBJECTS} objects", text), text
    assert re.search(rf"│ objects deleted\s+│\s+{OBJECTS} │", text), text
    assert not [path for path in (tmp_path / "store" / "blobs").rglob("*") if path.is_file()]


# --- sigil export: a transfer, on a terminal and on pipes ----------------------------------

# Three layers of 900 KiB (one body over 1 MiB makes aiohttp warn, and warnings are errors).
EXPORT_LAYERS, EXPORT_LAYER = 3, 900 * 1024


def export_setup(registry: RealRegistry, root: Path) -> list[str]:
    """A config (no policy: the export warns and carries the image as allowed), a plan of
    one 2.6 MiB image pushed to the real registry, and the export command line."""
    import asyncio

    repo = f"progress/{os.urandom(3).hex()}"

    async def push() -> None:
        async with RegistryPusher(registry.url) as pusher:
            await pusher.make_image(repo, "v1", [os.urandom(EXPORT_LAYER)
                                                   for _ in range(EXPORT_LAYERS)])

    asyncio.run(push())
    config = root / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(root / "unused")},
        "upstreams": [{"name": "registry.test", "url": registry.url, "default": True}],
        "log": {"level": "warning", "format": "json"}}))
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"images": [{"ref": f"registry.test/{repo}:v1"}]}))
    return ["export", "--config", str(config), "--plan", str(plan), "--output",
            str(root / "out.tar")]


@pytest.mark.realparts
def test_export_on_a_pipe_prints_plain_transfer_lines(real_registry: RealRegistry,
                                                       tmp_path: Path) -> None:
    done = run_piped(*export_setup(real_registry, tmp_path))
    assert done.returncode == 0, done.stderr
    assert ANSI not in done.stderr and "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("sigil: export: ")]
    assert lines[0] == "sigil: export: started"
    # The image, and at least its layers in bytes (the archive also holds metadata blobs).
    match = re.fullmatch(r"sigil: export: done, 1/1 items, ([0-9.]+) MiB of \1 MiB, .+/s in "
                         r"\d+\.\ds", lines[-1])
    assert match is not None, lines
    assert float(match.group(1)) >= int(EXPORT_LAYERS * EXPORT_LAYER / 1024 / 1024 * 10) / 10
    assert "exported" in done.stdout and (tmp_path / "out.tar").is_file()


@pytest.mark.realparts
def test_export_on_a_terminal_draws_a_transfer_bar(real_registry: RealRegistry,
                                                   tmp_path: Path) -> None:
    code, output = run_on_tty(*export_setup(real_registry, tmp_path))
    assert code == 0, output
    assert ANSI in output   # drawn, not plain
    text = ESCAPES.sub("", output)
    assert "sigil: export: started" not in text   # no plain lines on a terminal
    # The finished bar: bytes done of total, a rate, the item count.
    assert re.search(r"export\s+━+\s+([0-9.]+)/\1 MiB\s+[0-9.]+ [kMG]?i?B/s\s+1/1 items",
                     text), text
    assert (tmp_path / "out.tar").is_file()


# --- gc pass metrics -------------------------------------------------------------------------

def sample(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


def test_gc_pass_metrics_on_success_and_failure(tmp_path: Path) -> None:
    make_store(tmp_path, aged=True)
    store = BlobStore(tmp_path / "store")
    index = Index(tmp_path / "store" / "index.sqlite")
    passes, failures = sample("sigil_gc_duration_seconds_count"), sample("sigil_gc_failures_total")
    freed = sample("sigil_gc_freed_bytes_total")
    before = time.time()
    try:
        stats = collect(store, index, 1, now=time.time())
    finally:
        index.close()
    assert stats.objects_deleted == OBJECTS
    assert sample("sigil_gc_duration_seconds_count") == passes + 1
    assert sample("sigil_gc_freed_bytes_total") == freed + stats.bytes_freed
    assert sample("sigil_gc_last_success_timestamp_seconds") >= before
    assert sample("sigil_gc_over_budget") == 0
    assert sample("sigil_gc_failures_total") == failures

    # A pass that raises (the store's directory is gone) is timed and counted as a failure;
    # the last success stays where it was.
    last = sample("sigil_gc_last_success_timestamp_seconds")
    shutil.rmtree(store.blobs_dir)
    index = Index(tmp_path / "store" / "index.sqlite")
    try:
        with pytest.raises(FileNotFoundError):
            collect(store, index, 1, now=time.time())
    finally:
        index.close()
    assert sample("sigil_gc_failures_total") == failures + 1
    assert sample("sigil_gc_duration_seconds_count") == passes + 2
    assert sample("sigil_gc_last_success_timestamp_seconds") == last


def test_gc_over_budget_gauge(tmp_path: Path) -> None:
    make_store(tmp_path)  # young objects: spared by the grace period
    store = BlobStore(tmp_path / "store")
    index = Index(tmp_path / "store" / "index.sqlite")
    try:
        stats = collect(store, index, 1, now=time.time())
    finally:
        index.close()
    assert stats.over_budget and stats.objects_deleted == 0
    assert sample("sigil_gc_over_budget") == 1
