"""S3 store specifics the contract suite cannot state for both backends: the memory bound of a
streamed upload, the key layout in the bucket, and what the cold download's scratch feeder
(``Download._upload_scratch``) relies on when it vouches for the digest instead of letting the
upload hash again."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sigil.config import S3Config
from sigil.downloads import Download
from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore
from sigil.storage.s3 import S3ObjectStore, S3Upload

MiB = 1024 * 1024


@pytest.mark.parametrize("whole_parts", [False, True])
async def test_streamed_upload_memory_is_bounded_by_parts(s3_config: S3Config,
                                                          whole_parts: bool) -> None:
    """A 40 MiB blob in 5 MiB parts: Python's peak allocation during the upload is bounded by
    the parts in flight (each held twice while aiohttp sends it: sigil's bytes and the
    transport's copy) plus the one filling, far below the blob's size. Both write shapes:
    1 MiB writes cut into parts, and whole-part writes sent as they are (the scratch feeder's,
    which also leaves the hashing to the caller)."""
    store = await S3ObjectStore.open(s3_config)
    block = os.urandom(MiB)
    chunks = [i.to_bytes(4, "big") + block[4:] for i in range(40)]
    digest = Digest.of(b"".join(chunks))
    if whole_parts:
        per = s3_config.part_size // MiB
        chunks = [b"".join(chunks[at:at + per]) for at in range(0, 40, per)]
    try:
        tracemalloc.start()
        try:
            session = await store.begin_upload(digest)
            if whole_parts:
                session.hash_by_caller()
                session.vouch(digest, 40 * MiB)
            for chunk in chunks:
                await session.write(chunk)
            await session.commit()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        parts = 2 * s3_config.upload_concurrency + 1
        assert peak < parts * s3_config.part_size + 2 * MiB, peak
        assert await store.size(digest) == 40 * MiB
        assert await store.hash_object(digest) == digest
    finally:
        await store.close()


async def test_key_layout(s3_config: S3Config) -> None:
    store = await S3ObjectStore.open(s3_config)
    try:
        data = b"layout"
        digest = Digest.of(data)
        await store.put_bytes(digest, data)
        listed = await store.client.list_objects_v2(Bucket=s3_config.bucket,
                                                    Prefix=s3_config.prefix)
        keys = [item["Key"] for item in listed.get("Contents", [])]
        assert keys == [f"{s3_config.prefix}blobs/sha256/{digest.hex[:2]}/{digest.hex}"]
        assert await store.quarantine(digest)
        listed = await store.client.list_objects_v2(Bucket=s3_config.bucket,
                                                    Prefix=s3_config.prefix)
        assert [item["Key"] for item in listed.get("Contents", [])] == [
            f"{s3_config.prefix}quarantine/{digest.hex}"]
        assert not await store.has(digest)
    finally:
        await store.close()


async def test_cleanup_spares_uploads_with_a_live_lease(s3_config: S3Config, pg_dsn: str) -> None:
    """With ``keep`` = "a live fetch lease exists", cleanup aborts only the dead replica's
    upload, even with no age bound."""
    from sigil.storage.pgindex import PgIndex

    store = await S3ObjectStore.open(s3_config)
    index = await PgIndex.open(pg_dsn)
    try:
        live, dead = Digest.of(b"live"), Digest.of(b"dead")
        sessions = [await store.begin_upload(d) for d in (live, dead)]
        for session in sessions:
            await session.write(bytes(s3_config.part_size))  # a part: the uploads exist
        await index.acquire(live, "replica-a", "http://a", ttl=60)

        async def leased(digest: Digest) -> bool:
            return await index.current(digest) is not None

        assert len(await store.pending_uploads()) == 2
        assert await store.cleanup_abandoned(0, keep=leased) == 1
        remaining = await store.pending_uploads()
        assert [p.name.split(" ")[0] for p in remaining] == [store.key(live)]
        for session in sessions:
            await session.abort()
        assert await store.pending_uploads() == []
    finally:
        await store.close()
        await index.close()


class _Body:
    """An upstream body from memory (only the local scratch file is the fault here)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size: int | None = len(data)

    async def iter_chunks(self, chunk: int = MiB) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), chunk):
            yield self.data[at:at + chunk]


class _PausingStore:
    """The real S3 store, whose upload session holds its first write until the download is
    verified and runs ``on_second_write`` before the second (when the feeder has already
    seen the verification): a slow bucket, so the test can act between hash and upload."""

    def __init__(self, store: S3ObjectStore) -> None:
        self.store = store
        self.download: Download | None = None
        self.on_second_write: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def begin_upload(self, expected: Digest) -> Any:
        session = await self.store.begin_upload(expected)
        outer = self
        writes = 0

        class Session:
            def __getattr__(self, name: str) -> Any:
                return getattr(session, name)

            async def write(self, data: bytes) -> None:
                nonlocal writes
                writes += 1
                assert outer.download is not None
                for _ in range(1000):
                    if outer.download.verified:
                        break
                    await asyncio.sleep(0.01)
                if writes == 2 and outer.on_second_write is not None:
                    outer.on_second_write()
                await session.write(data)

        return Session()


async def _cold_download(s3_config: S3Config, tmp_path: Path, tamper: bool
                         ) -> tuple[S3ObjectStore, Download, Digest, bytes]:
    store = await S3ObjectStore.open(s3_config)
    data = os.urandom(4 * s3_config.part_size + 123)
    digest = Digest.of(data)
    objects = _PausingStore(store)
    download = Download(digest, BlobStore(tmp_path / "scratch"), objects)  # type: ignore[arg-type]
    objects.download = download
    scratch = download.path

    def flip_last_byte() -> None:
        # Behind sigil's back, after the digest matched, before the feeder read the tail.
        fd = os.open(scratch, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([data[-1] ^ 1]), len(data) - 1)
        finally:
            os.close(fd)

    objects.on_second_write = flip_last_byte if tamper else None

    @asynccontextmanager
    async def open_blob() -> AsyncIterator[_Body]:
        yield _Body(data)

    committed: list[Digest] = []

    async def on_commit(digest: Digest, size: int) -> None:
        committed.append(digest)

    await asyncio.wait_for(download.run(open_blob, on_commit), 60)
    assert committed == ([] if tamper else [digest])
    return store, download, digest, data


async def test_scratch_feeder_uploads_the_verified_bytes_hashed_once(
        s3_config: S3Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload session is told the caller hashes (it does not hash again), and what it
    commits is exactly the blob."""
    hashing: list[bool] = []
    original = S3Upload.hash_by_caller

    def spy(self: S3Upload) -> None:
        original(self)
        hashing.append(self._hash is not None)

    monkeypatch.setattr(S3Upload, "hash_by_caller", spy)
    store, download, digest, _ = await _cold_download(s3_config, tmp_path, tamper=False)
    try:
        assert download.error is None and download.stored_remotely
        assert hashing == [False]
        assert await store.hash_object(digest) == digest
        assert await store.pending_uploads() == []
    finally:
        await store.close()


async def test_scratch_file_changed_after_verification_is_not_committed(
        s3_config: S3Config, tmp_path: Path) -> None:
    """A byte of the scratch file flipped after the download's hash matched and before the
    feeder uploaded it: the upload is aborted (ctime tripwire), nothing appears under the
    digest, and the download reports the failure."""
    store, download, digest, _ = await _cold_download(s3_config, tmp_path, tamper=True)
    try:
        assert isinstance(download.error, StorageError)
        assert "changed after it was verified" in str(download.error)
        assert not await store.has(digest)
        assert await store.pending_uploads() == []
    finally:
        await store.close()
