"""``python3 -m bench.bench_fleet [--runs 3] [--mib 256] [--herd 20] [--base SRC] [--no-fs]
[--no-herd] [--herd-runs 1]``: sigil replicas over S3 (SeaweedFS) + PostgreSQL against the
embedded sigil and distribution, same machine, same run.

Rows (medians with min..max over ``--runs``, each run on a fresh store; the systems of a run
go in an order rotated from run to run, so noise on the shared machine does not always hit the
same one):

- cold and warm blob GET (MiB/s, curl's own rate) through one replica on S3 + PostgreSQL,
  through filesystem + SQLite sigil, and through distribution's proxy with its ``s3`` storage
  driver on the same SeaweedFS; with ``--base SRC`` also a replica running the sigil source
  tree ``SRC`` (``PYTHONPATH``: an A/B against an older commit, e.g. ``git archive main src``).
  For each cold GET, the CPU seconds that the mirror, SeaweedFS (``weed``) and the upstream
  registry spent during it (``/proc/<pid>/stat``), and for sigil on S3 the seconds from the
  GET's start until the object was committed to the bucket (its ``blob.committed`` log line;
  distribution stores in the background after the client is served);
- the herd: ``--herd`` concurrent curls of one cold blob spread over 3 replicas by a
  round-robin TCP balancer: upstream GETs of the blob (from the upstream's access log), wall
  time, and the median time to first byte (``--herd-runs`` times; with ``--base``, base and
  this tree alternating, a fresh blob each);
- manifest HEAD by tag (ab, 16 keep-alive connections): one replica, and 3 replicas behind the
  balancer (on 2 cores the replicas share the CPU with ab and the balancer: this shows the
  overhead of the fleet path, not scaling).

Uses the realparts servers of the tests (``tests/realparts``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.realparts import RealRegistry
from tests.realparts.balancer import RoundRobinBalancer
from tests.realparts.postgres import RealPostgres
from tests.realparts.seaweed import SeaweedS3
from tests.support.sigilproc import SigilProcess, free_port

from .harness import (
    MANIFEST_ACCEPT,
    Image,
    MiB,
    Sample,
    ab_head,
    curl_get,
    expect_ok,
    seed_upstream,
    settled_upstream_count,
)

BUCKET = "sigil-bench"


class _Loop:
    """An event loop in a thread, for the asyncio balancer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class _DistributionS3(RealRegistry):
    """distribution's pull-through proxy storing in SeaweedFS (its ``s3`` driver)."""

    def __init__(self, seaweed: SeaweedS3, prefix: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seaweed, self._prefix = seaweed, prefix

    def start(self) -> _DistributionS3:
        # The AWS SDK in distribution panics on a custom CA bundle with its own transport;
        # SeaweedFS speaks plain HTTP here, so the registry runs without it.
        saved = os.environ.pop("AWS_CA_BUNDLE", None)
        try:
            super().start()
        finally:
            if saved is not None:
                os.environ["AWS_CA_BUNDLE"] = saved
        return self

    def config(self, port: int) -> dict[str, object]:
        cfg = super().config(port)
        cfg["storage"] = {
            "s3": {"accesskey": self._seaweed.access_key, "secretkey": self._seaweed.secret_key,
                   "region": "us-east-1", "regionendpoint": self._seaweed.endpoint,
                   "bucket": BUCKET, "secure": False, "v4auth": True,
                   "rootdirectory": f"/{self._prefix}"},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
            # Streamed through the registry, like sigil's default (no 307 to the bucket).
            "redirect": {"disable": True},
        }
        return cfg


def _replica(workdir: Path, upstream: str, seaweed: SeaweedS3, dsn: str, prefix: str,
             secrets: Path) -> SigilProcess:
    replica = SigilProcess(workdir, [{"name": "docker.io", "url": upstream, "default": True,
                                      "tag_ttl": "1h"}])
    config: dict[str, Any] = yaml.safe_load(replica.config_path.read_text())
    config["server"].update({"peer_listen": f"127.0.0.1:{free_port()}",
                             "peer_secret_file": str(secrets / "peer")})
    config["storage"].update({"backend": "s3", "s3": {
        "endpoint": seaweed.endpoint, "bucket": BUCKET, "prefix": prefix,
        "access_key_file": str(secrets / "access"), "secret_key_file": str(secrets / "secret"),
        "create_bucket": True}})
    config["index"] = {"backend": "postgres", "postgres": {"dsn": dsn}}
    replica.config_path.write_text(yaml.safe_dump(config))
    return replica


class Bench:
    """The servers for every row."""

    def __init__(self, workdir: Path, seaweed: SeaweedS3, postgres: RealPostgres,
                 upstream: RealRegistry) -> None:
        self.workdir, self.seaweed, self.postgres, self.upstream = (workdir, seaweed, postgres,
                                                                    upstream)
        self.secrets = workdir / "secrets"
        self.secrets.mkdir(exist_ok=True)
        for name, value in (("access", seaweed.access_key), ("secret", seaweed.secret_key),
                            ("peer", os.urandom(16).hex())):
            (self.secrets / name).write_text(value)
        self._count = 0

    @contextmanager
    def fleet(self, size: int, pythonpath: str | None = None) -> Iterator[list[SigilProcess]]:
        """``size`` replicas on a fresh prefix and database (``pythonpath``: run that sigil)."""
        self._count += 1
        name = f"bench{self._count}_{os.urandom(3).hex()}"
        self.postgres.psql(f"CREATE DATABASE {name}")
        replicas = [_replica(self.workdir / name / f"r{i}", self.upstream.url, self.seaweed,
                             self.postgres.dsn(name), f"{name}/", self.secrets)
                    for i in range(size)]
        saved = os.environ.get("PYTHONPATH")
        try:
            if pythonpath is not None:
                os.environ["PYTHONPATH"] = pythonpath  # the replicas inherit the environment
            try:
                for replica in replicas:
                    replica.start()
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
            yield replicas
        finally:
            for replica in replicas:
                replica.stop()
            self.postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    @contextmanager
    def embedded(self) -> Iterator[SigilProcess]:
        self._count += 1
        proc = SigilProcess(self.workdir / f"fs{self._count}",
                            [{"name": "docker.io", "url": self.upstream.url, "default": True,
                              "tag_ttl": "1h"}])
        try:
            yield proc.start()
        finally:
            proc.stop()

    @contextmanager
    def distribution(self) -> Iterator[RealRegistry]:
        self._count += 1
        proxy = _DistributionS3(self.seaweed, f"dist{self._count}",
                                proxy_remote_url=self.upstream.url).start()
        try:
            yield proxy
        finally:
            proxy.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ColdWarm:
    """One system's cold and warm GET of one run."""

    cold: float                 # MiB/s
    warm: float                 # MiB/s
    cpu: dict[str, float]       # CPU seconds during the cold GET, by process
    committed: float | None     # seconds from the cold GET's start to the commit (sigil)


def _cold_warm(base: str, image: Image, pids: dict[str, int],
               log: Path | None = None) -> ColdWarm:
    curl_get(base + image.manifest_path())
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    cold = expect_ok(curl_get(base + image.blob_path), image.blob.size, "cold GET")
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    committed = None
    if log is not None:
        while time.monotonic() - start < 120:
            if b'"blob.committed"' in log.read_bytes():
                committed = time.monotonic() - start
                break
            time.sleep(0.01)
    time.sleep(1.0)  # the commit (and distribution's background store) after the body
    warm = expect_ok(curl_get(base + image.blob_path), image.blob.size, "warm GET")
    return ColdWarm(cold.mib_per_s(), warm.mib_per_s(), cpu, committed)


def _ttfb_many(url: str, count: int) -> tuple[float, list[float]]:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "300", "-o", "/dev/null", "-w",
            "%{http_code} %{time_starttransfer}\n", "-H", f"Accept: {MANIFEST_ACCEPT}", url]
    start = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    first: list[float] = []
    for proc in procs:
        out, err = proc.communicate(timeout=320)
        status, ttfb = out.split()
        if status != "200":
            raise RuntimeError(f"herd GET answered {status}: {err}")
        first.append(float(ttfb))
    return time.monotonic() - start, first


