"""Single-flight blob downloads that many clients stream from while they grow.

One :class:`Download` per digest: it runs as its own task (a client disconnect does not cancel
it), writes to a staging file while hashing, and lets every waiting client stream it as it
grows: a client that has caught up is handed the chunk just received from memory, one further
behind reads the staging file with ``pread``. The last byte is held back until the sha256
matches: on a mismatch every waiting connection is aborted, so no client ever receives a
complete unverified body, and nothing is committed. On a match: fsync, atomic rename into the
store, index row, then the tail is released.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from sigil import metrics
from sigil.errors import RegistryError, SigilError, UpstreamError
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage import BlobStore

log = get_logger("sigil.downloads")

READ_CHUNK = 512 * 1024
# The number of bytes withheld from readers until the digest is confirmed. One byte is enough
# to make an unverified body incomplete; a client that counts on Content-Length sees a short read.
# With a known size it is the blob's last byte; without one, the last byte written so far.
HOLD_BACK = 1
# The staging file is written in slices of this size. On this VM's kernel (6.18, ext4) a
# buffered write of 512 KiB or more now and then stalls (a 256 MiB file took 0.3-0.4 s to write
# instead of 0.05 s, in about one file of three), which halved the cold pull; 128 KiB writes
# did not stall in any of the runs.
STAGING_WRITE = 128 * 1024
# While a download runs, its staging file is fdatasync'ed in a thread every this many bytes, so
# the fsync of the commit (which the client's last byte waits for) finds little left to flush.
SYNC_EVERY = 32 * 1024 * 1024


class BlobSource(Protocol):
    """What a download reads from: an upstream blob response."""

    size: int | None

    def iter_chunks(self, chunk: int = ...) -> AsyncIterator[bytes]: ...


OpenBlob = Callable[[], AbstractAsyncContextManager[BlobSource]]


def _flush(path: Path) -> None:
    """Best-effort early writeback of a staging file (the commit fsyncs it for real)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # aborted or already committed: nothing to do
        return
    try:
        os.fdatasync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Download:
    """One in-flight fetch of one blob into the store."""

    def __init__(self, digest: Digest, store: BlobStore) -> None:
        self.digest = digest
        self.store = store
        self.staging = store.new_staging()
        self.size: int | None = None       # expected size (upstream Content-Length), once known
        self.written = 0
        self.error: BaseException | None = None
        self.committed: Path | None = None
        self.started = asyncio.Event()     # headers known (size) or failed
        self.finished = asyncio.Event()    # committed or failed
        # The chunk received last and its offset: clients that have caught up are given it from
        # memory; clients further behind read the staging file.
        self._chunk = b""
        self._chunk_at = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        """The staging file readers open (the fd stays valid across the commit rename)."""
        return self.staging.path

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _progress(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def run(self, open_blob: OpenBlob,
                  on_commit: Callable[[Digest, int], None]) -> None:
        """Fetch, hash, commit. ``open_blob()`` opens the upstream body. Errors are stored
        on the download, never raised to the loop."""
        metrics.INFLIGHT_DOWNLOADS.inc()
        flushing: asyncio.Future[None] | None = None
        try:
            async with open_blob() as blob:
                self.size = blob.size
                self.started.set()
                self._notify()
                synced = 0
                async for chunk in blob.iter_chunks(READ_CHUNK):
                    view = memoryview(chunk)
                    for at in range(0, len(chunk), STAGING_WRITE):
                        # StagingFile.write takes any buffer (raw file write + hashlib).
                        self.staging.write(view[at:at + STAGING_WRITE])
                    self._chunk_at, self._chunk = self.written, chunk
                    self.written += len(chunk)
                    if self.size is not None and self.written > self.size:
                        raise UpstreamError("upstream sent more bytes than it announced")
                    self._notify()
                    if self.written - synced >= SYNC_EVERY and (flushing is None
                                                                or flushing.done()):
                        synced = self.written
                        flushing = asyncio.ensure_future(asyncio.to_thread(_flush, self.path))
            if self.size is not None and self.written != self.size:
                raise UpstreamError(
                    f"upstream blob ended after {self.written} of {self.size} bytes")
            self.committed = await self.staging.commit(self.digest)
            on_commit(self.digest, self.written)
            log.info("blob.committed", digest=str(self.digest), size=self.written)
        except asyncio.CancelledError:
            self.error = UpstreamError("download cancelled at shutdown")
            self.staging.abort()
            raise
        except SigilError as exc:
            self.error = exc
            self.staging.abort()
            log.warning("blob.download_failed", digest=str(self.digest), error=str(exc),
                        code=getattr(exc, "code", None))
        except Exception as exc:  # translate anything unexpected; fail closed
            self.error = UpstreamError(f"download failed: {type(exc).__name__}")
            self.staging.abort()
            log.exception("blob.download_crashed", digest=str(self.digest))
        finally:
            if self.error is not None:
                self._chunk = b""
            metrics.INFLIGHT_DOWNLOADS.dec()
            self.started.set()
            self.finished.set()
            self._notify()
            if flushing is not None and not flushing.done():
                # Best effort and harmless either way; do not leave it unobserved.
                flushing.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def wait_started(self) -> None:
        """Wait for the upstream headers; raise the download's error if it failed first."""
        await self.started.wait()
        if self.error is not None and self.written == 0:
            raise self._client_error()

    def _client_error(self) -> RegistryError:
        if isinstance(self.error, RegistryError):
            return self.error
        return UpstreamError(str(self.error))

    def _limit(self) -> int:
        """How many bytes a client may have now: all of them once committed, else all but
        the blob's last byte (size known) or all but the last byte written (size unknown)."""
        if self.finished.is_set():
            return self.written
        if self.size is not None:
            return max(0, min(self.written, self.size - HOLD_BACK))
        return max(0, self.written - HOLD_BACK)

    async def stream(self) -> AsyncIterator[bytes | memoryview]:
        """Yield the body for one client as the download grows, withholding the tail until
        the digest is confirmed. Raises the download's error (the caller aborts the
        connection) if it fails."""
        # Open before anything else: if the commit renames the file later, this fd still
        # reads the same inode. If the rename already happened (the commit runs in a thread),
        # wait for the commit to be recorded and read the committed object.
        try:
            fd = os.open(self.committed or self.staging.path, os.O_RDONLY)
        except FileNotFoundError:
            await self.finished.wait()
            if self.committed is None:
                raise self._client_error() from None
            fd = os.open(self.committed, os.O_RDONLY)
        try:
            sent = 0
            while True:
                done = self.finished.is_set()
                if done and self.error is not None:
                    raise self._client_error()
                limit = self._limit()
                if sent < limit:
                    chunk, at = self._chunk, self._chunk_at
                    if at <= sent < at + len(chunk):
                        # Caught up: the chunk just received, from memory.
                        end = min(at + len(chunk), limit)
                        data: bytes | memoryview = (
                            chunk if sent == at and end == at + len(chunk)
                            else memoryview(chunk)[sent - at:end - at])
                    else:
                        data = os.pread(fd, min(READ_CHUNK, limit - sent), sent)
                        if not data:
                            raise UpstreamError("staging file shrank during download")
                    sent += len(data)
                    yield data
                    continue
                if done:
                    return
                await self._progress()
        finally:
            os.close(fd)


class Downloads:
    """The table of in-flight downloads: at most one per digest."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._active: dict[Digest, Download] = {}

    def __len__(self) -> int:
        return len(self._active)

    def get_or_start(self, digest: Digest, open_blob: OpenBlob,
                     on_commit: Callable[[Digest, int], None]) -> tuple[Download, bool]:
        """Join the download of ``digest`` or start it. Returns (download, started_here)."""
        existing = self._active.get(digest)
        if existing is not None:
            metrics.COALESCED_WAITERS.inc()
            return existing, False
        download = Download(digest, self._store)
        self._active[digest] = download

        async def runner() -> None:
            try:
                await download.run(open_blob, on_commit)
            finally:
                self._active.pop(digest, None)

        download.task = asyncio.get_running_loop().create_task(runner(),
                                                               name=f"download {digest}")
        return download, True

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: let in-flight downloads finish, cancel what is left."""
        tasks = [d.task for d in self._active.values() if d.task is not None]
        if not tasks:
            return
        log.info("downloads.draining", count=len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
