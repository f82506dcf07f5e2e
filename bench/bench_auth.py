"""Client authentication costs on the warm path: htpasswd and token auth vs no auth.

One real ``docker-registry`` upstream on loopback holds one image (a 64 KiB layer). Three sigil
processes serve it from their stores: ``server.auth.type`` none, htpasswd (an ``htpasswd -B``
entry at bcrypt cost 10; htpasswd's default is 5) and token (an ES256 JWT from a run-time key,
JWKS file). Each is warmed once, then ApacheBench (16 keep-alive connections) drives manifest
HEAD by tag and blob GET, every request carrying the credentials as a logged-in client does;
the three servers alternate, in a rotating order, run after run. Reported: median req/s
(min..max) and the ratio of medians to no auth (goal >= 0.9x: verified credentials are cached,
so bcrypt runs once per credential and cache_ttl, not per request); and the server's CPU time
per request, which moves less than req/s when other work shares the machine.

Also: what one uncached check costs (the first request of a client), measured in-process.

    python3 -m bench.bench_auth [--runs 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from bench.harness import cpu_seconds
from sigil.config import build_config
from sigil.oci.manifest import DEFAULT_ACCEPT
from sigil.server.auth import ClientAuth, HtpasswdVerifier, TokenVerifier, build_client_auth
from tests.realparts import RealRegistry, RegistryPusher
from tests.support.sigilproc import SigilProcess
from tests.test_auth_support import TokenIssuer, basic

REPO = "bench/auth"
USER, PASSWORD = "puller", "bench-password"
BCRYPT_COST = 10


def ab(url: str, *, head: bool, authorization: str | None, seconds: int
       ) -> tuple[float, int]:
    """(requests/second, requests completed) of ``ab -k -c16`` against ``url`` (HEAD with
    ``-i``); any failed or non-2xx response aborts the bench (a 401 would measure the wrong
    path)."""
    argv = ["ab", "-q", "-k", "-c", "16", "-t", str(seconds), "-n", "100000000", "-s", "10",
            "-H", f"Accept: {DEFAULT_ACCEPT}"]
    if authorization:
        argv += ["-H", f"Authorization: {authorization}"]
    if head:
        argv.append("-i")
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60,
                          check=True)
    failed = re.search(r"^Failed requests:\s+(\d+)", done.stdout, re.M)
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", done.stdout, re.M)
    if (failed and int(failed.group(1))) or non2xx:
        raise SystemExit(f"ab saw failures at {url}: {done.stdout[-600:]}")
    rate = re.search(r"^Requests per second:\s+([\d.]+)", done.stdout, re.M)
    complete = re.search(r"^Complete requests:\s+(\d+)", done.stdout, re.M)
    assert rate is not None and complete is not None, done.stdout
    return float(rate.group(1)), int(complete.group(1))


def measured(server: SigilProcess, url: str, *, head: bool, authorization: str | None,
             seconds: int) -> tuple[float, float]:
    """(req/s, server CPU microseconds per request) of one ab run. CPU per request moves
    far less than req/s when other work shares the machine's two cores."""
    assert server.proc is not None
    before = cpu_seconds(server.proc.pid)
    rate, complete = ab(url, head=head, authorization=authorization, seconds=seconds)
    return rate, (cpu_seconds(server.proc.pid) - before) / max(1, complete) * 1e6


def write_htpasswd(path: Path) -> Path:
    subprocess.run(["htpasswd", "-cbB", "-C", str(BCRYPT_COST), str(path), USER, PASSWORD],
                   check=True, capture_output=True, timeout=60)
    return path


def start(workdir: Path, upstream: RealRegistry, auth: dict[str, Any] | None) -> SigilProcess:
    process = SigilProcess(workdir, [{"name": "docker.io", "url": upstream.url,
                                      "default": True, "tag_ttl": "1h"}])
    if auth:
        config = yaml.safe_load(process.config_path.read_text())
        config["server"]["auth"] = auth
        process.config_path.write_text(yaml.safe_dump(config))
    return process.start()


def uncached_costs(htpasswd: Path, jwks: Path, issuer: TokenIssuer, token: str
                   ) -> dict[str, float]:
    """Milliseconds of one uncached credential check, median of 20."""
    config = build_config({"server": {"auth": {"type": "htpasswd", "htpasswd": str(htpasswd)}}},
                          env={})
    basic_verifier = HtpasswdVerifier(config.server.auth)
    token_verifier = TokenVerifier(build_config(
        {"server": {"auth": issuer.auth_config(jwks)}}, env={}).server.auth)
    results = {}
    for name, check in (("htpasswd", lambda: basic_verifier.verify(
                            basic(USER, PASSWORD), 0.0, 60.0)),
                        ("token", lambda: token_verifier.verify(f"Bearer {token}", 0.0, 60.0))):
        times = []
        for _ in range(20):
            begin = time.perf_counter()
            check()
            times.append((time.perf_counter() - begin) * 1000)
        results[name] = statistics.median(times)
    return results


async def _time_checks(gate: ClientAuth, request: Any, count: int) -> float:
    await gate.check(request)  # the one uncached check
    begin = time.perf_counter()
    for _ in range(count):
        await gate.check(request)
    return (time.perf_counter() - begin) / count * 1e6