def _report(results: dict[str, list[ColdWarm]]) -> None:
    for name, runs in results.items():
        if not runs:
            continue
        for what in ("cold", "warm"):
            sample = Sample([getattr(r, what) for r in runs])
            print(f"{what} {name:12s} MiB/s {sample.median:.0f} ({sample.spread()})")
        cpu = {k: Sample([r.cpu[k] for r in runs]) for k in runs[0].cpu}
        print(f"     {name:12s} CPU s during the cold GET: " + ", ".join(
            f"{k} {v.median:.2f} ({v.spread()})" for k, v in cpu.items()))
        committed = [r.committed for r in runs if r.committed is not None]
        if committed:
            done = Sample(committed)
            print(f"     {name:12s} committed to the bucket {done.median:.2f} s "
                  f"({done.spread()}) after the cold GET began")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--herd", type=int, default=20)
    parser.add_argument("--base", help="another sigil src/ tree to run as replica 'base'")
    parser.add_argument("--no-fs", action="store_true", help="skip filesystem + SQLite")
    parser.add_argument("--no-herd", action="store_true", help="skip the herd and HEAD rows")
    parser.add_argument("--herd-runs", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-fleet-"))
    loop = _Loop()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    with SeaweedS3() as seaweed, RealPostgres() as postgres, RealRegistry() as upstream:
        bench = Bench(workdir, seaweed, postgres, upstream)
        weed = seaweed._proc.pid  # type: ignore[union-attr]  # the daemon's own process

        def fleet_run(pythonpath: str | None) -> Callable[[Image], ColdWarm]:
            def one(image: Image) -> ColdWarm:
                with bench.fleet(1, pythonpath) as (replica,):
                    assert replica.proc is not None
                    return _cold_warm(replica.url, image, {
                        "sigil": replica.proc.pid, "weed": weed, "upstream": upstream.pid},
                        replica.log_path)
            return one

        def embedded_run(image: Image) -> ColdWarm:
            with bench.embedded() as proc:
                assert proc.proc is not None
                return _cold_warm(proc.url, image, {"sigil": proc.proc.pid,
                                                    "upstream": upstream.pid})

        def distribution_run(image: Image) -> ColdWarm:
            with bench.distribution() as proxy:
                return _cold_warm(proxy.url, image, {
                    "distribution": proxy.pid, "weed": weed, "upstream": upstream.pid})

        systems: dict[str, Callable[[Image], ColdWarm]] = {}
        if args.base:
            systems["base fleet"] = fleet_run(args.base)
        systems["fleet"] = fleet_run(None)
        if not args.no_fs:
            systems["fs"] = embedded_run
        systems["dist-s3"] = distribution_run
        results: dict[str, list[ColdWarm]] = {name: [] for name in systems}
        dist_error = ""
        with bench.fleet(1):
            pass  # creates the bucket, which distribution's driver needs at start-up
        names = list(systems)
        for run in range(args.runs):
            images = seed_upstream(upstream, workdir, {f"big{run}": args.mib * MiB})
            image = images[f"big{run}"]
            order = names[run % len(names):] + names[:run % len(names)]
            for name in order:
                try:
                    results[name].append(systems[name](image))
                except RuntimeError as exc:
                    if name != "dist-s3":
                        raise
                    dist_error = str(exc)[:300]
            print(f"run {run} ({', '.join(order)}), load {os.getloadavg()[0]:.2f}: " + ", ".join(
                f"{name} cold {r[-1].cold:.0f} warm {r[-1].warm:.0f}"
                for name, r in results.items() if r), flush=True)
        _report(results)
        if dist_error:
            print(f"distribution with the s3 driver failed: {dist_error}")
        if args.no_herd:
            print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            loop.close()
            return

        # The herd: with --base, base and after alternate (a fresh cold blob each time).
        variants = [("base", args.base), ("after", None)] if args.base else [("", None)]
        herds: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _ in variants}
        herd: Image | None = None
        for run in range(args.herd_runs):
            for name, pythonpath in variants if run % 2 == 0 else variants[::-1]:
                herd = seed_upstream(upstream, workdir, {f"herd{run}{name}": 64 * MiB})[
                    f"herd{run}{name}"]
                with bench.fleet(3, pythonpath) as replicas:
                    balancer = loop.run(RoundRobinBalancer(
                        [("127.0.0.1", r.port) for r in replicas]).__aenter__())
                    try:
                        base = f"http://{balancer.host}"
                        for replica in replicas:
                            curl_get(replica.url + herd.manifest_path())
                        mark = upstream.log_mark()
                        wall, first = _ttfb_many(base + herd.blob_path, args.herd)
                        gets = settled_upstream_count(upstream, mark, "GET", herd.blob_path)
                        herds[name].append((gets, wall, statistics.median(first)))
                        print(f"herd {name} of {args.herd} on 3 replicas, 64 MiB cold: upstream "
                              f"GETs {gets}, wall {wall:.2f}s, median time to first byte "
                              f"{statistics.median(first):.3f}s (max {max(first):.3f}s)",
                              flush=True)
                        if run == args.herd_runs - 1 and pythonpath is None:
                            tag_url = herd.manifest_path()
                            one = ab_head(replicas[0].url + tag_url)
                            three = ab_head(base + tag_url)
                            print(f"manifest HEAD by tag, 16 conns: 1 replica {one.rate:.0f} "
                                  f"req/s, 3 replicas behind the balancer {three.rate:.0f} "
                                  f"req/s (failed {one.failed}/{three.failed})")
                    finally:
                        loop.run(balancer.__aexit__(None, None, None))
        for name, rows in herds.items():
            walls = Sample([wall for _, wall, _ in rows])
            print(f"herd {name}: upstream GETs {[gets for gets, _, _ in rows]}, wall "
                  f"{walls.median:.2f}s ({walls.spread()})")
        assert herd is not None
        with bench.embedded() as proc:
            curl_get(proc.url + herd.manifest_path())
            embedded = ab_head(proc.url + herd.manifest_path())
            print(f"manifest HEAD by tag, 16 conns: filesystem + SQLite {embedded.rate:.0f} "
                  "req/s")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loop.close()


if __name__ == "__main__":
    main()
