"""The content-addressed store: immutable objects named by their sha256.

Layout under ``root`` (every path below ``blobs/`` and ``quarantine/`` is built from a validated
:class:`~sigil.oci.digest.Digest`, so no client-supplied text ever reaches the filesystem)::

    blobs/sha256/<2 hex>/<64 hex>   immutable content (manifests are blobs too)
    staging/<pid>-<host>-<uuid>     in-progress writes of process <pid> on host <host> (a
                                    hash tag of its name); removed on start-up, and once
                                    their process is dead (:meth:`BlobStore.sweep_dead_staging`)
    quarantine/<64 hex>             objects fsck found corrupt

Writes go to ``staging/`` first and appear under ``blobs/`` only through an atomic
``os.replace`` after the content hash matched and the data was fsynced, so a reader never sees a
partial or unverified object. ``staging/`` and ``blobs/`` share a filesystem by construction
(both under ``root``), which is what makes the rename atomic.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sigil.errors import BlobUnknown, DigestInvalid, StorageError
from sigil.oci.digest import Digest
from sigil.storage.lease import pid_alive

_HEX64 = re.compile(r"[a-f0-9]{64}")
_HEX2 = re.compile(r"[a-f0-9]{2}")
_CHUNK = 1024 * 1024
# The name of a staging file (_open_staging): the writer's pid and host tag, then a uuid4 in hex
# (earlier versions wrote the uuid alone: such a file has no known owner).
_STAGING_NAME = re.compile(r"(?:(?P<pid>[0-9]{1,10})-(?P<host>[0-9a-f]{8})-)?[0-9a-f]{32}")


def _host_tag() -> str:
    """This host in staging names: 8 hex digits of the hash of its name."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object on disk, as seen by a directory walk (for gc and fsck)."""

    digest: Digest
    size: int
    mtime: float


