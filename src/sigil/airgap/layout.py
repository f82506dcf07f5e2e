"""OCI image layout on disk and in a tar (plain or zstd), written and read safely.

Writing: a directory (files and hard links from the work store), a ``.tar`` or a ``.tar.zst``,
always through a ``*.partial`` name renamed into place at the end, so an interrupted export
never leaves something that looks complete. Members are in a fixed order (``oci-layout``,
``index.json``, then sigil's metadata blobs, then the rest sorted) with fixed owner, mode and
time, so the same content makes the same bytes and an importer can check free space before it
writes a single blob.

Reading: only the member names an OCI layout has (``oci-layout``, ``index.json``,
``blobs/sha256/<64 hex>`` and their two directories) as regular files or directories are
accepted; ``..``, absolute paths, symbolic and hard links, devices, FIFOs and sparse files
make the archive refused. Members are never extracted by name: their bytes are streamed into
files whose paths come from validated digests, so nothing can be written outside the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from sigil.airgap import ArchiveError

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"
# The index.json entry of sigil's own manifest, and the base a delta builds on.
ARCHIVE_ANNOTATION = "dev.sigil.airgap.archive"
BASE_ANNOTATION = "dev.sigil.airgap.base"
ARCHIVE_ARTIFACT = "application/vnd.sigil.airgap.archive.v1"
CONTENTS_TYPE = "application/vnd.sigil.airgap.contents.v1+json"
REPORT_TYPE = "application/vnd.sigil.airgap.report.v1+json"
POLICY_TYPE = "application/vnd.sigil.airgap.policy.v1+yaml"
TRUST_TYPE = "application/vnd.sigil.airgap.trust.v1"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
MAX_METADATA_BYTES = 64 * 1024 * 1024
COPY_CHUNK = 1024 * 1024
SYNC_EVERY = 64 * 1024 * 1024
_BLOB_NAME = re.compile(r"^blobs/sha256/([a-f0-9]{64})$")
_DIRS = frozenset({"blobs", "blobs/sha256"})
# Fixed metadata: the archive's bytes depend on its content only.
_MTIME = 0


def canonical_json(obj: Any) -> bytes:
    """The one serialisation sigil writes (sorted keys, no spaces): checkable byte for byte."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def archive_kind(path: Path) -> str:
    """``tar``, ``tar.zst`` or ``dir`` from the output name."""
    name = path.name
    if name.endswith(".tar.zst") or name.endswith(".tzst"):
        return "tar.zst"
    if name.endswith(".tar"):
        return "tar"
    return "dir"


def blob_name(hex_digest: str) -> str:
    """The layout path of a blob."""
    return f"blobs/sha256/{hex_digest}"


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Entry:
    """One file of the layout to write: in-memory bytes or a file to copy (or link)."""

    name: str
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        """Bytes this entry will take (data length or file size)."""
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size


