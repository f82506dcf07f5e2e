"""Fetch and gc leases for the processes of one host, in a small SQLite file beside the index.

``<root>/leases.sqlite`` holds one row per digest being fetched. It is a file of its own rather
than a table of ``index.sqlite`` so that taking or renewing a lease never waits behind a long
index transaction (a gc pass) and so the index schema is untouched. Every process of a
``sigil serve --workers N`` set opens it; ``BEGIN IMMEDIATE`` makes each acquire an atomic
check-and-set across them. Expiry is judged by the host clock (``time.time()``), the one clock
all the processes share, so there is no skew to reason about.

The calls are short but may wait on the file lock of another process (``busy_timeout``), so
they run in a thread, never on the event loop.

A worker SIGKILLed mid-download leaves its staging file behind. The survivors remove it
(:meth:`~sigil.storage.blobs.BlobStore.sweep_dead_staging`: staging names carry the writer's
pid) when one of them takes an expired lease over, and otherwise at most every
:data:`SWEEP_EVERY` seconds on a lease acquire, so the space is back long before the next
start-up.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sigil.errors import StorageError
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore
from sigil.storage.lease import LeaseInfo

log = get_logger("sigil.storage.lease_sqlite")

FILE_NAME = "leases.sqlite"
# The row of the gc lease (one gc at a time); fetch lease rows are keyed by digest.
GC_LEASE = "gc"
# How long a call waits for another process holding the write lock (a few ms in practice).
BUSY_TIMEOUT = 5.0
# At most this often (seconds) an acquire also sweeps the staging files of dead processes.
SWEEP_EVERY = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fetch_leases (
    digest     TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    location   TEXT NOT NULL,
    expires_at REAL NOT NULL,
    size       INTEGER
) WITHOUT ROWID;
"""


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: no fsync per lease (start-up empties the table after a crash anyway).
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise StorageError(f"lease table {path} is unusable: {exc}") from exc
    return db


def reset_leases(root: Path) -> None:
    """Create the lease file if needed and forget every lease in it.

    Call at start-up, before the workers fork: a lease left by a process of an earlier run is
    dead (start-up also removes the staging files it pointed at)."""
    db = _connect(Path(root) / FILE_NAME)
    try:
        db.execute("DELETE FROM fetch_leases")
    finally:
        db.close()


