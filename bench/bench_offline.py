"""Offline serving vs online serving of the same warm store (issue 7 part 3).

One image (a 64 MiB layer by default) is pulled through an online sigil from a real
``docker-registry``, which fills its store. The store is then copied and a second sigil serves
the copy with ``server.offline: true``, its upstream URL at a dead loopback port and
``tag_ttl: 1ms`` (every stored tag is past its TTL: the offline rule, not the TTL, answers).
Both run side by side; runs alternate (online, offline, then offline, online, ...):

- manifest HEAD by tag, 16 keep-alive connections (ApacheBench), req/s;
- cached blob GET with curl, MiB/s.

Ratios are offline ÷ online of the medians (1.0 = no cost for being offline).

    python3 -m bench.bench_offline [--runs 5] [--layer-mib 64]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml

from bench.harness import (
    UPSTREAM_NAME,
    MiB,
    ab_head,
    curl_get,
    expect_ok,
    seed_upstream,
    start_sigil,
)
from tests.realparts import DEAD_URL, RealRegistry
from tests.support.sigilproc import SigilProcess


def _offline_copy(online: SigilProcess, workdir: Path) -> SigilProcess:
    """A second sigil over a copy of ``online``'s store, offline, upstream at a dead port."""
    shutil.copytree(online.store, workdir / "store")
    upstreams = [{"name": UPSTREAM_NAME, "url": DEAD_URL, "default": True, "tag_ttl": "1ms"}]
    process = SigilProcess(workdir, upstreams, None,
                           extra={"log": {"level": "info", "format": "json"}})
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["offline"] = True
    config["storage"]["root"] = str(workdir / "store")
    process.config_path.write_text(yaml.safe_dump(config))
    return process.start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layer-mib", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-offline-"))
    started: list[SigilProcess] = []
    try:
        with RealRegistry() as upstream:
            image = seed_upstream(upstream, workdir, {"offline": args.layer_mib * MiB})["offline"]
            online = start_sigil(workdir / "online", upstream.url, tag_ttl="1h")
            started.append(online)
            if curl_get(online.url + image.manifest_path()).status != 200:
                raise RuntimeError("online sigil did not serve the manifest")
            expect_ok(curl_get(online.url + image.blob_path), image.blob.size, "online blob")
            online.stop()  # a quiet store to copy
            offline = _offline_copy(online, workdir / "offline")
            started.append(offline)
            online.start()
            head: dict[str, list[float]] = {"online": [], "offline": []}
            blob: dict[str, list[float]] = {"online": [], "offline": []}
            for run in range(args.runs):
                order = [("online", online), ("offline", offline)]
                for name, process in order if run % 2 == 0 else reversed(order):
                    load = ab_head(process.url + image.manifest_path())
                    if load.failed:
                        raise RuntimeError(f"{name}: {load.failed} failed HEADs")
                    head[name].append(load.rate)
                    fetch = expect_ok(curl_get(process.url + image.blob_path),
                                      image.blob.size, f"{name} blob")
                    blob[name].append(fetch.mib_per_s())
            if offline.metric("sigil_offline") != 1:
                raise RuntimeError("the offline sigil does not say it is offline")
    finally:
        for process in started:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def line(what: str, values: dict[str, list[float]]) -> str:
        on, off = statistics.median(values["online"]), statistics.median(values["offline"])
        spread = {k: f"{min(v):.0f}..{max(v):.0f}" for k, v in values.items()}
        return (f"{what:<34} online {on:8.0f} ({spread['online']})  offline {off:8.0f} "
                f"({spread['offline']})  ratio {off / on:.2f}x")

    print(f"offline vs online, same store, {args.runs} alternating runs, "
          f"{args.layer_mib} MiB layer")
    print(line("manifest HEAD by tag, req/s", head))
    print(line("cached blob GET, MiB/s", blob))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
