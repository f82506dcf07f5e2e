"""``python3 -m bench.pace [--runs 3] [--size-mib 256]``: what sets the pace of one cold pull.

For each system (sigil, distribution's proxy, bench/floor_proxy.py, its ``--hash-thread``
variant) one cold GET of a fresh blob store, sampled every 10 ms: the machine's busy share
(``/proc/stat``, all cores), and the CPU seconds of every thread of the server, the upstream
registry and curl during the GET (``/proc/PID/task/*/stat``). If both cores are busy through
the GET only less total CPU can help; if not, the busiest thread (near 100 % of the wall)
is the pace-setter. "(runq)" is the time a process's threads were runnable but waited for a
core (``/proc/PID/task/*/schedstat``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.realparts import RealRegistry

from .ab_cold import _system
from .harness import MiB, _curl_argv, _parse_curl, curl_get, seed_upstream

TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid`` (name:tid -> utime+stime)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[f"{name}:{task.name}"] = (int(fields[11]) + int(fields[12])) / TICK
        try:  # ns on the CPU, ns runnable but waiting for a CPU
            _, wait, _ = (task / "schedstat").read_text().split()
            out[f"{name}:{task.name}:wait"] = int(wait) / 1e9
        except (OSError, ValueError):
            pass
    return out


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _measure(base: str, blob_path: str, pids: dict[str, int]) -> dict[str, object]:
    start = {k: _threads(p) for k, p in pids.items()}
    m0 = _machine()
    t0 = time.monotonic()
    curl = subprocess.Popen(_curl_argv(base + blob_path), stdout=subprocess.PIPE, text=True)
    pids = {**pids, "curl": curl.pid}
    start["curl"] = {}
    last: dict[str, dict[str, float]] = {}
    busy_samples = []
    stop = threading.Event()

    def sampler() -> None:
        prev = _machine()
        while not stop.is_set():
            time.sleep(0.01)
            now = _machine()
            if now[1] > prev[1]:
                busy_samples.append((now[0] - prev[0]) / (now[1] - prev[1]))
            prev = now
            for k, p in pids.items():
                try:
                    last[k] = _threads(p)
                except OSError:
                    pass

    th = threading.Thread(target=sampler)
    th.start()
    out, _ = curl.communicate()
    wall = time.monotonic() - t0
    stop.set()
    th.join()
    for k, p in pids.items():
        if k != "curl":
            last[k] = _threads(p)
    m1 = _machine()
    fetch = _parse_curl(out)
    procs = {}
    for k in pids:
        for t, v in last.get(k, {}).items():
            d = v - start[k].get(t, 0.0)
            if d >= 0.02:
                key = f"{k}/{t.split(':')[0]}" + ("(runq)" if t.endswith(":wait") else "")
                procs[key] = procs.get(key, 0) + d
    busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    full = sum(1 for b in busy_samples if b > 0.9) / max(1, len(busy_samples))
    return {"rate": fetch.mib_per_s(), "wall": wall, "busy": busy, "full": full, "threads": procs}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.pace", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--systems", default="new,dist,floor,floor2")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sigil-pace-"))
    upstream = RealRegistry().start()
    try:
        image = seed_upstream(upstream, workdir, {"p": args.size_mib * MiB})["p"]
        curl_get(upstream.url + image.blob_path)
        names = args.systems.split(",")
        for i in range(args.runs):
            for name in names[i % len(names):] + names[:i % len(names)]:
                with _system(name, upstream, {"new": None}, 1) as (base, proxy, pid):
                    curl_get(base + image.manifest_path())
                    r = _measure(base, image.blob_path, {"srv": pid, "up": upstream.pid})
                    th = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
                        r["threads"].items(), key=lambda kv: -kv[1]))
                    print(f"{name:6} {r['rate']:5.0f} MiB/s wall {r['wall']:.2f}s machine busy "
                          f"{r['busy']*100:3.0f}% (ticks >90%: {r['full']*100:3.0f}%) | {th}",
                          flush=True)
                    if proxy is not None:
                        from .harness import proxy_has_blob, wait_for
                        wait_for(lambda p=proxy: proxy_has_blob(p, image.blob), 120, "dist")
        print("load", Path("/proc/loadavg").read_text().split()[:3])
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
