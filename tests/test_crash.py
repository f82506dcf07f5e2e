"""SIGKILL during a download, then restart: the store is consistent and the blob is served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.support.fakeupstream import FakeUpstream, sha
from tests.support.sigilproc import SigilProcess


@contextlib.asynccontextmanager
async def slow_upstream(tmp_path: Path, size: int, delay: float
                        ) -> AsyncIterator[tuple[FakeUpstream, bytes, SigilProcess]]:
    """A fake upstream serving one image whose layer trickles out in 256 KiB chunks every
    ``delay`` seconds, and a (not yet started) sigil process in front of it."""
    fake = FakeUpstream()
    layer = os.urandom(size)
    fake.add_image("library/app", "v1", [layer])
    fake.blob_delay = delay
    upstream = TestServer(fake.app(), host="127.0.0.1")
    await upstream.start_server()
    upstreams = [{"name": "docker.io", "url": str(upstream.make_url("")).rstrip("/"),
                  "default": True, "retries": 0}]
    sigil = SigilProcess(tmp_path, upstreams)
    try:
        yield fake, layer, sigil
    finally:
        sigil.stop()
        await upstream.close()


async def test_sigkill_mid_download_then_restart(tmp_path: Path) -> None:
    # 32 chunks of 256 KiB at 0.05 s: about 1.6 s in flight.
    async with slow_upstream(tmp_path, 8 * 1024 * 1024, 0.05) as (fake, layer, sigil):
        await asyncio.to_thread(sigil.start)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sigil.url}/v2/app/manifests/v1") as response:
                assert response.status == 200
            got = 0
            try:
                async with session.get(f"{sigil.url}/v2/app/blobs/{sha(layer)}") as response:
                    async for chunk in response.content.iter_chunked(65536):
                        got += len(chunk)
                        if got >= 512 * 1024:
                            sigil.kill()  # mid-body: the download is half done
                            break
            except aiohttp.ClientError:
                pass
            assert 0 < got < len(layer)
            staging = list((sigil.store / "staging").iterdir())
            assert staging, "the interrupted download left its staging file"
            blob_path = sigil.store / "blobs" / "sha256" / sha(layer)[7:9] / sha(layer)[7:]
            assert not blob_path.exists(), "nothing partial is visible in the store"

            await asyncio.to_thread(sigil.start)
            assert list((sigil.store / "staging").iterdir()) == []
            async with session.get(f"{sigil.url}/v2/app/blobs/{sha(layer)}") as response:
                assert response.status == 200
                assert await response.read() == layer
        # The interrupted download was not resumed from a partial file: fetched anew, once.
        assert fake.hits[f"GET blob {sha(layer)}"] == 2
        sigil.stop()
        fsck = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sigil", "fsck", "--config", str(sigil.config_path), "--json"],
            capture_output=True, text=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        report = json.loads(fsck.stdout)
        assert report["corrupt"] == [] and report["objects_checked"] == 2 and report["missing"] == []


async def test_sigterm_drains_in_flight_download(tmp_path: Path) -> None:
    """Graceful shutdown: a download in progress finishes and is committed before exit."""
    # 16 chunks at 0.03 s: about 0.5 s in flight.
    async with slow_upstream(tmp_path, 4 * 1024 * 1024, 0.03) as (fake, layer, sigil):
        await asyncio.to_thread(sigil.start)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sigil.url}/v2/app/manifests/v1") as response:
                assert response.status == 200
            async with session.head(f"{sigil.url}/v2/app/blobs/{sha(layer)}") as response:
                # HEAD on a cold blob starts the download and answers with its size.
                assert response.status == 200
                assert int(response.headers["Content-Length"]) == len(layer)
        code = await asyncio.to_thread(sigil.stop)
        assert code == 0
        blob_path = sigil.store / "blobs" / "sha256" / sha(layer)[7:9] / sha(layer)[7:]
        assert blob_path.read_bytes() == layer
        assert fake.hits[f"GET blob {sha(layer)}"] == 1
        assert any(e.get("event") == "downloads.draining" for e in sigil.log_events())


async def test_sigkill_right_after_the_last_byte_leaves_the_whole_object_or_none(
        tmp_path: Path) -> None:
    """The tail now leaves before the commit (fsync, rename, index row): a crash right after
    the client got the whole body must leave either the complete verified object under its
    digest or nothing there (a staging file, removed at start-up), never a partial one."""
    async with slow_upstream(tmp_path, 16 * 1024 * 1024, 0.0) as (fake, layer, sigil):
        await asyncio.to_thread(sigil.start)
        blob_path = sigil.store / "blobs" / "sha256" / sha(layer)[7:9] / sha(layer)[7:]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sigil.url}/v2/app/manifests/v1") as response:
                assert response.status == 200
            async with session.get(f"{sigil.url}/v2/app/blobs/{sha(layer)}") as response:
                body = await response.read()
            sigil.kill()  # as soon as the client has the last byte
            assert body == layer
            if blob_path.exists():
                assert blob_path.read_bytes() == layer, "a partial object is visible"
            await asyncio.to_thread(sigil.start)
            assert list((sigil.store / "staging").iterdir()) == []
            async with session.get(f"{sigil.url}/v2/app/blobs/{sha(layer)}") as response:
                assert response.status == 200
                assert await response.read() == layer
        # Fetched again only if the crash came before the rename.
        assert fake.hits[f"GET blob {sha(layer)}"] in (1, 2)
        # One worker: no fetch lease table at all (the lease code is for --workers N).
        assert not (sigil.store / "leases.sqlite").exists()
        sigil.stop()
        fsck = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sigil", "fsck", "--config", str(sigil.config_path), "--json"],
            capture_output=True, text=True, timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        report = json.loads(fsck.stdout)
        assert report["corrupt"] == [] and report["missing"] == []