class LayoutWriter:
    """Writes a layout entry by entry (so blobs can be added as their downloads finish), as
    ``OUT.partial``; :meth:`close` makes it durable and renames it to ``OUT``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kind = archive_kind(out)
        self.partial = out.with_name(out.name + ".partial")
        _remove(self.partial)
        self._raw: Any = None
        self._zst: Any = None
        self._tar: _TarOut | None = None
        self._dirs_done = False
        self._synced = 0
        self._member: IO[bytes] | None = None   # a streamed entry of a directory layout
        self._member_size = self._member_left = 0
        if self.kind == "dir":
            (self.partial / "blobs" / "sha256").mkdir(parents=True)
            return
        # Unbuffered: plain tar members are copied file to file in the kernel
        # (copy_file_range), which must see the real file offset.
        self._raw = open(self.partial, "wb", buffering=0)  # closed in close() / abort()
        fd = self._raw.fileno()
        if self.kind == "tar.zst":
            import zstandard  # optional dependency (extra "airgap")

            self._zst = zstandard.ZstdCompressor(level=3).stream_writer(self._raw,
                                                                        closefd=False)
            self._tar = _TarOut(self._zst.write, None)
        else:
            self._tar = _TarOut(lambda b: _write_fd(fd, b), fd)

    def add(self, entry: Entry, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """Append one entry (blocking: call it in a thread from async code)."""
        if self._tar is None:
            _add_to_dir(self.partial, entry, on_bytes)
            return
        tar = self._tar
        if entry.name.startswith("blobs/") and not self._dirs_done:
            for directory in ("blobs", "blobs/sha256"):
                tar.header(_info(directory, 0, tarfile.DIRTYPE))
            self._dirs_done = True
        size = entry.size
        tar.header(_info(entry.name, size, tarfile.REGTYPE))
        if entry.data is not None:
            tar.data(entry.data)
            on_bytes(size)
        else:
            assert entry.path is not None
            tar.copy(entry.path, size, on_bytes)
        if tar.offset - self._synced >= SYNC_EVERY:
            # Write back as we go (the caller runs this in a thread while downloads go on),
            # so the final fsync finds little left to do.
            os.fdatasync(self._raw.fileno())
            self._synced = tar.offset

    def begin(self, name: str, size: int) -> None:
        """Start an entry whose ``size`` bytes follow through :meth:`write` (a blob streamed
        from a remote store); :meth:`end` finishes it. Blocking, like :meth:`add`."""
        if self._tar is None:
            self._member = open(self.partial / name, "wb")  # closed in end() / abort()
        else:
            if name.startswith("blobs/") and not self._dirs_done:
                for directory in ("blobs", "blobs/sha256"):
                    self._tar.header(_info(directory, 0, tarfile.DIRTYPE))
                self._dirs_done = True
            self._tar.header(_info(name, size, tarfile.REGTYPE))
        self._member_size, self._member_left = size, size

    def write(self, data: bytes) -> None:
        """Append the next bytes of the entry :meth:`begin` started."""
        if len(data) > self._member_left:
            raise ArchiveError(f"{self.out}: more bytes than the entry announced")
        self._member_left -= len(data)
        if self._tar is None:
            assert self._member is not None  # begin() opened it
            self._member.write(data)
        else:
            self._tar.put(data)

    def end(self) -> None:
        """Finish the entry :meth:`begin` started (all its announced bytes written)."""
        if self._member_left:
            raise ArchiveError(f"{self.out}: an entry ended {self._member_left} bytes short")
        if self._tar is None:
            assert self._member is not None  # begin() opened it
            self._member.close()
            self._member = None
            return
        self._tar.pad(self._member_size)
        if self._tar.offset - self._synced >= SYNC_EVERY:
            os.fdatasync(self._raw.fileno())
            self._synced = self._tar.offset

    def close(self) -> None:
        """Finish, fsync and rename into place."""
        try:
            if self._tar is not None:
                self._tar.close()
                if self._zst is not None:
                    self._zst.close()     # ends the zstd frame (closefd=False: raw stays)
                os.fsync(self._raw.fileno())
                self._raw.close()
            _replace(self.partial, self.out)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the partial output. Idempotent."""
        if self._member is not None:
            self._member.close()
            self._member = None
        if self._raw is not None and not self._raw.closed:
            self._raw.close()
        _remove(self.partial)


