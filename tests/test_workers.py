"""``sigil serve --workers 2``: one upstream fetch per cold blob across the worker processes.

The upstream is the in-process fake (it serves one large blob slowly and can send wrong bytes);
sigil runs as a real process. Which worker answers a connection is told by the request id
prefix each process puts on its responses (``X-Request-Id``), so the clients of a test are
spread over both workers on purpose, not by chance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from sigil.downloads import LEASE_TTL
from sigil.storage.lease_sqlite import FILE_NAME
from tests.support.fakeupstream import FakeUpstream, sha
from tests.support.sigilproc import SigilProcess

MiB = 1024 * 1024


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, size: int, delay: float
                      ) -> AsyncIterator[tuple[FakeUpstream, bytes, SigilProcess]]:
    """A fake upstream with one image whose layer trickles out (256 KiB every ``delay`` s)
    and a running ``sigil serve --workers 2`` in front of it."""
    fake = FakeUpstream()
    layer = os.urandom(size)
    fake.add_image("library/app", "v1", [layer])
    fake.blob_delay = delay
    upstream = TestServer(fake.app(), host="127.0.0.1")
    await upstream.start_server()
    sigil = SigilProcess(tmp_path, [{"name": "docker.io", "default": True, "retries": 0,
                                     "url": str(upstream.make_url("")).rstrip("/")}],
                         workers=2)
    try:
        await asyncio.to_thread(sigil.start)
        yield fake, layer, sigil
    finally:
        sigil.stop()
        await upstream.close()


class Client:
    """One keep-alive connection to sigil, and the worker (request id prefix) it reached."""

    def __init__(self, session: aiohttp.ClientSession, worker: str) -> None:
        self.session = session
        self.worker = worker


async def _connect(base: str) -> Client:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    async with session.get(f"{base}/v2/") as response:
        assert response.status == 200
        return Client(session, response.headers["X-Request-Id"][:8])


async def spread_clients(base: str, per_worker: int, limit: int = 64) -> dict[str, list[Client]]:
    """Open connections until each of the two workers has ``per_worker`` of them."""
    by_worker: dict[str, list[Client]] = {}
    spare: list[Client] = []
    for _ in range(limit):
        client = await _connect(base)
        group = by_worker.setdefault(client.worker, [])
        (group if len(group) < per_worker else spare).append(client)
        if len(by_worker) == 2 and all(len(g) >= per_worker for g in by_worker.values()):
            break
    for client in spare:
        await client.session.close()
    assert len(by_worker) == 2, f"every connection reached one worker: {list(by_worker)}"
    assert all(len(g) >= per_worker for g in by_worker.values())
    return by_worker


async def close_all(groups: dict[str, list[Client]]) -> None:
    for group in groups.values():
        for client in group:
            await client.session.close()


async def pull(client: Client, url: str, on_bytes: object = None) -> tuple[int, str, bool]:
    """GET a blob: (bytes received, sha256 of them, whether the transfer failed)."""
    hasher, got = hashlib.sha256(), 0
    try:
        async with client.session.get(url) as response:
            assert response.status == 200, response.status
            async for piece in response.content.iter_chunked(256 * 1024):
                hasher.update(piece)
                got += len(piece)
                if on_bytes is not None:
                    on_bytes(got)  # type: ignore[operator]
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError):
        return got, "sha256:" + hasher.hexdigest(), True
    return got, "sha256:" + hasher.hexdigest(), False


async def pull_everywhere(base: str, groups: dict[str, list[Client]],
                          digest: str) -> list[tuple[int, str, bool]]:
    """GET the manifest ``app:v1`` once (the blob gate, recorded in the shared index), then
    the blob ``digest`` from every client of every worker at once: each client's
    :func:`pull` result."""
    async with groups[next(iter(groups))][0].session.get(
            f"{base}/v2/app/manifests/v1") as response:
        assert response.status == 200
    url = f"{base}/v2/app/blobs/{digest}"
    clients = [c for group in groups.values() for c in group]
    return await asyncio.wait_for(asyncio.gather(*(pull(c, url) for c in clients)), 60)


def blob_file(sigil: SigilProcess, digest: str) -> Path:
    return sigil.store / "blobs" / "sha256" / digest[7:9] / digest[7:]


def lease_holder_pid(sigil: SigilProcess, digest: str) -> int | None:
    """The pid in the holder id (``host:pid:random``) of the digest's lease, if any."""
    with contextlib.closing(sqlite3.connect(sigil.store / FILE_NAME, timeout=5)) as db:
        row = db.execute("SELECT holder FROM fetch_leases WHERE digest = ?",
                         (digest,)).fetchone()
    return None if row is None else int(row[0].split(":")[-2])


def run_fsck(sigil: SigilProcess) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "sigil", "fsck", "--config",
                           str(sigil.config_path), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


