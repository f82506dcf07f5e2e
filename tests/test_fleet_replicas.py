"""Several ``sigil serve`` replicas over one SeaweedFS bucket and one PostgreSQL database,
behind a round-robin TCP balancer, in front of the real docker-registry upstream.

What a fleet promises (issue 8): real clients pull through any replica; a cold blob is fetched
from the upstream once however many clients on however many replicas ask (the lease holder
fetches and uploads, the others relay its peer endpoint); a replica killed mid-download leaves
nothing partial and the others (or a retry) finish; ``storage.s3.redirect`` answers a 307 to a
presigned URL only for blobs the gate allows; a PostgreSQL outage keeps what is in memory
serving and recovers by itself.

Cross-replica streaming goes through the real peer endpoint and client
(``sigil.server.peer``, ``sigil.upstream.peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.realparts import (
    Containerd,
    RealRegistry,
    RegistryPusher,
    podman_pull,
    shipped_client_config,
    skopeo_copy,
)
from tests.realparts.balancer import RoundRobinBalancer
from tests.realparts.fleet import TEST_BUCKET
from tests.realparts.postgres import RealPostgres
from tests.realparts.seaweed import SeaweedS3
from tests.support.sigilproc import SigilProcess, free_port

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Fleet:
    """``count`` replica processes sharing a bucket prefix and a database."""

    def __init__(self, tmp_path: Path, upstream_url: str, seaweed: SeaweedS3, dsn: str,
                 count: int, *, redirect: bool = False, workers: int = 1) -> None:
        secrets_dir = tmp_path / "secrets"
        secrets_dir.mkdir(parents=True, exist_ok=True)
        files = {"access": seaweed.access_key, "secret": seaweed.secret_key,
                 "peer": os.urandom(16).hex()}
        for name, value in files.items():
            (secrets_dir / name).write_text(value)
        prefix = f"fleet-{os.urandom(4).hex()}/"
        self.replicas: list[SigilProcess] = []
        for number in range(count):
            replica = SigilProcess(tmp_path / f"replica{number}", [
                {"name": "docker.io", "url": upstream_url, "default": True, "retries": 1}],
                workers=workers)
            config: dict[str, Any] = yaml.safe_load(replica.config_path.read_text())
            config["server"].update({
                "peer_listen": f"127.0.0.1:{free_port()}",
                "peer_secret_file": str(secrets_dir / "peer")})
            config["storage"].update({"backend": "s3", "s3": {
                "endpoint": seaweed.endpoint, "bucket": TEST_BUCKET, "prefix": prefix,
                "access_key_file": str(secrets_dir / "access"),
                "secret_key_file": str(secrets_dir / "secret"),
                "create_bucket": True, "redirect": redirect, "part_size": "5MiB"}})
            config["index"] = {"backend": "postgres", "postgres": {"dsn": dsn}}
            replica.config_path.write_text(yaml.safe_dump(config))
            self.replicas.append(replica)

    def start(self) -> None:
        """One after the other: the first creates the schema."""
        for replica in self.replicas:
            replica.start()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def backends(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", replica.port) for replica in self.replicas]

    def sigil_cli(self, command: str) -> subprocess.CompletedProcess[str]:
        """``sigil <command> --json`` with the first replica's config."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
        return subprocess.run(
            [sys.executable, "-m", "sigil", command, "--json", "--config",
             str(self.replicas[0].config_path)],
            capture_output=True, text=True, timeout=120, env=env, check=False)

    def upstream_fetches(self) -> float:
        """Cold blob fetches the replicas made from the upstream, summed over the fleet."""
        return sum(r.metric("sigil_cache_requests_total", {"kind": "blob", "result": "miss"})
                   for r in self.replicas if r.proc is not None and r.proc.poll() is None)


@contextlib.asynccontextmanager
async def running_fleet(tmp_path: Path, upstream_url: str, seaweed: SeaweedS3, dsn: str,
                        count: int = 3, **options: Any
                        ) -> AsyncIterator[tuple[Fleet, RoundRobinBalancer]]:
    fleet = Fleet(tmp_path, upstream_url, seaweed, dsn, count, **options)
    try:
        await asyncio.to_thread(fleet.start)
        async with RoundRobinBalancer(fleet.backends()) as balancer:
            yield fleet, balancer
    finally:
        await asyncio.to_thread(fleet.stop)


