"""The storage and index contracts a replica needs, and their local (filesystem + SQLite) adapters.

Two implementations exist of each: the embedded one (:class:`~sigil.storage.blobs.BlobStore` on
a local filesystem, :class:`~sigil.storage.index.Index` on SQLite) and the fleet one (S3 object
storage, :mod:`sigil.storage.s3`; PostgreSQL, :mod:`sigil.storage.pgindex`). Every call is
``async`` because the fleet backends are network services; the local adapters below are thin
wrappers over the existing synchronous classes, so the embedded default keeps its speed (short
SQLite calls stay on the event loop thread exactly as before; only whole-store walks move to a
thread). One contract test suite (``tests/test_storage_contract.py``) runs against both.

Objects (:class:`ObjectStore`)
    Immutable, content-addressed. A write is an :class:`UploadSession` begun for the digest the
    caller expects; the object becomes visible under that digest only when :meth:`commit`
    finds that the bytes written hash to it. Until then readers see nothing (a crash leaves an
    invisible staging file or multipart upload that start-up or gc removes).

Index (:class:`AsyncIndex`)
    Every operation of the SQLite :class:`~sigil.storage.index.Index` with the same meaning,
    plus what a shared index needs instead of the SQLite process lock:
    :meth:`AsyncIndex.delete_unreferenced` (check-and-delete atomic against every replica's
    ``put_manifest``), and index-driven gc queries (:meth:`AsyncIndex.gc_candidates`,
    :meth:`AsyncIndex.stored_bytes`) so gc need not walk the whole bucket; batches
    (:meth:`AsyncIndex.indexed`: which of many digests have rows, in one query;
    :meth:`AsyncIndex.record_image`: every row of one image in one transaction); and small
    named values every replica shares (:meth:`AsyncIndex.get_meta`: the orphan sweep's
    cursor).

Leases
    :class:`~sigil.storage.lease.FetchLeases` (per digest, one downloader across processes) and
    :class:`GcLease` (one gc at a time across the fleet).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sigil.errors import BlobUnknown, DigestInvalid, RangeInvalid, StorageError
from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore, ObjectInfo, StagingFile
from sigil.storage.index import (
    Blocked,
    Graph,
    ImageRecord,
    Index,
    ManifestRow,
    TagRow,
    VerdictRow,
    poll_delays,
)

#: Size of the chunks object readers yield.
READ_CHUNK = 1024 * 1024
#: How often SqliteAsyncIndex.record_image tries again when deletes keep coming in between
#: (each try waits longer: :func:`~sigil.storage.index.poll_delays`, about 20 s in all).
RECORD_ATTEMPTS = 100


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """An upload that was begun and neither committed nor aborted (a staging file, or an S3
    multipart upload), as start-up cleanup and fsck see it."""

    name: str         # staging path or "<key> <upload id>"
    started_at: float  # seconds since the epoch, on the store's clock


class ObjectReader(Protocol):
    """A byte range of one stored object, streamed in chunks."""

    @property
    def length(self) -> int:
        """Bytes this reader yields (the range length)."""
        ...

    @property
    def total(self) -> int:
        """Size of the whole object."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...


