"""gc's orphan sweep: committed objects no index row accounts for (a killed import or replica).

The incremental gc (:func:`~sigil.storage.maintenance.collect_incremental`) is driven by the
index, so an object committed without its row is invisible to eviction. Each pass therefore
lists a bounded slice of the store and deletes the unindexed objects older than
``storage.orphan_grace``, through ``AsyncIndex.delete_unreferenced``. Ages are the store's
own (file mtime, S3 LastModified): the tests store an "old" and a "young" object a moment
apart and place the grace boundary between the two ages the store reports.

Real parts: SeaweedFS for S3, PostgreSQL, SQLite files (the ``backends`` fixture of
tests/test_gc_race.py). The last test (an export closing its backends when an upstream client
cannot be built) rides along here: it came with the same review of the fleet backends.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from sigil.oci.digest import Digest
from sigil.storage.blobs import ObjectInfo
from sigil.storage.contracts import AsyncIndex, GcLease
from sigil.storage.maintenance import (
    ORPHAN_CURSOR_KEY,
    IncrementalGcStats,
    OrphanCursor,
    StoredOrphanCursor,
    check_objects,
    collect_incremental,
)
from tests import test_gc_race
from tests.test_gc_race import BOUND, Backends

backends = test_gc_race.backends  # the fixture, found by name

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GRACE = 3600.0
BUDGET = 1 << 40  # far under budget: nothing is evicted, only orphans go


async def _put(b: Backends) -> tuple[Digest, bytes]:
    data = os.urandom(2048)
    digest = Digest.of(data)
    await b.objects.put_bytes(digest, data)
    return digest, data


async def _ages(b: Backends) -> dict[Digest, ObjectInfo]:
    return {info.digest: info async for info in b.objects.iter_objects()}


async def _later(b: Backends, after: float) -> None:
    """Wait until an object stored now gets a store time above ``after`` (S3 LastModified has
    one-second resolution): probe with a throwaway object, deleted again."""
    for _ in range(50):
        probe, _ = await _put(b)
        mtime = (await _ages(b))[probe].mtime
        await b.objects.delete(probe)
        if mtime > after:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the store's clock did not move")


async def _gc(b: Backends, now: float, *, lease: GcLease | None = None, limit: int = 1000,
              cursor: OrphanCursor | None = None) -> IncrementalGcStats:
    if cursor is None:
        cursor = OrphanCursor()
        cursor.after = None  # from the beginning: the whole (small) store in one pass
    return await asyncio.wait_for(collect_incremental(
        b.objects, b.index, lease or b.leases, "gc-test", BUDGET, now=now,
        orphan_grace=GRACE, orphan_batch=limit, orphan_cursor=cursor), BOUND)


async def _old_and_young(b: Backends) -> tuple[list[Digest], list[Digest], float]:
    """Indexed objects and an old orphan stored first, a young orphan a moment later; return
    (old objects, young objects, a ``now`` whose grace boundary falls between them)."""
    layer, layer_raw = await _put(b)
    await b.index.put_blob(layer, len(layer_raw))
    lone, lone_raw = await _put(b)       # an indexed blob no manifest references
    await b.index.put_blob(lone, len(lone_raw))
    manifest, manifest_raw = await _put(b)
    await b.index.put_manifest(manifest, MANIFEST, len(manifest_raw), [layer], now=100.0)
    old_orphan, _ = await _put(b)
    old = [layer, lone, manifest, old_orphan]
    await _later(b, max(i.mtime for d, i in (await _ages(b)).items() if d in old))
    young_orphan, _ = await _put(b)
    ages = await _ages(b)
    boundary = (max(ages[d].mtime for d in old) + ages[young_orphan].mtime) / 2
    return old, [young_orphan], boundary + GRACE


async def test_an_old_orphan_goes_a_young_one_and_every_indexed_object_stay(
        backends: Backends) -> None:
    b = backends
    (layer, lone, manifest, old_orphan), (young_orphan,), now = await _old_and_young(b)
    stats = await _gc(b, now)
    assert stats.ran and stats.roots_evicted == 0
    assert stats.orphans_listed == 5 and stats.orphans_deleted == 1
    assert stats.orphan_bytes_freed == 2048 and stats.bytes_freed == 2048
    assert not await b.objects.has(old_orphan)
    for kept in (layer, lone, manifest, young_orphan):
        assert await b.objects.has(kept), kept
    assert await b.index.blob_size(layer) == 2048 and await b.index.blob_size(lone) == 2048
    assert await b.index.get_references(manifest) == [layer]
    report = await check_objects(b.objects, b.index)
    assert report.ok and report.unindexed == [young_orphan]


async def test_a_pass_lists_a_bounded_slice_and_the_cursor_goes_on(backends: Backends) -> None:
    b = backends
    orphans = [(await _put(b))[0] for _ in range(5)]
    kept, _ = await _put(b)
    await b.index.put_blob(kept, 2048)
    await _later(b, max(i.mtime for i in (await _ages(b)).values()))
    now = max(i.mtime for i in (await _ages(b)).values()) + GRACE + 1
    cursor = OrphanCursor()
    cursor.after = None
    listed = []
    for _ in range(3):  # 6 objects, 2 a pass
        stats = await _gc(b, now, limit=2, cursor=cursor)
        assert stats.orphans_listed <= 2
        listed.append(stats.orphans_listed)
    assert sum(listed) == 6
    assert [d for d in orphans if await b.objects.has(d)] == []
    assert await b.objects.has(kept)
    # Once a pass runs out of objects, the next one starts at the beginning again.
    for _ in range(3):
        if (await _gc(b, now, limit=2, cursor=cursor)).orphans_listed < 2:
            break
    assert cursor.after is None
    assert (await _gc(b, now, limit=2, cursor=cursor)).orphans_listed == 1  # only `kept` left


class CountingIndex:
    """The real index, noting every call the sweep makes through it (name, arguments)."""

    def __init__(self, inner: AsyncIndex) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return await method(*args, **kwargs)

        return counted

    def lookups(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The calls that ask whether an object has rows."""
        return [c for c in self.calls if c[0] in ("indexed", "get_manifest", "blob_size")]


