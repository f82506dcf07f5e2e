"""``python3 -m bench.ab_cold --base DIR [--runs 7] [--size-mib 256] [--workers 1]``:
an A/B of the cold pull, old sigil code against new, with distribution in the same rounds.

``--base DIR`` is a directory holding another checkout's ``src/`` (for example
``git archive <commit> src | tar -x -C DIR``); that sigil runs with ``PYTHONPATH=DIR/src``
(an editable install is a path entry, so PYTHONPATH wins). The systems run one after the other
in every round, the order rotated from round to round, each on a fresh store; the figures are
medians (min..max) of curl's own transfer rate, with the CPU seconds the server and the
upstream registry spent during the GET (the whole machine has 2 cores: what one system makes
the upstream do is CPU the mirror does not get). ``--herd N`` adds a round of N concurrent
clients per system and counts the upstream GETs of the blob (sigil must stay at 1).
``--workers N`` runs both sigils with ``--workers N``. ``--floor`` adds ``bench/floor_proxy.py``
(one thread doing only the receive, staging write, sha256 and send a verifying mirror cannot
drop) to the rounds: the ceiling of a one-thread design on this machine. ``--floor-mmap`` adds
``floormm`` (the floor receiving straight into its mapped, fallocated staging file) and its
control ``floor1m`` (the floor with sigil's 1 MiB reads and one write per read).

The machine schedules by autogroup (``/proc/sys/kernel/sched_autogroup_enabled``): ``nice``
only ranks processes within one session, so another session's "niced" test suite gets an
equal share of the cores. To measure beside one, run this in a session of its own with a
higher autogroup priority: ``setsid bash -c 'echo -10 > /proc/self/autogroup; python3 -m
bench.ab_cold ...'`` (root), and say so with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.realparts import RealRegistry
from tests.support.sigilproc import SigilProcess

from .harness import (
    Image,
    MiB,
    Sample,
    cpu_seconds,
    curl_get,
    curl_many,
    expect_ok,
    proxy_has_blob,
    running_proxy,
    seed_upstream,
    settled_upstream_count,
    start_sigil,
    wait_for,
)


@contextmanager
def _sigil(upstream: str, pythonpath: str | None, workers: int) -> Iterator[SigilProcess]:
    """A fresh sigil (code from ``pythonpath`` if given) on a fresh store; yields its URL."""
    workdir = Path(tempfile.mkdtemp(prefix="sigil-ab-"))
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath  # SigilProcess passes os.environ on
    try:
        proc = start_sigil(workdir, upstream, workers=workers)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _pull(base: str, image: Image, what: str, pid: int | None,
          upstream_pid: int) -> tuple[float, float, float]:
    """(MiB/s of the blob GET, CPU seconds the server process spent during it, CPU seconds
    the upstream registry spent during it)."""
    manifest = curl_get(base + image.manifest_path())
    if manifest.status != 200:
        raise RuntimeError(f"{what}: manifest HTTP {manifest.status}")
    before = cpu_seconds(pid) if pid else 0.0
    upstream_before = cpu_seconds(upstream_pid)
    fetch = expect_ok(curl_get(base + image.blob_path), image.blob.size, what)
    return (image.blob.size / MiB / fetch.seconds,
            (cpu_seconds(pid) - before) if pid else 0.0,
            cpu_seconds(upstream_pid) - upstream_before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ab_cold", description=__doc__)
    parser.add_argument("--base", required=True, help="directory with the old code's src/")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                        help="another code variant to run in the same rounds (DIR/src)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--herd", type=int, default=0, help="clients of one herd round")
    parser.add_argument("--herd-rounds", type=int, default=3,
                        help="how many of the first rounds also run the herd")
    parser.add_argument("--no-dist", action="store_true", help="sigil old vs new only")
    parser.add_argument("--floor", action="store_true",
                        help="also run bench/floor_proxy.py (the one-thread ceiling), and "
                             "floor2: the same with the sha256 on a second thread")
    parser.add_argument("--floor-mmap", action="store_true",
                        help="also run floormm: floor_proxy.py --mmap (receive into the "
                             "mapped staging file) and its control floor1m (--whole)")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50 or not 1 <= args.size_mib <= 2048 or not 0 <= args.herd <= 50:
        parser.error("--runs 1..50, --size-mib 1..2048, --herd 0..50")
    sources = {"old": str(Path(args.base).resolve() / "src"), "new": None}
    for item in args.also:
        name, _, folder = item.partition("=")
        if not name or name in ("old", "new", "dist") or not folder:
            parser.error(f"--also {item!r}: expected NAME=DIR with a new name")
        sources[name] = str(Path(folder).resolve() / "src")
    for name, src in sources.items():
        if src is not None and not Path(src, "sigil").is_dir():
            parser.error(f"{src}/sigil does not exist ({name})")
    workdir = Path(tempfile.mkdtemp(prefix="sigil-ab-data-"))
    upstream = RealRegistry().start()
    try:
        image = seed_upstream(upstream, workdir, {"ab": args.size_mib * MiB})["ab"]
        expect_ok(curl_get(upstream.url + image.blob_path), image.blob.size, "warm-up")
        systems = (list(sources) + ([] if args.no_dist else ["dist"])
                   + (["floor", "floor2"] if args.floor else [])
                   + (["floor1m", "floormm"] if args.floor_mmap else []))
        rates = {name: Sample() for name in systems}
        cpus = {name: Sample() for name in systems}
        upstream_cpus = {name: Sample() for name in systems}
        herd_gets: dict[str, list[int]] = {name: [] for name in systems}
        herd_walls = {name: Sample() for name in systems}
        for i in range(args.runs):
            k = i % len(systems)
            for name in systems[k:] + systems[:k]:
                with _system(name, upstream, sources, args.workers) as (base, proxy, pid):
                    rate, cpu, upstream_cpu = _pull(base, image, f"cold {name}", pid,
                                                    upstream.pid)
                    rates[name].add(rate)
                    cpus[name].add(cpu)
                    upstream_cpus[name].add(upstream_cpu)
                    if proxy is not None:
                        wait_for(lambda p=proxy: proxy_has_blob(p, image.blob), 120,
                                 "distribution to store the blob")
                if args.herd and i < args.herd_rounds and not name.startswith("floor"):
                    with _system(name, upstream, sources, args.workers) as (base, proxy, _):
                        manifest = curl_get(base + image.manifest_path())
                        if manifest.status != 200:
                            raise RuntimeError(f"herd {name}: manifest {manifest.status}")
                        mark = upstream.log_mark()
                        wall, fetches = curl_many(base + image.blob_path, args.herd)
                        for fetch in fetches:
                            expect_ok(fetch, image.blob.size, f"herd {name}")
                        herd_walls[name].add(wall)
                        if proxy is not None:
                            wait_for(lambda p=proxy: proxy_has_blob(p, image.blob), 120,
                                     "distribution to store the blob")
                        herd_gets[name].append(settled_upstream_count(
                            upstream, mark, "GET", image.blob_path, quiet=1.0))
            print(f"round {i + 1}: " + ", ".join(
                f"{n} {rates[n].values[-1]:.0f}" for n in systems), flush=True)
        print(f"\ncold {args.size_mib} MiB pull, workers={args.workers}, {args.runs} rounds, "
              f"load {Path('/proc/loadavg').read_text().split()[:3]}, {time.strftime('%H:%M')}")
        for name in systems:
            print(f"  {name:7} {rates[name].median:6.0f} MiB/s ({rates[name].spread()}); "
                  f"server CPU during the GET {cpus[name].median:.2f}s ({cpus[name].spread()}), "
                  f"upstream's {upstream_cpus[name].median:.2f}s")
        if "dist" in rates:
            for name in [*sources, *(n for n in systems if n.startswith("floor"))]:
                print(f"  {name} / dist = {rates[name].median / rates['dist'].median:.2f}x")
        print(f"  new / old = {rates['new'].median / rates['old'].median:.2f}x")
        if args.herd:
            for name in systems:
                print(f"  herd {args.herd} {name}: upstream GETs {herd_gets[name]}, wall "
                      f"{herd_walls[name].median:.2f}s ({herd_walls[name].spread()})")
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


@contextmanager
def _floor(upstream: str, *flags: str) -> Iterator[tuple[str, int]]:
    """bench/floor_proxy.py in its own process; yields (its URL, its pid)."""
    staging = Path(tempfile.mkdtemp(prefix="sigil-ab-floor-"))
    argv = [sys.executable, "-m", "bench.floor_proxy", upstream, str(staging)]
    proc = subprocess.Popen(argv + list(flags),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _system(name: str, upstream: RealRegistry, sources: dict[str, str | None], workers: int
            ) -> Iterator[tuple[str, RealRegistry | None, int | None]]:
    """(base URL, the proxy if it is distribution, the server pid whose CPU is measured:
    sigil's with one worker, distribution's proxy process)."""
    if name == "dist":
        with running_proxy(upstream.url) as proxy:
            yield proxy.url, proxy, proxy.pid
        return
    if name.startswith("floor"):
        flags = {"floor2": ["--hash-thread"], "floormm": ["--mmap"],
                 "floor1m": ["--whole"]}.get(name, [])
        with _floor(upstream.url, *flags) as (url, floor_pid):
            yield url, None, floor_pid
        return
    with _sigil(upstream.url, sources[name], workers) as proc:
        pid = proc.proc.pid if proc.proc is not None and workers == 1 else None
        yield proc.url, None, pid


if __name__ == "__main__":
    raise SystemExit(main())