class UploadSession(Protocol):
    """One object being written; becomes visible only on a successful :meth:`commit`."""

    @property
    def expected(self) -> Digest:
        """The digest the object must have; fixed when the upload begins."""
        ...

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    @property
    def local_path(self) -> Path | None:
        """Where local readers may follow the growing data (a staging file), if anywhere."""
        ...

    @property
    def write_size(self) -> int:
        """The write size the session handles best (S3: one part, sent without a copy)."""
        ...

    def hash_by_caller(self) -> None:
        """Before the first write: the caller hashes exactly the bytes it writes, in order,
        and will :meth:`vouch` for their digest, so the session need not hash them again.

        Only for a caller that can show the written bytes are the hashed ones (the download's
        scratch file, ``Download._upload_scratch`` says why). A session may hash anyway (the
        filesystem one does: its staging file hashes as it writes)."""
        ...

    def vouch(self, digest: Digest, size: int) -> None:
        """The digest and length the caller computed over exactly the bytes it wrote."""
        ...

    def limit_inflight(self, parts: int | None) -> None:
        """Keep at most ``parts`` writes in flight to the store (a background upload yielding
        to the clients); None: the session's configured concurrency. Never raises it above
        that, so the memory bound stands."""
        ...

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. May wait (back-pressure) while an earlier part is uploaded."""
        ...

    async def commit(self) -> None:
        """Publish the object under :attr:`expected` if the bytes written hash to it (or,
        after :meth:`hash_by_caller`, if the vouched digest is it and the vouched length is
        what was written).

        Raise :class:`~sigil.errors.DigestInvalid` (and discard everything written) when they
        do not; :class:`~sigil.errors.StorageError` (discarding too) when a caller that hashes
        did not vouch or vouched for another length. Committing a digest that another writer
        committed meanwhile is fine: the bytes are the same by construction."""
        ...

    async def abort(self) -> None:
        """Discard the upload. Idempotent; a no-op after commit."""
        ...


class ObjectStore(Protocol):
    """Immutable objects named by their sha256 (manifests and blobs alike)."""

    async def has(self, digest: Digest) -> bool:
        """True if the object is stored (committed)."""
        ...

    async def size(self, digest: Digest) -> int | None:
        """The object's size, or None if absent."""
        ...

    def open_range(self, digest: Digest, offset: int = 0,
                   length: int | None = None) -> AbstractAsyncContextManager[ObjectReader]:
        """Stream ``length`` bytes (default: to the end) from ``offset``.

        :class:`~sigil.errors.BlobUnknown` if absent, :class:`~sigil.errors.RangeInvalid` if
        the range is not inside the object."""
        ...

    async def read_bytes(self, digest: Digest) -> bytes:
        """The whole object (small objects such as manifests); BlobUnknown if absent."""
        ...

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store ``data`` as ``digest``; DigestInvalid (storing nothing) if it does not hash
        to it. Idempotent."""
        ...

    async def begin_upload(self, expected: Digest) -> UploadSession:
        """Start writing the object ``expected`` (streamed, never buffered whole)."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove the object; return whether it existed."""
        ...

    def iter_objects(self) -> AsyncIterator[ObjectInfo]:
        """Every committed object (a full walk: fsck and the local gc use it)."""
        ...

    async def hash_object(self, digest: Digest) -> Digest | None:
        """Re-hash the stored bytes (streaming); None if absent."""
        ...

    async def quarantine(self, digest: Digest) -> bool:
        """Move a corrupt object out of the content namespace; False if it was absent."""
        ...

    async def pending_uploads(self) -> list[PendingUpload]:
        """Uploads begun and never finished (staging leftovers)."""
        ...

    async def cleanup_abandoned(self, older_than: float,
                                keep: Callable[[Digest], Awaitable[bool]] | None = None) -> int:
        """Discard pending uploads started more than ``older_than`` seconds ago; return how
        many. Start-up of a single box passes 0 (nothing can resume them); a fleet passes
        more than the longest download, since other replicas' uploads are pending too, and
        may pass ``keep`` (e.g. "a live fetch lease exists for this digest") to spare uploads
        still in progress. Stores whose pending uploads carry no digest ignore ``keep``."""
        ...

    async def presign_url(self, digest: Digest, expires: float) -> str | None:
        """A time-limited URL a client may GET the object from directly, or None when the
        store has no such thing (the filesystem)."""
        ...

    def local_path(self, digest: Digest) -> Path | None:
        """A local file holding the object, for sendfile; None for remote stores."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class AsyncIndex(Protocol):
    """The index: tags, manifests and references, referrers, the blob gate, verdicts and the
    gc graph. Each method has the meaning of the same-named :class:`~sigil.storage.index.Index`
    method; times given by callers are wall-clock seconds."""

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRow | None: ...
    async def put_tag(self, upstream: str, repo: str, tag: str, digest: Digest,
                      media_type: str, checked_at: float) -> None: ...
    async def delete_tag(self, upstream: str, repo: str, tag: str) -> bool: ...
    async def list_tags(self, upstream: str, repo: str, *, last: str | None = None,
                        limit: int | None = None) -> list[str]:
        """Stored tags of the repository after ``last`` (code point order), at most
        ``limit``: one page, cut by the index query."""
        ...


    async def put_manifest(self, digest: Digest, media_type: str, size: int,
                           references: Iterable[Digest], *, now: float | None = None
                           ) -> None: ...
    async def get_manifest(self, digest: Digest) -> ManifestRow | None: ...
    async def get_references(self, digest: Digest) -> list[Digest]: ...
    async def touch(self, digest: Digest, now: float) -> None: ...
    async def add_referrer(self, subject: Digest, referrer: Digest) -> None: ...
    async def get_referrers(self, subject: Digest) -> list[Digest]: ...

    async def put_blob(self, digest: Digest, size: int) -> None: ...
    async def blob_size(self, digest: Digest) -> int | None: ...

    async def allow(self, upstream: str, repo: str, digests: Iterable[Digest],
                    fingerprint: str) -> None: ...
    async def is_allowed(self, upstream: str, repo: str, digest: Digest,
                         fingerprint: str) -> bool: ...
    async def prune_allows(self, fingerprint: str) -> int: ...

    async def get_verdict(self, digest: Digest, fingerprint: str,
                          now: float) -> VerdictRow | None: ...
    async def put_verdict(self, digest: Digest, fingerprint: str, allowed: bool, detail: str,
                          expires_at: float) -> None: ...
    async def prune_verdicts(self, now: float) -> int: ...

    async def graph(self) -> Graph: ...
    async def is_referenced(self, digest: Digest) -> bool: ...
    async def forget_manifests(self, digests: Iterable[Digest]) -> tuple[set[Digest], int]: ...
    async def forget_objects(self, digests: Iterable[Digest]) -> None: ...
    async def drop_allows(self, digests: Iterable[Digest]) -> None: ...

    async def delete_unreferenced(self, digest: Digest,
                                  delete: Callable[[], Awaitable[bool]]) -> bool:
        """Run ``delete()`` only if nothing stored references ``digest``, atomically with
        respect to every writer of this index, in any process: a manifest recorded before the
        check keeps the object; a ``put_manifest``/``add_referrer`` naming it during the
        delete waits until it is over (the caller then finds it gone, and stores it again);
        a ``put_blob`` of it during the delete waits and records nothing. The object's
        manifest and blob rows are dropped before ``delete()`` starts, so no row ever claims
        an object that may be gone (not even after a crash midway). Return what ``delete()``
        returned, or False if it was kept."""
        ...

    async def gc_candidates(self, accessed_before: float, limit: int) -> list[ManifestRow]:
        """Root manifests (no stored manifest points at them) last accessed before
        ``accessed_before``, least recently used first, at most ``limit``: where an
        incremental gc pass starts, without walking the store."""
        ...

    async def stored_bytes(self) -> int:
        """Bytes of every indexed manifest and blob (the index's view of the store size)."""
        ...

    async def indexed(self, digests: Iterable[Digest]) -> set[Digest]:
        """Which of ``digests`` have a manifest or a blob row: one query (or a few, for many
        digests) instead of two point lookups each. A snapshot only: a caller about to delete
        still decides through :meth:`delete_unreferenced`."""
        ...

    async def record_image(self, image: ImageRecord,
                           check: Callable[[], Awaitable[None]] | None = None) -> None:
        """Write every row of one image (blobs, manifests with their references and referrer
        links, tags) in one transaction: a reader in any process sees all of them or none,
        and a failure midway (a refused row, a lost connection) leaves none.

        Waits, like :meth:`put_manifest`, while a digest the rows name is being deleted.
        ``check`` (which raises to refuse) runs where no delete of those digests can come
        between it and the commit: an object it finds stored is still stored when the rows
        appear, and from then on they protect it. Raising from it records nothing."""
        ...

    async def get_meta(self, key: str) -> str | None:
        """A small value every process of this index shares (None if never stored)."""
        ...

    async def put_meta(self, key: str, value: str) -> None:
        """Store (or replace) the value under ``key``."""
        ...

    async def close(self) -> None: ...


class GcLease(Protocol):
    """One gc at a time over a shared store."""

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        """Take the gc lease if free or expired (or already ours: then extend it)."""
        ...

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        """Extend our gc lease; False if it was lost (stop deleting)."""
        ...

    async def release_gc(self, holder: str) -> None:
        """Give the gc lease up (untouched if another holds it)."""
        ...


def check_range(total: int, offset: int, length: int | None) -> int:
    """Validate a byte range against an object of ``total`` bytes; return its length."""
    if offset < 0 or (length is not None and length < 0) or (offset > total) or \
            (offset == total and total > 0 and length != 0):
        raise RangeInvalid(f"range {offset}+{length} is outside an object of {total} bytes")
    end = total if length is None else offset + length
    if end > total:
        raise RangeInvalid(f"range {offset}+{length} is outside an object of {total} bytes")
    return end - offset


def check_vouch(vouched: tuple[Digest, int] | None, written: int, expected: Digest) -> None:
    """For a session whose caller hashes (:meth:`UploadSession.hash_by_caller`): raise
    :class:`StorageError` unless the caller vouched for exactly the ``written`` bytes, and
    :class:`DigestInvalid` unless the digest it vouched for is ``expected``."""
    if vouched is None:
        raise StorageError("upload committed without the caller's digest")
    digest, size = vouched
    if size != written:
        raise StorageError(f"the caller hashed {size} bytes but wrote {written}")
    if digest != expected:
        raise DigestInvalid(f"content digest {digest} does not match {expected}",
                            detail={"expected": str(expected), "actual": str(digest)})


# ------------------------------------------------------------------------------------------
# The embedded backends behind the contracts


class _FileReader:
    """A byte range of a local file, read with pread in a worker thread."""

    def __init__(self, fd: int, offset: int, length: int, total: int) -> None:
        self._fd = fd
        self._offset = offset
        self.length = length
        self.total = total

    async def __aiter__(self) -> AsyncIterator[bytes]:
        at, end = self._offset, self._offset + self.length
        while at < end:
            chunk = await asyncio.to_thread(os.pread, self._fd, min(READ_CHUNK, end - at), at)
            if not chunk:
                raise BlobUnknown("object shrank while it was read")
            at += len(chunk)
            yield chunk


class FilesystemUpload:
    """:class:`UploadSession` over a :class:`~sigil.storage.blobs.StagingFile`."""

    def __init__(self, staging: StagingFile, expected: Digest) -> None:
        self._staging = staging
        self.expected = expected
        self.local_path: Path | None = staging.path
        self._caller_hashes = False
        self._vouched: tuple[Digest, int] | None = None

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._staging.size

    @property
    def write_size(self) -> int:
        """Any size: the staging file writes through."""
        return READ_CHUNK

    def hash_by_caller(self) -> None:
        """Accepted, but the staging file hashes anyway (that hash is the only one here)."""
        self._caller_hashes = True

    def vouch(self, digest: Digest, size: int) -> None:
        """Recorded; :meth:`commit` checks it against the staging file's own hash."""
        self._vouched = (digest, size)

    def limit_inflight(self, parts: int | None) -> None:
        """Nothing is in flight: each write goes straight to the file."""

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append to the staging file (unbuffered: local readers see it at once)."""
        self._staging.write(data)

    async def commit(self) -> None:
        """Verify, fsync and rename into the store (StagingFile.commit), after checking the
        caller's vouch like the S3 session does (the same contract on both backends)."""
        if self._caller_hashes:
            try:
                check_vouch(self._vouched, self.size, self.expected)
            except (StorageError, DigestInvalid):
                self._staging.abort()
                raise
        await self._staging.commit(self.expected)

    async def abort(self) -> None:
        """Remove the staging file."""
        self._staging.abort()


class FilesystemObjectStore:
    """:class:`ObjectStore` over the local :class:`~sigil.storage.blobs.BlobStore`."""

    def __init__(self, store: BlobStore) -> None:
        self.blobs = store

    async def has(self, digest: Digest) -> bool:
        """True if the file exists (a stat: cheap enough for the loop thread)."""
        return self.blobs.has(digest)

    async def size(self, digest: Digest) -> int | None:
        """The file's size, or None."""
        return self.blobs.size(digest)

    @asynccontextmanager
    async def open_range(self, digest: Digest, offset: int = 0,
                         length: int | None = None) -> AsyncIterator[ObjectReader]:
        """Stream a byte range of the file (the server itself uses sendfile instead)."""
        try:
            fd = os.open(self.blobs.path(digest), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BlobUnknown(detail={"digest": str(digest)}) from exc
        try:
            total = os.fstat(fd).st_size
            yield _FileReader(fd, offset, check_range(total, offset, length), total)
        finally:
            os.close(fd)

    async def read_bytes(self, digest: Digest) -> bytes:
        """The whole file, read in a thread."""
        return await asyncio.to_thread(self.blobs.read_bytes, digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Verify and store in a thread (the commit fsyncs)."""
        await asyncio.to_thread(self.blobs.put_bytes, digest, data)

    async def begin_upload(self, expected: Digest) -> FilesystemUpload:
        """A new staging file for ``expected``."""
        return FilesystemUpload(self.blobs.new_staging(), expected)

    async def delete(self, digest: Digest) -> bool:
        """Unlink the file."""
        return self.blobs.delete(digest)

    async def iter_objects(self) -> AsyncIterator[ObjectInfo]:
        """The directory walk of BlobStore.iter_objects, listed in a thread."""
        for info in await asyncio.to_thread(lambda: list(self.blobs.iter_objects())):
            yield info

    async def hash_object(self, digest: Digest) -> Digest | None:
        """Re-hash in a thread."""
        return await asyncio.to_thread(self.blobs.hash_object, digest)

    async def quarantine(self, digest: Digest) -> bool:
        """Move the file to quarantine/."""
        return await asyncio.to_thread(self.blobs.quarantine, digest) is not None

    def _pending_sync(self) -> list[PendingUpload]:
        pending = []
        for path in self.blobs.staging_entries():
            try:
                pending.append(PendingUpload(str(path), path.stat().st_mtime))
            except FileNotFoundError:
                continue
        return pending

    async def pending_uploads(self) -> list[PendingUpload]:
        """Files in staging/."""
        return await asyncio.to_thread(self._pending_sync)

    def _cleanup_sync(self, older_than: float) -> int:
        if older_than <= 0:
            return self.blobs.cleanup_staging()
        cutoff = time.time() - older_than
        removed = 0
        for upload in self._pending_sync():
            if upload.started_at < cutoff:
                Path(upload.name).unlink(missing_ok=True)
                removed += 1
        return removed

    async def cleanup_abandoned(self, older_than: float,
                                keep: Callable[[Digest], Awaitable[bool]] | None = None) -> int:
        """Remove staging files older than ``older_than`` seconds (0: all of them, which is
        what a single box does at start-up: BlobStore.cleanup_staging). Staging file names
        carry no digest, so ``keep`` is not consulted."""
        return await asyncio.to_thread(self._cleanup_sync, older_than)

    async def presign_url(self, digest: Digest, expires: float) -> str | None:
        """Local files have no URL: the server sends them itself."""
        return None

    def local_path(self, digest: Digest) -> Path | None:
        """The object's path (for FileResponse/sendfile), or None if it is absent."""
        path = self.blobs.path(digest)
        return path if path.is_file() else None

    async def close(self) -> None:
        """Nothing to release."""


class SqliteAsyncIndex:
    """:class:`AsyncIndex` over the SQLite :class:`~sigil.storage.index.Index`.

    Point lookups and small writes run inline, as the mirror calls them today (microseconds on
    a local WAL database); snapshots of the whole graph run in a worker thread.
    """

    def __init__(self, index: Index) -> None:
        self.sync = index

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        """See Index.get_tag."""
        return self.sync.get_tag(upstream, repo, tag)

    async def put_tag(self, upstream: str, repo: str, tag: str, digest: Digest,
                      media_type: str, checked_at: float) -> None:
        """See Index.put_tag."""
        self.sync.put_tag(upstream, repo, tag, digest, media_type, checked_at)

    async def delete_tag(self, upstream: str, repo: str, tag: str) -> bool:
        """See Index.delete_tag."""
        return self.sync.delete_tag(upstream, repo, tag)

    async def list_tags(self, upstream: str, repo: str, *, last: str | None = None,
                        limit: int | None = None) -> list[str]:
        """See Index.list_tags."""
        return self.sync.list_tags(upstream, repo, last=last, limit=limit)

    async def put_manifest(self, digest: Digest, media_type: str, size: int,
                           references: Iterable[Digest], *, now: float | None = None) -> None:
        """See Index.put_manifest (waiting asynchronously while a digest it names is being
        deleted)."""
        refs = list(references)
        await _retry_blocked(
            lambda: self.sync.try_put_manifest(digest, media_type, size, refs, now=now))

    async def get_manifest(self, digest: Digest) -> ManifestRow | None:
        """See Index.get_manifest."""
        return self.sync.get_manifest(digest)

    async def get_references(self, digest: Digest) -> list[Digest]:
        """See Index.get_references."""
        return self.sync.get_references(digest)

    async def touch(self, digest: Digest, now: float) -> None:
        """See Index.touch."""
        self.sync.touch(digest, now)

    async def add_referrer(self, subject: Digest, referrer: Digest) -> None:
        """See Index.add_referrer (waiting asynchronously like put_manifest)."""
        await _retry_blocked(lambda: self.sync.try_add_referrer(subject, referrer))

    async def get_referrers(self, subject: Digest) -> list[Digest]:
        """See Index.get_referrers."""
        return self.sync.get_referrers(subject)

    async def put_blob(self, digest: Digest, size: int) -> None:
        """See Index.put_blob: while the digest is being deleted, wait for that and write no
        row (the object just stored may have gone with the delete)."""
        try:
            self.sync.try_put_blob(digest, size)
        except Blocked:
            for delay in poll_delays():
                if not self.sync.deleting([digest]):
                    return
                await asyncio.sleep(delay)

    async def blob_size(self, digest: Digest) -> int | None:
        """See Index.blob_size."""
        return self.sync.blob_size(digest)

    async def allow(self, upstream: str, repo: str, digests: Iterable[Digest],
                    fingerprint: str) -> None:
        """See Index.allow."""
        self.sync.allow(upstream, repo, digests, fingerprint)

    async def is_allowed(self, upstream: str, repo: str, digest: Digest,
                         fingerprint: str) -> bool:
        """See Index.is_allowed."""
        return self.sync.is_allowed(upstream, repo, digest, fingerprint)

    async def prune_allows(self, fingerprint: str) -> int:
        """See Index.prune_allows."""
        return self.sync.prune_allows(fingerprint)

    async def get_verdict(self, digest: Digest, fingerprint: str,
                          now: float) -> VerdictRow | None:
        """See Index.get_verdict."""
        return self.sync.get_verdict(digest, fingerprint, now)

    async def put_verdict(self, digest: Digest, fingerprint: str, allowed: bool, detail: str,
                          expires_at: float) -> None:
        """See Index.put_verdict."""
        self.sync.put_verdict(digest, fingerprint, allowed, detail, expires_at)

    async def prune_verdicts(self, now: float) -> int:
        """See Index.prune_verdicts."""
        return self.sync.prune_verdicts(now)

    async def graph(self) -> Graph:
        """See Index.graph (in a thread: it reads every row)."""
        return await asyncio.to_thread(self.sync.graph)

    async def is_referenced(self, digest: Digest) -> bool:
        """See Index.is_referenced."""
        return self.sync.is_referenced(digest)

    async def forget_manifests(self, digests: Iterable[Digest]) -> tuple[set[Digest], int]:
        """See Index.forget_manifests."""
        doomed = list(digests)
        return await asyncio.to_thread(self.sync.forget_manifests, doomed)

    async def forget_objects(self, digests: Iterable[Digest]) -> None:
        """See Index.forget_objects."""
        self.sync.forget_objects(list(digests))

    async def drop_allows(self, digests: Iterable[Digest]) -> None:
        """See Index.drop_allows."""
        self.sync.drop_allows(list(digests))

    async def delete_unreferenced(self, digest: Digest,
                                  delete: Callable[[], Awaitable[bool]]) -> bool:
        """Mark, delete, unmark (Index.begin_delete / end_delete). No lock is held while
        ``delete()`` waits (an S3 DELETE), so neither the event loop nor another process
        stalls on it; writers of this and every other process that name the digest wait on
        the mark instead, and the object's rows went with the mark."""
        if not self.sync.begin_delete(digest):
            return False
        try:
            return await delete()
        finally:
            self.sync.end_delete(digest)

    async def gc_candidates(self, accessed_before: float, limit: int) -> list[ManifestRow]:
        """Computed from the graph snapshot: on one box the whole index is local and small."""
        graph = await self.graph()
        kept = {c for m in graph.manifests
                for c in graph.refs.get(m, []) + graph.referrers.get(m, [])}
        roots = [row for digest, row in graph.manifests.items()
                 if digest not in kept and row.last_access < accessed_before]
        roots.sort(key=lambda row: (row.last_access, str(row.digest)))
        return roots[:limit]

    async def stored_bytes(self) -> int:
        """Sum of manifest and blob sizes from the graph snapshot."""
        graph = await self.graph()
        return (sum(row.size for row in graph.manifests.values())
                + sum(graph.blobs.values()))

    async def indexed(self, digests: Iterable[Digest]) -> set[Digest]:
        """See Index.indexed."""
        return self.sync.indexed(list(digests))

    async def record_image(self, image: ImageRecord,
                           check: Callable[[], Awaitable[None]] | None = None) -> None:
        """See Index.try_record_image. SQLite's write lock cannot be held across ``check``
        (an await), so ``check`` runs just before the transaction, and the transaction
        commits only if no delete began since before ``check`` (the deletes-begun counter)
        and none is under way; otherwise it writes nothing, and ``check`` and the write are
        tried again."""
        for attempt, delay in enumerate(poll_delays()):
            begun = self.sync.deletes_begun()
            if check is not None:
                await check()
            try:
                return self.sync.try_record_image(image, begun)
            except Blocked:
                if attempt >= RECORD_ATTEMPTS:
                    raise StorageError(f"index {self.sync.path}: deletes kept coming between "
                                       "an image's check and its rows; try again") from None
                await asyncio.sleep(delay)

    async def get_meta(self, key: str) -> str | None:
        """See Index.get_meta."""
        return self.sync.get_meta(key)

    async def put_meta(self, key: str, value: str) -> None:
        """See Index.put_meta."""
        self.sync.put_meta(key, value)

    async def close(self) -> None:
        """Close the SQLite connection."""
        self.sync.close()


async def _retry_blocked(attempt: Callable[[], None]) -> None:
    """Run a write that raises :class:`~sigil.storage.index.Blocked` while a digest it names
    is being deleted, sleeping (on the loop, never blocking it) between attempts."""
    for delay in poll_delays():
        try:
            return attempt()
        except Blocked:
            await asyncio.sleep(delay)


async def hash_stream(chunks: AsyncIterator[bytes]) -> Digest:
    """The sha256 of a stream of chunks (fsck over a remote store)."""
    digest = hashlib.sha256()
    async for chunk in chunks:
        digest.update(chunk)
    return Digest(digest.hexdigest())
