"""fsck and gc over the contracts (:mod:`sigil.storage.contracts`), for any backend pair.

- :func:`check_objects` is the storage-level fsck: re-hash every object, quarantine corrupt
  ones (and drop their index rows, so the mirror fetches them again), report what the index
  lists but the store lacks, what the store holds but the index does not know, and pending
  uploads. It walks the whole store; that is what fsck is for.
- :func:`collect_incremental` is gc for a shared store: one replica at a time (the gc lease),
  driven by the index (least recently used root manifests first, via
  :meth:`~sigil.storage.contracts.AsyncIndex.gc_candidates`), never listing the bucket, and
  deleting each object only through :meth:`~sigil.storage.contracts.AsyncIndex.delete_unreferenced`
  so a manifest any replica records meanwhile keeps what it references, and a writer that
  names an object while its delete is under way waits for it and then finds it gone.
  Each pass then sweeps a bounded slice of the store for *orphans* (:func:`sweep_orphans`):
  objects committed but never indexed (an import or a replica killed between the commit and
  its row), which the index-driven eviction cannot see.

The local :func:`sigil.storage.gc.collect` (mark and sweep over a directory walk) stays what a
single box runs; these are what replicas run.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sigil import metrics
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage.blobs import ObjectInfo
from sigil.storage.contracts import AsyncIndex, FilesystemObjectStore, GcLease, ObjectStore
from sigil.storage.gc import DEFAULT_GRACE, counted_pass

log = get_logger("sigil.storage.maintenance")

#: Roots considered per index query.
GC_BATCH = 64
#: How long a gc pass may go between lease renewals before another replica may take over.
GC_LEASE_TTL = 120.0
#: Objects the orphan sweep lists per gc pass at most (a pass never walks a whole bucket; the
#: next pass goes on after the last one listed).
ORPHAN_BATCH = 1000
_HEX64 = re.compile(r"[a-f0-9]{64}")
#: Default ``storage.orphan_grace``: an unindexed object younger than this is left alone, since
#: an import or a download may still be about to write its row.
DEFAULT_ORPHAN_GRACE = 24 * 3600.0


@dataclass
class ObjectsReport:
    """What :func:`check_objects` found (corrupt objects were quarantined)."""

    objects_checked: int = 0
    bytes_checked: int = 0
    corrupt: list[Digest] = field(default_factory=list)
    missing: list[Digest] = field(default_factory=list)    # indexed, not in the store
    unindexed: list[Digest] = field(default_factory=list)  # in the store, no index row
    pending: list[str] = field(default_factory=list)       # uploads never finished

    @property
    def ok(self) -> bool:
        """True if nothing is corrupt or missing."""
        return not (self.corrupt or self.missing)


async def check_objects(objects: ObjectStore, index: AsyncIndex) -> ObjectsReport:
    """The storage-level fsck over any backend (see module docstring)."""
    report = ObjectsReport()
    graph = await index.graph()
    present: set[Digest] = set()
    async for info in objects.iter_objects():
        actual = await objects.hash_object(info.digest)
        if actual is None:  # deleted meanwhile (gc)
            continue
        report.objects_checked += 1
        report.bytes_checked += info.size
        if actual != info.digest:
            await objects.quarantine(info.digest)
            report.corrupt.append(info.digest)
            continue
        present.add(info.digest)
        if info.digest not in graph.manifests and info.digest not in graph.blobs:
            report.unindexed.append(info.digest)
    if report.corrupt:
        await index.forget_objects(report.corrupt)
        log.warning("fsck.corrupt", count=len(report.corrupt),
                    digests=[str(d) for d in report.corrupt[:20]])
    indexed = set(graph.manifests) | set(graph.blobs)
    report.missing = sorted((d for d in indexed - present if d not in report.corrupt), key=str)
    report.pending = sorted(upload.name for upload in await objects.pending_uploads())
    return report


@dataclass
class IncrementalGcStats:
    """What one :func:`collect_incremental` pass did."""

    ran: bool = False               # False: another process holds the gc lease
    bytes_before: int = 0
    bytes_after: int = 0
    roots_evicted: int = 0
    manifests_forgotten: int = 0
    tags_deleted: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    over_budget: bool = False
    orphans_listed: int = 0         # objects the orphan sweep looked at in this pass
    orphans_deleted: int = 0        # of those: unindexed, older than the grace, deleted
    orphan_bytes_freed: int = 0     # (also counted in bytes_freed)


async def _closure(index: AsyncIndex, root: Digest) -> set[Digest]:
    """Every digest ``root`` keeps alive, through stored manifests only (index queries)."""
    seen, stack = {root}, [root]
    while stack:
        current = stack.pop()
        if await index.get_manifest(current) is None:
            continue
        for child in [*await index.get_references(current),
                      *await index.get_referrers(current)]:
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


async def collect_incremental(objects: ObjectStore, index: AsyncIndex, lease: GcLease,
                              holder: str, max_bytes: int, *, now: float,
                              grace: float = DEFAULT_GRACE,
                              orphan_grace: float = DEFAULT_ORPHAN_GRACE,
                              orphan_batch: int = ORPHAN_BATCH,
                              orphan_cursor: OrphanCursor | None = None) -> IncrementalGcStats:
    """Evict least recently used roots (not accessed within ``grace``) until the indexed
    size fits ``max_bytes``; delete what nothing stored references any more; then sweep up to
    ``orphan_batch`` listed objects for orphans older than ``orphan_grace``
    (:func:`sweep_orphans`), over budget or not.

    Every pass is timed and counted in the same ``sigil_gc_*`` metrics as a single box's
    (a pass that finds another replica holding the gc lease succeeded: the fleet's gc ran),
    and the store gauges follow the index, which every replica shares."""
    with counted_pass():
        stats = await _collect_incremental(objects, index, lease, holder, max_bytes, now=now,
                                           grace=grace, orphan_grace=orphan_grace,
                                           orphan_batch=orphan_batch,
                                           orphan_cursor=orphan_cursor or ORPHAN_CURSOR)
    if stats.ran:
        metrics.STORE_BYTES.set(stats.bytes_after)
        metrics.GC_OVER_BUDGET.set(1 if stats.over_budget else 0)
        metrics.GC_FREED_BYTES.inc(stats.bytes_freed)
    return stats


async def _collect_incremental(objects: ObjectStore, index: AsyncIndex, lease: GcLease,
                               holder: str, max_bytes: int, *, now: float,
                               grace: float, orphan_grace: float,
                               orphan_batch: int,
                               orphan_cursor: OrphanCursor) -> IncrementalGcStats:
    stats = IncrementalGcStats()
    if not await lease.acquire_gc(holder, GC_LEASE_TTL):
        return stats
    stats.ran = True
    try:
        stats.bytes_before = stats.bytes_after = await index.stored_bytes()
        tried: set[Digest] = set()
        while stats.bytes_after > max_bytes:
            candidates = [row for row in await index.gc_candidates(now - grace, GC_BATCH)
                          if row.digest not in tried]
            if not candidates:
                break
            for row in candidates:
                if stats.bytes_after <= max_bytes:
                    break
                if not await lease.renew_gc(holder, GC_LEASE_TTL):
                    log.warning("gc.lease_lost", holder=holder)
                    return stats
                tried.add(row.digest)
                await _evict(objects, index, row.digest, stats)
                stats.bytes_after = await index.stored_bytes()
        stats.over_budget = stats.bytes_after > max_bytes
        if not await sweep_orphans(objects, index, lease, holder, stats, now=now,
                                   grace=orphan_grace, limit=orphan_batch,
                                   cursor=orphan_cursor):
            return stats
    finally:
        await lease.release_gc(holder)
    log.info("gc.collected_incremental", roots_evicted=stats.roots_evicted,
             objects_deleted=stats.objects_deleted, bytes_freed=stats.bytes_freed,
             bytes_after=stats.bytes_after, over_budget=stats.over_budget,
             orphans_listed=stats.orphans_listed, orphans_deleted=stats.orphans_deleted)
    return stats


async def _evict(objects: ObjectStore, index: AsyncIndex, root: Digest,
                 stats: IncrementalGcStats) -> None:
    members = await _closure(index, root)
    sizes: dict[Digest, int] = {}
    for digest in members:
        row = await index.get_manifest(digest)
        size = row.size if row is not None else await index.blob_size(digest)
        if size is not None:
            sizes[digest] = size
    forgotten, tags = await index.forget_manifests(
        [d for d in members if await index.get_manifest(d) is not None])
    stats.roots_evicted += 1
    stats.manifests_forgotten += len(forgotten)
    stats.tags_deleted += tags
    for digest in sorted(members, key=str):

        async def delete(digest: Digest = digest) -> bool:
            return await objects.delete(digest)

        if await index.delete_unreferenced(digest, delete):
            stats.objects_deleted += 1
            stats.bytes_freed += sizes.get(digest, 0)
            metrics.EVICTIONS.labels(kind="manifest" if digest in forgotten else "blob").inc()
    # Their rows went with each delete (delete_unreferenced): not again here, where a row a
    # writer recorded after the delete, for an object it stored again, would be lost.
    await index.drop_allows([d for d in members if not await index.is_referenced(d)])


# ------------------------------------------------------------------------------------------
# Orphans: committed objects no index row accounts for


class OrphanCursor:
    """Where the next orphan sweep starts listing: after the last object the previous sweep
    listed, back at the start once the listing ran out. This one lives in memory (a test, or
    a caller that wants a sweep of its own); :class:`StoredOrphanCursor` is what gc uses."""

    def __init__(self) -> None:
        self.after: str | None = secrets.token_hex(32)  # an object's 64 hex digits, or None

    async def load(self, index: AsyncIndex) -> str | None:
        """Where to start (None: at the beginning)."""
        return self.after

    async def save(self, index: AsyncIndex, after: str | None) -> None:
        """Where the next sweep starts."""
        self.after = after


class StoredOrphanCursor(OrphanCursor):
    """The cursor in the index (meta key :data:`ORPHAN_CURSOR_KEY`), shared by every process
    and replica: a restart, a one-off ``sigil gc`` or the gc lease moving to another replica
    goes on where the last sweep stopped, instead of listing the same first objects again.
    Never stored yet: a random point (any start covers the store over the passes)."""

    async def load(self, index: AsyncIndex) -> str | None:
        """The stored position ("" is the beginning); a value that is not 64 hex digits (a
        hand edit) counts as the beginning too."""
        value = await index.get_meta(ORPHAN_CURSOR_KEY)
        if value is None:
            return secrets.token_hex(32)
        return value if _HEX64.fullmatch(value) else None

    async def save(self, index: AsyncIndex, after: str | None) -> None:
        """Store the position (the caller holds the gc lease, so no two sweeps race here)."""
        await index.put_meta(ORPHAN_CURSOR_KEY, after or "")


#: The index meta key of :class:`StoredOrphanCursor`.
ORPHAN_CURSOR_KEY = "gc.orphan-cursor"
#: The cursor the server's periodic passes and ``sigil gc`` use.
ORPHAN_CURSOR = StoredOrphanCursor()


def _list_after(objects: ObjectStore, after: str | None) -> AsyncIterator[ObjectInfo]:
    """Committed objects whose hex sorts after ``after`` (all if None), in hex order, listed
    lazily: the caller stops when it has enough, and no more is listed than it read (one S3
    page, or one fan-out directory, ahead)."""
    if isinstance(objects, FilesystemObjectStore):
        return _fs_list_after(objects, after)
    from sigil.storage.s3 import S3ObjectStore  # the fleet extra: only without a local store

    if isinstance(objects, S3ObjectStore):
        return _s3_list_after(objects, after)
    return _any_list_after(objects, after)


async def _any_list_after(objects: ObjectStore, after: str | None) -> AsyncIterator[ObjectInfo]:
    # Another ObjectStore (a wrapper): correct, but it walks the whole store to sort it.
    listed = sorted([info async for info in objects.iter_objects()
                     if after is None or info.digest.hex > after], key=lambda i: i.digest.hex)
    for info in listed:
        yield info


async def _s3_list_after(objects: ObjectStore, after: str | None) -> AsyncIterator[ObjectInfo]:
    # S3 lists keys in UTF-8 byte order, which for <prefix><2 hex>/<64 hex> is hex order:
    # StartAfter makes the cursor a single request instead of a walk from the beginning.
    from sigil.storage.s3 import S3ObjectStore

    assert isinstance(objects, S3ObjectStore)
    sample = objects.key(Digest("0" * 64))
    prefix = sample[:len(sample) - 67]  # strip "<2 hex>/<64 hex>"
    request: dict[str, Any] = {"Bucket": objects.settings.bucket, "Prefix": prefix}
    if after is not None:
        request["StartAfter"] = objects.key(Digest(after))
    paginator = objects.client.get_paginator("list_objects_v2")
    with objects.errors("list"):
        async for page in paginator.paginate(**request):
            for item in page.get("Contents", []):
                fan, _, name = item["Key"][len(prefix):].partition("/")
                if _HEX64.fullmatch(name) and name.startswith(fan) and len(fan) == 2:
                    yield ObjectInfo(Digest(name), int(item["Size"]),
                                     item["LastModified"].timestamp())


async def _fs_list_after(objects: FilesystemObjectStore,
                         after: str | None) -> AsyncIterator[ObjectInfo]:
    # Fan-out directories in order, each read (and sorted) in a thread only when reached.
    root = objects.blobs.blobs_dir
    hexdigits = "0123456789abcdef"
    first = after[:2] if after is not None else "00"
    for fan in (a + b for a in hexdigits for b in hexdigits):
        if fan < first:
            continue

        def entries(fan: str = fan) -> list[ObjectInfo]:
            found = []
            try:
                names = sorted(os.listdir(root / fan))
            except (FileNotFoundError, NotADirectoryError):
                return []
            for name in names:
                if (after is not None and name <= after) or not _HEX64.fullmatch(name) \
                        or not name.startswith(fan):
                    continue
                try:
                    st = os.lstat(root / fan / name)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if stat.S_ISREG(st.st_mode):  # not a symlink or directory (junk is left)
                    found.append(ObjectInfo(Digest(name), st.st_size, st.st_mtime))
            return found

        for info in await asyncio.to_thread(entries):
            yield info


async def _unindexed(index: AsyncIndex, digest: Digest) -> bool:
    return not await index.indexed([digest])


async def sweep_orphans(objects: ObjectStore, index: AsyncIndex, lease: GcLease, holder: str,
                        stats: IncrementalGcStats, *, now: float, grace: float, limit: int,
                        cursor: OrphanCursor = ORPHAN_CURSOR) -> bool:
    """Delete committed objects that have no manifest or blob row and were last written more
    than ``grace`` seconds before ``now`` (S3 LastModified, file mtime); list at most
    ``limit`` objects, after ``cursor`` (moved on, and stored in the index by default). The
    slice is checked for rows with one batched index query (:meth:`AsyncIndex.indexed`),
    then each candidate once more just before it is deleted. The caller holds the gc lease;
    return False if it was lost (nothing more was deleted).

    Only committed objects are listed: multipart uploads and staging files are not objects,
    so nothing being uploaded is touched. A candidate is re-checked for rows just before the
    delete, and deleted only through :meth:`AsyncIndex.delete_unreferenced`, so a manifest
    recorded meanwhile that references it keeps it (and one naming it during the delete waits
    and then finds it gone, as for any gc delete). An orphan a stored manifest references (its
    own row was never written) is therefore kept: the mirror may be serving it."""
    listed: list[ObjectInfo] = []
    async for info in _list_after(objects, await cursor.load(index)):
        listed.append(info)
        if len(listed) >= limit:
            break
    # Past the last object listed; back at the start when the listing ran out.
    await cursor.save(index, listed[-1].digest.hex if len(listed) >= limit else None)
    stats.orphans_listed += len(listed)
    old = [info for info in listed if info.mtime <= now - grace]
    # One batched query for the whole slice; each candidate is asked again just before its
    # delete (a row may have come meanwhile), and deleted only by delete_unreferenced.
    rows = await index.indexed([info.digest for info in old]) if old else set()
    for info in old:
        if info.digest in rows:
            continue
        if not await lease.renew_gc(holder, GC_LEASE_TTL):
            log.warning("gc.lease_lost", holder=holder)
            return False
        if not await _unindexed(index, info.digest):  # indexed while the lease was renewed
            continue

        async def delete(digest: Digest = info.digest) -> bool:
            return await objects.delete(digest)

        if await index.delete_unreferenced(info.digest, delete):
            stats.orphans_deleted += 1
            stats.orphan_bytes_freed += info.size
            stats.objects_deleted += 1
            stats.bytes_freed += info.size
            metrics.EVICTIONS.labels(kind="orphan").inc()
            log.info("gc.orphan_deleted", digest=str(info.digest), size=info.size,
                     age=round(now - info.mtime))
    return True
