"""gc deleting an object while a writer names it, over every store x index pair.

The incremental gc (:func:`~sigil.storage.maintenance.collect_incremental`) deletes through
``AsyncIndex.delete_unreferenced``. With an S3 store that delete really waits on the network;
here it is held open on purpose (a wrapper whose ``delete`` waits for an event) while a writer
stores a manifest naming the object, as the mirror does for a new image sharing a layer with
an evicted one. The writer follows the mirror's protocol: record the manifest, then look for
the layer (a stat locally, the index row over S3) and store it again if it is missing. After
gc the layer must be stored, indexed and served, and fsck clean. Before the deletion marks,
SQLite's ``put_manifest`` went through while the delete was pending (the index lock is
re-entrant for coroutines of the loop thread), the writer found the doomed layer still
there, and gc then deleted it under the new manifest.

Real parts: SeaweedFS for S3, PostgreSQL, SQLite files; a second index client on the same
file or database stands for a sibling worker or another replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    GcLease,
    ObjectStore,
    SqliteAsyncIndex,
)
from sigil.storage.index import Index
from sigil.storage.lease_sqlite import SqliteFetchLeases
from sigil.storage.maintenance import check_objects, collect_incremental

# How long the held delete stays open for the writer to show what it does meanwhile (not an
# assertion: a writer that waits, as it must, is simply released after it).
HOLD = 1.0
BOUND = 60.0


class SlowDelete:
    """An :class:`ObjectStore` whose delete of one digest announces itself and then waits
    for :attr:`release` before it really deletes (an S3 DELETE that takes its time)."""

    def __init__(self, inner: ObjectStore, target: Digest) -> None:
        self.inner = inner
        self.target = target
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.deleted: list[Digest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete(self, digest: Digest) -> bool:
        if digest == self.target:
            self.entered.set()
            await self.release.wait()
        self.deleted.append(digest)
        return await self.inner.delete(digest)


@dataclass
class Backends:
    objects: ObjectStore
    index: AsyncIndex
    leases: GcLease
    local: bool  # the mirror stats local files; over S3 it trusts the index rows
    # Another client of the same index (a sibling worker, another replica).
    other_index: Callable[[], Awaitable[AsyncIndex]]
    sqlite_path: Path | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@pytest.fixture(params=["filesystem+sqlite", "s3+sqlite", "filesystem+postgres",
                        "s3+postgres"])
async def backends(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backends]:
    store_kind, index_kind = request.param.split("+")
    async with AsyncExitStack() as stack:
        objects: ObjectStore
        if store_kind == "s3":
            from sigil.storage.s3 import S3ObjectStore

            objects = await S3ObjectStore.open(request.getfixturevalue("s3_config"))
        else:
            objects = FilesystemObjectStore(BlobStore(tmp_path / "store"))
        stack.push_async_callback(objects.close)
        root = tmp_path / "store"
        root.mkdir(exist_ok=True)
        if index_kind == "sqlite":
            path = root / "index.sqlite"
            index: AsyncIndex = SqliteAsyncIndex(Index(path))
            leases: GcLease = SqliteFetchLeases(root)
            stack.push_async_callback(leases.close)  # type: ignore[attr-defined]

            async def other_sqlite() -> AsyncIndex:
                other = SqliteAsyncIndex(Index(path))
                stack.push_async_callback(other.close)
                return other

            other_index, sqlite_path = other_sqlite, path
        else:
            from sigil.storage.pgindex import PgIndex

            dsn = request.getfixturevalue("pg_dsn")
            index = leases = await PgIndex.open(dsn)

            async def other_pg() -> AsyncIndex:
                other = await PgIndex.open(dsn, max_connections=2)
                stack.push_async_callback(other.close)
                return other

            other_index, sqlite_path = other_pg, None
        stack.push_async_callback(index.close)
        yield Backends(objects, index, leases, store_kind == "filesystem", other_index,
                       sqlite_path)


async def _present(b: Backends, index: AsyncIndex, digest: Digest) -> bool:
    """Is the blob there, as the mirror decides it (Mirror._has_blob)?"""
    if b.local:
        return await b.objects.has(digest)
    return await index.blob_size(digest) is not None


async def _stored_image(b: Backends) -> tuple[bytes, Digest, Digest]:
    """An old image (manifest OLD -> LAYER), stored and indexed, last used long ago."""
    layer = os.urandom(64 * 1024)
    layer_d = Digest.of(layer)
    old = os.urandom(300)
    old_d = Digest.of(old)
    await b.objects.put_bytes(layer_d, layer)
    await b.objects.put_bytes(old_d, old)
    await b.index.put_blob(layer_d, len(layer))
    await b.index.put_manifest(old_d, "application/vnd.oci.image.manifest.v1+json", len(old),
                               [layer_d], now=100.0)
    return layer, layer_d, old_d


async def _gc_with_held_delete(b: Backends, slow: SlowDelete,
                               writer: Callable[[], Awaitable[None]]) -> None:
    """Run a gc pass (it evicts the old image) whose delete of the layer is held open
    while ``writer`` runs; release it once the writer finished or had HOLD seconds."""
    gc = asyncio.create_task(collect_incremental(
        slow, b.index, b.leases, "gc-test", max_bytes=1, now=1000.0, grace=0.0))  # type: ignore[arg-type]
    await asyncio.wait_for(slow.entered.wait(), BOUND)
    written = asyncio.create_task(writer())
    await asyncio.wait({written}, timeout=HOLD)
    slow.release.set()
    stats, _ = await asyncio.wait_for(asyncio.gather(gc, written), BOUND)
    assert stats.ran and slow.target in slow.deleted  # the old copy really was deleted


@pytest.mark.parametrize("writer_is", ["same-process", "sibling"])
async def test_a_manifest_stored_during_a_slow_delete_keeps_its_blob(
        backends: Backends, writer_is: str) -> None:
    b = backends
    layer, layer_d, old_d = await _stored_image(b)
    new = os.urandom(300)
    new_d = Digest.of(new)
    index = b.index if writer_is == "same-process" else await b.other_index()
    slow = SlowDelete(b.objects, layer_d)

    async def mirror_stores_a_new_image() -> None:
        await b.objects.put_bytes(new_d, new)
        await index.put_manifest(new_d, "application/vnd.oci.image.manifest.v1+json",
                                 len(new), [layer_d])
        if not await _present(b, index, layer_d):  # a client pulls the layer: fetched again
            await b.objects.put_bytes(layer_d, layer)
            await index.put_blob(layer_d, len(layer))

    await _gc_with_held_delete(b, slow, mirror_stores_a_new_image)
    assert not await b.objects.has(old_d) and await b.index.get_manifest(old_d) is None
    assert await b.index.get_references(new_d) == [layer_d]
    assert await b.objects.has(layer_d), "gc deleted a layer a stored manifest references"
    assert await b.objects.read_bytes(layer_d) == layer
    assert await b.index.blob_size(layer_d) == len(layer)
    report = await check_objects(b.objects, b.index)
    assert report.ok and report.missing == [] and layer_d not in report.unindexed


async def test_a_blob_recorded_during_its_delete_is_not_claimed(backends: Backends) -> None:
    """A download that stores the layer again while gc's delete of it is under way (its
    upload lands first, the delete after it) must not leave an index row claiming it."""
    b = backends
    layer, layer_d, _ = await _stored_image(b)
    slow = SlowDelete(b.objects, layer_d)

    async def download_commits() -> None:
        await b.objects.put_bytes(layer_d, layer)
        await b.index.put_blob(layer_d, len(layer))

    await _gc_with_held_delete(b, slow, download_commits)
    assert not await b.objects.has(layer_d)
    assert await b.index.blob_size(layer_d) is None
    report = await check_objects(b.objects, b.index)
    assert report.ok and report.missing == []


async def test_a_deleter_killed_after_marking_blocks_nobody(tmp_path: Path) -> None:
    """SQLite: a gc process SIGKILLed between its deletion mark and the delete leaves the
    mark behind; the next writer naming the digest drops it (the holder is dead) instead of
    waiting forever, and no row claims the object (the rows went with the mark). (PostgreSQL
    leaves nothing behind: its advisory lock dies with the session.)"""
    path = tmp_path / "index.sqlite"
    index = SqliteAsyncIndex(Index(path))
    layer = os.urandom(1000)
    layer_d = Digest.of(layer)
    try:
        await index.put_blob(layer_d, len(layer))
        code = ("import os, signal, sys\n"
                "from sigil.oci.digest import Digest\n"
                "from sigil.storage.index import Index\n"
                "assert Index(sys.argv[1]).begin_delete(Digest.parse(sys.argv[2]))\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n")
        result = subprocess.run([sys.executable, "-c", code, str(path), str(layer_d)],
                                timeout=BOUND, capture_output=True)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert await index.blob_size(layer_d) is None  # dropped with the mark
        assert index.sync.deleting([layer_d]) == set()  # a dead holder's mark is stale
        new = os.urandom(300)
        new_d = Digest.of(new)
        await asyncio.wait_for(index.put_manifest(new_d, "m", len(new), [layer_d]), BOUND)
        await asyncio.wait_for(index.put_blob(layer_d, len(layer)), BOUND)
        assert await index.blob_size(layer_d) == len(layer)
        assert await index.get_references(new_d) == [layer_d]
    finally:
        await index.close()


async def test_a_live_mark_holds_writers_of_every_process(tmp_path: Path) -> None:
    """A deletion under way in one process (its mark) holds a put_manifest naming the digest
    in another Index of the same file until the mark is cleared; then it goes through."""
    path = tmp_path / "index.sqlite"
    deleter, writer = Index(path), SqliteAsyncIndex(Index(path))
    layer_d, new_d = Digest.of(b"layer"), Digest.of(b"new")
    try:
        assert deleter.begin_delete(layer_d)
        assert not deleter.begin_delete(layer_d)  # one deletion of a digest at a time
        stored = asyncio.create_task(writer.put_manifest(new_d, "m", 3, [layer_d]))
        await asyncio.wait({stored}, timeout=HOLD)
        assert not stored.done() and await writer.get_manifest(new_d) is None
        deleter.end_delete(layer_d)
        await asyncio.wait_for(stored, BOUND)
        assert await writer.get_references(new_d) == [layer_d]
        assert not deleter.begin_delete(layer_d)  # now referenced: kept
    finally:
        deleter.close()
        await writer.close()
