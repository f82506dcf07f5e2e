"""Keyed verification costs: cold latency, crypto alone, and the warm path with a cached allow.

Pushes N images, each signed with a legacy cosign ``.sig`` (ECDSA P-256), to a real
``docker-registry`` on loopback, then for each image runs the policy engine exactly as the
mirror does (``Verifier.evaluate`` over a fresh store: discovery of ``.sig``/``.att``/referrers,
blob fetches, digest checks, crypto) and reports p50/p99. Separately, the crypto part alone
(``KeyAuthority.verify_cosign_layer`` on one signature layer: base64, ECDSA verify, nothing
else) over many runs.

Warm: the same signed image served by two sigil processes, one with a key policy (cached
allow verdict) and one with no policy (verification off); manifest HEAD and GET by tag within
``tag_ttl``, 16 keep-alive connections (ApacheBench), alternating runs, ratio of medians.

    python3 -m bench.bench_verify [--images 200] [--crypto-runs 2000] [--warm-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from sigil.config import build_config
from sigil.logs import configure
from sigil.mirror import Mirror
from sigil.oci.digest import Digest
from sigil.oci.manifest import DEFAULT_ACCEPT as OCI_ACCEPT
from sigil.routing import Router
from sigil.storage import BlobStore, Index
from sigil.upstream import UpstreamClient
from sigil.verify.engine import Verifier
from sigil.verify.policy import load_policy
from tests.realparts import Layer, RealRegistry, RegistryPusher
from tests.support.sigilproc import SigilProcess
from tests.test_verify_support import SIMPLE, Signer, b64, simple_signing


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def sig_layer(signer: Signer, digest: str) -> Layer:
    payload = simple_signing(Digest.parse(digest), reference="bench.test")
    return Layer(payload, SIMPLE, {"dev.cosignproject.cosign/signature":
                                   b64(signer.sign(payload))})


async def discovery_and_verify(images: int, workdir: Path, signer: Signer) -> list[float]:
    with RealRegistry() as upstream:
        async with RegistryPusher(upstream.url) as pusher:
            digests = []
            for i in range(images):
                pushed = await pusher.make_image("bench/app", f"v{i}")
                await pusher.push_cosign_signatures("bench/app", pushed.digest,
                                                    [sig_layer(signer, pushed.digest)])
                digests.append(pushed.digest)
        key = workdir / "key.pub"
        key.write_text(signer.pem())
        policy_file = workdir / "policy.yaml"
        policy_file.write_text(yaml.safe_dump({"policies": [{
            "name": "bench", "images": ["bench.test/**"],
            "authorities": [{"name": "k", "key": {"path": str(key)}}]}]}))
        verifier = Verifier(load_policy(policy_file))
        config = build_config({"storage": {"root": str(workdir / "store")},
                               "upstreams": [{"name": "bench.test", "url": upstream.url,
                                              "default": True}]}, env={})
        store, index = BlobStore(workdir / "store"), Index(workdir / "store" / "index.sqlite")
        clients = {u.name: UpstreamClient(u) for u in config.upstreams}
        mirror = Mirror(config, store, index, clients, verifier)
        route = Router(config).resolve("bench/app")
        times = []
        try:
            for digest in digests:
                manifest = await mirror.fetch_manifest(route, digest)
                start = time.perf_counter()
                verdict = await verifier.evaluate(route.image, route.repo, manifest,
                                                  mirror.source(route))
                times.append(time.perf_counter() - start)
                if not verdict.allowed:
                    raise SystemExit(f"unexpected deny: {verdict.message}")
        finally:
            for client in clients.values():
                await client.close()
            index.close()
        return times


def ab(url: str, *, head: bool, seconds: int = 3) -> float:
    """Requests/second of ``ab -k -c16`` (HEAD with ``-i``) against ``url``."""
    argv = ["ab", "-q", "-k", "-c", "16", "-t", str(seconds), "-n", "100000000", "-s", "10",
            "-H", f"Accept: {OCI_ACCEPT}", url]
    if head:
        argv.insert(1, "-i")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=True)
    failed = re.search(r"^Failed requests:\s+(\d+)", done.stdout, re.M)
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", done.stdout, re.M)
    if (failed and int(failed.group(1))) or non2xx:
        raise SystemExit(f"ab saw failures: {done.stdout[-600:]}")
    rate = re.search(r"^Requests per second:\s+([\d.]+)", done.stdout, re.M)
    assert rate is not None, done.stdout
    return float(rate.group(1))


async def warm_ratio(runs: int, workdir: Path, signer: Signer) -> dict[str, tuple[float, float]]:
    """Median req/s with a cached allow verdict vs verification off, for HEAD and GET."""
    with RealRegistry() as upstream:
        async with RegistryPusher(upstream.url) as pusher:
            image = await pusher.make_image("bench/warm", "v1")
            await pusher.push_cosign_signatures("bench/warm", image.digest,
                                                [sig_layer(signer, image.digest)])
        key = workdir / "key.pub"
        key.write_text(signer.pem())
        policy = {"policies": [{"name": "bench", "images": ["bench.test/**"],
                                "authorities": [{"name": "k", "key": {"path": str(key)}}]}]}
        up = [{"name": "bench.test", "url": upstream.url, "default": True, "tag_ttl": "1h"}]
        servers = {"verified": SigilProcess(workdir / "on", up, policy),
                   "off": SigilProcess(workdir / "off", up, None)}
        results: dict[str, dict[str, list[float]]] = {
            m: {name: [] for name in servers} for m in ("HEAD", "GET")}
        try:
            for server in servers.values():
                server.start()
                ab(f"{server.url}/v2/bench/warm/manifests/v1", head=False, seconds=1)  # warm
            for _ in range(runs):
                for method in ("HEAD", "GET"):
                    for name, server in servers.items():
                        rate = ab(f"{server.url}/v2/bench/warm/manifests/v1",
                                  head=method == "HEAD")
                        results[method][name].append(rate)
        finally:
            for server in servers.values():
                server.stop()
        return {m: (statistics.median(r["verified"]), statistics.median(r["off"]))
                for m, r in results.items()}


def crypto_only(runs: int, signer: Signer) -> list[float]:
    from sigil.verify.keys import KeyAuthority, load_public_key

    authority = KeyAuthority("k", (load_public_key(signer.pem().encode()),))
    layer = sig_layer(signer, "sha256:" + "ab" * 32)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        authority.verify_cosign_layer(blob=layer.data, media_type=SIMPLE,
                                      annotations=layer.annotations or {})
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crypto-runs", type=int, default=2000)
    parser.add_argument("--warm-runs", type=int, default=5)
    args = parser.parse_args()
    configure("warning", "console")
    signer = Signer("p256")
    with tempfile.TemporaryDirectory(prefix="sigil-bench-verify-") as tmp:
        full = asyncio.run(discovery_and_verify(args.images, Path(tmp), signer))
    with tempfile.TemporaryDirectory(prefix="sigil-bench-warm-") as tmp:
        warm = asyncio.run(warm_ratio(args.warm_runs, Path(tmp), signer))
    crypto = crypto_only(args.crypto_runs, signer)
    print(f"{'measurement':<52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, values in (("cold keyed verification (discovery + verify)", full),
                          ("crypto only (one .sig layer, ECDSA P-256)", crypto)):
        ms = [v * 1000 for v in values]
        print(f"{label:<52} {len(ms):>5} {percentile(ms, 0.5):>8.3f} "
              f"{percentile(ms, 0.99):>8.3f} {statistics.fmean(ms):>8.3f}")
    print()
    print(f"{'warm manifest by tag, 16 conns (req/s)':<40} {'verified':>10} {'off':>10} "
          f"{'ratio':>7}  target")
    for method, (on, off) in warm.items():
        print(f"{method:<40} {on:>10.0f} {off:>10.0f} {on / off:>6.2f}x  >=0.9x")


if __name__ == "__main__":
    main()
