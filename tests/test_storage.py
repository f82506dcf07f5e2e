"""Tests for sigil.storage: the blob store, the index, gc and fsck, on a real filesystem."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sigil import metrics
from sigil.errors import BlobUnknown, DigestInvalid, StorageError
from sigil.oci.digest import Digest
from sigil.oci.manifest import OCI_INDEX, OCI_MANIFEST
from sigil.storage import BlobStore, Index, ObjectInfo, collect, fsck
from sigil.storage.index import SCHEMA_VERSION

FP = "policy-fp-1"
HOUR = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "root")


@pytest.fixture
def index(store: BlobStore) -> Iterator[Index]:
    idx = Index(store.root / "index.sqlite")
    yield idx
    idx.close()


def put_blob(store: BlobStore, index: Index, data: bytes) -> Digest:
    digest = Digest.of(data)
    store.put_bytes(digest, data)
    index.put_blob(digest, len(data))
    return digest


def put_manifest(store: BlobStore, index: Index, body: dict[str, object], refs: list[Digest],
                 *, accessed: float) -> Digest:
    raw = json.dumps(body, sort_keys=True).encode()
    digest = Digest.of(raw)
    store.put_bytes(digest, raw)
    index.put_manifest(digest, str(body["mediaType"]), len(raw), refs, now=accessed)
    return digest


def image(store: BlobStore, index: Index, layers: list[bytes], *, accessed: float,
          name: str = "img") -> tuple[Digest, list[Digest]]:
    """Store an image manifest with a config and layers; return (manifest, [config, layers])."""
    blobs = [put_blob(store, index, json.dumps({"name": name}).encode())]
    blobs += [put_blob(store, index, layer) for layer in layers]
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"digest": str(blobs[0])}, "layers": [str(b) for b in blobs[1:]]}
    return put_manifest(store, index, body, blobs, accessed=accessed), blobs


def evictions(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("sigil_evictions_total", {"kind": kind}) or 0.0


# --- BlobStore ---------------------------------------------------------------------------------


def test_put_read_round_trip(store: BlobStore) -> None:
    data = b"hello layer"
    digest = Digest.of(data)
    assert not store.has(digest) and store.size(digest) is None
    path = store.put_bytes(digest, data)
    assert path == store.root / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    assert store.has(digest) and store.size(digest) == len(data)
    assert store.read_bytes(digest) == data
    assert list(store.iter_digests()) == [digest]
    assert store.total_bytes() == len(data)
    assert store.put_bytes(digest, data) == path  # idempotent
    assert store.staging_entries() == []  # the staging file became the blob
    assert store.delete(digest) and not store.has(digest) and not store.delete(digest)
    with pytest.raises(BlobUnknown):
        store.read_bytes(digest)


def test_put_bytes_digest_mismatch_writes_nothing(store: BlobStore) -> None:
    claimed = Digest.of(b"what the upstream promised")
    with pytest.raises(DigestInvalid):
        store.put_bytes(claimed, b"what it sent")
    assert not store.path(claimed).exists()
    assert list(store.iter_digests()) == [] and store.staging_entries() == []


async def test_staging_commit(store: BlobStore) -> None:
    staging = store.new_staging()
    assert staging.path.parent == store.staging_dir
    chunks = [b"a" * 70000, b"b" * 3, b"c" * 100000]
    for chunk in chunks:
        staging.write(chunk)
    data = b"".join(chunks)
    digest = Digest.of(data)
    assert staging.size == len(data) and staging.digest == digest
    assert not store.has(digest)  # nothing visible under blobs/ before commit
    path = await staging.commit(digest)
    assert path == store.path(digest) and path.read_bytes() == data
    assert not staging.path.exists() and staging.closed
    with pytest.raises(StorageError):
        staging.write(b"more")


async def test_staging_commit_mismatch_removes_file(store: BlobStore) -> None:
    staging = store.new_staging()
    staging.write(b"tampered bytes")
    expected = Digest.of(b"genuine bytes")
    with pytest.raises(DigestInvalid):
        await staging.commit(expected)
    assert not staging.path.exists() and not store.has(expected)
    assert list(store.iter_digests()) == []


def test_staging_abort(store: BlobStore) -> None:
    staging = store.new_staging()
    staging.write(b"partial")
    assert staging.path.exists()
    staging.abort()
    staging.abort()  # idempotent
    assert not staging.path.exists() and store.staging_entries() == []


def test_cleanup_staging_removes_leftovers(store: BlobStore) -> None:
    # What a crash leaves behind: files (and a stray directory) in staging/.
    (store.staging_dir / "dead-download-1").write_bytes(b"x" * 10)
    (store.staging_dir / "dead-download-2").write_bytes(b"")
    (store.staging_dir / "stray").mkdir()
    (store.staging_dir / "stray" / "f").write_bytes(b"y")
    kept = store.put_bytes(Digest.of(b"committed"), b"committed")
    assert store.cleanup_staging() == 3
    assert store.staging_entries() == []
    assert kept.read_bytes() == b"committed"
    assert store.cleanup_staging() == 0


async def test_reader_of_staging_file_reads_everything_after_commit(store: BlobStore) -> None:
    staging = store.new_staging()
    staging.write(b"first half|")
    # Another client streaming the download (a small local file: blocking open is fine here).
    with open(staging.path, "rb") as reader:
        assert reader.read() == b"first half|"  # unbuffered: visible as soon as written
        staging.write(b"second half")
        digest = Digest.of(b"first half|second half")
        await staging.commit(digest)
        assert not staging.path.exists()
        assert reader.read() == b"second half"  # same inode: the rename kept it valid
        # Moved, not copied: a copy would be visible under blobs/ half-written.
        assert os.fstat(reader.fileno()).st_ino == store.path(digest).stat().st_ino
    assert store.read_bytes(digest) == b"first half|second half"


def test_iter_digests_ignores_junk(store: BlobStore) -> None:
    good = Digest.of(b"good")
    store.put_bytes(good, b"good")
    other = Digest.of(b"other").hex
    wrong_fan = "00" if not other.startswith("00") else "01"
    (store.blobs_dir / wrong_fan).mkdir(exist_ok=True)
    (store.blobs_dir / wrong_fan / other).write_bytes(b"misplaced")
    (store.blobs_dir / "zz").mkdir()
    (store.blobs_dir / "zz" / ("z" * 64)).write_bytes(b"junk")
    (store.blobs_dir / "README").write_text("junk")
    (store.path(good).parent / (good.hex + ".tmp")).write_bytes(b"junk")
    assert list(store.iter_digests()) == [good]
    assert store.total_bytes() == len(b"good")


def test_paths_come_only_from_valid_digests(store: BlobStore) -> None:
    for text in ("sha256:../../../etc/passwd", "sha256:" + "A" * 64, "sha512:" + "a" * 128,
                 "sha256:" + "a" * 63, "../" + "a" * 64, "sha256:" + "a" * 64 + "/.."):
        with pytest.raises(DigestInvalid):
            Digest.parse(text)
    # A Digest built without parse() still cannot name a path outside the store.
    for hex_ in ("../../../../etc/passwd", "a" * 62 + "/x", ""):
        with pytest.raises(DigestInvalid):
            store.path(Digest(hex_))
    assert store.path(Digest.parse("sha256:" + "ab" * 32)).is_relative_to(store.blobs_dir)


def test_quarantine_moves_object(store: BlobStore) -> None:
    digest = Digest.of(b"suspect")
    store.put_bytes(digest, b"suspect")
    moved = store.quarantine(digest)
    assert moved == store.quarantine_dir / digest.hex and moved.read_bytes() == b"suspect"
    assert not store.has(digest) and store.quarantine(digest) is None


# --- Index -------------------------------------------------------------------------------------


def test_index_schema_wal_and_reopen(store: BlobStore, index: Index) -> None:
    digest = Digest.of(b"m")
    index.put_tag("docker.io", "library/alpine", "3.20", digest, OCI_MANIFEST, 100.0)
    index.close()
    with sqlite3.connect(store.root / "index.sqlite") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    again = Index(store.root / "index.sqlite")
    try:
        row = again.get_tag("docker.io", "library/alpine", "3.20")
        assert row is not None and row.digest == digest
    finally:
        again.close()


def test_index_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StorageError, match="newer"):
        Index(path)


def test_tags(index: Index) -> None:
    a, b = Digest.of(b"a"), Digest.of(b"b")
    assert index.get_tag("docker.io", "library/nginx", "latest") is None
    index.put_tag("docker.io", "library/nginx", "latest", a, OCI_INDEX, 10.0)
    row = index.get_tag("docker.io", "library/nginx", "latest")
    assert row is not None and (row.digest, row.media_type, row.checked_at) == (a, OCI_INDEX, 10.0)
    assert index.get_tag("ghcr.io", "library/nginx", "latest") is None  # per upstream
    index.put_tag("docker.io", "library/nginx", "latest", b, OCI_MANIFEST, 20.0)
    row = index.get_tag("docker.io", "library/nginx", "latest")
    assert row is not None and (row.digest, row.checked_at) == (b, 20.0)
    assert index.delete_tag("docker.io", "library/nginx", "latest")
    assert not index.delete_tag("docker.io", "library/nginx", "latest")
    assert index.get_tag("docker.io", "library/nginx", "latest") is None


def test_verdicts_expire_and_follow_fingerprint(index: Index) -> None:
    digest = Digest.of(b"image")
    assert index.get_verdict(digest, FP, now=0.0) is None
    index.put_verdict(digest, FP, True, '{"policy": "p"}', expires_at=1000.0)
    row = index.get_verdict(digest, FP, now=999.0)
    assert row is not None and row.allowed and json.loads(row.detail) == {"policy": "p"}
    assert index.get_verdict(digest, FP, now=1000.0) is None  # expired
    assert index.get_verdict(digest, "policy-fp-2", now=0.0) is None  # policy changed
    index.put_verdict(digest, FP, False, '{"reason": "no_signature"}', expires_at=2000.0)
    row = index.get_verdict(digest, FP, now=1500.0)
    assert row is not None and not row.allowed and row.expires_at == 2000.0
    assert index.prune_verdicts(now=2000.0) == 1
    assert index.get_verdict(digest, FP, now=0.0) is None


def test_blob_gate_allows(index: Index) -> None:
    layer, other = Digest.of(b"layer"), Digest.of(b"other")
    index.allow("docker.io", "library/nginx", [layer], FP)
    index.allow("docker.io", "library/nginx", [layer], FP)  # idempotent
    assert index.is_allowed("docker.io", "library/nginx", layer, FP)
    assert not index.is_allowed("docker.io", "library/nginx", other, FP)
    assert not index.is_allowed("docker.io", "library/redis", layer, FP)  # per repository
    assert not index.is_allowed("ghcr.io", "library/nginx", layer, FP)  # per upstream
    assert not index.is_allowed("docker.io", "library/nginx", layer, "policy-fp-2")
    index.allow("docker.io", "library/nginx", [other], "policy-fp-2")
    assert index.prune_allows("policy-fp-2") == 1
    assert not index.is_allowed("docker.io", "library/nginx", layer, FP)
    assert index.is_allowed("docker.io", "library/nginx", other, "policy-fp-2")


def test_manifests_touch_and_links(index: Index) -> None:
    m, child, sig = Digest.of(b"m"), Digest.of(b"child"), Digest.of(b"sig")
    assert index.get_manifest(m) is None
    index.put_manifest(m, OCI_INDEX, 123, [child, child], now=1000.0)
    row = index.get_manifest(m)
    assert row is not None and (row.media_type, row.size, row.last_access) == (OCI_INDEX, 123,
                                                                                1000.0)
    assert index.get_references(m) == [child]
    index.touch(m, 1030.0)  # within the precision window: no write
    assert index.get_manifest(m).last_access == 1000.0  # type: ignore[union-attr]
    index.touch(m, 1100.0)
    assert index.get_manifest(m).last_access == 1100.0  # type: ignore[union-attr]
    index.touch(child, 5000.0)  # unknown manifest: nothing to do
    assert index.get_manifest(child) is None
    index.add_referrer(m, sig)
    index.add_referrer(m, sig)
    assert index.get_referrers(m) == [sig]


def test_forget_manifests_spares_one_a_new_manifest_points_at(index: Index) -> None:
    # gc planned to drop `old`, then the mirror stored `new`, an index listing `old`.
    old, layer, new = Digest.of(b"old"), Digest.of(b"layer"), Digest.of(b"new")
    index.put_manifest(old, OCI_MANIFEST, 10, [layer], now=0.0)
    index.put_manifest(new, OCI_INDEX, 10, [old], now=0.0)
    forgotten, _ = index.forget_manifests([old])
    assert forgotten == set()
    assert index.get_manifest(old) is not None and index.is_referenced(layer)
    forgotten, _ = index.forget_manifests([old, new])
    assert forgotten == {old, new} and not index.is_referenced(layer)


# --- gc ----------------------------------------------------------------------------------------


def test_gc_under_budget_does_nothing(store: BlobStore, index: Index) -> None:
    now = time.time() + 10 * HOUR
    m, _ = image(store, index, [b"L" * 100], accessed=0.0)
    stray = Digest.of(b"unindexed")
    store.put_bytes(stray, b"unindexed")
    before = sorted(store.iter_digests(), key=str)
    stats = collect(store, index, store.total_bytes(), now=now)
    assert stats.objects_deleted == 0 and stats.roots_evicted == 0
    assert sorted(store.iter_digests(), key=str) == before
    assert index.get_manifest(m) is not None
    assert metrics.REGISTRY.get_sample_value("sigil_store_bytes") == store.total_bytes()


def test_gc_evicts_lru_root_with_its_exclusive_blobs(store: BlobStore, index: Index) -> None:
    now = time.time() + 10 * HOUR
    base = b"B" * 1000
    old, old_blobs = image(store, index, [base, b"O" * 5000], accessed=now - 5 * HOUR, name="o")
    new, new_blobs = image(store, index, [base, b"N" * 5000], accessed=now - 4 * HOUR, name="n")
    index.put_tag("docker.io", "acme/app", "v1", old, OCI_MANIFEST, now)
    index.put_tag("docker.io", "acme/app", "v2", new, OCI_MANIFEST, now)
    index.allow("docker.io", "acme/app", old_blobs + new_blobs, FP)
    index.touch(new, now - 2 * HOUR)
    blob_evictions = evictions("blob")
    total = store.total_bytes()

    stats = collect(store, index, total - 1, now=now)

    old_size = store.size(new)  # both manifests are the same shape, roughly the same size
    assert stats.roots_evicted == 1 and stats.manifests_forgotten == 1
    assert not store.has(old) and index.get_manifest(old) is None
    assert not store.has(old_blobs[0]) and not store.has(old_blobs[2])  # config, own layer
    assert store.has(old_blobs[1])  # shared base layer: `new` still references it
    assert all(store.has(d) for d in [new, *new_blobs])
    assert index.get_manifest(new) is not None
    assert index.get_tag("docker.io", "acme/app", "v1") is None and stats.tags_deleted == 1
    assert index.get_tag("docker.io", "acme/app", "v2") is not None
    assert not index.is_allowed("docker.io", "acme/app", old_blobs[2], FP)
    assert index.is_allowed("docker.io", "acme/app", old_blobs[1], FP)  # shared layer
    assert index.blob_size(old_blobs[2]) is None and index.blob_size(new_blobs[2]) == 5000
    assert stats.objects_deleted == 3 and stats.bytes_after == store.total_bytes()
    assert stats.bytes_freed == total - store.total_bytes() and old_size is not None
    assert not stats.over_budget
    assert evictions("blob") == blob_evictions + 2
    assert metrics.REGISTRY.get_sample_value("sigil_store_objects") == stats.objects_after


def test_gc_keeps_signatures_with_their_subject(store: BlobStore, index: Index) -> None:
    now = time.time() + 10 * HOUR
    old, old_blobs = image(store, index, [b"O" * 3000], accessed=now - 5 * HOUR, name="o")
    new, new_blobs = image(store, index, [b"N" * 3000], accessed=now - 4 * HOUR, name="n")
    # Signatures are manifests too, with their own payload blobs, and old access times (they
    # are fetched once, when verifying): they live as long as their subject.
    sig_new, sig_new_blobs = image(store, index, [b"payload-new"], accessed=0.0, name="sn")
    sig_old, sig_old_blobs = image(store, index, [b"payload-old"], accessed=0.0, name="so")
    index.add_referrer(new, sig_new)
    index.add_referrer(old, sig_old)

    stats = collect(store, index, store.total_bytes() - 1, now=now)

    assert stats.roots_evicted == 1
    assert all(store.has(d) for d in [new, *new_blobs, sig_new, *sig_new_blobs])
    assert index.get_manifest(sig_new) is not None and index.get_referrers(new) == [sig_new]
    assert not any(store.has(d) for d in [old, *old_blobs, sig_old, *sig_old_blobs])
    assert index.get_manifest(sig_old) is None and index.get_referrers(old) == []


def test_gc_index_recency_counts_its_children(store: BlobStore, index: Index) -> None:
    now = time.time() + 10 * HOUR
    amd64, amd64_blobs = image(store, index, [b"A" * 4000], accessed=now - 9 * HOUR, name="a")
    arm64 = Digest.of(b"never pulled")  # listed in the index, never stored
    idx = put_manifest(store, index, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                      "manifests": [str(amd64), str(arm64)]},
                       [amd64, arm64], accessed=now - 9 * HOUR)
    index.allow("docker.io", "acme/multi", [amd64, arm64], FP)
    other, other_blobs = image(store, index, [b"X" * 4000], accessed=now - 5 * HOUR, name="x")
    index.touch(amd64, now - 1 * HOUR)  # the platform manifest was pulled recently by digest

    stats = collect(store, index, store.total_bytes() - 1, now=now)

    assert stats.roots_evicted == 1
    assert all(store.has(d) for d in [idx, amd64, *amd64_blobs])
    assert not any(store.has(d) for d in [other, *other_blobs])
    assert index.is_allowed("docker.io", "acme/multi", arm64, FP)

    # Evicting the index takes its children, and the allows of what was never stored.
    stats = collect(store, index, 1, now=now)
    assert stats.roots_evicted == 1 and stats.manifests_forgotten == 2
    assert list(store.iter_digests()) == [] and index.get_manifest(amd64) is None
    assert not index.is_allowed("docker.io", "acme/multi", arm64, FP)


def test_gc_spares_recent_roots_and_young_unindexed_objects(store: BlobStore,
                                                            index: Index) -> None:
    wall = time.time()
    m, blobs = image(store, index, [b"R" * 2000], accessed=wall)
    stray = Digest.of(b"committed, index row not yet written")
    store.put_bytes(stray, b"committed, index row not yet written")

    stats = collect(store, index, 1, now=wall + 60)  # within the grace period
    assert stats.objects_deleted == 0 and stats.over_budget
    assert all(store.has(d) for d in [m, *blobs, stray])

    stats = collect(store, index, 1, now=wall + 10 * HOUR)
    assert stats.objects_deleted == len(blobs) + 2 and not stats.over_budget
    assert list(store.iter_digests()) == []


def test_gc_never_deletes_blob_of_retained_manifest(store: BlobStore, index: Index) -> None:
    now = time.time() + 10 * HOUR
    shared = b"S" * 10000
    old, old_blobs = image(store, index, [shared], accessed=now - 5 * HOUR, name="o")
    keep, keep_blobs = image(store, index, [shared], accessed=now - 1, name="k")  # in grace
    stats = collect(store, index, 1, now=now)
    assert stats.roots_evicted == 1 and stats.over_budget
    assert all(store.has(d) for d in [keep, *keep_blobs])
    assert not store.has(old) and not store.has(old_blobs[0])


class RacingStore(BlobStore):
    """A real store that runs ``during_walk`` after gc has listed the objects, the way a
    mirror request served concurrently with a gc thread would."""

    during_walk: Callable[[], None] | None = None

    def iter_objects(self) -> Iterator[ObjectInfo]:
        yield from super().iter_objects()
        if self.during_walk is not None:
            self.during_walk()
            self.during_walk = None


def test_gc_spares_what_a_manifest_recorded_meanwhile_references(tmp_path: Path) -> None:
    store = RacingStore(tmp_path / "root")
    index = Index(store.root / "index.sqlite")
    try:
        now = time.time() + 10 * HOUR
        old, old_blobs = image(store, index, [b"O" * 5000], accessed=now - 5 * HOUR, name="o")
        kept, _ = image(store, index, [b"K" * 5000], accessed=now - 4 * HOUR, name="k")
        # While gc plans to evict `old`, a new image reusing `old`'s layer is stored.
        body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [str(old_blobs[1])]}
        budget = store.total_bytes() - 1

        def mirror_stores_new_image() -> None:
            put_manifest(store, index, body, [old_blobs[1]], accessed=now)

        store.during_walk = mirror_stores_new_image

        stats = collect(store, index, budget, now=now)

        assert stats.roots_evicted == 1 and not store.has(old) and store.has(kept)
        assert store.has(old_blobs[1])  # the new manifest references it
        assert not store.has(old_blobs[0])  # old's config is referenced by nobody
    finally:
        index.close()


# --- fsck --------------------------------------------------------------------------------------


def test_fsck_quarantines_corrupt_object(store: BlobStore, index: Index) -> None:
    m, blobs = image(store, index, [b"layer bytes " * 100], accessed=0.0)
    victim = blobs[1]
    path = store.path(victim)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit on disk
    path.write_bytes(bytes(raw))
    gone = Digest.of(b"indexed but lost")
    index.put_blob(gone, 16)
    unindexed = Digest.of(b"on disk only")
    store.put_bytes(unindexed, b"on disk only")
    (store.staging_dir / "leftover").write_bytes(b"partial")

    report = fsck(store, index)

    assert report.corrupt == [victim] and not report.ok
    assert not store.has(victim) and (store.quarantine_dir / victim.hex).read_bytes() == raw
    assert index.blob_size(victim) is None
    assert report.missing == [gone]
    assert report.unindexed == [unindexed]
    assert report.staging == [store.staging_dir / "leftover"]
    assert report.objects_checked == 4  # config, manifest, unindexed, victim
    assert index.get_manifest(m) is not None and store.has(m)

    again = fsck(store, index)
    assert again.corrupt == [] and again.objects_checked == 3