def _blob_gets(registry: RealRegistry, mark: int, digest: str) -> int:
    return sum(1 for r in registry.requests(since=mark)
               if r.method == "GET" and r.path.endswith(f"/blobs/{digest}"))


async def _get_blob(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
                    digest: str) -> bytes:
    """The manifest (the blob gate), then the blob, over one keep-alive connection."""
    async with session.get(f"{base}/v2/{repo}/manifests/{tag}") as response:
        assert response.status == 200, await response.text()
    async with session.get(f"{base}/v2/{repo}/blobs/{digest}") as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_real_clients_pull_through_three_replicas(
        tmp_path, real_registry, registry_pusher: RegistryPusher, unique_repo, seaweed_s3,
        pg_dsn, containerd_daemon: Containerd) -> None:
    async with running_fleet(tmp_path, real_registry.url, seaweed_s3, pg_dsn) as (
            _, balancer):
        pushed = await registry_pusher.make_image(unique_repo, "v1", media="docker")
        copy = await skopeo_copy(f"{balancer.host}/{unique_repo}:v1", tmp_path / "out")
        assert copy.digest == pushed.digest
        for blob in pushed.blobs:
            assert _sha(copy.blob(blob)) == blob
        # Again through the other replicas: from the shared store, no upstream blob GET.
        mark = real_registry.log_mark()
        for attempt in range(2):
            again = await skopeo_copy(f"{balancer.host}/{unique_repo}:v1",
                                      tmp_path / f"again{attempt}")
            assert again.digest == pushed.digest
        assert not [r for r in real_registry.requests(since=mark)
                    if "/blobs/" in r.path and r.method == "GET"]
        multi = await registry_pusher.make_multiplatform_image(unique_repo, "c1")
        digest = await containerd_daemon.pull(f"docker.io/{unique_repo}:c1",
                                              mirrors={"docker.io": f"http://{balancer.host}"})
        assert digest == multi.index.digest
        podman = await registry_pusher.make_image(unique_repo, "p1")
        conf = shipped_client_config("containers/registries.conf", balancer.host)
        image = await podman_pull(f"docker.io/{unique_repo}:p1", conf)
        assert image.digest == podman.digest
        assert all(count > 0 for count in balancer.connections)


async def test_herd_of_20_on_three_replicas_fetches_upstream_once(
        tmp_path, real_registry, registry_pusher: RegistryPusher, unique_repo, seaweed_s3,
        pg_dsn) -> None:
    layer = os.urandom(48 * MiB)
    # The upstream behind a throttle, so the download is still in flight when the herd
    # arrives and the followers really relay (with a fast upstream they would find the
    # object committed, which proves less).
    host, port = real_registry.host.split(":")
    async with RoundRobinBalancer([(host, int(port))], chunk=256 * 1024, pause=0.01) as slow:
        pushed = await registry_pusher.make_image(unique_repo, "big", [layer])
        digest = _sha(layer)
        async with running_fleet(tmp_path, f"http://{slow.host}", seaweed_s3, pg_dsn) as (
                fleet, balancer):
            mark = real_registry.log_mark()
            base = f"http://{balancer.host}"
            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                        for _ in range(20)]
            try:
                bodies = await asyncio.wait_for(asyncio.gather(
                    *(_get_blob(s, base, unique_repo, "big", digest) for s in sessions)), 240)
            finally:
                for session in sessions:
                    await session.close()
            assert all(_sha(body) == digest for body in bodies)
            assert _blob_gets(real_registry, mark, digest) == 1
            assert all(count >= 6 for count in balancer.connections)
            # The other replicas relayed the holder's stream (coalesced, not fetched).
            relayed = [r.metric("sigil_coalesced_waiters_total") for r in fleet.replicas]
            assert sum(1 for value in relayed if value > 0) >= 2
            # ... and only the lease holder uploaded it to the shared store.
            uploaders = [r for r in fleet.replicas if any(
                e.get("event") == "blob.committed" and e.get("digest") == digest
                for e in r.log_events())]
            assert len(uploaders) == 1
            report = await asyncio.to_thread(fleet.sigil_cli, "fsck")
            assert report.returncode == 0, report.stdout + report.stderr
            assert pushed.digest


