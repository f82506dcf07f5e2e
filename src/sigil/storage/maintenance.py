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

The local :func:`sigil.storage.gc.collect` (mark and sweep over a directory walk) stays what a
single box runs; these are what replicas run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sigil import metrics
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage.contracts import AsyncIndex, GcLease, ObjectStore
from sigil.storage.gc import DEFAULT_GRACE

log = get_logger("sigil.storage.maintenance")

#: Roots considered per index query.
GC_BATCH = 64
#: How long a gc pass may go between lease renewals before another replica may take over.
GC_LEASE_TTL = 120.0


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
                              grace: float = DEFAULT_GRACE) -> IncrementalGcStats:
    """Evict least recently used roots (not accessed within ``grace``) until the indexed
    size fits ``max_bytes``; delete what nothing stored references any more.

    Every pass is timed and counted in the same ``sigil_gc_*`` metrics as a single box's
    (a pass that finds another replica holding the gc lease succeeded: the fleet's gc ran),
    and the store gauges follow the index, which every replica shares."""
    started = time.monotonic()
    try:
        stats = await _collect_incremental(objects, index, lease, holder, max_bytes, now=now,
                                           grace=grace)
    except Exception:
        metrics.GC_FAILURES.inc()
        raise
    finally:
        metrics.GC_SECONDS.observe(time.monotonic() - started)
    metrics.GC_LAST_SUCCESS.set(time.time())
    if stats.ran:
        metrics.STORE_BYTES.set(stats.bytes_after)
        metrics.GC_OVER_BUDGET.set(1 if stats.over_budget else 0)
        metrics.GC_FREED_BYTES.inc(stats.bytes_freed)
    return stats


async def _collect_incremental(objects: ObjectStore, index: AsyncIndex, lease: GcLease,
                               holder: str, max_bytes: int, *, now: float,
                               grace: float) -> IncrementalGcStats:
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
    finally:
        await lease.release_gc(holder)
    log.info("gc.collected_incremental", roots_evicted=stats.roots_evicted,
             objects_deleted=stats.objects_deleted, bytes_freed=stats.bytes_freed,
             bytes_after=stats.bytes_after, over_budget=stats.over_budget)
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