async def _pass(b: Backends, index: AsyncIndex, now: float, limit: int,
                holder: str = "gc-test") -> tuple[IncrementalGcStats, CountingIndex]:
    """One gc pass as a freshly started process makes it: its own cursor object, which
    knows only what the index stores."""
    counting = CountingIndex(index)
    stats = await asyncio.wait_for(collect_incremental(
        b.objects, counting, b.leases, holder, BUDGET, now=now,  # type: ignore[arg-type]
        orphan_grace=GRACE, orphan_batch=limit, orphan_cursor=StoredOrphanCursor()), BOUND)
    return stats, counting


async def test_the_stored_cursor_survives_a_restart_and_another_replica_goes_on(
        backends: Backends) -> None:
    b = backends
    digests = []
    for _ in range(5):  # indexed objects: listed, never deleted, so a repeat would show
        digest, raw = await _put(b)
        await b.index.put_blob(digest, len(raw))
        digests.append(digest)
    digests.sort(key=str)
    now = max(i.mtime for i in (await _ages(b)).values()) + GRACE + 1
    await b.index.put_meta(ORPHAN_CURSOR_KEY, "")  # start at the beginning (not at random)
    first, counted = await _pass(b, b.index, now, limit=2)
    assert first.orphans_listed == 2 and first.orphans_deleted == 0
    assert counted.lookups() == [("indexed", (digests[:2],))]  # one query for the slice
    assert await b.index.get_meta(ORPHAN_CURSOR_KEY) == digests[1].hex
    # A restart, and the gc lease on another replica: its own connection, its own cursor.
    other = await b.other_index()
    second, counted = await _pass(b, other, now, limit=2, holder="replica-2")
    assert second.orphans_listed == 2
    assert counted.lookups() == [("indexed", (digests[2:4],))]  # the next slice, not the first
    third, counted = await _pass(b, b.index, now, limit=2)
    assert third.orphans_listed == 1 and counted.lookups() == [("indexed", (digests[4:],))]
    assert await b.index.get_meta(ORPHAN_CURSOR_KEY) == ""  # ran out: the beginning next
    assert (await _pass(b, other, now, limit=2))[1].lookups() == [
        ("indexed", (digests[:2],))]


async def test_one_batched_query_per_slice_and_a_recheck_per_delete(backends: Backends) -> None:
    """Six old objects listed, two of them indexed: one query answers for all six, then each
    of the four orphans is asked again just before its delete, and nothing else is asked
    (before: two point lookups per listed object, and two more per candidate)."""
    b = backends
    orphans = [(await _put(b))[0] for _ in range(4)]
    indexed = []
    for _ in range(2):
        digest, raw = await _put(b)
        await b.index.put_blob(digest, len(raw))
        indexed.append(digest)
    now = max(i.mtime for i in (await _ages(b)).values()) + GRACE + 1
    await b.index.put_meta(ORPHAN_CURSOR_KEY, "")
    stats, counted = await _pass(b, b.index, now, limit=100)
    assert stats.orphans_listed == 6 and stats.orphans_deleted == 4
    lookups = counted.lookups()
    assert lookups[0] == ("indexed", (sorted(orphans + indexed, key=str),))
    assert sorted(lookups[1:], key=str) == sorted((("indexed", ([d],)) for d in orphans),
                                                  key=str)
    assert [d for d in orphans if await b.objects.has(d)] == []
    assert all([await b.objects.has(d) for d in indexed])


class HeldRenew:
    """The real gc lease, whose first renewal (the sweep's, just before it re-checks and
    deletes an orphan) announces itself and waits for :attr:`release`."""

    def __init__(self, inner: GcLease) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        return await self.inner.acquire_gc(holder, ttl)

    async def release_gc(self, holder: str) -> None:
        await self.inner.release_gc(holder)

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        if not self.entered.is_set():
            self.entered.set()
            await self.release.wait()
        return await self.inner.renew_gc(holder, ttl)