async def test_two_replicas_with_two_workers_each_stream_one_upstream_fetch(
        tmp_path, real_registry, registry_pusher: RegistryPusher, unique_repo, seaweed_s3,
        pg_dsn) -> None:
    """``server.workers: 2`` on every replica: either worker of a replica may miss first,
    and a peer request lands on either worker of the holder (one SO_REUSEPORT port). The
    upstream stops after 12 of 24 MiB until every client (12, spread over the four
    processes) has 8 MiB of the body: so each streams while the holder still downloads,
    whichever process it reached, instead of waiting for the commit (before, a peer request
    on the holder's sibling found nothing, and the holder's own siblings did not follow it:
    their clients waited for the commit, up to about 55 s). Then: one upstream GET, every
    body byte-exact, one upload."""
    size, held_at, enough = 24 * MiB, 12 * MiB, 8 * MiB
    layer = os.urandom(size)
    digest = _sha(layer)
    await registry_pusher.make_image(unique_repo, "w2", [layer])
    resume = asyncio.Event()
    host, port = real_registry.host.split(":")
    async with RoundRobinBalancer([(host, int(port))], hold=(held_at, resume)) as held:
        async with running_fleet(tmp_path, f"http://{held.host}", seaweed_s3, pg_dsn,
                                 count=2, workers=2) as (fleet, balancer):
            mark = real_registry.log_mark()
            base = f"http://{balancer.host}"
            streaming = [asyncio.Event() for _ in range(12)]

            async def pull(session: aiohttp.ClientSession, streams: asyncio.Event) -> bytes:
                async with session.get(f"{base}/v2/{unique_repo}/manifests/w2") as response:
                    assert response.status == 200, await response.text()
                async with session.get(f"{base}/v2/{unique_repo}/blobs/{digest}") as response:
                    assert response.status == 200, await response.text()
                    body = bytearray()
                    async for piece in response.content.iter_chunked(256 * 1024):
                        body += piece
                        if len(body) >= enough:
                            streams.set()
                    return bytes(body)

            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                        for _ in streaming]
            try:
                pulls = [asyncio.ensure_future(pull(s, e))
                         for s, e in zip(sessions, streaming, strict=True)]
                try:
                    # A bound, not a measurement: the upstream is held until all stream.
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), 40)
                finally:
                    resume.set()
                    reached = sum(e.is_set() for e in streaming)
                bodies = await asyncio.wait_for(asyncio.gather(*pulls), 60)
            finally:
                for task in pulls:
                    task.cancel()
                for session in sessions:
                    await session.close()
            assert reached == len(streaming)
            assert all(body == layer for body in bodies)
            assert _blob_gets(real_registry, mark, digest) == 1
            assert balancer.connections == [6, 6]  # round robin: six clients per replica
            # Exactly one process (of four) uploaded it; the bucket agrees with the index.
            commits = [e for r in fleet.replicas for e in r.log_events()
                       if e.get("event") == "blob.committed" and e.get("digest") == digest]
            assert len(commits) == 1
            report = await asyncio.to_thread(fleet.sigil_cli, "fsck")
            assert report.returncode == 0, report.stdout + report.stderr


async def test_replica_killed_mid_download(tmp_path, real_registry,
                                           registry_pusher: RegistryPusher, unique_repo,
                                           seaweed_s3, pg_dsn) -> None:
    layer = os.urandom(24 * MiB)
    host, port = real_registry.host.split(":")
    async with RoundRobinBalancer([(host, int(port))], chunk=128 * 1024, pause=0.02) as slow:
        await registry_pusher.make_image(unique_repo, "k1", [layer])
        digest = _sha(layer)
        async with running_fleet(tmp_path, f"http://{slow.host}", seaweed_s3, pg_dsn) as (
                fleet, _):
            holder, others = fleet.replicas[0], fleet.replicas[1:]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{holder.url}/v2/{unique_repo}/manifests/k1") as r:
                    assert r.status == 200
                response = await session.get(f"{holder.url}/v2/{unique_repo}/blobs/{digest}")
                assert response.status == 200
                await response.content.readexactly(2 * MiB)  # the holder is fetching

                async def follower(replica: SigilProcess) -> bytes | None:
                    async with aiohttp.ClientSession() as own:
                        try:
                            return await _get_blob(own, replica.url, unique_repo, "k1", digest)
                        except (aiohttp.ClientError, asyncio.IncompleteReadError):
                            return None  # cut: the holder died before the digest matched

                followers = [asyncio.ensure_future(follower(r)) for r in others]
                await asyncio.sleep(1.0)
                holder.kill()
                with pytest.raises((aiohttp.ClientError, asyncio.IncompleteReadError)):
                    await response.read()  # cut short, never a complete body
                response.release()
                results = await asyncio.wait_for(asyncio.gather(*followers), 120)
                assert all(body is None or _sha(body) == digest for body in results)
                # A retry through a surviving replica succeeds once the lease expired.
                body: bytes | None = None
                for _ in range(60):
                    try:
                        body = await _get_blob(session, others[0].url, unique_repo, "k1",
                                               digest)
                        break
                    except (aiohttp.ClientError, AssertionError):
                        await asyncio.sleep(1.0)
                assert body is not None and _sha(body) == digest
            report = await asyncio.to_thread(fleet.sigil_cli, "fsck")
            assert report.returncode == 0, report.stdout + report.stderr
            assert '"corrupt": []' in report.stdout