class StagingFile:
    """A file in ``staging/`` being written and hashed; becomes a blob on :meth:`commit`.

    Other readers may open :attr:`path` themselves to stream the download while it grows. The
    file is moved (never copied, never unlinked on success) into the store, so their open file
    descriptors stay valid after commit.
    """

    def __init__(self, store: BlobStore, path: Path, fh: io.FileIO) -> None:
        self._store = store
        self._fh: io.FileIO | None = fh
        self._hash = hashlib.sha256()
        self.path = path
        self.size = 0

    @property
    def digest(self) -> Digest:
        """The digest of the bytes written so far."""
        return Digest(self._hash.hexdigest())

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._fh is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` and hash it.

        The file is unbuffered, so when this returns the bytes are visible to other readers
        of :attr:`path` (through the page cache); durability comes at :meth:`commit`.
        """
        if self._fh is None:
            raise StorageError("write to a closed staging file")
        try:
            _write_all(self._fh, data)
        except OSError as exc:
            raise StorageError(f"cannot write to the store: {exc}") from exc
        self._hash.update(data)
        self.size += len(data)

    def check(self, expected: Digest) -> None:
        """Raise :class:`DigestInvalid` unless the bytes written so far hash to ``expected``
        (the file is left as it is: the caller aborts it)."""
        actual = self.digest
        if actual != expected:
            raise DigestInvalid(f"content digest {actual} does not match {expected}",
                                detail={"expected": str(expected), "actual": str(actual)})

    async def commit(self, expected: Digest) -> Path:
        """Move the file into the store as ``expected``; return the blob path.

        Raise :class:`DigestInvalid` (and remove the file) when the bytes written do not hash
        to ``expected``. The fsyncs run in a thread because they can take long on a busy disk.
        Only the rename makes the object visible, after the fsync: a crash before it leaves
        a staging file (removed at start-up), never a partial object under its digest.
        """
        if self._fh is None:
            raise StorageError("commit of a closed staging file")
        try:
            self.check(expected)
        except DigestInvalid:
            self.abort()
            raise
        fh, self._fh = self._fh, None
        try:
            return await asyncio.to_thread(self._store._finish, fh, self.path, expected)
        except BaseException as exc:
            # If we were cancelled the thread runs on: either it already renamed (the blob is
            # complete and verified) or its rename now fails on the missing file. Both are fine.
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot commit {expected}: {exc}") from exc
            raise

    def abort(self) -> None:
        """Close and remove the file (open readers keep their descriptors). Idempotent."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
            self.path.unlink(missing_ok=True)


def _write_all(fh: io.FileIO, data: bytes | bytearray | memoryview) -> None:
    # A raw write may be short (signal, nearly full disk); loop instead of losing bytes.
    view = memoryview(data)
    while view:
        written = fh.write(view)
        if not written:
            raise StorageError("short write to the store (disk full?)")
        view = view[written:]


class BlobStore:
    """Content-addressed, immutable object store on a local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.staging_dir = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        for directory in (self.blobs_dir, self.staging_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # --- paths and lookups -------------------------------------------------------------------

    def path(self, digest: Digest) -> Path:
        """Where the object for ``digest`` lives (whether or not it exists)."""
        # Digest guarantees 64 lowercase hex characters; re-check anyway because a Digest can be
        # built directly (Digest("..")) without going through parse().
        if not _HEX64.fullmatch(digest.hex):
            raise DigestInvalid(f"invalid digest hex {digest.hex[:80]!r}")
        return self.blobs_dir / digest.hex[:2] / digest.hex

    def has(self, digest: Digest) -> bool:
        """True if the object is in the store."""
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        """Size in bytes of the object, or None if absent."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read_bytes(self, digest: Digest) -> bytes:
        """The whole object (for small objects such as manifests); :class:`BlobUnknown` if
        absent."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise BlobUnknown(detail={"digest": str(digest)}) from exc

    def iter_objects(self) -> Iterator[ObjectInfo]:
        """Every object under ``blobs/``; names that are not ``<2 hex>/<64 hex>`` with a
        matching prefix are skipped (junk is left for an operator to look at)."""
        with os.scandir(self.blobs_dir) as fans:
            fan_dirs = [f for f in fans
                        if _HEX2.fullmatch(f.name) and f.is_dir(follow_symlinks=False)]
        for fan in fan_dirs:
            with os.scandir(fan.path) as entries:  # closed even if the caller stops early
                for entry in entries:
                    if not (_HEX64.fullmatch(entry.name) and entry.name.startswith(fan.name)
                            and entry.is_file(follow_symlinks=False)):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # deleted between scandir and stat
                        continue
                    yield ObjectInfo(Digest(entry.name), st.st_size, st.st_mtime)

    def iter_digests(self) -> Iterator[Digest]:
        """The digests of every object in the store."""
        return (info.digest for info in self.iter_objects())

    def total_bytes(self) -> int:
        """Bytes held under ``blobs/`` (a directory walk, not a cached value)."""
        return sum(info.size for info in self.iter_objects())

    # --- writes --------------------------------------------------------------------------------

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        """Store ``data`` as ``digest``; return its path.

        Raise :class:`DigestInvalid` (writing nothing) when ``sha256(data) != digest``.
        Idempotent: an existing object is left as it is.
        """
        actual = Digest.of(data)
        if actual != digest:
            raise DigestInvalid(f"content digest {actual} does not match {digest}",
                                detail={"expected": str(digest), "actual": str(actual)})
        target = self.path(digest)
        if target.is_file():
            return target
        staged, fh = self._open_staging()
        try:
            _write_all(fh, data)
            return self._finish(fh, staged, digest)
        except BaseException as exc:
            fh.close()
            staged.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot store {digest}: {exc}") from exc
            raise

    def new_staging(self) -> StagingFile:
        """A new, empty file in ``staging/`` opened for writing."""
        path, fh = self._open_staging()
        return StagingFile(self, path, fh)

    def is_staging_file(self, path: Path) -> bool:
        """Is ``path`` named as a staging file of this store (``staging/<uuid hex>``)? For a
        path read from elsewhere (a lease row): nothing else in or above staging/ matches."""
        return path.parent == self.staging_dir and bool(_STAGING_NAME.fullmatch(path.name))

    def _open_staging(self) -> tuple[Path, io.FileIO]:
        # The owner in the name: survivors can tell a dead process's leftovers (sweep).
        path = self.staging_dir / f"{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex}"
        # "x": never clobber another writer's file; unbuffered so readers see every write.
        return path, open(path, "xb", buffering=0)

    def _finish(self, fh: io.FileIO, staged: Path, digest: Digest) -> Path:
        """Durably move a verified staging file into place (blocking)."""
        try:
            os.fsync(fh.fileno())
        finally:
            fh.close()
        target = self.path(digest)
        fan = target.parent
        if not fan.is_dir():
            fan.mkdir(exist_ok=True)
            _fsync_dir(self.blobs_dir)  # the new fan-out directory entry must be durable too
        # Fresh mtime = commit time: gc spares on-disk objects the index does not know yet if
        # they are younger than its grace period, and the last write may be older than that.
        os.utime(staged)
        os.replace(staged, target)
        _fsync_dir(fan)
        return target

    def delete(self, digest: Digest) -> bool:
        """Remove the object; return whether it existed. Open readers keep their descriptor."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, digest: Digest) -> Path | None:
        """Move a (corrupt) object to ``quarantine/`` for inspection; return its new path, or
        None if it was not in the store."""
        source = self.path(digest)  # validates the digest before any path is built from it
        target = self.quarantine_dir / digest.hex
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return None
        _fsync_dir(self.quarantine_dir)
        return target

    def staging_entries(self) -> list[Path]:
        """Everything currently in ``staging/``."""
        return sorted(Path(e.path) for e in os.scandir(self.staging_dir))

    def cleanup_staging(self) -> int:
        """Remove everything in ``staging/``; return how many entries were removed.

        Call at start-up only, before anything writes: leftovers are downloads a crash
        interrupted, and nothing can resume them.
        """
        removed = 0
        for path in self.staging_entries():
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def sweep_dead_staging(self) -> int:
        """Remove the staging files whose writer is dead: named by this host and by a pid
        that no longer exists (a worker SIGKILLed mid-download). Safe beside live writers
        (of any process): a file is removed only when its owner cannot write, commit or
        follow it any more; files of other hosts, of a pid in use (even reused), and names
        without an owner are left (start-up removes those). Return how many were removed."""
        mine, removed = _host_tag(), 0
        for path in self.staging_entries():
            match = _STAGING_NAME.fullmatch(path.name)
            if match is None or match["pid"] is None or match["host"] != mine:
                continue
            if int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def hash_object(self, digest: Digest) -> Digest | None:
        """Re-hash the stored object (streaming); None if it is absent."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return hash_descriptor(fd)
        finally:
            os.close(fd)


def hash_descriptor(fd: int) -> Digest:
    """The sha256 of the whole file open as ``fd`` (streaming, by offset: the descriptor's
    position is not used). Blocking: call it in a thread for a big file."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return Digest(h.hexdigest())
