"""``sigil serve --workers 2`` over a local store and a PostgreSQL index (no S3, no peer
endpoint): the workers of the host still share one upstream fetch per cold blob, through the
host's lease file under ``storage.root`` (the PostgreSQL lease table is for the gc lease and
for relaying replicas; a staging path means nothing on another host).

Real parts: PostgreSQL; sigil as a real process; the in-process fake upstream, whose blob
trickles out so that every client arrives while the fetch is in flight.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp.test_utils import TestServer

from tests.support.fakeupstream import FakeUpstream, sha
from tests.support.sigilproc import SigilProcess
from tests.test_workers import blob_file, close_all, pull_everywhere, run_fsck, spread_clients

MiB = 1024 * 1024


async def test_ten_clients_on_two_workers_over_postgres_make_one_upstream_fetch(
        tmp_path: Path, pg_dsn: str) -> None:
    fake = FakeUpstream()
    layer = os.urandom(8 * MiB)
    fake.add_image("library/app", "v1", [layer])
    fake.blob_delay = 0.03  # 32 chunks of 256 KiB: about a second in flight
    upstream = TestServer(fake.app(), host="127.0.0.1")
    await upstream.start_server()
    sigil = SigilProcess(tmp_path, [{"name": "docker.io", "default": True, "retries": 0,
                                     "url": str(upstream.make_url("")).rstrip("/")}],
                         workers=2,
                         extra={"index": {"backend": "postgres", "postgres": {"dsn": pg_dsn}}})
    try:
        await asyncio.to_thread(sigil.start)
        groups = await spread_clients(sigil.url, per_worker=5)
        try:
            assert sum(len(group) for group in groups.values()) == 10
            results = await pull_everywhere(sigil.url, groups, sha(layer))
        finally:
            await close_all(groups)
        assert [r for r in results if r != (len(layer), sha(layer), False)] == []
        assert fake.hits[f"GET blob {sha(layer)}"] == 1
        assert blob_file(sigil, sha(layer)).read_bytes() == layer
        assert sigil.metric("sigil_coalesced_waiters_total") >= 1
    finally:
        sigil.stop()
        await upstream.close()
    report = run_fsck(sigil)
    assert report["corrupt"] == [] and report["missing"] == []
