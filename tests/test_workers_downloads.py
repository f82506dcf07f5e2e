"""Single-flight across worker processes, in one process: two :class:`Downloads` tables (two
workers) on one store, each with its own connection to the SQLite lease file, fed by an
upstream body the test releases step by step."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sigil import downloads as downloads_module
from sigil.downloads import Download, Downloads
from sigil.errors import RegistryError
from sigil.oci.digest import Digest
from sigil.storage import BlobStore
from sigil.storage.contracts import FilesystemObjectStore
from sigil.storage.lease_sqlite import SqliteFetchLeases, reset_leases

CHUNK = downloads_module.READ_CHUNK


class SteppedBlob:
    """An upstream body whose chunks leave only when the test allows (``allow(n)``)."""

    def __init__(self, data: bytes, wrong: bool = False) -> None:
        self.data = bytes(reversed(data)) if wrong else data
        self.size: int | None = len(data)
        self.opens = 0
        self._allowed = 0
        self._more = asyncio.Event()

    def allow(self, chunks: int) -> None:
        self._allowed += chunks
        self._more.set()

    def open(self) -> AsyncIterator[SteppedBlob]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[SteppedBlob]:
            self.opens += 1
            yield self

        return opened()

    async def iter_chunks(self, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        for n, at in enumerate(range(0, len(self.data), chunk)):
            while n >= self._allowed:
                self._more.clear()
                await self._more.wait()
            yield self.data[at:at + chunk]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    reset_leases(tmp_path)
    return BlobStore(tmp_path)


@pytest.fixture
async def workers(store: BlobStore) -> AsyncIterator[tuple[Downloads, Downloads]]:
    leases = [SqliteFetchLeases(store.root), SqliteFetchLeases(store.root)]
    yield Downloads(store, leases[0]), Downloads(store, leases[1])
    for lease in leases:
        await lease.close()


def _commit_after(download: Download, gate: asyncio.Event) -> None:
    """Hold ``download``'s commit (fsync, rename) until ``gate`` is set: every byte is in its
    staging file and verified, the object is not committed yet."""
    commit = download.staging.commit  # type: ignore[union-attr]

    async def slow_commit(expected: Digest) -> Path:
        await gate.wait()
        return await commit(expected)

    download.staging.commit = slow_commit  # type: ignore[method-assign,union-attr]


def _committed(digest: Digest, size: int) -> None:
    """The index row callback (the mirror writes the index row here)."""


async def _read(download: Download, into: bytearray) -> None:
    await download.wait_started()
    async for piece in download.stream():
        into += piece


async def _until(condition: object, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_a_follower_streams_the_holders_file_and_gets_the_tail_after_commit(
        store: BlobStore, workers: tuple[Downloads, Downloads]) -> None:
    data = os.urandom(4 * CHUNK + 1000)
    digest = Digest(hashlib.sha256(data).hexdigest())
    blob = SteppedBlob(data)
    first, second = workers
    holder, _ = first.get_or_start(digest, blob.open, _committed)
    blob.allow(1)
    await _until(lambda: holder.written > 0, "the holder's first chunk")
    follower, _ = second.get_or_start(digest, blob.open, _committed)
    got, mine = bytearray(), bytearray()
    readers = [asyncio.ensure_future(_read(follower, got)),
               asyncio.ensure_future(_read(holder, mine))]
    blob.allow(3)  # everything but the last, short chunk
    await _until(lambda: len(got) == 4 * CHUNK, "the follower to catch up")
    assert follower.path == holder.path  # it reads the holder's staging file
    assert follower.size == len(data)  # from the lease, before the body is complete
    blob.allow(1)
    await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert bytes(got) == data and bytes(mine) == data
    assert blob.opens == 1  # one upstream fetch for both workers
    await asyncio.wait_for(holder.finished.wait(), 20)
    assert store.path(digest).read_bytes() == data
    assert follower.committed == store.path(digest)


async def test_the_follower_holds_the_last_byte_until_the_object_is_committed(
        store: BlobStore, workers: tuple[Downloads, Downloads]) -> None:
    data = os.urandom(2 * CHUNK)
    digest = Digest(hashlib.sha256(data).hexdigest())
    blob = SteppedBlob(data)
    first, second = workers
    holder, _ = first.get_or_start(digest, blob.open, _committed)
    blob.allow(1)
    await _until(lambda: holder.written > 0, "the holder's first chunk")
    follower, _ = second.get_or_start(digest, blob.open, _committed)
    got = bytearray()
    reader = asyncio.ensure_future(_read(follower, got))
    # Pretend the holder is slow to commit: every byte is in its file, not yet verified.
    gate = asyncio.Event()
    _commit_after(holder, gate)
    blob.allow(1)
    await _until(lambda: holder.verified, "the holder to verify")
    await _until(lambda: len(got) == len(data) - 1, "all but the last byte")
    await asyncio.sleep(0.3)  # the follower keeps polling, and still holds the last byte back
    assert len(got) == len(data) - 1 and not store.has(digest)
    gate.set()
    await asyncio.wait_for(reader, 20)
    assert bytes(got) == data


async def test_wrong_bytes_at_the_holder_abort_the_followers_and_commit_nothing(
        store: BlobStore, workers: tuple[Downloads, Downloads]) -> None:
    data = os.urandom(3 * CHUNK)
    digest = Digest(hashlib.sha256(data).hexdigest())
    blob = SteppedBlob(data, wrong=True)
    first, second = workers
    holder, _ = first.get_or_start(digest, blob.open, _committed)
    blob.allow(1)
    await _until(lambda: holder.written > 0, "the holder's first chunk")
    follower, _ = second.get_or_start(digest, blob.open, _committed)
    got = bytearray()
    reader = asyncio.ensure_future(_read(follower, got))
    await _until(lambda: follower.started.is_set(), "the follower to attach")
    blob.allow(10)
    with pytest.raises(RegistryError):
        await asyncio.wait_for(reader, 20)
    assert len(got) < len(data)  # never a complete body
    await asyncio.wait_for(follower.finished.wait(), 20)
    assert not store.has(digest) and blob.opens == 1
    await _until(lambda: not store.staging_entries(), "the staging files to go")


async def test_a_dead_holders_lease_expires_and_the_next_request_takes_over(
        store: BlobStore, workers: tuple[Downloads, Downloads],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads_module, "LEASE_TTL", 0.5)
    data = os.urandom(2 * CHUNK)
    digest = Digest(hashlib.sha256(data).hexdigest())
    # A worker that died mid-download: a lease it will never renew and a half-written file.
    dead = store.new_staging()
    dead.write(data[:CHUNK])
    leases = SqliteFetchLeases(store.root)
    try:
        await leases.acquire(digest, "dead-worker", str(dead.path), 0.5)
        await leases.renew(digest, "dead-worker", 0.5, size=len(data))
    finally:
        await leases.close()
    _, second = workers
    blob = SteppedBlob(data)
    blob.allow(10)
    follower, _ = second.get_or_start(digest, blob.open, _committed)
    got = bytearray()
    with pytest.raises(RegistryError, match="stopped before it was verified"):
        await asyncio.wait_for(_read(follower, got), 20)
    assert len(got) == CHUNK and blob.opens == 0 and not store.has(digest)
    await asyncio.wait_for(follower.finished.wait(), 20)
    # The next request takes the expired lease over and fetches anew.
    again, started = second.get_or_start(digest, blob.open, _committed)
    assert started
    fresh = bytearray()
    await asyncio.wait_for(_read(again, fresh), 20)
    assert bytes(fresh) == data and blob.opens == 1
    await asyncio.wait_for(again.finished.wait(), 20)
    assert store.path(digest).read_bytes() == data
    dead.abort()


async def test_a_blob_committed_by_another_worker_meanwhile_is_not_fetched_again(
        store: BlobStore, workers: tuple[Downloads, Downloads]) -> None:
    data = os.urandom(1000)
    digest = Digest(hashlib.sha256(data).hexdigest())
    store.put_bytes(digest, data)  # committed between the store check and the lease
    blob = SteppedBlob(data)
    download, _ = workers[0].get_or_start(digest, blob.open, _committed)
    got = bytearray()
    await asyncio.wait_for(_read(download, got), 20)
    assert bytes(got) == data and blob.opens == 0
    await _until(lambda: not store.staging_entries(), "the unused staging file to go")


async def test_one_worker_without_leases_releases_the_tail_once_verified(
        store: BlobStore) -> None:
    """workers = 1: no lease table at all; the tail leaves after the hash matched, and the
    commit (fsync, rename, index row) follows."""
    data = os.urandom(2 * CHUNK + 7)
    digest = Digest(hashlib.sha256(data).hexdigest())
    blob = SteppedBlob(data)
    table = Downloads(store)
    rows: list[tuple[Digest, int]] = []
    download, _ = table.get_or_start(digest, blob.open, lambda d, n: rows.append((d, n)))
    gate = asyncio.Event()
    _commit_after(download, gate)
    blob.allow(10)
    got = bytearray()
    await asyncio.wait_for(_read(download, got), 20)
    # The client has the whole verified body while the object is not committed yet.
    assert bytes(got) == data and not store.has(digest) and rows == []
    gate.set()
    await asyncio.wait_for(download.finished.wait(), 20)
    assert store.path(digest).read_bytes() == data and rows == [(digest, len(data))]


async def test_a_lease_pointing_outside_staging_is_never_opened(
        store: BlobStore, workers: tuple[Downloads, Downloads], tmp_path: Path) -> None:
    data = os.urandom(1000)
    elsewhere = tmp_path / "not-staging"
    elsewhere.write_bytes(data)
    await _refused_lease(store, workers[1], data, str(elsewhere))


async def _refused_lease(store: BlobStore, follower: Downloads, data: bytes,
                         location: str) -> None:
    """A live lease of ``data``'s digest naming ``location``: the follower must refuse it
    without opening it and without fetching."""
    digest = Digest(hashlib.sha256(data).hexdigest())
    leases = SqliteFetchLeases(store.root)
    try:
        await leases.acquire(digest, "someone", location, 30)
        await leases.renew(digest, "someone", 30, size=len(data))
    finally:
        await leases.close()
    blob = SteppedBlob(data)
    download, _ = follower.get_or_start(digest, blob.open, _committed)
    with pytest.raises(RegistryError):
        await asyncio.wait_for(_read(download, bytearray()), 20)
    assert "outside staging" in str(download.error) and blob.opens == 0
    assert not store.has(digest)


@pytest.mark.parametrize("name", ["..", "not-a-staging-name", "0" * 31 + "G"])
async def test_a_lease_naming_no_staging_file_is_never_opened(
        store: BlobStore, workers: tuple[Downloads, Downloads], name: str) -> None:
    # ``staging/..`` has staging/ as its parent (pathlib keeps ".."): a check of the parent
    # alone opened the store's root directory. Only ``staging/<uuid hex>`` is followed.
    data = os.urandom(1000)
    (store.staging_dir / "not-a-staging-name").write_bytes(data)
    await _refused_lease(store, workers[1], data, f"{store.staging_dir}/{name}")


@pytest.mark.parametrize("holder_bytes", ["wrong", "right"])
async def test_a_follower_over_a_remote_store_releases_only_a_file_that_hashes_right(
        store: BlobStore, tmp_path: Path, holder_bytes: str) -> None:
    # Workers over a remote store (S3 + the host's lease file): the holder's scratch file is
    # followed and the tail released once the object is in the store and the lease is gone.
    # The object proves nothing about this file when the holder lost its lease (it stalled)
    # and another worker fetched and committed: this file may hold wrong or partial bytes.
    data = os.urandom(3 * CHUNK + 17)
    digest = Digest(hashlib.sha256(data).hexdigest())
    remote = FilesystemObjectStore(BlobStore(tmp_path / "bucket"))
    held = data if holder_bytes == "right" else bytes(reversed(data))
    scratch = store.staging_dir / uuid.uuid4().hex
    scratch.write_bytes(held)
    leases = SqliteFetchLeases(store.root)
    try:
        await leases.acquire(digest, "stalled", str(scratch), 30)
        await leases.renew(digest, "stalled", 30, size=len(data))
        follower = Download(digest, store, remote)
        blob = SteppedBlob(data)
        task = asyncio.create_task(follower.run(blob.open, _committed, leases, "follower"))
        await _until(lambda: follower.received == len(data), "the follower to read the file")
        got = bytearray()
        reading = asyncio.create_task(_read(follower, got))
        # The stalled holder's lease is taken over; the new holder commits the real blob.
        await remote.put_bytes(digest, data)
        await leases.release(digest, "stalled")
        await leases.acquire(digest, "taker", str(store.staging_dir / uuid.uuid4().hex), 30)
        if holder_bytes == "right":
            await asyncio.wait_for(reading, 20)
            assert bytes(got) == data and follower.verified
        else:
            with pytest.raises(RegistryError):
                await asyncio.wait_for(reading, 20)
            assert len(got) < len(data) and not follower.verified
        await asyncio.wait_for(task, 20)
        assert blob.opens == 0
    finally:
        await leases.close()