class SqliteFetchLeases:
    """:class:`~sigil.storage.lease.FetchLeases` and :class:`~sigil.storage.contracts.GcLease`
    for the processes of one host."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(root) / FILE_NAME
        self._root = Path(root)
        self._db = _connect(self.path)
        self._clock = clock
        self._swept_at = float("-inf")  # monotonic time of the last staging sweep
        # One connection per process, used from worker threads one call at a time.
        self._lock = threading.Lock()
        self._closed = False

    async def close(self) -> None:
        """Close the connection. A release still on its way (shutdown) is dropped: start-up
        empties the table anyway; other calls then raise :class:`StorageError`."""
        with self._lock:
            self._closed = True
            self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"lease table {self.path} is closed")

    async def acquire(self, digest: Digest, holder: str, location: str,
                      ttl: float) -> LeaseInfo:
        """Take the lease if free, expired or already ours; else return the live one."""
        return await asyncio.to_thread(self._acquire, digest, holder, location, ttl)

    async def renew(self, digest: Digest, holder: str, ttl: float,
                    size: int | None = None) -> bool:
        """Extend our lease (recording ``size`` once known); False if it is no longer ours."""
        return await asyncio.to_thread(self._renew, digest, holder, ttl, size)

    async def release(self, digest: Digest, holder: str) -> None:
        """Drop our lease; another holder's is untouched."""
        await asyncio.to_thread(self._write, "DELETE FROM fetch_leases WHERE digest = ? AND "
                                "holder = ?", (str(digest), holder))

    async def current(self, digest: Digest) -> LeaseInfo | None:
        """The unexpired lease of ``digest``, if any."""
        return await asyncio.to_thread(self._current, digest)

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        """Take the gc lease if free or expired (extend it if ours)."""
        return await asyncio.to_thread(self._acquire_gc, holder, ttl)

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        """Extend our gc lease; False if it was lost."""
        return await asyncio.to_thread(self._renew_gc, holder, ttl)

    async def release_gc(self, holder: str) -> None:
        """Give the gc lease up if it is ours."""
        await asyncio.to_thread(self._write, "DELETE FROM fetch_leases WHERE digest = ? AND "
                                "holder = ?", (GC_LEASE, holder))

    # ------------------------------------------------------------------ blocking parts
    def _acquire_gc(self, holder: str, ttl: float) -> bool:
        with self._lock:
            self._check_open()
            with self._transaction():
                now = self._clock()
                row = self._db.execute("SELECT holder, expires_at FROM fetch_leases WHERE "
                                       "digest = ?", (GC_LEASE,)).fetchone()
                if row is not None and row[0] != holder and row[1] > now:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO fetch_leases (digest, holder, location, expires_at,"
                    " size) VALUES (?, ?, '', ?, NULL)", (GC_LEASE, holder, now + ttl))
                return True

    def _renew_gc(self, holder: str, ttl: float) -> bool:
        with self._lock:
            self._check_open()
            with self._transaction():
                now = self._clock()
                return self._db.execute(
                    "UPDATE fetch_leases SET expires_at = ? WHERE digest = ? AND holder = ? "
                    "AND expires_at > ?", (now + ttl, GC_LEASE, holder, now)).rowcount == 1

    def _acquire(self, digest: Digest, holder: str, location: str, ttl: float) -> LeaseInfo:
        key = str(digest)
        with self._lock:
            self._check_open()
            lease, took_over = self._acquire_locked(key, digest, holder, location, ttl)
        if took_over or time.monotonic() - self._swept_at >= SWEEP_EVERY:
            self._sweep()
        return lease

    def _acquire_locked(self, key: str, digest: Digest, holder: str, location: str,
                        ttl: float) -> tuple[LeaseInfo, bool]:
        """The lease (ours or the live holder's), and whether we took it over from another
        holder whose lease had expired (it may have died: its staging file is then swept)."""
        with self._transaction():
            now = self._clock()
            row = self._db.execute(
                "SELECT holder, location, expires_at, size FROM fetch_leases WHERE digest = ?",
                (key,)).fetchone()
            if row is not None and row[0] != holder and row[2] > now:
                return LeaseInfo(digest, row[0], row[1], row[2], row[3]), False
            self._db.execute(
                "INSERT OR REPLACE INTO fetch_leases (digest, holder, location, expires_at, size)"
                " VALUES (?, ?, ?, ?, NULL)", (key, holder, location, now + ttl))
            return (LeaseInfo(digest, holder, location, now + ttl, None),
                    row is not None and row[0] != holder)

    def _sweep(self) -> None:
        """Remove dead processes' staging files (best effort: a failure is only logged)."""
        self._swept_at = time.monotonic()
        try:
            removed = BlobStore(self._root).sweep_dead_staging()
        except OSError as exc:
            log.warning("staging.sweep_failed", error=str(exc))
            return
        if removed:
            log.info("staging.swept", removed=removed)

    def _renew(self, digest: Digest, holder: str, ttl: float, size: int | None) -> bool:
        with self._lock:
            self._check_open()
            return self._renew_locked(digest, holder, ttl, size)

    def _renew_locked(self, digest: Digest, holder: str, ttl: float, size: int | None) -> bool:
        with self._transaction():
            # Our row only, and only while it is live: an expired lease may already have been
            # judged dead by a follower, so it is not brought back to life.
            changed = self._db.execute(
                "UPDATE fetch_leases SET expires_at = ?, size = COALESCE(?, size) "
                "WHERE digest = ? AND holder = ? AND expires_at > ?",
                (self._clock() + ttl, size, str(digest), holder, self._clock())).rowcount
            return changed == 1

    def _current(self, digest: Digest) -> LeaseInfo | None:
        with self._lock:
            self._check_open()
            try:
                row = self._db.execute(
                    "SELECT holder, location, expires_at, size FROM fetch_leases "
                    "WHERE digest = ? AND expires_at > ?", (str(digest), self._clock())
                ).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"lease table {self.path}: {exc}") from exc
        return None if row is None else LeaseInfo(digest, row[0], row[1], row[2], row[3])

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            if self._closed:
                return  # only release writes: see close()
            with self._transaction():
                self._db.execute(sql, args)

    def _transaction(self) -> _Immediate:
        return _Immediate(self._db, self.path)


class _Immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is taken
    before the read, so a check-then-set is atomic across processes."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"lease table {self._path}: {exc}") from exc

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                self._db.execute("ROLLBACK")
                raise StorageError(f"lease table {self._path}: {error}") from error
        self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"lease table {self._path}: {exc}") from exc
