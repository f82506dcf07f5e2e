"""Faults of the fleet backends, on the real servers: S3 throttling and server errors (an
in-process fault proxy in front of SeaweedFS, since a real server cannot be made to answer
503 on demand), refused S3 credentials, a missing bucket, PostgreSQL down at start-up and
stopped while in use, clock skew between replicas on lease expiry, and a replica process
SIGKILLed while it holds a fetch lease and a half-sent multipart upload."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sigil.config import S3Config, build_config
from sigil.errors import StorageError, Unavailable
from sigil.oci.digest import Digest
from sigil.storage.backends import open_backends
from sigil.storage.pgindex import PgIndex
from sigil.storage.s3 import S3ObjectStore
from tests.realparts._process import DEAD_PORT
from tests.realparts.fleet import TEST_BUCKET, s3_config_for
from tests.realparts.postgres import RealPostgres
from tests.realparts.seaweed import SeaweedS3

MiB = 1024 * 1024
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "expect", "keep-alive",
                "content-encoding"}


@dataclass
class Fault:
    method: str
    status: int
    code: str
    remaining: int
    query: str = ""  # only requests whose query string contains this


@dataclass
class FaultProxy:
    """Forwards S3 requests to SeaweedFS verbatim (the Host header too, which the signature
    covers) and answers some with an S3 error instead."""

    target: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    url: str = ""

    def fail(self, method: str, times: int, status: int = 503, code: str = "SlowDown",
             query: str = "") -> None:
        self.faults.append(Fault(method, status, code, times, query))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        for fault in self.faults:
            if (fault.remaining and fault.method == request.method
                    and fault.query in request.query_string):
                fault.remaining -= 1
                self.seen.append((request.method, request.path_qs, fault.status))
                return web.Response(
                    status=fault.status, content_type="application/xml",
                    text=f"<?xml version='1.0'?><Error><Code>{fault.code}</Code>"
                         f"<Message>injected</Message></Error>")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
                request.method, self.target + request.path_qs, headers=headers, data=io.BytesIO(body),
                allow_redirects=False) as upstream:
            payload = await upstream.read()
            self.seen.append((request.method, request.path_qs, upstream.status))
            reply = {k: v for k, v in upstream.headers.items()
                     if k.lower() not in _HOP_HEADERS}
            return web.Response(status=upstream.status, headers=reply, body=io.BytesIO(payload))


@pytest.fixture
async def fault_proxy(seaweed_s3: SeaweedS3) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(seaweed_s3.endpoint)
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        await runner.cleanup()


async def _store_via(proxy: FaultProxy, seaweed_s3: SeaweedS3, prefix: str,
                     attempts: int = 3) -> S3ObjectStore:
    return await S3ObjectStore.open(s3_config_for(seaweed_s3, prefix, endpoint=proxy.url,
                                                  max_attempts=attempts))


# --- S3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"),
                                              (503, "ServiceUnavailable")])
async def test_s3_throttling_and_server_errors_are_retried(
        fault_proxy: FaultProxy, seaweed_s3: SeaweedS3, status: int, code: str) -> None:
    store = await _store_via(fault_proxy, seaweed_s3, f"faults-{code}/")
    try:
        data = b"retry me " * 1000
        digest = Digest.of(data)
        fault_proxy.fail("PUT", 2, status, code)
        await store.put_bytes(digest, data)
        puts = [entry for entry in fault_proxy.seen
                if entry[0] == "PUT" and digest.hex in entry[1]]
        assert [entry[2] for entry in puts] == [status, status, 200]
        fault_proxy.fail("GET", 2, status, code)
        assert await store.read_bytes(digest) == data
        # A multipart upload whose part uploads are refused twice still commits intact.
        big = bytes(range(256)) * (6 * MiB // 256)
        big_digest = Digest.of(big)
        fault_proxy.fail("PUT", 2, status, code, query="partNumber=")
        session = await store.begin_upload(big_digest)
        await session.write(big)
        await session.commit()
        assert await store.hash_object(big_digest) == big_digest
    finally:
        await store.close()


async def test_s3_errors_past_the_retry_budget_become_unavailable(
        fault_proxy: FaultProxy, seaweed_s3: SeaweedS3) -> None:
    store = await _store_via(fault_proxy, seaweed_s3, "faults-budget/", attempts=2)
    try:
        data = b"never stored"
        fault_proxy.fail("PUT", 2)
        with pytest.raises(Unavailable) as caught:
            await store.put_bytes(Digest.of(data), data)
        assert "SlowDown" in str(caught.value)
        assert seaweed_s3.secret_key not in str(caught.value)
        assert not await store.has(Digest.of(data))
        fault_proxy.fail("HEAD", 5, 500, "InternalError")
        with pytest.raises(Unavailable):
            await store.has(Digest.of(data))
    finally:
        await store.close()


async def test_wrong_s3_credential_names_the_key_not_the_secret(seaweed_s3: SeaweedS3) -> None:
    wrong = "definitely-not-the-secret-0123456789"
    env = {"FLEET_AK": seaweed_s3.access_key, "FLEET_SK": wrong}
    config = build_config({"storage": {"root": "/nonexistent-unused", "backend": "s3", "s3": {
        "endpoint": seaweed_s3.endpoint, "bucket": TEST_BUCKET, "access_key_env": "FLEET_AK",
        "secret_key_env": "FLEET_SK"}}}, source="fleet.yaml", env=env)
    with pytest.raises(StorageError) as caught:
        await open_backends(config)
    message = str(caught.value)
    assert "storage.s3.secret_key_env (FLEET_SK)" in message
    assert "storage.s3.access_key_env (FLEET_AK)" in message
    assert "SignatureDoesNotMatch" in message
    assert wrong not in message and seaweed_s3.secret_key not in message
    assert wrong not in repr(config) and wrong not in repr(config.storage.s3)


async def test_unknown_s3_access_key(seaweed_s3: SeaweedS3) -> None:
    settings = s3_config_for(seaweed_s3, "x/", access_key="NO-SUCH-KEY")
    with pytest.raises(StorageError, match=r"refused the credentials from storage\.s3\."):
        await S3ObjectStore.open(settings)


async def test_missing_bucket_and_dead_endpoint(seaweed_s3: SeaweedS3) -> None:
    with pytest.raises(StorageError, match=r"storage\.s3\.bucket: bucket 'sigil-absent' does "
                                           r"not exist.*create_bucket"):
        await S3ObjectStore.open(s3_config_for(seaweed_s3, "", bucket="sigil-absent",
                                               create_bucket=False))
    created = await S3ObjectStore.open(s3_config_for(seaweed_s3, "", bucket="sigil-created",
                                                     create_bucket=True))
    await created.close()
    with pytest.raises(StorageError, match=r"storage\.s3\.endpoint: cannot reach"):
        await S3ObjectStore.open(s3_config_for(seaweed_s3, "",
                                               endpoint=f"http://127.0.0.1:{DEAD_PORT}",
                                               max_attempts=1))


# --- PostgreSQL ------------------------------------------------------------------------------


async def test_postgres_down_at_startup_is_a_clear_error() -> None:
    dsn = f"postgresql://sigil:hunter2-secret@127.0.0.1:{DEAD_PORT}/sigil"
    with pytest.raises(StorageError) as caught:
        await PgIndex.open(dsn, source="index.postgres.dsn_env (SIGIL_PG_DSN)")
    message = str(caught.value)
    assert f"127.0.0.1:{DEAD_PORT}/sigil" in message
    assert "index.postgres.dsn_env (SIGIL_PG_DSN)" in message
    assert "hunter2" not in message
    # Through the configuration, as `sigil serve` will open it.
    config = build_config({"storage": {"root": "/tmp/unused-by-this-test"},
                           "index": {"backend": "postgres"}}, env={"SIGIL_PG_DSN": dsn})
    with pytest.raises(StorageError, match="SIGIL_PG_DSN") as caught:
        await open_backends(config)
    assert "hunter2" not in str(caught.value)


async def test_postgres_stopped_during_use_then_back() -> None:
    """Unavailable (never an asyncpg exception) while the server is down; the same index
    object works again once it is back, with the data kept."""
    digest = Digest.of(b"x")
    with RealPostgres() as server:
        index = await PgIndex.open(server.dsn(), max_connections=2)
        try:
            await index.put_tag("docker.io", "r", "t", digest, "m", 1.0)
            server.stop()
            for call in (index.get_tag("docker.io", "r", "t"),
                         index.acquire(digest, "a", "loc", 10),
                         index.put_blob(digest, 1)):
                with pytest.raises(Unavailable, match="index database"):
                    await call
            server.start()
            row = None
            for _ in range(20):  # bounded: the pool replaces its dead connections
                try:
                    row = await index.get_tag("docker.io", "r", "t")
                    break
                except Unavailable:
                    await asyncio.sleep(0.25)
            assert row is not None and row.digest == digest
            assert (await index.acquire(digest, "a", "loc", 10)).holder == "a"
        finally:
            await index.close()


async def test_lease_expiry_ignores_replica_clock_skew(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica A's clock runs two hours fast, B's two hours slow: neither changes who holds
    a lease or when it expires, which the database's clock alone decides."""
    a, b = await PgIndex.open(pg_dsn), await PgIndex.open(pg_dsn)
    real_time = time.time
    digest = Digest.of(b"skew")
    try:
        monkeypatch.setattr(time, "time", lambda: real_time() + 7200)  # A's view
        before = await a.database_now()
        lease = await a.acquire(digest, "replica-a", "http://a", ttl=3.0)
        after = await a.database_now()
        assert lease.holder == "replica-a"
        # The expiry is the database's now() + ttl, nowhere near A's clock (two hours off).
        assert before + 3.0 - 1e-3 <= lease.expires_at <= after + 3.0 + 1e-3
        monkeypatch.setattr(time, "time", lambda: real_time() - 7200)  # B's view
        assert (await b.acquire(digest, "replica-b", "http://b", ttl=30)).holder == "replica-a"
        monkeypatch.setattr(time, "time", lambda: real_time() + 7200)
        assert (await b.acquire(digest, "replica-b", "http://b", ttl=30)).holder == "replica-a"
        for _ in range(100):  # bounded wait for the database clock to pass the expiry
            await asyncio.sleep(0.1)
            if await b.current(digest) is None:
                break
        taken = await b.acquire(digest, "replica-b", "http://b", ttl=30)
        assert taken.holder == "replica-b"
        assert not await a.renew(digest, "replica-a", ttl=30)
    finally:
        monkeypatch.setattr(time, "time", real_time)
        await a.close()
        await b.close()