def cached_check_costs(htpasswd: Path, jwks: Path, issuer: TokenIssuer, token: str
                       ) -> dict[str, float]:
    """Microseconds of one cached check (what every request of a logged-in client pays),
    through :meth:`ClientAuth.check` on a mocked request, median of 5 x 20000."""
    from aiohttp.test_utils import make_mocked_request


    results = {}
    for name, auth, header in (
            ("htpasswd", {"type": "htpasswd", "htpasswd": str(htpasswd)}, basic(USER, PASSWORD)),
            ("token", issuer.auth_config(jwks), f"Bearer {token}")):
        gate = build_client_auth(build_config({"server": {"auth": auth}}, env={}).server.auth)
        assert gate is not None
        request = make_mocked_request("HEAD", f"/v2/{REPO}/manifests/v1",
                                      headers={"Authorization": header})

        results[name] = statistics.median(asyncio.run(_time_checks(gate, request, 20000))
                                          for _ in range(5))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sigil-bench-auth-") as tmp, \
            RealRegistry() as upstream:
        workdir = Path(tmp)

        async def seed() -> tuple[str, str]:
            async with RegistryPusher(upstream.url) as pusher:
                pushed = await pusher.make_image(REPO, "v1", [os.urandom(64 * 1024)])
            return pushed.digest, pushed.blobs[-1]

        _, layer = asyncio.run(seed())
        htpasswd = write_htpasswd(workdir / "htpasswd")
        issuer = TokenIssuer()
        issuer.port = 9  # the realm is never contacted: the bench holds its token already
        jwks = issuer.write_jwks(workdir / "jwks.json")
        token = issuer.token(issuer.pull(REPO), exp=time.time() + 3600)
        variants: dict[str, tuple[dict[str, Any] | None, str | None]] = {
            "none": (None, None),
            "htpasswd": ({"type": "htpasswd", "htpasswd": str(htpasswd)}, basic(USER, PASSWORD)),
            "token": (issuer.auth_config(jwks), f"Bearer {token}"),
        }
        servers = {name: start(workdir / f"sigil-{name}", upstream, auth)
                   for name, (auth, _) in variants.items()}
        paths = {"HEAD manifest by tag": (f"/v2/{REPO}/manifests/v1", True),
                 "GET blob (64 KiB)": (f"/v2/{REPO}/blobs/{layer}", False)}
        results: dict[str, dict[str, list[float]]] = {p: {n: [] for n in variants}
                                                      for p in paths}
        cpu: dict[str, dict[str, list[float]]] = {p: {n: [] for n in variants} for p in paths}
        try:
            for name, server in servers.items():  # warm: manifest, verdict, blob in store
                for path, _ in paths.values():
                    ab(server.url + path, head=False, authorization=variants[name][1],
                       seconds=1)
            names = list(servers)
            for run in range(args.runs):
                # The order rotates every run, so no variant always follows the same one.
                order = names[run % len(names):] + names[:run % len(names)]
                for label, (path, head) in paths.items():
                    for name in order:
                        server = servers[name]
                        rate, micros = measured(server, server.url + path, head=head,
                                                authorization=variants[name][1],
                                                seconds=args.seconds)
                        results[label][name].append(rate)
                        cpu[label][name].append(micros)
            upstream_gets = sum(1 for r in upstream.requests() if r.path.endswith(layer))
        finally:
            for server in servers.values():
                server.stop()
        costs = uncached_costs(htpasswd, jwks, issuer, token)
        cached = cached_check_costs(htpasswd, jwks, issuer, token)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"sigil bench_auth, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, load {load}, {args.runs} runs x {args.seconds}s, "
          f"16 keep-alive connections (ab); bcrypt {bcrypt.__version__} cost {BCRYPT_COST}")
    print(f"{'req/s, median (min..max)':<24} {'none':>20} {'htpasswd':>20} {'token':>20}"
          f" {'ratio htpasswd':>15} {'ratio token':>12}  goal")
    for label, by_name in results.items():
        med = {n: statistics.median(v) for n, v in by_name.items()}
        cells = [f"{med[n]:.0f} ({min(v):.0f}..{max(v):.0f})" for n, v in by_name.items()]
        print(f"{label:<24} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} "
              f"{med['htpasswd'] / med['none']:>14.2f}x {med['token'] / med['none']:>11.2f}x"
              "  >= 0.9x")
    print(f"{'server CPU us/request':<24} {'none':>20} {'htpasswd':>20} {'token':>20}"
          f" {'none/htpasswd':>15} {'none/token':>12}")
    for label, by_name in cpu.items():
        med = {n: statistics.median(v) for n, v in by_name.items()}
        cells = [f"{med[n]:.1f} ({min(v):.1f}..{max(v):.1f})" for n, v in by_name.items()]
        print(f"{label:<24} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} "
              f"{med['none'] / med['htpasswd']:>14.2f}x {med['none'] / med['token']:>11.2f}x")
    print(f"one uncached check, median of 20: htpasswd (bcrypt cost {BCRYPT_COST}) "
          f"{costs['htpasswd']:.1f} ms, token (ES256) {costs['token']:.3f} ms; "
          f"upstream GETs of the layer during the whole run: {upstream_gets} (warm: store)")
    print(f"one cached check (every request of a logged-in client), in-process: htpasswd "
          f"{cached['htpasswd']:.2f} us, token {cached['token']:.2f} us")


if __name__ == "__main__":
    main()