def _write_fd(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _TarOut:
    """A minimal ustar/PAX writer (headers from :class:`tarfile.TarInfo`, so the format is
    the standard library's), able to copy member data file to file in the kernel."""

    def __init__(self, write: Callable[[bytes], Any], fd: int | None) -> None:
        self._write = write
        self._fd = fd          # the output file, when copy_file_range can target it
        self.offset = 0

    def put(self, data: bytes) -> None:
        """Raw bytes at the current offset."""
        self._write(data)
        self.offset += len(data)

    def pad(self, size: int) -> None:
        """Zeros up to the next block after ``size`` data bytes."""
        if size % tarfile.BLOCKSIZE:
            self.put(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def header(self, info: tarfile.TarInfo) -> None:
        """One member header (PAX where the name or size needs it)."""
        self.put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def data(self, data: bytes) -> None:
        """In-memory member data, padded to a block."""
        self.put(data)
        self.pad(len(data))

    def copy(self, path: Path, size: int, on_bytes: Callable[[int], None]) -> None:
        """Member data from a file: in the kernel when possible, else read/write."""
        with open(path, "rb", buffering=0) as src:
            left = size
            while left > 0 and self._fd is not None:
                try:
                    n = os.copy_file_range(src.fileno(), self._fd, min(left, 64 * COPY_CHUNK))
                except OSError:
                    self._fd = None   # not supported here (other filesystem): copy below
                    break
                if n == 0:
                    raise ArchiveError(f"{path} shrank while being archived")
                left -= n
                self.offset += n
                on_bytes(n)
            while left > 0:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise ArchiveError(f"{path} shrank while being archived")
                self.put(chunk)
                left -= len(chunk)
                on_bytes(len(chunk))
        self.pad(size)

    def close(self) -> None:
        """The end-of-archive blocks, padded to a record (as tarfile writes them)."""
        self.put(b"\0" * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self.put(b"\0" * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))


def _info(name: str, size: int, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_to_dir(partial: Path, entry: Entry, on_bytes: Callable[[int], None]) -> None:
    target = partial / entry.name
    if entry.data is not None:
        target.write_bytes(entry.data)
        on_bytes(len(entry.data))
        return
    assert entry.path is not None
    try:
        # Blobs are immutable and content-addressed: a hard link is a correct copy.
        os.link(entry.path, target)
    except OSError:
        shutil.copyfile(entry.path, target)
    on_bytes(target.stat().st_size)


def _replace(partial: Path, out: Path) -> None:
    if partial.is_dir() and out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / LAYOUT_FILE).is_file()):
            raise ArchiveError(f"{out} exists and is not an OCI layout: not overwriting it")
        old = out.with_name(out.name + ".old")
        _remove(old)
        os.replace(out, old)
        os.replace(partial, out)
        _remove(old)
        return
    if out.is_dir():
        raise ArchiveError(f"{out} is a directory: not overwriting it with a file")
    os.replace(partial, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading
@dataclass
class Member:
    """One regular file of the archive being read, in archive order."""

    name: str
    size: int
    fileobj: IO[bytes]

    archive: str = ""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; a truncated or damaged stream is :class:`ArchiveError`."""
        try:
            return self.fileobj.read(size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"{self.archive}: archive is truncated or damaged in "
                               f"{self.name} ({exc})") from exc
        except Exception as exc:
            if _is_zstd_error(exc):
                raise ArchiveError(f"{self.archive}: compressed stream is damaged in "
                                   f"{self.name} ({exc})") from exc
            raise

    @property
    def blob_hex(self) -> str | None:
        """The digest hex for ``blobs/sha256/<hex>``, else None."""
        match = _BLOB_NAME.match(self.name)
        return match.group(1) if match else None


def check_member_name(raw: str, archive: str) -> str:
    """The normalised name of a tar member, or :class:`ArchiveError` if it has no place in
    an OCI layout (traversal, absolute path, anything but the layout's own names)."""
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/") if name not in ("", "/") else name
    if raw.startswith("/") or "\\" in raw or "\x00" in raw:
        raise ArchiveError(f"{archive}: member {raw[:200]!r} has an absolute or unsafe path")
    if any(part == ".." for part in raw.split("/")):
        raise ArchiveError(f"{archive}: member {raw[:200]!r} climbs out with '..'")
    if name in (LAYOUT_FILE, INDEX_FILE) or name in _DIRS or _BLOB_NAME.match(name):
        return name
    raise ArchiveError(f"{archive}: unexpected member {raw[:200]!r} (not part of an OCI "
                       "image layout)")


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[ArchiveReader]:
    """A reader for a layout directory, ``.tar`` or ``.tar.zst`` archive."""
    if path.is_dir():
        yield DirReader(path)
        return
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive")
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head == b"\x28\xb5\x2f\xfd":  # zstd frame magic
            try:
                import zstandard
            except ImportError as exc:
                raise ArchiveError(f"{path}: a .tar.zst archive needs the Python package "
                                   "'zstandard' (pip install 'sigil[airgap]')") from exc
            with zstandard.ZstdDecompressor().stream_reader(raw, closefd=False) as stream:
                yield TarReader(path, stream)
        else:
            yield TarReader(path, raw)


class ArchiveReader(Protocol):
    """Yields the members of an archive (:class:`TarReader`, :class:`DirReader`)."""

    source: Path

    def members(self, wanted: Callable[[], Sequence[str]]) -> Iterator[Member]:
        """Every member in order. ``wanted()`` names members the caller needs next (sigil's
        metadata); a directory reader yields those first, a tar stream cannot reorder."""
        ...


class TarReader:
    """Sequential reading of a (possibly compressed) tar stream."""

    def __init__(self, source: Path, stream: Any) -> None:
        self.source = source
        self._stream = stream

    def members(self, wanted: Callable[[], Sequence[str]]) -> Iterator[Member]:
        label = str(self.source)
        try:
            with tarfile.open(fileobj=self._stream, mode="r|") as tar:
                for info in tar:
                    name = check_member_name(info.name, label)
                    if info.issym() or info.islnk():
                        raise ArchiveError(f"{label}: member {info.name[:200]!r} is a "
                                           f"{'symbolic' if info.issym() else 'hard'} link")
                    if info.isdir():
                        if name not in _DIRS:
                            raise ArchiveError(f"{label}: unexpected directory {info.name!r}")
                        continue
                    if not info.isreg() or info.issparse():
                        raise ArchiveError(f"{label}: member {info.name[:200]!r} is not a "
                                           "regular file (device, FIFO or sparse file)")
                    fileobj = tar.extractfile(info)
                    assert fileobj is not None  # a regular file always has one
                    yield Member(name, info.size, fileobj, label)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"{label}: archive is truncated or not a tar ({exc})") from exc
        except Exception as exc:
            if _is_zstd_error(exc):
                raise ArchiveError(f"{label}: compressed stream is damaged ({exc})") from exc
            raise


def _is_zstd_error(exc: BaseException) -> bool:
    """python-zstandard raises its own ``ZstdError`` (imported lazily, so checked by name)."""
    return type(exc).__module__.startswith("zstandard") or "Zstd" in type(exc).__name__


class DirReader:
    """A layout directory: its files are checked like tar members (no links, no extras)."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def _files(self) -> list[str]:
        found: list[str] = []
        label = str(self.source)
        for top, dirs, files in os.walk(self.source, followlinks=False):
            rel = os.path.relpath(top, self.source)
            for name in dirs + files:
                member = name if rel == "." else f"{rel}/{name}"
                full = Path(top) / name
                if full.is_symlink():
                    raise ArchiveError(f"{label}: {member!r} is a symbolic link")
                checked = check_member_name(member, label)
                if name in files:
                    if not full.is_file():
                        raise ArchiveError(f"{label}: {member!r} is not a regular file")
                    found.append(checked)
        return found

    def members(self, wanted: Callable[[], Sequence[str]]) -> Iterator[Member]:
        pending = self._files()
        order = [n for n in (LAYOUT_FILE, INDEX_FILE) if n in pending]
        order += sorted(n for n in pending if n not in order)
        done: set[str] = set()
        while True:
            first = [n for n in wanted() if n in pending and n not in done]
            name = first[0] if first else next((n for n in order if n not in done), None)
            if name is None:
                return
            done.add(name)
            path = self.source / name
            try:
                with open(path, "rb") as fh:
                    yield Member(name, os.fstat(fh.fileno()).st_size, fh, str(self.source))
            except FileNotFoundError as exc:
                raise ArchiveError(f"{self.source}: {name} vanished while reading") from exc


def read_small(member: Member, limit: int, archive: str) -> bytes:
    """The whole member in memory, refusing one larger than ``limit``."""
    if member.size > limit:
        raise ArchiveError(f"{archive}: {member.name} is {member.size} bytes, over the "
                           f"{limit}-byte limit for metadata")
    data = member.read(limit + 1)
    if len(data) != member.size:
        raise ArchiveError(f"{archive}: {member.name} is truncated")
    return data
