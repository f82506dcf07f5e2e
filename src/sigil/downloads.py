"""Single-flight blob downloads that many clients stream from while they grow.

One :class:`Download` per digest and process: it runs as its own task (a client disconnect
does not cancel it), writes to a staging file while hashing, and lets every waiting client
stream it as it grows: a client that has caught up is handed the chunk just received from
memory, one further behind reads the staging file with ``pread``. The staging write and the
sha256 stay on the event loop, chunk by chunk while the chunk is hot in the cache: on the 2-core
VMs sigil is measured on, handing them to a thread cost ~0.1 s more CPU per 256 MiB (the bytes
cross cores) and was not faster (bench/README.md).

The last byte is held back until the sha256 of everything received matches the digest. Then it
is released at once, and the commit (fsync, atomic rename into the store, index row) follows:
the security rule is that no client gets a complete body before the digest matched, and
durability is the store's business (a crash before the rename leaves only a staging file, which
start-up removes; the index row is written after the rename, as before). On a mismatch or a cut
upstream every waiting connection is aborted, so no client ever receives a complete unverified
body, and nothing is committed.

Across processes (``--workers N``) a :class:`~sigil.storage.lease.FetchLeases` table makes the
fetch single-flight per host: the process that takes a digest's lease fetches it; the others
*follow* the holder's staging file as it grows and release the last byte only once the blob is
committed under its digest as that very file (same inode: in one host this proves the holder
verified the bytes they read). If the holder fails, or its lease expires (it died) without a
commit, the followers abort their clients, and the next request takes the lease over.
Over a remote object store (S3) the bytes go to an :class:`~sigil.storage.contracts.UploadSession`
(multipart, streamed) and, beside it, to a local *scratch* file under ``storage.root/staging``
that late joiners of this process and the peer endpoint read; it is deleted after the commit
(open descriptors keep reading it). Across replicas (``relay``: a fleet with a peer endpoint),
the lease holder fetches and uploads; a replica that finds a live lease *relays*: it streams
from the holder's peer endpoint into its own scratch file, hashing, uploads nothing, and
releases its last byte only when its own hash matched and the object is visible in the shared
store under the digest. If the peer fails, or the lease ends without a commit, its clients are
cut and the next request takes the lease over. With ``--workers N`` in a fleet the workers of a
replica first elect one per blob through the host's lease file; only that one takes part in
the fleet lease, and its siblings (their clients and their peer endpoint) follow its scratch
file (:class:`RelayPeers`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sigil import metrics
from sigil.errors import RegistryError, SigilError, StorageError, Unavailable, UpstreamError
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore, StagingFile, hash_descriptor
from sigil.storage.contracts import FilesystemObjectStore, ObjectStore, UploadSession
from sigil.storage.lease import FetchLeases, LeaseInfo, process_holder_id

log = get_logger("sigil.downloads")

# Largest piece a download takes from its source at once (a raw upstream body's pieces are
# 1 MiB, upstream/client.py RAW_PIECE), and the pread size of a client behind the download.
READ_CHUNK = 1024 * 1024
# The number of bytes withheld from readers until the digest is confirmed. One byte is enough
# to make an unverified body incomplete; a client that counts on Content-Length sees a short read.
# With a known size it is the blob's last byte; without one, the last byte received so far.
HOLD_BACK = 1
# While a download runs, its staging file is fdatasync'ed in a thread every this many bytes, so
# the commit's fsync finds little left to flush (followers in other workers wait for it).
SYNC_EVERY = 32 * 1024 * 1024
# Fetch lease (``--workers N``): its time to live, renewed every LEASE_RENEW seconds while the
# download runs. A holder that dies loses the lease after at most LEASE_TTL.
LEASE_TTL = 10.0
LEASE_RENEW = 2.5
# A follower checks the holder's staging file every FOLLOW_POLL seconds while it grows (a
# stat; no inotify), backing off to FOLLOW_IDLE while it does not, and the lease table every
# LEASE_CHECK seconds.
FOLLOW_POLL = 0.002
FOLLOW_IDLE = 0.02
LEASE_CHECK = 0.1
# How often a miss may find the lease held by a holder whose staging file is already gone
# (it just failed or committed) before answering UNAVAILABLE.
ACQUIRE_TRIES = 5


class BlobSource(Protocol):
    """What a download reads from: an upstream blob response."""

    size: int | None

    def iter_chunks(self, chunk: int = ...) -> AsyncIterator[bytes | memoryview]:
        """Pieces that never change once yielded (clients are handed them from memory)."""
        ...


OpenBlob = Callable[[], AbstractAsyncContextManager[BlobSource]]
#: Called once a blob is committed (digest, size); may be a coroutine function.
OnCommit = Callable[[Digest, int], "Awaitable[None] | None"]
# Parts the upload to a remote store keeps in flight while the download still runs (its own
# ``upload_concurrency`` once the download is verified). The clients come first: on the 2-core
# bench VM SeaweedFS burns ~2.5-3.5 s CPU per 256 MiB ingested and competes with the download
# for the cores; one part in flight instead of two took a cold 256 MiB GET from 175-212 to
# 270-286 MiB/s and the object was committed no later (2.6-2.8 s vs 3.5-4.1 s after the GET
# began). The upload still streams while the blob downloads, never behind it by more than
# the scratch file holds.
UPLOAD_INFLIGHT_WHILE_FETCHING = 1
# How often a relaying replica looks for the holder's committed object in the shared store.
RELAY_COMMIT_POLL = 0.05


@dataclass(frozen=True)
class RelayPeers:
    """Cross-replica single-flight: where other replicas reach this one's peer endpoint
    (the lease ``location``), and how to open another replica's in-flight download
    (:meth:`sigil.upstream.peer.PeerClient.open_blob`).

    ``siblings``: with ``--workers N`` the host's lease table (``leases.sqlite``). All the
    workers of a replica advertise one peer address (one SO_REUSEPORT port), so the fleet
    lease cannot say which process holds a download, and a peer request may land on any of
    them. So the workers first elect one of them per blob through this table (its location
    is the elected worker's scratch file); only that one takes part in the fleet lease
    (fetches or relays), its siblings follow its scratch file, and a sibling's peer endpoint
    streams that same file to other replicas (:meth:`Downloads.follow_sibling`). Chosen over
    a peer port per worker: it reuses the ``--workers`` follow path as it is (same tail rule,
    same takeover of a dead worker), needs no port range to configure or open, and keeps one
    peer connection per blob and replica."""

    location: str
    open_peer: Callable[[str, Digest], AbstractAsyncContextManager[BlobSource]]
    siblings: FetchLeases | None = None


async def _committed(on_commit: OnCommit, digest: Digest, size: int) -> None:
    result = on_commit(digest, size)
    if inspect.isawaitable(result):
        await result


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


def _write(staging: StagingFile, chunk: bytes | memoryview) -> None:
    """Append and hash one chunk (up to READ_CHUNK) with one file write and one hash update.

    It was written in 128 KiB slices (2026-11-29: buffered writes of >= 512 KiB then stalled
    now and then on this VM). On 2026-12-03 whole 1 MiB writes did not stall in 22 files
    and cost less; the cold pull went up 6-27 % in four A/Bs (bench/README.md, "Cold path:
    the send side and the hash thread")."""
    staging.write(chunk)


def _hash_copy(fd: int) -> Digest:
    """Hash the file of a duplicated descriptor and close it (in a thread: the caller's own
    descriptor may be closed meanwhile if it is cancelled)."""
    try:
        return hash_descriptor(fd)
    finally:
        os.close(fd)


def _observe(future: asyncio.Future[Any]) -> None:
    """Mark a best-effort future's outcome retrieved (nothing waits for it)."""
    if not future.cancelled():
        future.exception()


class Download:
    """One in-flight fetch of one blob into the store (or, with leases, the following of
    another worker's fetch)."""

    def __init__(self, digest: Digest, store: BlobStore,
                 objects: ObjectStore | None = None) -> None:
        self.digest = digest
        # ``store``: the local store (filesystem backend), or only the scratch area of a
        # remote ``objects`` store, whose committed objects have no local path.
        self.store = store
        self.objects = objects
        self.staging: StagingFile | None = store.new_staging()
        self._path = self.staging.path
        self.stored_remotely = False       # committed to the remote store (no local path)
        self.size: int | None = None       # expected size (upstream Content-Length), once known
        self.received = 0                  # bytes that exist: on disk or in the last chunk
        self.written = 0                   # bytes in the file at ``path`` (pread may read them)
        self.verified = False              # the digest matched: every byte may be released
        self.error: BaseException | None = None
        self.committed: Path | None = None
        self.started = asyncio.Event()     # headers known (size) or failed
        self.finished = asyncio.Event()    # committed or failed
        # The chunk received last and its offset: clients that have caught up are given it from
        # memory; clients further behind read the staging file.
        self._chunk: bytes | memoryview = b""
        self._chunk_at = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        """The file readers open: this process's staging file, or the lease holder's (the fd
        stays valid across the commit rename)."""
        return self._path

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _progress(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _start(self, size: int | None) -> None:
        self.size = size
        self.started.set()
        self._notify()

    async def run(self, open_blob: OpenBlob, on_commit: OnCommit,
                  leases: FetchLeases | None = None, holder: str = "",
                  relay: RelayPeers | None = None) -> None:
        """Fetch, hash, commit (or follow the lease holder's fetch). ``open_blob()`` opens
        the upstream body. Errors are stored on the download, never raised to the loop."""
        metrics.INFLIGHT_DOWNLOADS.inc()
        try:
            if leases is None:
                await self._fetch(open_blob, on_commit)
            elif relay is not None and relay.siblings is not None:
                await self._run_elected(open_blob, on_commit, leases, holder, relay,
                                        relay.siblings)
            else:
                await self._run_leased(open_blob, on_commit, leases, holder, relay)
        except asyncio.CancelledError:
            self.error = UpstreamError("download cancelled at shutdown")
            raise
        except SigilError as exc:
            self.error = exc
            log.warning("blob.download_failed", digest=str(self.digest), error=str(exc),
                        code=getattr(exc, "code", None))
        except Exception as exc:  # translate anything unexpected; fail closed
            self.error = UpstreamError(f"download failed: {type(exc).__name__}")
            log.exception("blob.download_crashed", digest=str(self.digest))
        finally:
            metrics.INFLIGHT_DOWNLOADS.dec()
            self._settle()

    def _settle(self) -> None:
        """The end of a download or a following, whatever happened: drop the in-memory
        chunk of a failed one, abort a staging file still open (a path that failed before
        fetching or following), and wake every waiting client."""
        if self.error is not None:
            self._chunk = b""
        if self.staging is not None and not self.staging.closed:
            self.staging.abort()
        self.started.set()
        self.finished.set()
        self._notify()

    # ------------------------------------------------------------------- fetching
    async def _fetch(self, open_blob: OpenBlob, on_commit: OnCommit,
                     on_started: Callable[[int | None], Awaitable[None]] | None = None
                     ) -> None:
        """Fetch from the upstream into the staging file; verify; release; commit."""
        staging = self.staging
        assert staging is not None
        flushing: asyncio.Future[None] | None = None
        ok = False
        # A remote store: the bytes also stream into its upload session (the staging file is
        # then the local scratch copy for late joiners and the peer endpoint), fed from that
        # file by a task of its own, so a slower bucket does not slow the clients down.
        upload: UploadSession | None = None
        uploading: asyncio.Task[None] | None = None
        if self.objects is not None:
            upload = await self.objects.begin_upload(self.digest)
            uploading = asyncio.get_running_loop().create_task(
                self._upload_scratch(upload, staging.path))
        try:
            async with open_blob() as blob:
                if on_started is not None:
                    await on_started(blob.size)  # before any byte reaches the file
                self._start(blob.size)
                synced = 0
                async for chunk in blob.iter_chunks(READ_CHUNK):
                    self._chunk_at, self._chunk = self.received, chunk
                    self.received += len(chunk)
                    if self.size is not None and self.received > self.size:
                        raise UpstreamError("upstream sent more bytes than it announced")
                    _write(staging, chunk)
                    self.written = self.received
                    self._notify()
                    if upload is None and self.written - synced >= SYNC_EVERY and (
                            flushing is None or flushing.done()):
                        synced = self.written
                        flushing = asyncio.ensure_future(asyncio.to_thread(_flush, self.path))
            if self.size is not None and self.received != self.size:
                raise UpstreamError(
                    f"upstream blob ended after {self.received} of {self.size} bytes")
            staging.check(self.digest)  # DigestInvalid on a mismatch
            # The digest matched: every client may have the tail now. The commit below only
            # makes it durable and visible under the digest.
            self.verified = True
            self._notify()
            if upload is None:
                self.committed = await staging.commit(self.digest)
            else:
                assert uploading is not None
                await uploading  # the rest of the scratch file into the upload
                await upload.commit()  # checks the feeder's vouch (digest, length), then publishes
                self.stored_remotely = True
                staging.abort()  # the scratch copy: open readers keep their descriptor
            ok = True
            await _committed(on_commit, self.digest, self.received)
            log.info("blob.committed", digest=str(self.digest), size=self.received)
        finally:
            if uploading is not None and not uploading.done():
                uploading.cancel()
                await asyncio.gather(uploading, return_exceptions=True)
            if not ok:
                staging.abort()
                if upload is not None:
                    await asyncio.shield(upload.abort())
            if flushing is not None and not flushing.done():
                flushing.add_done_callback(_observe)

    async def _upload_scratch(self, upload: UploadSession, path: Path) -> None:
        """Feed ``upload`` from the scratch file as it grows, in whole parts, at the object
        store's pace (its back-pressure); return once everything verified is in it, vouched
        for by the download's own digest. Cancelled when the download fails.

        One sha256 per blob, not two: the upload session does not hash what it is fed
        (:meth:`~sigil.storage.contracts.UploadSession.hash_by_caller`); this feeder vouches
        for the digest the download verified instead. Why the uploaded bytes are the hashed
        ones: the scratch file is this download's own staging file, created exclusively
        (``open(..., "xb")``) and written only through :meth:`StagingFile.write`, which
        writes every byte it hashes, in order, with no gap (a short write is retried); no
        other code opens it for writing (workers that follow it and the peer endpoint open it
        read-only). The feeder reads ``[0, written)`` of that same file in order and writes
        it into the session, so it uploads exactly the bytes the staging hash covered, and
        vouches only when that hash matched (``verified``), for the staging file's own length
        and digest. What this trusts is that the file returns what was written to it, the
        same trust every late joiner reading it with ``pread`` already places in it (and, on
        the filesystem backend, every read of a committed blob). Tripwires, failing closed:
        the descriptor must be the staging file (same inode), the file must not grow past
        what was verified, and nothing may touch it after the verification (its ctime must
        not change; a change made before it hides behind the download's own later writes:
        that is the trust above).
        """
        staging = self.staging
        if staging is None:
            raise StorageError("no scratch file to upload from")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(staging.path)):
                raise StorageError("the scratch file was replaced before the upload")
            upload.hash_by_caller()
            if not self.verified:
                upload.limit_inflight(UPLOAD_INFLIGHT_WHILE_FETCHING)
            part = upload.write_size
            sent = 0
            sealed: int | None = None  # the file's ctime once the download was verified
            while True:
                if self.verified and sealed is None:
                    sealed = os.fstat(fd).st_ctime_ns
                    upload.limit_inflight(None)  # the clients are served: full speed
                ready = self.written - sent
                if ready >= part or (self.verified and ready > 0):
                    data = os.pread(fd, min(part, ready), sent)
                    if len(data) != min(part, ready):
                        raise StorageError("the scratch file shrank during the upload")
                    await upload.write(data)
                    sent += len(data)
                elif self.verified:
                    break
                else:
                    await self._progress()
            after = os.fstat(fd)
            if after.st_ctime_ns != sealed or after.st_size != sent or staging.size != sent:
                raise StorageError("the scratch file changed after it was verified")
            # staging.digest is the hash of what StagingFile wrote; ``verified`` says it
            # matched, and it is re-read here so a mismatch can never be vouched for.
            upload.vouch(staging.digest, staging.size)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ across workers
    async def _run_elected(self, open_blob: OpenBlob, on_commit: OnCommit,
                           leases: FetchLeases, holder: str, relay: RelayPeers,
                           siblings: FetchLeases) -> None:
        """A relaying replica with ``--workers N`` (see :class:`RelayPeers`): take the
        digest's host lease and then go on as a lone replica would (fetch or relay), or
        follow the sibling worker that holds it. The host lease's size is recorded before
        the first byte reaches the scratch file, as a ``--workers`` holder does."""
        staging = self.staging
        assert staging is not None
        for _ in range(ACQUIRE_TRIES):
            lease = await siblings.acquire(self.digest, holder, str(staging.path), LEASE_TTL)
            if lease.holder == holder:
                break
            if await self._follow(lease, siblings):
                return
            await asyncio.sleep(LEASE_CHECK)
        else:
            raise UpstreamError("another worker keeps failing to fetch this blob")
        size: int | None = None

        async def announce(announced: int | None) -> None:
            nonlocal size
            size = announced
            await siblings.renew(self.digest, holder, LEASE_TTL, size)

        # Renewed for as long as this worker fetches, relays or waits for the fleet lease (a
        # dead worker's siblings take over after LEASE_TTL, as with --workers); a lease lost
        # by stalling past LEASE_TTL: one sibling that took it waits for our fleet lease.
        keeping = asyncio.get_running_loop().create_task(
            self._renew(siblings, holder, lambda: size))
        try:
            await self._run_leased(open_blob, on_commit, leases, holder, relay, announce)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            # After the fleet lease's release (and the commit or abort): a sibling that sees
            # this lease gone looks for the object, as a --workers follower does.
            await asyncio.shield(siblings.release(self.digest, holder))

    async def _run_leased(self, open_blob: OpenBlob, on_commit: OnCommit,
                          leases: FetchLeases, holder: str,
                          relay: RelayPeers | None = None,
                          announce: Callable[[int | None], Awaitable[None]] | None = None
                          ) -> None:
        """Take the digest's lease and fetch, or follow the worker that holds it (on one
        host: its staging file; across replicas: its peer endpoint). ``announce(size)``
        runs before the first byte reaches the staging file (fetched or relayed)."""
        staging = self.staging
        assert staging is not None
        location = relay.location if relay is not None else str(staging.path)
        for _ in range(ACQUIRE_TRIES):
            lease = await leases.acquire(self.digest, holder, location, LEASE_TTL)
            if lease.holder == holder:
                break
            if relay is not None and lease.location == relay.location:
                # Another holder at this replica's own address: an earlier process here that
                # died (or a second replica advertising the same address). Asking it would
                # reach this very download through our own peer endpoint and stall for the
                # peer timeout; wait for the lease to expire or change hands instead.
                await self._lease_change(lease, leases)
                if await self._already_committed():
                    return
                continue
            if relay is not None:
                try:
                    await self._relay(lease, leases, relay, announce)
                    return
                except Unavailable:
                    # The peer is unreachable or has nothing (it just finished, or died and
                    # its lease has not expired yet): look again once the lease changed
                    # hands, unless a client already has bytes from it.
                    if self.received:
                        raise
                    if await self._already_committed():
                        return
                    await self._lease_change(lease, leases)
                    continue
            if await self._follow(lease, leases):
                return
            await asyncio.sleep(LEASE_CHECK)
        else:
            staging.abort()
            raise UpstreamError("another worker keeps failing to fetch this blob")
        try:
            if await self._already_committed():
                return  # committed by another worker between our miss and the lease
            renewing: asyncio.Task[None] | None = None

            async def started(size: int | None) -> None:
                # The size goes into the lease before the first byte is written, so a
                # follower that sees bytes and no size knows the upstream announced none.
                nonlocal renewing
                await leases.renew(self.digest, holder, LEASE_TTL, size)
                if announce is not None:
                    await announce(size)
                renewing = asyncio.get_running_loop().create_task(
                    self._renew(leases, holder, lambda: size))

            try:
                await self._fetch(open_blob, on_commit, started)
            finally:
                if renewing is not None:
                    renewing.cancel()
                    await asyncio.gather(renewing, return_exceptions=True)
        finally:
            if not staging.closed:
                staging.abort()
            # After the rename (or the abort): a follower that sees the lease gone and then
            # looks for the object finds it if it was committed.
            await asyncio.shield(leases.release(self.digest, holder))

    async def follow_sibling(self, siblings: FetchLeases, holder: str) -> None:
        """Only follow the sibling worker holding this digest's host lease (the peer
        endpoint of a worker without the download, :meth:`Downloads.follow_sibling`);
        never fetch or relay. Errors are stored on the download, as in :meth:`run`."""
        try:
            lease = await siblings.current(self.digest)
            if lease is None or lease.holder == holder or not await self._follow(lease,
                                                                                 siblings):
                raise Unavailable(f"no download of {self.digest} in flight on this host")
        except SigilError as exc:
            self.error = exc
        except Exception as exc:  # fail closed, as run() does
            self.error = UpstreamError(f"following failed: {type(exc).__name__}")
            log.exception("blob.follow_crashed", digest=str(self.digest))
        finally:
            self._settle()

    async def _already_committed(self) -> bool:
        if self.objects is not None:
            size = await self.objects.size(self.digest)
        else:
            size = self.store.size(self.digest)
        if size is None:
            return False
        if self.staging is not None:
            self.staging.abort()
        if self.objects is not None:
            self.stored_remotely = True
        else:
            self.committed = self._path = self.store.path(self.digest)
        self.received = self.written = size
        self.verified = True
        self._start(size)
        return True

    async def _lease_change(self, lease: LeaseInfo, leases: FetchLeases) -> None:
        """Wait (at most a lease lifetime and a bit) until ``lease`` ended or changed hands,
        or the object appeared."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEASE_TTL + 1.0
        while loop.time() < deadline:
            current = await leases.current(self.digest)
            if current is None or current.holder != lease.holder:
                return
            if self.objects is not None and await self.objects.has(self.digest):
                return
            await asyncio.sleep(LEASE_CHECK)

    async def _relay(self, lease: LeaseInfo, leases: FetchLeases, relay: RelayPeers,
                     announce: Callable[[int | None], Awaitable[None]] | None = None
                     ) -> None:
        """Stream another replica's download of this blob through its peer endpoint into
        the scratch file, hashing; upload nothing. The last byte is released only when our
        own hash matched and the holder's object is visible in the shared store."""
        staging, objects = self.staging, self.objects
        assert staging is not None and objects is not None
        metrics.COALESCED_WAITERS.inc()
        async with relay.open_peer(lease.location, self.digest) as source:
            size = source.size if source.size is not None else lease.size
            if announce is not None:
                await announce(size)  # for the sibling workers following our scratch file
            self._start(size)
            async for chunk in source.iter_chunks(READ_CHUNK):
                self._chunk_at, self._chunk = self.received, chunk
                self.received += len(chunk)
                if self.size is not None and self.received > self.size:
                    raise UpstreamError("the peer replica sent more bytes than announced")
                _write(staging, chunk)
                self.written = self.received
                self._notify()
        if self.size is not None and self.received != self.size:
            raise UpstreamError(f"the peer replica's stream ended after {self.received} of "
                                f"{self.size} bytes")
        staging.check(self.digest)  # our own hash: DigestInvalid cuts every client
        while not await objects.has(self.digest):
            current = await leases.current(self.digest)
            if current is None or current.holder != lease.holder:
                if await objects.has(self.digest):
                    break  # committed, then released, between the two reads
                raise UpstreamError("the replica fetching this blob stopped before it "
                                    "committed it")
            await asyncio.sleep(RELAY_COMMIT_POLL)
        self.stored_remotely = True
        self.verified = True
        self._notify()
        staging.abort()  # the scratch copy: open readers keep their descriptor
        self.staging = None

    async def _renew(self, leases: FetchLeases, holder: str,
                     size: Callable[[], int | None]) -> None:
        """Keep the lease while the download runs; record the size (as known at each
        renewal) for the followers."""
        while True:
            await asyncio.sleep(LEASE_RENEW)
            try:
                if not await leases.renew(self.digest, holder, LEASE_TTL, size()):
                    # Followers of this file abort; a new holder fetches for the others. The
                    # bytes here are still verified before anything is released or committed.
                    log.warning("blob.lease_lost", digest=str(self.digest))
                    return
            except Exception:  # a busy lease table must not fail the download itself
                log.exception("blob.lease_renew_failed", digest=str(self.digest))

    async def _follow(self, lease: LeaseInfo, leases: FetchLeases) -> bool:
        """Stream another worker's staging file as it grows. True when done (committed or
        failed: the outcome is on the download); False when the holder's file is already
        gone and uncommitted, so the caller tries to take the lease."""
        location = Path(lease.location)
        if not self.store.is_staging_file(location):
            # Only ever a sibling's staging file: a path from the lease table is not opened
            # anywhere else, whoever wrote the row (``staging/..`` has staging/ as parent).
            raise StorageError(f"lease of {self.digest} points outside staging/")
        try:
            # No symlink either: the holder creates a regular file.
            fd = os.open(location, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            # Committed (renamed) or aborted just now.
            return await self._already_committed()
        metrics.COALESCED_WAITERS.inc()
        if self.staging is not None:
            self.staging.abort()
            self.staging = None
        self._path = location
        loop = asyncio.get_running_loop()
        try:
            mine = os.fstat(fd)
            target = self.store.path(self.digest)
            size = lease.size
            checked = loop.time()
            pause = FOLLOW_POLL
            while True:
                grown = os.fstat(fd).st_size
                if grown > self.written:
                    self.received = self.written = grown
                    self._notify()
                    pause = FOLLOW_POLL
                else:
                    pause = min(FOLLOW_IDLE, pause * 2)
                if size is not None and grown > size:
                    raise UpstreamError("the fetching worker wrote more bytes than announced")
                now = loop.time()
                holder_gone = False
                # Until the headers are known the lease is read on every turn (the holder
                # records the size there before it writes a byte).
                if not self.started.is_set() or now - checked >= LEASE_CHECK:
                    checked = now
                    current = await leases.current(self.digest)
                    holder_gone = current is None or current.holder != lease.holder
                    if current is not None and size is None and not holder_gone:
                        size = current.size
                    if not self.started.is_set() and (size is not None or grown):
                        self._start(size)
                # The lease is read before the object: the holder renames, then releases.
                if _same_file(mine, target):
                    self.received = self.written = os.fstat(fd).st_size
                    self.committed = target
                    self.verified = True
                    self._start(self.written)
                    return True
                if holder_gone and self.objects is not None \
                        and await self.objects.has(self.digest):
                    # A remote store: the object is there, but another holder may have put
                    # it (this one lost its lease while it stalled, and may still be writing
                    # or have received wrong bytes). Nothing proves this file is what was
                    # verified, so it is hashed here before its tail is released.
                    self.received = self.written = os.fstat(fd).st_size
                    if await asyncio.to_thread(_hash_copy, os.dup(fd)) != self.digest:
                        raise UpstreamError("the fetching worker's file is not the committed "
                                            "blob (its lease was taken over)")
                    self.stored_remotely = self.verified = True
                    self._start(self.written)
                    return True
                if holder_gone:
                    raise UpstreamError("the worker fetching this blob stopped before it was "
                                        "verified")
                await asyncio.sleep(pause)
        finally:
            os.close(fd)

    # -------------------------------------------------------------------- clients
    async def wait_started(self) -> None:
        """Wait for the upstream headers; raise the download's error if it failed first."""
        await self.started.wait()
        if self.error is not None and self.received == 0:
            raise self._client_error()

    def _client_error(self) -> RegistryError:
        if isinstance(self.error, RegistryError):
            return self.error
        return UpstreamError(str(self.error))

    def _limit(self) -> int:
        """How many bytes a client may have now: all of them once the digest matched, else
        all but the blob's last byte (size known) or all but the last byte received (size
        unknown)."""
        if self.verified:
            return self.received
        if self.size is not None:
            return max(0, min(self.received, self.size - HOLD_BACK))
        return max(0, self.received - HOLD_BACK)

    async def stream(self) -> AsyncIterator[bytes | memoryview]:
        """Yield the body for one client as the download grows, withholding the tail until
        the digest is confirmed. Raises the download's error (the caller aborts the
        connection) if it fails before that."""
        # Open before anything else: if the commit renames the file later, this fd still
        # reads the same inode. If the rename already happened (the commit runs in a thread),
        # wait for the commit to be recorded and read the committed object.
        try:
            fd = os.open(self.committed or self.path, os.O_RDONLY)
        except FileNotFoundError:
            await self.finished.wait()
            if self.stored_remotely and self.objects is not None:
                # The scratch file of a remote store is gone after the commit: the object.
                async with self.objects.open_range(self.digest) as reader:
                    async for piece in reader:
                        yield piece
                return
            if self.committed is None:
                raise self._client_error() from None
            fd = os.open(self.committed, os.O_RDONLY)
        try:
            sent = 0
            while True:
                # Verified bytes stay servable even if the commit after them failed.
                if self.error is not None and not self.verified:
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
                    elif sent < self.written:
                        data = os.pread(fd, min(READ_CHUNK, limit - sent,
                                                self.written - sent), sent)
                        if not data:
                            raise UpstreamError("staging file shrank during download")
                    else:  # in flight to the disk: wait until it is written
                        await self._progress()
                        continue
                    sent += len(data)
                    yield data
                    continue
                if self.verified or self.finished.is_set():
                    return
                await self._progress()
        finally:
            os.close(fd)


def _same_file(mine: os.stat_result, target: Path) -> bool:
    """Is ``target`` the file ``mine`` describes (same device and inode)?"""
    try:
        return os.path.samestat(mine, target.stat())
    except FileNotFoundError:
        return False


class Downloads:
    """The table of in-flight downloads: at most one per digest in this process, and with
    ``leases`` (``--workers N``) at most one upstream fetch per digest on the host."""

    def __init__(self, store: ObjectStore | BlobStore, leases: FetchLeases | None = None, *,
                 scratch: Path | None = None, relay: RelayPeers | None = None) -> None:
        # The filesystem store downloads into its own staging/; a remote one streams into an
        # upload session, with a local scratch copy under ``scratch``/staging.
        self._objects: ObjectStore | None = None
        if isinstance(store, FilesystemObjectStore):
            store = store.blobs
        elif not isinstance(store, BlobStore):
            if scratch is None:
                raise StorageError("a remote object store needs a local scratch directory")
            self._objects = store
            store = BlobStore(scratch)
        self._store = store
        self._active: dict[Digest, Download] = {}
        self._leases = leases
        self._relay = relay if self._objects is not None else None
        self._holder = process_holder_id() if leases is not None else ""

    def __len__(self) -> int:
        return len(self._active)

    def get(self, digest: Digest) -> Download | None:
        """The download of ``digest`` in flight in this process, if any (the peer endpoint
        streams it to other replicas; it never starts one)."""
        return self._active.get(digest)

    async def follow_sibling(self, digest: Digest) -> Download | None:
        """A download that follows the sibling worker (``--workers N`` in a relaying fleet,
        :class:`RelayPeers`) holding ``digest``'s host lease, for the peer endpoint of this
        process, which has no download of it; None when no sibling holds one. It never
        fetches, is not joined by this process's clients (they take the lease path of
        :meth:`get_or_start`), and its task is the caller's to cancel."""
        siblings = self._relay.siblings if self._relay is not None else None
        if siblings is None:
            return None
        lease = await siblings.current(digest)
        if lease is None or lease.holder == self._holder:
            return None
        log.info("peer.follows_sibling", digest=str(digest))
        download = Download(digest, self._store, self._objects)
        download.task = asyncio.get_running_loop().create_task(
            download.follow_sibling(siblings, self._holder), name=f"follow {digest}")
        return download

    def get_or_start(self, digest: Digest, open_blob: OpenBlob,
                     on_commit: OnCommit) -> tuple[Download, bool]:
        """Join the download of ``digest`` or start it. Returns (download, started_here)."""
        existing = self._active.get(digest)
        if existing is not None:
            metrics.COALESCED_WAITERS.inc()
            return existing, False
        download = Download(digest, self._store, self._objects)
        self._active[digest] = download

        async def runner() -> None:
            try:
                await download.run(open_blob, on_commit, self._leases, self._holder,
                                   self._relay)
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