async def test_redirect_only_for_allowed_blobs(tmp_path, real_registry,
                                               registry_pusher: RegistryPusher, unique_repo,
                                               seaweed_s3, pg_dsn) -> None:
    layer = os.urandom(3 * MiB)
    pushed = await registry_pusher.make_image(unique_repo, "r1", [layer])
    other = await registry_pusher.make_image(unique_repo + "-other", "r1",
                                             [os.urandom(1 * MiB)])
    digest = _sha(layer)
    async with running_fleet(tmp_path, real_registry.url, seaweed_s3, pg_dsn, count=1,
                             redirect=True) as (fleet, _):
        replica = fleet.replicas[0]
        async with aiohttp.ClientSession() as session:
            # Never a redirect before the gate passed: no manifest of this repo verified.
            async with session.get(f"{replica.url}/v2/{unique_repo}/blobs/{digest}",
                                   allow_redirects=False) as response:
                assert response.status == 404
                assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
            async with session.get(f"{replica.url}/v2/{unique_repo}/manifests/r1") as r:
                assert r.status == 200
            # Cold: streamed through sigil (and stored); then warm: a 307.
            async with session.get(f"{replica.url}/v2/{unique_repo}/blobs/{digest}",
                                   allow_redirects=False) as response:
                assert response.status == 200
                assert _sha(await response.read()) == digest
            # (The tail leaves before the upload completes: until the object is committed a
            # GET still joins the download and is streamed.)
            location = ""
            for _ in range(100):
                async with session.get(f"{replica.url}/v2/{unique_repo}/blobs/{digest}",
                                       allow_redirects=False) as response:
                    if response.status == 307:
                        location = response.headers["Location"]
                        break
                    assert response.status == 200
                    assert _sha(await response.read()) == digest
                await asyncio.sleep(0.1)
            assert location.startswith(seaweed_s3.endpoint)
            async with session.get(location) as response:
                assert response.status == 200
                assert _sha(await response.read()) == digest
            # A blob of another repository: not servable here, so no URL to it.
            foreign = other.blobs[-1]
            async with session.get(f"{replica.url}/v2/{unique_repo}/blobs/{foreign}",
                                   allow_redirects=False) as response:
                assert response.status == 404
            # HEAD and ranges are answered by sigil itself (a presigned URL is for GET).
            async with session.head(f"{replica.url}/v2/{unique_repo}/blobs/{digest}") as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) == len(layer)
        assert pushed.digest


async def test_streamed_ranges_from_the_object_store(tmp_path, real_registry,
                                                     registry_pusher: RegistryPusher,
                                                     unique_repo, seaweed_s3, pg_dsn,
                                                     ) -> None:
    layer = os.urandom(2 * MiB + 123)
    await registry_pusher.make_image(unique_repo, "g1", [layer])
    digest = _sha(layer)
    async with running_fleet(tmp_path, real_registry.url, seaweed_s3, pg_dsn, count=1) as (
            fleet, _):
        url = f"{fleet.replicas[0].url}/v2/{unique_repo}"
        async with aiohttp.ClientSession() as session:
            assert _sha(await _get_blob(session, fleet.replicas[0].url, unique_repo, "g1",
                                        digest)) == digest
            async with session.get(f"{url}/blobs/{digest}") as response:  # warm: streamed
                assert response.status == 200 and _sha(await response.read()) == digest
            async with session.get(f"{url}/blobs/{digest}",
                                   headers={"Range": "bytes=100-199"}) as response:
                assert response.status == 206
                assert response.headers["Content-Range"] == f"bytes 100-199/{len(layer)}"
                assert await response.read() == layer[100:200]
            async with session.get(f"{url}/blobs/{digest}",
                                   headers={"Range": "bytes=-10"}) as response:
                assert response.status == 206 and await response.read() == layer[-10:]
            async with session.get(f"{url}/blobs/{digest}",
                                   headers={"Range": f"bytes={len(layer) + 5}-"}) as response:
                assert response.status == 416
                assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"