# --- a replica killed mid-download -----------------------------------------------------------

_REPLICA = r"""
import asyncio, json, os
from sigil.config import S3Config
from sigil.oci.digest import Digest
from sigil.storage.pgindex import PgIndex
from sigil.storage.s3 import S3ObjectStore

async def main():
    args = json.loads(os.environ["FLEET_REPLICA"])
    store = await S3ObjectStore.open(S3Config(**args["s3"]))
    index = await PgIndex.open(args["dsn"])
    digest = Digest.parse(args["digest"])
    lease = await index.acquire(digest, "doomed-replica", "http://doomed/peer", ttl=1.0)
    assert lease.holder == "doomed-replica"
    upload = await store.begin_upload(digest)
    await upload.write(b"\0" * (6 * 1024 * 1024))  # a full part: the multipart upload exists
    await asyncio.sleep(1.0)  # let the part upload get under way
    print("READY", flush=True)
    await asyncio.sleep(600)  # "downloading" until SIGKILLed

asyncio.run(main())
"""


async def test_killed_replica_loses_lease_and_its_upload_is_cleaned(
        s3_config: S3Config, pg_dsn: str, tmp_path: Path) -> None:
    """A real process holding a fetch lease and a half-sent multipart upload is SIGKILLed:
    nothing is visible under the digest, the lease expires by the database clock and another
    replica takes it over, and the abandoned upload is aborted by the cleanup."""
    digest = Digest.of(b"the blob the dead replica was fetching")
    env = {**os.environ, "FLEET_REPLICA": json.dumps(
        {"s3": dict(vars(s3_config)), "dsn": pg_dsn, "digest": str(digest)})}
    log = tmp_path / "replica.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _REPLICA], stdout=subprocess.PIPE,
                                stderr=out, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        lines: list[bytes] = []
        while b"READY" not in lines and len(lines) < 20:  # log lines may come first
            lines.append((await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline),
                                                 60)).strip())
        assert b"READY" in lines, (lines, log.read_text())
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    store = await S3ObjectStore.open(s3_config)
    index = await PgIndex.open(pg_dsn)
    try:
        assert not await store.has(digest)
        pending = await store.pending_uploads()
        assert [p.name.split(" ")[0] for p in pending] == [store.key(digest)]
        for _ in range(50):  # bounded: the 1 s lease expires by the database's clock
            if await index.current(digest) is None:
                break
            await asyncio.sleep(0.1)
        taken = await index.acquire(digest, "survivor", "http://survivor/peer", ttl=30)
        assert taken.holder == "survivor"
        assert await store.cleanup_abandoned(older_than=0) == 1
        assert await store.pending_uploads() == []
        assert not await store.has(digest)
    finally:
        await store.close()
        await index.close()