async def test_clients_on_both_workers_share_one_upstream_fetch(tmp_path: Path) -> None:
    # 32 chunks of 256 KiB every 0.03 s: about a second in flight.
    async with two_workers(tmp_path, 8 * MiB, 0.03) as (fake, layer, sigil):
        groups = await spread_clients(sigil.url, per_worker=5)
        try:
            results = await pull_everywhere(sigil.url, groups, sha(layer))
        finally:
            await close_all(groups)
        assert [r for r in results if r != (len(layer), sha(layer), False)] == []
        assert fake.hits[f"GET blob {sha(layer)}"] == 1
        assert blob_file(sigil, sha(layer)).read_bytes() == layer
        # Each worker's clients were served: the follower's clients by coalescing too.
        coalesced = sigil.metric("sigil_coalesced_waiters_total")
        assert coalesced >= 1


async def test_wrong_bytes_on_both_workers_nothing_complete_nothing_committed(
        tmp_path: Path) -> None:
    async with two_workers(tmp_path, 4 * MiB, 0.03) as (fake, layer, sigil):
        fake.faults[sha(layer)] = "wrong-bytes"
        groups = await spread_clients(sigil.url, per_worker=3)
        try:
            results = await pull_everywhere(sigil.url, groups, sha(layer))
        finally:
            await close_all(groups)
        # Every client of both workers was cut short: none got a complete body.
        assert all(failed and got < len(layer) for got, _, failed in results), results
        assert fake.hits[f"GET blob {sha(layer)}"] == 1
        assert not blob_file(sigil, sha(layer)).exists()
    report = run_fsck(sigil)
    assert report["corrupt"] == [] and report["missing"] == []


async def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
        if "State:\tZ" in status:
            return
        await asyncio.sleep(0.05)


async def test_a_worker_killed_mid_download_loses_its_lease_and_the_next_request_fetches(
        tmp_path: Path) -> None:
    # The main blob: 64 chunks of 256 KiB every 0.05 s, about 3 s in flight.
    fake = FakeUpstream()
    layer, probe = os.urandom(16 * MiB), os.urandom(2 * MiB)
    fake.add_image("library/app", "v1", [layer, probe])
    fake.blob_delay = 0.05
    upstream = TestServer(fake.app(), host="127.0.0.1")
    await upstream.start_server()
    sigil = SigilProcess(tmp_path, [{"name": "docker.io", "default": True, "retries": 0,
                                     "url": str(upstream.make_url("")).rstrip("/")}],
                         workers=2)
    child: int | None = None
    groups: dict[str, list[Client]] = {}
    try:
        await asyncio.to_thread(sigil.start)
        assert sigil.proc is not None
        parent = sigil.proc.pid
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        assert len(children) == 1
        child = int(children[0])
        groups = await spread_clients(sigil.url, per_worker=3)
        first = groups[next(iter(groups))][0]
        async with first.session.get(f"{sigil.url}/v2/app/manifests/v1") as response:
            assert response.status == 200
        # Which worker is the parent? A HEAD on a cold blob starts its download there and
        # the lease row names the process. (Killing the child would stop the set by design;
        # killing the parent leaves the child serving alone.)
        async with first.session.head(f"{sigil.url}/v2/app/blobs/{sha(probe)}") as response:
            assert response.status == 200
        holder = lease_holder_pid(sigil, sha(probe))
        assert holder in (parent, child)
        parent_group = first.worker if holder == parent else next(
            w for w in groups if w != first.worker)
        child_group = next(w for w in groups if w != parent_group)
        await asyncio.sleep(1.0)  # let the probe finish

        url = f"{sigil.url}/v2/app/blobs/{sha(layer)}"
        killed = asyncio.Event()

        def kill_holder_mid_body(got: int) -> None:
            if got >= 2 * MiB and not killed.is_set():
                os.kill(parent, signal.SIGKILL)
                killed.set()

        holder_pull = asyncio.ensure_future(pull(groups[parent_group][0], url,
                                                 kill_holder_mid_body))
        await asyncio.sleep(0.3)  # the parent took the lease; now the child's clients join
        assert lease_holder_pid(sigil, sha(layer)) == parent
        waiters = [asyncio.ensure_future(pull(c, url)) for c in groups[child_group]]
        got, _, failed = await asyncio.wait_for(holder_pull, 60)
        assert killed.is_set() and failed and got < len(layer)
        assert not blob_file(sigil, sha(layer)).exists(), "nothing partial is visible"
        # The child's clients are cut once the dead holder's lease expires (no complete
        # unverified body, no endless wait).
        results = await asyncio.wait_for(asyncio.gather(*waiters), 4 * LEASE_TTL)
        assert all(failed and n < len(layer) for n, _, failed in results), results
        assert not blob_file(sigil, sha(layer)).exists()
        # The next request (the child is the only worker left) takes the lease over.
        retry = await _connect(sigil.url)
        try:
            assert retry.worker == child_group
            assert await asyncio.wait_for(pull(retry, url), 60) == (len(layer), sha(layer),
                                                                    False)
        finally:
            await retry.session.close()
        assert fake.hits[f"GET blob {sha(layer)}"] == 2
        deadline = time.monotonic() + 20
        while not blob_file(sigil, sha(layer)).exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert blob_file(sigil, sha(layer)).read_bytes() == layer
    finally:
        await close_all(groups)
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGTERM)
            await _wait_gone(child, 40)
        sigil.stop()
        await upstream.close()
    report = run_fsck(sigil)
    assert report["corrupt"] == [] and report["missing"] == []
