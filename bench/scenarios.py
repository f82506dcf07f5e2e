"""The five scenarios of tracker issue 2, sigil against distribution on the same machine.

Each scenario alternates the order of the two systems from run to run (so a burst of noise on
this shared machine does not always hit the same one), reports medians with their min..max
band, and compares medians as ratios.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.realparts import RealRegistry
from tests.support.sigilproc import SigilProcess

from . import profile
from .harness import (
    Image,
    MiB,
    Sample,
    SendfileServer,
    ThrottledLink,
    ab_head,
    cpu_seconds,
    curl_get,
    curl_many,
    expect_ok,
    file_digest,
    live_children,
    proc_status,
    proxy_has_blob,
    running_proxy,
    running_sigil,
    seed_upstream,
    settled_upstream_count,
    start_sigil,
    upstream_requests,
    wait_for,
)

MB = 1_000_000
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Params:
    """Sizes and repetitions of one bench mode."""

    mode: str
    big: int               # blob of scenarios 1-3
    huge: int              # blob of scenario 5
    warm_runs: int
    cold_runs: int
    conc_runs: int
    clients: int
    head_runs: int
    head_seconds: float
    rss_runs: int
    wan_size: int          # blob of scenario 3w (upstream behind a throttled link)
    wan_rate: int          # bytes/s of that link, shared by all connections
    wan_runs: int          # sigil runs (distribution: one; its herd takes clients+1 times longer)
    probe_tries: int = 3   # fresh-store --workers 2 start-up attempts (scenario 4 note)
    profile: bool = False
    verify_bodies: bool = False   # write bodies to files and check their sha256 (smoke test)


FULL = Params("full", 256 * MiB, 1024 * MiB, warm_runs=15, cold_runs=5, conc_runs=3,
              clients=20, head_runs=5, head_seconds=4.0, rss_runs=2, wan_size=64 * MiB,
              wan_rate=32 * MiB, wan_runs=3, profile=True)
QUICK = Params("quick", 64 * MiB, 256 * MiB, warm_runs=7, cold_runs=3, conc_runs=3,
               clients=20, head_runs=3, head_seconds=2.0, rss_runs=1, wan_size=16 * MiB,
               wan_rate=32 * MiB, wan_runs=2)
SMOKE = Params("smoke", 1 * MiB, 2 * MiB, warm_runs=2, cold_runs=2, conc_runs=2,
               clients=5, head_runs=1, head_seconds=1.0, rss_runs=1, wan_size=1 * MiB,
               wan_rate=8 * MiB, wan_runs=1, probe_tries=1, verify_bodies=True)


@dataclass
class Row:
    """One line of the results table."""

    key: str
    what: str
    sigil: str
    dist: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""   # "met", "MISSED" or "" (no target)
    note: str = ""


def _size(n: int) -> str:
    return f"{n // 1024 // MiB} GiB" if n >= 1024 * MiB else f"{n // MiB} MiB"


def _med(sample: Sample, unit: str = "") -> str:
    return f"{_num(sample.median)}{unit} ({sample.spread()})"


def _num(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 \
        else f"{value:.2f}"


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _order(i: int, systems: list[Any]) -> list[Any]:
    """Rotate the systems by run index."""
    k = i % len(systems)
    return systems[k:] + systems[:k]


@dataclass
class Bench:
    """One bench run: an upstream seeded with the test images, then the scenarios."""

    params: Params
    workdir: Path
    log: Callable[[str], None] = print
    upstream: RealRegistry | None = None
    images: dict[str, Image] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        p = self.params
        self.upstream = RealRegistry().start()
        started = time.monotonic()
        self.images = seed_upstream(self.upstream, self.workdir,
                                    {"big": p.big, "huge": p.huge, "wan": p.wan_size})
        for image in self.images.values():
            # Read once so every later upstream read comes from the page cache, for both systems.
            expect_ok(curl_get(self.upstream.url + image.blob_path), image.blob.size,
                      "upstream warm-up")
        self.log(f"seeded upstream {self.upstream.url} with {_size(p.big)} and {_size(p.huge)} "
                 f"blobs in {time.monotonic() - started:.1f}s")
        self.raw["meta"] = machine_info(p)

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None

    @property
    def up(self) -> RealRegistry:
        assert self.upstream is not None
        return self.upstream

    @property
    def big(self) -> Image:
        return self.images["big"]

    def _outputs(self, tag: str, count: int) -> list[str] | None:
        if not self.params.verify_bodies:
            return None
        return [str(self.workdir / f"{tag}-{i}.out") for i in range(count)]

    def _check_bodies(self, outputs: list[str] | None, image: Image) -> None:
        for out in outputs or []:
            got = file_digest(Path(out))
            if got != image.blob.digest:
                raise RuntimeError(f"client body {out} has digest {got}, not {image.blob.digest}")
            Path(out).unlink()

    def _pull(self, base: str, image: Image, tag: str) -> tuple[float, float]:
        """GET the manifest (the blob gate) then the blob; (curl seconds, wall seconds)."""
        expect_ok(curl_get(base + image.manifest_path()), len_manifest(self, image),
                  f"{tag} manifest")
        outputs = self._outputs(tag, 1)
        started = time.monotonic()
        fetch = curl_get(base + image.blob_path, output=outputs[0] if outputs else "/dev/null")
        wall = time.monotonic() - started
        expect_ok(fetch, image.blob.size, f"{tag} blob")
        self._check_bodies(outputs, image)
        return fetch.seconds, wall

    # -------------------------------------------------------------------------- ceiling
    def ceiling(self) -> None:
        """curl from a bare sendfile server (no work per byte): what loopback TCP and curl
        allow on this machine, the reference every throughput number is bounded by."""
        p, image = self.params, self.big
        single, copy, conc = Sample(), Sample(), Sample()
        with SendfileServer(image.blob.path) as server, \
                SendfileServer(image.blob.path, copy=True) as copier:
            for i in range(p.warm_runs):
                for which, sample in _order(i, [(server, single), (copier, copy)]):
                    fetch = expect_ok(curl_get(which.url), image.blob.size, "ceiling")
                    sample.add(fetch.mib_per_s())
            for _ in range(p.conc_runs):
                wall, fetches = curl_many(server.url, p.clients)
                for fetch in fetches:
                    expect_ok(fetch, image.blob.size, "ceiling concurrent")
                conc.add(wall)
        self.raw["ceiling"] = {"mib_s": single.values, "copy_mib_s": copy.values,
                               "concurrent_wall_s": conc.values}
        self.rows.append(Row(
            "0", f"reference: bare sendfile server -> curl, {_size(p.big)}, MiB/s",
            _med(single), "", note=f"{p.clients} concurrent clients: {_med(conc, 's')} wall"))
        self.rows.append(Row(
            "0b", "  same, bare read/send(1 MiB) server", _med(copy), "", note=(
                "no server work per byte: loopback TCP + curl on this VM; sigil serves cached "
                "blobs by a pread(1 MiB) + send copy (sendfile is slower here), distribution by a "
                "read/write copy")))
        self.log(f"ceiling: {single.median:.0f} MiB/s; {p.clients} clients {conc.median:.2f}s")

    # -------------------------------------------------------------------------- 1. warm
    def warm(self) -> None:
        p, image = self.params, self.big
        rates = {"sigil": Sample(), "dist": Sample()}
        with running_sigil(self.up.url) as sigil, running_proxy(self.up.url) as proxy:
            bases = {"sigil": sigil.url, "dist": proxy.url}
            for name, base in bases.items():
                self._pull(base, image, f"warm-fill {name}")
            wait_for(lambda: proxy_has_blob(proxy, image.blob), 120,
                     "distribution to store the blob")
            for name, base in bases.items():
                self._pull(base, image, f"warm-up {name}")
            mark = self.up.log_mark()
            for i in range(p.warm_runs):
                for name in _order(i, ["sigil", "dist"]):
                    fetch = curl_get(bases[name] + image.blob_path)
                    rates[name].add(expect_ok(fetch, image.blob.size, f"warm {name}").mib_per_s())
            refetched = upstream_requests(self.up, mark, "GET", image.blob_path)
        ratio = rates["sigil"].median / rates["dist"].median
        self.raw["warm"] = {k: v.values for k, v in rates.items()} | {"upstream_gets": refetched}
        self.rows.append(Row(
            "1", f"warm cached {_size(p.big)} blob GET, MiB/s", _med(rates["sigil"]),
            _med(rates["dist"]), _ratio(ratio), ">= 1.0x", _verdict(ratio >= 1.0),
            f"{p.warm_runs} runs each; upstream blob GETs during warm runs: {refetched}"))
        self.log(f"1 warm: sigil {rates['sigil'].median:.0f} dist {rates['dist'].median:.0f} "
                 f"MiB/s")

    # -------------------------------------------------------------------------- 2. cold
    def cold(self) -> None:
        p, image = self.params, self.big
        rates = {"sigil": Sample(), "dist": Sample()}
        walls = {"sigil": Sample(), "dist": Sample()}
        gets: dict[str, list[int]] = {"sigil": [], "dist": []}
        for i in range(p.cold_runs):
            for name in _order(i, ["sigil", "dist"]):
                with self._fresh(name) as system:
                    mark = self.up.log_mark()
                    seconds, wall = self._pull(system.url, image, f"cold {name}")
                    if name == "dist":
                        wait_for(lambda s=system: proxy_has_blob(s, image.blob), 120,
                                 "distribution to store the blob")
                    gets[name].append(settled_upstream_count(
                        self.up, mark, "GET", image.blob_path, quiet=0.5))
                rates[name].add(image.blob.size / MiB / seconds)
                walls[name].add(wall)
        ratio = rates["sigil"].median / rates["dist"].median
        self.raw["cold"] = {"mib_s": {k: v.values for k, v in rates.items()},
                            "wall_s": {k: v.values for k, v in walls.items()},
                            "upstream_gets": gets}
        self.rows.append(Row(
            "2", f"cold pull {_size(p.big)} blob (fresh store), MiB/s", _med(rates["sigil"]),
            _med(rates["dist"]), _ratio(ratio), ">= 1.0x", _verdict(ratio >= 1.0),
            f"{p.cold_runs} runs each; upstream blob GETs per pull: sigil {_counts(gets['sigil'])}"
            f", distribution {_counts(gets['dist'])}"))
        self.log(f"2 cold: sigil {rates['sigil'].median:.0f} dist {rates['dist'].median:.0f} "
                 "MiB/s")

    def _fresh(self, name: str, upstream_url: str | None = None) -> Any:
        url = upstream_url or self.up.url
        return running_sigil(url) if name == "sigil" else running_proxy(url)

    # -------------------------------------------------------------------------- 3. herd
    def herd(self) -> None:
        p, image = self.params, self.big
        walls = {"sigil": Sample(), "dist": Sample()}
        gets: dict[str, list[int]] = {"sigil": [], "dist": []}
        hwm = Sample()
        coalesced: list[float] = []
        profiled: profile.Profile | None = None
        for i in range(p.conc_runs):
            for name in _order(i, ["sigil", "dist"]):
                with self._fresh(name) as system:
                    expect_ok(curl_get(system.url + image.manifest_path()),
                              len_manifest(self, image), f"herd {name} manifest")
                    mark = self.up.log_mark()
                    outputs = self._outputs(f"herd-{name}", p.clients)
                    wall, fetches = curl_many(system.url + image.blob_path, p.clients,
                                              outputs=outputs)
                    for fetch in fetches:
                        expect_ok(fetch, image.blob.size, f"herd {name}")
                    self._check_bodies(outputs, image)
                    if name == "dist":
                        wait_for(lambda s=system: proxy_has_blob(s, image.blob), 120,
                                 "distribution to store the blob")
                    gets[name].append(settled_upstream_count(
                        self.up, mark, "GET", image.blob_path, quiet=0.5 if name == "sigil"
                        else 1.0))
                    walls[name].add(wall)
                    if name == "sigil":
                        assert isinstance(system, SigilProcess) and system.proc is not None
                        hwm.add(proc_status(system.proc.pid, "VmHWM"))
                        coalesced.append(system.metric("sigil_coalesced_waiters_total"))
        if p.profile and profile.available():
            profiled = self._profile_herd()
        single = self.raw.get("cold", {}).get("wall_s")
        if single is None:  # scenario 2 was not run: measure the single cold pull here
            single = {"sigil": [], "dist": []}
            for name in ("sigil", "dist"):
                for _ in range(p.conc_runs):
                    with self._fresh(name) as system:
                        single[name].append(self._pull(system.url, image, f"single {name}")[1])
        single_med = {k: Sample(v).median for k, v in single.items()}
        slow = {k: walls[k].median / single_med[k] for k in walls}
        ceiling = self.raw.get("ceiling", {}).get("concurrent_wall_s")
        floor = Sample(ceiling).median / single_med["sigil"] if ceiling else float("nan")
        self.raw["herd"] = {"wall_s": {k: v.values for k, v in walls.items()},
                            "single_cold_wall_s": single, "upstream_gets": gets,
                            "sigil_vmhwm": hwm.values, "sigil_coalesced_waiters": coalesced,
                            "profile": profiled.lines(10) if profiled else None}
        ok_gets = all(n == 1 for n in gets["sigil"])
        self.rows.append(Row(
            "3a", f"{p.clients} concurrent cold clients, one {_size(p.big)} blob: upstream GETs",
            _counts(gets["sigil"]), _counts(gets["dist"]), "", "sigil = 1", _verdict(ok_gets),
            "counted in the upstream registry's access log, per run"))
        self.rows.append(Row(
            "3b", f"  wall time of the {p.clients} ÷ one cold pull", _ratio(slow["sigil"]),
            _ratio(slow["dist"]), "", "sigil <= 1.5x", _verdict(slow["sigil"] <= 1.5),
            f"{p.clients} clients: sigil {_med(walls['sigil'], 's')}, distribution "
            f"{_med(walls['dist'], 's')}; one pull: sigil {_num(single_med['sigil'])}s, "
            f"distribution {_num(single_med['dist'])}s; bare sendfile server for the "
            f"{p.clients}: {_ratio(floor)} of sigil's one pull"))
        self.rows.append(Row(
            "3c", f"  sigil peak RSS during the {p.clients} clients, MB",
            _med(Sample([v / MB for v in hwm.values])), "", "", "", "", "VmHWM"))
        self.log(f"3 herd: sigil gets {gets['sigil']} wall {walls['sigil'].median:.2f}s "
                 f"({slow['sigil']:.2f}x); dist gets {gets['dist']} wall "
                 f"{walls['dist'].median:.2f}s ({slow['dist']:.2f}x)")

    def _profile_herd(self) -> profile.Profile:
        """py-spy on sigil during one more cold 20-client run (not timed)."""
        p, image = self.params, self.big
        out = RESULTS / "profile-herd.txt"
        RESULTS.mkdir(exist_ok=True)
        with running_sigil(self.up.url) as sigil:
            assert sigil.proc is not None
            expect_ok(curl_get(sigil.url + image.manifest_path()), len_manifest(self, image),
                      "profile manifest")
            single = Sample(self.raw.get("cold", {}).get("wall_s", {}).get("sigil", [2.0]))
            spy = profile.record(sigil.proc.pid, max(2.0, 4 * single.median), out, rate=100)
            time.sleep(0.5)
            curl_many(sigil.url + image.blob_path, p.clients)
            spy.communicate(timeout=120)
        summary = profile.summarise(out)
        self.log("\n".join(["profile of sigil, 20 cold clients:", *summary.lines(10)]))
        return summary

    # -------------------------------------------------------------------------- 3d. herd, w2
    def herd_workers(self) -> None:
        """Scenario 3a with ``sigil --workers 2``: the clients' connections are spread over
        the two processes by the kernel (SO_REUSEPORT), and the fetch lease must keep the
        upstream at one GET per blob (before: up to one per worker)."""
        p, image = self.params, self.big
        gets: list[int] = []
        walls = Sample()
        for _ in range(p.conc_runs):
            with running_sigil(self.up.url, workers=2) as sigil:
                expect_ok(curl_get(sigil.url + image.manifest_path()),
                          len_manifest(self, image), "herd w2 manifest")
                mark = self.up.log_mark()
                outputs = self._outputs("herd-w2", p.clients)
                wall, fetches = curl_many(sigil.url + image.blob_path, p.clients,
                                          outputs=outputs)
                for fetch in fetches:
                    expect_ok(fetch, image.blob.size, "herd w2")
                self._check_bodies(outputs, image)
                gets.append(settled_upstream_count(self.up, mark, "GET", image.blob_path,
                                                   quiet=0.5))
                walls.add(wall)
        self.raw["herd_workers"] = {"upstream_gets": gets, "wall_s": walls.values}
        self.rows.append(Row(
            "3d", f"  same {p.clients} clients, sigil --workers 2: upstream GETs",
            _counts(gets), "", "", "sigil = 1", _verdict(all(n == 1 for n in gets)),
            f"wall of the {p.clients}: {_med(walls, 's')}; one fetch lease per blob in "
            f"<root>/leases.sqlite, the other worker streams the holder's staging file"))
        self.log(f"3d herd w2: gets {gets} wall {walls.median:.2f}s")

    # -------------------------------------------------------------------------- 3w. herd, WAN
    def herd_wan(self) -> None:
        """Scenario 3 with the upstream behind a shared throttled link (a remote registry):
        the clients' loopback is then much faster than the upstream, as in production."""
        p, image = self.params, self.images["wan"]
        single = {"sigil": Sample(), "dist": Sample()}
        walls = {"sigil": Sample(), "dist": Sample()}
        gets: dict[str, list[int]] = {"sigil": [], "dist": []}
        with ThrottledLink("127.0.0.1", self.up.port, p.wan_rate) as link:
            for i in range(p.wan_runs):
                for name in _order(i, ["sigil", "dist"]):
                    with self._fresh(name, link.url) as system:
                        single[name].add(self._pull(system.url, image, f"wan single {name}")[1])
            # distribution's herd takes about clients+1 times one pull: run it once.
            for name in ["sigil"] * p.wan_runs + ["dist"]:
                with self._fresh(name, link.url) as system:
                    expect_ok(curl_get(system.url + image.manifest_path()),
                              len_manifest(self, image), f"wan herd {name} manifest")
                    mark = self.up.log_mark()
                    outputs = self._outputs(f"wan-{name}", p.clients)
                    wall, fetches = curl_many(system.url + image.blob_path, p.clients,
                                              outputs=outputs)
                    for fetch in fetches:
                        expect_ok(fetch, image.blob.size, f"wan herd {name}")
                    self._check_bodies(outputs, image)
                    if name == "dist":
                        wait_for(lambda s=system: proxy_has_blob(s, image.blob), 300,
                                 "distribution to store the blob")
                    gets[name].append(settled_upstream_count(
                        self.up, mark, "GET", image.blob_path, quiet=0.5))
                    walls[name].add(wall)
        slow = {k: walls[k].median / single[k].median for k in walls}
        self.raw["herd_wan"] = {"single_wall_s": {k: v.values for k, v in single.items()},
                                "herd_wall_s": {k: v.values for k, v in walls.items()},
                                "upstream_gets": gets, "rate": p.wan_rate}
        link_text = f"{p.wan_rate // MiB} MiB/s"
        rates = {k: Sample([p.wan_size / MiB / v for v in single[k].values]) for k in single}
        ratio = rates["sigil"].median / rates["dist"].median
        self.rows.append(Row(
            "2w", f"cold pull over a shared {link_text} upstream link, {_size(p.wan_size)} blob, "
            "MiB/s", _med(rates["sigil"]), _med(rates["dist"]), _ratio(ratio), ">= 1.0x",
            _verdict(ratio >= 1.0),
            f"{p.wan_runs} runs each; wall time incl. curl start; distribution fetches the blob "
            f"twice per cold pull (client copy + store), both over the link"))
        self.rows.append(Row(
            "3w", f"  same over the {link_text} link, {_size(p.wan_size)} blob: wall of the "
            f"{p.clients} ÷ one cold pull", _ratio(slow["sigil"]),
            _ratio(slow["dist"]), "", "sigil <= 1.5x", _verdict(slow["sigil"] <= 1.5),
            f"upstream GETs per run: sigil {_counts(gets['sigil'])}, distribution "
            f"{_counts(gets['dist'])}; one pull: sigil {_med(single['sigil'], 's')}, "
            f"distribution {_med(single['dist'], 's')}; the {p.clients}: sigil "
            f"{_med(walls['sigil'], 's')}, distribution {_med(walls['dist'], 's')} "
            f"(distribution: 1 run of the {p.clients})"))
        self.log(f"3w herd over {link_text}: sigil {slow['sigil']:.2f}x gets {gets['sigil']}; "
                 f"dist {slow['dist']:.2f}x gets {gets['dist']}")

    # -------------------------------------------------------------------------- 4. HEAD rate
    def head(self) -> None:
        p, image = self.params, self.big
        rates: dict[str, Sample] = {}
        ceilings = Sample()
        profiled: profile.Profile | None = None
        dirs = [Path(tempfile.mkdtemp(prefix="sigil-bench-head-")) for _ in range(3)]
        procs: list[SigilProcess] = []
        fresh_w2 = self._probe_fresh_workers2(p.probe_tries)
        try:
            w1 = start_sigil(dirs[0], self.up.url)
            procs.append(w1)
            # Create the store with one worker, then start two on it: before 71bc5e7 two
            # workers on a fresh store raced to create the index (the probe above checks).
            first = start_sigil(dirs[1], self.up.url)
            expect_ok(curl_get(first.url + image.manifest_path()), len_manifest(self, image),
                      "w2 seed")
            first.stop()
            w2 = start_sigil(dirs[1], self.up.url, workers=2)
            procs.append(w2)
            quiet = start_sigil(dirs[2], self.up.url, log_level="warning")
            procs.append(quiet)
            urls = {"plain": self.up.url, "sigil w1": w1.url, "sigil w2": w2.url,
                    "sigil w1 log=warning": quiet.url}
            for name, base in urls.items():
                url = base + image.manifest_path()
                expect_ok(curl_get(url), len_manifest(self, image), f"head warm-up {name}")
                ab_head(url, seconds=1)  # warm every worker and connection path
                rates[name] = Sample()
            assert w2.proc is not None
            w2_pids = [w2.proc.pid, *live_children(w2.proc.pid)]
            splits: list[str] = []
            mark = self.up.log_mark()
            names = list(urls)
            for i in range(p.head_runs):
                for name in _order(i, names):
                    before = [cpu_seconds(pid) for pid in w2_pids]
                    result = ab_head(urls[name] + image.manifest_path(), connections=16,
                                     seconds=p.head_seconds)
                    if result.failed:
                        raise RuntimeError(f"HEAD {name}: {result.failed} failed requests")
                    rates[name].add(result.rate)
                    ceilings.add(result.client_ceiling)
                    if name == "sigil w2":
                        splits.append("/".join(
                            f"{(cpu_seconds(pid) - b) / result.seconds:.2f}"
                            for pid, b in zip(w2_pids, before, strict=True)))
            from_sigil = sum(1 for r in self.up.requests(mark)
                             if r.user_agent.startswith("sigil/"))
            if p.profile and profile.available():
                profiled = self._profile_head(w1, image)
        finally:
            for proc in procs:
                proc.stop()
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
        plain = rates["plain"].median
        self.raw["head"] = {k: v.values for k, v in rates.items()} | {
            "ab_ceiling": ceilings.values, "upstream_requests_from_sigil": from_sigil,
            "w2_worker_cpu_split": splits, "w2_workers_alive": len(w2_pids),
            "fresh_store_workers2": fresh_w2, "profile": profiled.lines(12) if profiled else None}
        what = "warm manifest HEAD by tag, 16 conns, req/s"
        for key, name in (("4a", "sigil w1"), ("4b", "sigil w2")):
            ratio = rates[name].median / plain
            self.rows.append(Row(
                key, what if key == "4a" else "  same, sigil --workers 2",
                _med(rates[name]), _med(rates["plain"]), _ratio(ratio), ">= 2.0x",
                _verdict(ratio >= 2.0),
                f"distribution = plain docker-registry serving from its own storage; ab client "
                f"ceiling ~{_num(ceilings.median)} req/s per CPU-second; upstream requests from "
                f"sigil during the runs: {from_sigil}" if key == "4a" else
                f"{len(w2_pids)} workers alive; CPU cores used by each worker per run: "
                f"{', '.join(splits)} (one SO_REUSEPORT socket per worker); on a fresh store "
                f"--workers 2 {fresh_w2}"))
        ratio = rates["sigil w1 log=warning"].median / plain
        self.rows.append(Row(
            "4c", "  diagnostic: sigil w1 with log.level=warning", _med(
                rates["sigil w1 log=warning"]), _med(rates["plain"]), _ratio(ratio), "", "",
            f"vs w1 at the default log.level=info: "
            f"{_ratio(rates['sigil w1 log=warning'].median / rates['sigil w1'].median)}"))
        self.log("4 head: " + ", ".join(f"{k} {v.median:.0f}" for k, v in rates.items()))

    def _probe_fresh_workers2(self, tries: int = 3) -> str:
        """Does ``--workers 2`` start on an empty store? (Each process creates the index.)"""
        failures: list[str] = []
        for _ in range(tries):
            workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-w2-"))
            try:
                proc = start_sigil(workdir, self.up.url, workers=2)
            except RuntimeError as exc:
                failures.append("server exited: " + _sigil_error(str(exc)))
            else:
                time.sleep(0.3)
                assert proc.proc is not None
                if not live_children(proc.proc.pid):
                    failures.append("second worker died: " + _sigil_error(proc.logs()))
                proc.stop()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        if not failures:
            return f"started cleanly {tries} of {tries} times"
        return (f"failed {len(failures)} of {tries} times ("
                + "; ".join(sorted(set(failures))) + ")")

    def _profile_head(self, sigil: SigilProcess, image: Image) -> profile.Profile:
        out = RESULTS / "profile-head.txt"
        RESULTS.mkdir(exist_ok=True)
        assert sigil.proc is not None
        seconds = max(3.0, self.params.head_seconds)
        spy = profile.record(sigil.proc.pid, seconds, out, rate=100)
        time.sleep(0.3)
        ab_head(sigil.url + image.manifest_path(), seconds=seconds)
        spy.communicate(timeout=60)
        summary = profile.summarise(out)
        self.log("\n".join(["profile of sigil w1 under HEAD load:", *summary.lines(12)]))
        return summary

    # -------------------------------------------------------------------------- 5. RSS
    def rss(self) -> None:
        p, image = self.params, self.images["huge"]
        cold, warm, idle = Sample(), Sample(), Sample()
        for _ in range(p.rss_runs):
            workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-rss-"))
            try:
                for phase, sample in (("cold", cold), ("warm", warm)):
                    proc = start_sigil(workdir, self.up.url)
                    try:
                        assert proc.proc is not None
                        expect_ok(curl_get(proc.url + image.manifest_path()),
                                  len_manifest(self, image), f"rss {phase} manifest")
                        if phase == "cold":
                            idle.add(proc_status(proc.proc.pid, "VmHWM"))
                        self._pull(proc.url, image, f"rss {phase}")
                        sample.add(proc_status(proc.proc.pid, "VmHWM"))
                    finally:
                        proc.stop()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        with running_proxy(self.up.url) as proxy:
            self._pull(proxy.url, image, "rss distribution")
            wait_for(lambda: proxy_has_blob(proxy, image.blob), 180,
                     "distribution to store the blob")
            dist = proc_status(proxy.pid, "VmHWM")
        self.raw["rss"] = {"sigil_cold": cold.values, "sigil_warm": warm.values,
                           "sigil_before_blob": idle.values, "dist_cold": dist}
        for key, phase, sample in (("5a", "cold", cold), ("5b", "warm", warm)):
            self.rows.append(Row(
                key, f"sigil peak RSS serving a {_size(p.huge)} blob, {phase}, MB",
                f"{_num(sample.high / MB)}", f"{_num(dist / MB)}" if phase == "cold" else "",
                "", "< 150 MB", _verdict(sample.high < 150 * MB),
                f"VmHWM, worst of {p.rss_runs}; before the blob: {_num(idle.high / MB)} MB"
                + ("; distribution column: its proxy, cold pull + store" if phase == "cold"
                   else "")))
        self.log(f"5 rss: cold {cold.high / MB:.0f} MB warm {warm.high / MB:.0f} MB "
                 f"(dist {dist / MB:.0f} MB)")