@pytest.mark.parametrize("writer", ["manifest", "blob row"])
async def test_an_orphan_named_during_the_sweep_is_kept(backends: Backends,
                                                        writer: str) -> None:
    """The sweep found an old orphan; before it deletes it, a replica stores a manifest that
    references it (or writes its missing blob row): the orphan must stay."""
    b = backends
    orphan, orphan_raw = await _put(b)
    await _later(b, (await _ages(b))[orphan].mtime)
    now = (await _ages(b))[orphan].mtime + GRACE + 1
    other = await b.other_index()
    held = HeldRenew(b.leases)
    cursor = OrphanCursor()
    cursor.after = None
    gc = asyncio.create_task(_gc(b, now, lease=held, cursor=cursor))  # type: ignore[arg-type]
    await asyncio.wait_for(held.entered.wait(), BOUND)
    new, new_raw = await _put(b)
    if writer == "manifest":
        await other.put_manifest(new, MANIFEST, len(new_raw), [orphan])
    else:
        await other.put_blob(orphan, len(orphan_raw))
    held.release.set()
    stats = await gc
    assert stats.ran and stats.orphans_deleted == 0
    assert await b.objects.has(orphan), "gc deleted an object a replica had just named"
    assert await b.objects.read_bytes(orphan) == orphan_raw
    if writer == "blob row":
        assert await b.index.blob_size(orphan) == len(orphan_raw)
    else:
        assert await b.index.get_references(new) == [orphan]
    report = await check_objects(b.objects, b.index)
    assert report.ok and report.missing == []


async def test_no_sweep_without_the_lease_and_uploads_in_progress_are_untouched(
        backends: Backends) -> None:
    b = backends
    orphan, _ = await _put(b)
    far = (await _ages(b))[orphan].mtime + 10 * GRACE
    assert await b.leases.acquire_gc("another-replica", 60.0)
    try:
        stats = await _gc(b, far)
        assert not stats.ran and stats.orphans_listed == 0
        assert await b.objects.has(orphan)
    finally:
        await b.leases.release_gc("another-replica")
    # An upload under way (a staging file, a multipart upload) is not an object: a sweep that
    # would delete every unindexed object leaves it alone, and it commits afterwards.
    data = os.urandom(3 * 1024 * 1024)
    upload = await b.objects.begin_upload(Digest.of(data))
    try:
        await upload.write(data[:len(data) // 2])
        stats = await _gc(b, far + 10 * GRACE)
        assert stats.ran and stats.orphans_deleted == 1 and not await b.objects.has(orphan)
        await upload.write(data[len(data) // 2:])
        await upload.commit()
    finally:
        await upload.abort()
    assert await b.objects.read_bytes(Digest.of(data)) == data


def test_the_orphan_grace_is_a_duration_of_at_least_an_hour() -> None:
    from sigil.config import ConfigError, build_config

    assert build_config({}).storage.orphan_grace == 24 * 3600.0
    assert build_config({"storage": {"orphan_grace": "48h"}}).storage.orphan_grace == 172800.0
    with pytest.raises(ConfigError, match="at least 1h") as error:
        build_config({"storage": {"orphan_grace": "10m"}}, source="sigil.yaml")
    assert "storage.orphan_grace" in str(error.value) and "sigil.yaml" in str(error.value)
    with pytest.raises(ConfigError, match="duration"):
        build_config({"storage": {"orphan_grace": "soon"}})


async def test_an_export_whose_upstream_client_fails_closes_the_backends(
        pg_dsn: str, tmp_path: Path) -> None:
    """(export.py) The upstream clients are built after the fleet backends are opened: a client
    that cannot be built (a CA bundle that is not PEM) must not leave the PostgreSQL pool open.
    Counted on the server: the database's connections besides the probe's own."""
    import asyncpg

    from sigil.airgap.export import Exporter
    from sigil.airgap.plan import Plan
    from sigil.config import ConfigError, build_config

    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    config = build_config({
        "storage": {"root": str(tmp_path / "root")},
        "index": {"backend": "postgres", "postgres": {"dsn": pg_dsn}},
        "upstreams": [{"name": "private.example", "url": "https://127.0.0.1:9",
                       "ca_bundle": str(bad_ca)}],
    })
    probe = await asyncpg.connect(pg_dsn)
    count = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND pid <> pg_backend_pid()")
    try:
        before = await probe.fetchval(count)
        exporter = Exporter(config, Plan("plan.yaml", ()), tmp_path / "out.tar")
        with pytest.raises(ConfigError, match="ca_bundle"):
            await exporter.run()
        for _ in range(50):  # a closed connection's server process ends a moment later
            if await probe.fetchval(count) == before:
                break
            await asyncio.sleep(0.1)
        assert await probe.fetchval(count) == before, "the export left its database pool open"
    finally:
        await probe.close()