@pytest.fixture
def own_postgres() -> Iterator[RealPostgres]:
    """A PostgreSQL of this test alone (it is stopped and started again)."""
    with RealPostgres() as server:
        yield server


async def test_postgres_down_while_serving(tmp_path, real_registry,
                                           registry_pusher: RegistryPusher, unique_repo,
                                           seaweed_s3, own_postgres: RealPostgres,
                                           ) -> None:
    own_postgres.psql("CREATE DATABASE outage")
    dsn = own_postgres.dsn("outage")
    layer = os.urandom(1 * MiB)
    await registry_pusher.make_image(unique_repo, "d1", [layer])
    fresh = await registry_pusher.make_image(unique_repo, "d2", [os.urandom(1 * MiB)])
    digest = _sha(layer)
    async with running_fleet(tmp_path, real_registry.url, seaweed_s3, dsn, count=1) as (
            fleet, _):
        replica = fleet.replicas[0]
        async with aiohttp.ClientSession() as session:
            assert _sha(await _get_blob(session, replica.url, unique_repo, "d1",
                                        digest)) == digest
            await asyncio.to_thread(own_postgres.stop)
            # In memory and in the store: still served.
            async with session.get(f"{replica.url}/v2/{unique_repo}/manifests/d1") as r:
                assert r.status == 200
            async with session.get(f"{replica.url}/v2/{unique_repo}/blobs/{digest}") as r:
                assert r.status == 200 and _sha(await r.read()) == digest
            # New work needs the index: 503 UNAVAILABLE, not a hang or a traceback.
            async with session.get(f"{replica.url}/v2/{unique_repo}/manifests/d2") as r:
                assert r.status == 503
                assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
            await asyncio.to_thread(own_postgres.start)
            status = 0
            for _ in range(40):  # recovers by itself (the pool reconnects)
                async with session.get(f"{replica.url}/v2/{unique_repo}/manifests/d2") as r:
                    status = r.status
                if status == 200:
                    break
                await asyncio.sleep(0.5)
            assert status == 200
        assert fresh.digest


async def test_fleet_gc_and_fsck_cli(tmp_path, real_registry, registry_pusher: RegistryPusher,
                                     unique_repo, seaweed_s3, pg_dsn) -> None:
    layer = os.urandom(1 * MiB)
    await registry_pusher.make_image(unique_repo, "f1", [layer])
    async with running_fleet(tmp_path, real_registry.url, seaweed_s3, pg_dsn, count=1) as (
            fleet, _):
        async with aiohttp.ClientSession() as session:
            await _get_blob(session, fleet.replicas[0].url, unique_repo, "f1", _sha(layer))
        fsck = await asyncio.to_thread(fleet.sigil_cli, "fsck")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert '"objects_checked": ' in fsck.stdout and '"objects_checked": 0' not in fsck.stdout
        gc = await asyncio.to_thread(fleet.sigil_cli, "gc")
        assert gc.returncode == 0, gc.stdout + gc.stderr
        assert '"ran": true' in gc.stdout


def test_serve_with_postgres_down_exits_2_with_one_line(tmp_path: Path) -> None:
    from tests.realparts._process import DEAD_PORT

    config = tmp_path / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "storage": {"root": str(tmp_path / "store")},
        "index": {"backend": "postgres",
                  "postgres": {"dsn": f"postgresql://sigil:pw-never-shown@127.0.0.1:{DEAD_PORT}/x"}},
        "upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    result = subprocess.run([sys.executable, "-m", "sigil", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PostgreSQL" in lines[0], result.stderr
    assert "pw-never-shown" not in result.stderr + result.stdout