def _sigil_error(text: str) -> str:
    """The ``sigil: ...`` error line of a log, without the temp path."""
    found = re.findall(r"sigil: (index \S+ is unusable: [^\n]*|[^{\n][^\n]*)", text)
    return re.sub(r"/tmp/\S+", "<store>", found[-1]) if found else "see log"


def _counts(values: list[int]) -> str:
    return ",".join(str(v) for v in values) or "-"


def len_manifest(bench: Bench, image: Image) -> int:
    """The manifest's length, fetched once from the upstream (sigil serves it byte-exact)."""
    cache = bench.raw.setdefault("_manifest_len", {})
    if image.repo not in cache:
        cache[image.repo] = curl_get(bench.up.url + image.manifest_path()).size
    return int(cache[image.repo])


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "0": Bench.ceiling, "1": Bench.warm, "2": Bench.cold, "3": Bench.herd,
    "3d": Bench.herd_workers, "3w": Bench.herd_wan, "4": Bench.head, "5": Bench.rss,
}


def machine_info(params: Params) -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (
            done.stdout or done.stderr).strip() else "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import aiohttp

    repo = Path(__file__).resolve().parent.parent
    commit = out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(repo), "status", "--porcelain", "--", "src"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": params.mode,
        "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "distribution": out(["docker-registry", "--version"]),
        "curl": out(["curl", "--version"]).split(" (")[0], "ab": out(["ab", "-V"]),
        "commit": commit + (" + uncommitted changes in src/" if dirty not in ("", "?") else ""),
    }


def with_profile(params: Params, enabled: bool) -> Params:
    return replace(params, profile=enabled)
