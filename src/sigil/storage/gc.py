"""Eviction (mark and sweep by least-recent use of root manifests) and fsck.

The unit of eviction is a *root* manifest together with everything it keeps alive: the
manifests and blobs it references, transitively, and the referrers (signatures, attestations)
of every manifest it keeps, with what those reference. A root is a stored manifest that no other
stored manifest points at, as a reference or as a referrer's subject. Blobs are never evicted on
their own: a blob goes only when no retained manifest keeps it, so an image in use is never
left half-deleted (the distribution TTL-proxy failure mode).

Both functions are synchronous and may run in a worker thread beside the server: every deletion
is re-checked against the index inside the SQLite write transaction that unlinks the file
(:meth:`Index.delete_if_unreferenced`), so a manifest recorded while gc was planning, by this
process or by any other sharing the index (``--workers``, ``sigil gc``), still protects what
it references.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog

from sigil import metrics
from sigil.oci.digest import Digest
from sigil.progress import BYTES, NO_PROGRESS, ProgressReporter
from sigil.storage.blobs import BlobStore, ObjectInfo
from sigil.storage.index import Graph, Index

log = structlog.get_logger(__name__)

# Default age below which gc leaves alone (a) objects no stored manifest accounts for, since a
# commit and its index row are two steps, and (b) roots accessed that recently, since a client
# may be pulling their blobs right now.
DEFAULT_GRACE = 600.0


@dataclass
class GcStats:
    """What one :func:`collect` run did."""

    bytes_before: int = 0
    objects_before: int = 0
    bytes_after: int = 0
    objects_after: int = 0
    roots_evicted: int = 0
    manifests_forgotten: int = 0   # index rows dropped (evicted roots and what only they kept)
    tags_deleted: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    over_budget: bool = False      # still above max_bytes (everything left is recent or kept)


@dataclass
class FsckReport:
    """What :func:`fsck` found. Corrupt objects were moved to ``quarantine/``."""

    objects_checked: int = 0
    bytes_checked: int = 0
    corrupt: list[Digest] = field(default_factory=list)
    missing: list[Digest] = field(default_factory=list)   # indexed, but not on disk
    unindexed: list[Digest] = field(default_factory=list)  # on disk, no index row
    staging: list[Path] = field(default_factory=list)     # leftovers in staging/

    @property
    def ok(self) -> bool:
        """True if nothing is corrupt or missing (unindexed and staging files are harmless)."""
        return not (self.corrupt or self.missing)


def _edges(graph: Graph, manifest: Digest) -> list[Digest]:
    """What a stored manifest keeps alive directly: its references and its referrers."""
    return graph.refs.get(manifest, []) + graph.referrers.get(manifest, [])


def _closure(graph: Graph, root: Digest) -> set[Digest]:
    """Every digest ``root`` keeps alive, itself included. Edges only leave stored manifests:
    the references of a manifest gc (or fsck) dropped count for nothing."""
    seen = {root}
    stack = [root]
    while stack:
        current = stack.pop()
        if current not in graph.manifests:
            continue
        for child in _edges(graph, current):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def collect(store: BlobStore, index: Index, max_bytes: int, *, now: float,
            grace: float = DEFAULT_GRACE,
            progress: ProgressReporter = NO_PROGRESS) -> GcStats:
    """Bring the store under ``max_bytes`` by evicting least-recently used root manifests,
    then sweep every object no retained manifest keeps alive. Under budget, do nothing.

    ``now`` is wall-clock seconds (``time.time()``), compared with manifest access times and
    object mtimes. Evicted manifests lose their index rows and the tags resolving to them.
    Each pass is counted in the gc metrics (duration, failures, last success); ``progress``
    sees its phases (reading the index, scanning the store, deleting).
    """
    with counted_pass():
        return _collect(store, index, max_bytes, now=now, grace=grace, progress=progress)


@contextmanager
def counted_pass() -> Iterator[None]:
    """Count one gc pass (local or fleet) in the gc metrics: its duration always, a failure
    when it raises, the time of its success when it does not."""
    started = time.monotonic()
    try:
        yield
    except Exception:
        metrics.GC_FAILURES.inc()
        raise
    finally:
        metrics.GC_SECONDS.observe(time.monotonic() - started)
    metrics.GC_LAST_SUCCESS.set(time.time())


def _collect(store: BlobStore, index: Index, max_bytes: int, *, now: float, grace: float,
             progress: ProgressReporter) -> GcStats:
    # Downloads a killed worker left half done (the periodic pass of every worker runs here).
    store.sweep_dead_staging()
    with progress.phase("reading index", unit="manifests") as step:
        graph = index.graph()  # snapshot first: an object committed after it is young: spared
        step.advance(len(graph.manifests))
    objects: dict[Digest, ObjectInfo] = {}
    with progress.phase("scanning store") as step:
        for info in store.iter_objects():
            objects[info.digest] = info
            step.advance()
    stats = GcStats(bytes_before=sum(i.size for i in objects.values()),
                    objects_before=len(objects))
    stats.bytes_after, stats.objects_after = stats.bytes_before, stats.objects_before
    if stats.bytes_before <= max_bytes:
        _publish(stats)
        return stats

    def size(digest: Digest) -> int:
        info = objects.get(digest)
        return info.size if info else 0

    kept_by: set[Digest] = {c for m in graph.manifests for c in _edges(graph, m)}
    roots = [m for m in graph.manifests if m not in kept_by]
    closures = {root: _closure(graph, root) for root in roots}
    refcount: Counter[Digest] = Counter()
    for members in closures.values():
        refcount.update(members)
    # Objects no root keeps: the unindexed or unreferenced, and manifests in reference cycles
    # with no root. Young ones may be a commit whose index row is on its way: spare them.
    spared = {d for d, info in objects.items()
              if refcount[d] == 0 and info.mtime > now - grace}
    needed = sum(size(d) for d in refcount) + sum(size(d) for d in spared)

    # A root is as recent as any manifest it keeps: platform manifests are pulled by digest
    # after their index, and only they get touched then.
    recency = {root: max(graph.manifests[m].last_access for m in members
                         if m in graph.manifests)
               for root, members in closures.items()}

    for root in sorted(roots, key=recency.__getitem__):
        if needed <= max_bytes or recency[root] > now - grace:
            break
        stats.roots_evicted += 1
        for digest in closures[root]:
            refcount[digest] -= 1
            if refcount[digest] == 0:
                needed -= size(digest)

    # Manifests nothing retained keeps: the evicted closures and rootless cycles.
    dead_manifests = {m for m in graph.manifests if refcount[m] <= 0}
    forgotten, stats.tags_deleted = index.forget_manifests(dead_manifests)
    stats.manifests_forgotten = len(forgotten)

    deleted: list[Digest] = []
    # Unmarked objects: deleted unless the index, in the deleting transaction, says otherwise.
    candidates = [(digest, info) for digest, info in objects.items()
                  if refcount[digest] <= 0 and digest not in spared]
    with progress.phase("deleting", len(candidates)) as step:
        for digest, info in candidates:
            step.advance()
            # Check, unlink and drop the rows as one step against every writer of the index.
            if not index.delete_if_unreferenced(digest, partial(store.delete, digest)):
                continue
            deleted.append(digest)
            stats.objects_deleted += 1
            stats.bytes_freed += info.size
            kind = "manifest" if digest in graph.manifests else "blob"
            metrics.EVICTIONS.labels(kind=kind).inc()
            metrics.GC_FREED_BYTES.inc(info.size)
    # Allows of what is gone for good: the deleted objects, and what evicted manifests
    # referenced without it ever being stored (other platforms' manifests, unpulled layers).
    dead = set(deleted) | forgotten | {c for m in forgotten for c in _edges(graph, m)}
    with index.locked():
        index.drop_allows([d for d in dead if not index.is_referenced(d)])

    stats.bytes_after = stats.bytes_before - stats.bytes_freed
    stats.objects_after = stats.objects_before - stats.objects_deleted
    stats.over_budget = stats.bytes_after > max_bytes
    _publish(stats)
    log.info("gc.collected", roots_evicted=stats.roots_evicted,
             manifests_forgotten=stats.manifests_forgotten, objects_deleted=stats.objects_deleted,
             bytes_freed=stats.bytes_freed, bytes_after=stats.bytes_after,
             over_budget=stats.over_budget)
    return stats


def _publish(stats: GcStats) -> None:
    metrics.STORE_BYTES.set(stats.bytes_after)
    metrics.STORE_OBJECTS.set(stats.objects_after)
    metrics.GC_OVER_BUDGET.set(1 if stats.over_budget else 0)


def fsck(store: BlobStore, index: Index,
         progress: ProgressReporter = NO_PROGRESS) -> FsckReport:
    """Re-hash every object; quarantine corrupt ones and drop their index rows (so the mirror
    fetches them again); report indexed objects that are missing, objects the index does not
    know, and staging leftovers. Read-only apart from the quarantine. ``progress`` sees the
    listing and the hashing (counted in bytes) as phases."""
    report = FsckReport()
    graph = index.graph()
    on_disk: set[Digest] = set()
    listed: list[ObjectInfo] = []
    with progress.phase("listing store") as step:  # first, so hashing has a known total
        for info in store.iter_objects():
            listed.append(info)
            step.advance()
    with progress.phase("hashing", sum(i.size for i in listed), unit=BYTES) as step:
        for info in listed:
            actual = store.hash_object(info.digest)
            step.advance(info.size)
            if actual is None:  # removed meanwhile (gc)
                continue
            report.objects_checked += 1
            report.bytes_checked += info.size
            if actual != info.digest:
                store.quarantine(info.digest)
                report.corrupt.append(info.digest)
                continue
            on_disk.add(info.digest)
            if info.digest not in graph.manifests and info.digest not in graph.blobs:
                report.unindexed.append(info.digest)
    if report.corrupt:
        index.forget_objects(report.corrupt)
        log.warning("fsck.corrupt", count=len(report.corrupt),
                    digests=[str(d) for d in report.corrupt[:20]])
    indexed = set(graph.manifests) | set(graph.blobs)
    report.missing = sorted((d for d in indexed - on_disk if d not in report.corrupt), key=str)
    report.staging = store.staging_entries()
    return report
