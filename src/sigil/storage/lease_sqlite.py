"""Fetch and gc leases in the SQLite index file, for the processes of one host (``--workers``).

A ``leases`` table beside the index tables (created here if missing, outside the index's own
schema versions, so this module and :mod:`sigil.storage.index` evolve apart). Every process
opens its own connection; a ``BEGIN IMMEDIATE`` transaction makes each acquisition atomic
across processes. Expiry is judged by the host clock, which all processes of one host share,
so there is no skew to reason about.

The calls run in a worker thread: a busy database (another process's gc transaction) can make
one wait up to the busy timeout, which must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.lease import LeaseInfo

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,   -- 'sha256:<hex>' for a fetch lease, 'gc' for the gc lease
    holder     TEXT NOT NULL,
    location   TEXT NOT NULL,
    expires_at REAL NOT NULL,
    size       INTEGER
) WITHOUT ROWID
"""
GC_LEASE = "gc"


class SqliteLeases:
    """:class:`~sigil.storage.lease.FetchLeases` and
    :class:`~sigil.storage.contracts.GcLease` in a SQLite file (see module docstring)."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()  # one connection, used from worker threads
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=5.0)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"lease table in {self.path} is unusable: {exc}") from exc

    def _acquire_sync(self, name: str, holder: str, location: str,
                      ttl: float) -> tuple[str, str, float, int | None]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    now = self._clock()
                    row = self._db.execute(
                        "SELECT holder, location, expires_at, size FROM leases WHERE name = ?",
                        (name,)).fetchone()
                    if row is not None and row[0] != holder and float(row[2]) > now:
                        result = (str(row[0]), str(row[1]), float(row[2]),
                                  None if row[3] is None else int(row[3]))
                    else:
                        # Free, expired (its holder died or stalled), or ours already.
                        self._db.execute(
                            "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, NULL)",
                            (name, holder, location, now + ttl))
                        result = (holder, location, now + ttl, None)
                    self._db.execute("COMMIT")
                    return result
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"lease table in {self.path}: {exc}") from exc

    def _execute(self, sql: str, params: tuple[object, ...]) -> int:
        with self._lock:
            try:
                return self._db.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                raise StorageError(f"lease table in {self.path}: {exc}") from exc

    def _current_sync(self, name: str) -> tuple[str, str, float, int | None] | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT holder, location, expires_at, size FROM leases "
                    "WHERE name = ? AND expires_at > ?", (name, self._clock())).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"lease table in {self.path}: {exc}") from exc
        if row is None:
            return None
        return str(row[0]), str(row[1]), float(row[2]), None if row[3] is None else int(row[3])

    # --- FetchLeases -----------------------------------------------------------------------

    async def acquire(self, digest: Digest, holder: str, location: str,
                      ttl: float) -> LeaseInfo:
        """Take the lease if free or expired; else return the live holder's lease."""
        got = await asyncio.to_thread(self._acquire_sync, str(digest), holder, location, ttl)
        return LeaseInfo(digest, got[0], got[1], got[2], got[3])

    async def renew(self, digest: Digest, holder: str, ttl: float,
                    size: int | None = None) -> bool:
        """Extend the lease while ``holder`` still holds it (a takeover changed the holder)."""
        return await asyncio.to_thread(
            self._execute, "UPDATE leases SET expires_at = ?, size = coalesce(?, size) "
            "WHERE name = ? AND holder = ?", (self._clock() + ttl, size, str(digest), holder)) > 0

    async def release(self, digest: Digest, holder: str) -> None:
        """Delete the lease row if it is still ours."""
        await asyncio.to_thread(self._execute, "DELETE FROM leases WHERE name = ? AND holder = ?",
                                (str(digest), holder))

    async def current(self, digest: Digest) -> LeaseInfo | None:
        """The live lease of ``digest``, if any."""
        got = await asyncio.to_thread(self._current_sync, str(digest))
        return None if got is None else LeaseInfo(digest, got[0], got[1], got[2], got[3])

    # --- GcLease ---------------------------------------------------------------------------

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        """Take the gc lease if free or expired (extend it if ours)."""
        got = await asyncio.to_thread(self._acquire_sync, GC_LEASE, holder, "", ttl)
        return got[0] == holder

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        """Extend our gc lease; False if it was lost."""
        return await asyncio.to_thread(
            self._execute, "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ?",
            (self._clock() + ttl, GC_LEASE, holder)) > 0

    async def release_gc(self, holder: str) -> None:
        """Give the gc lease up if it is ours."""
        await asyncio.to_thread(self._execute, "DELETE FROM leases WHERE name = ? AND holder = ?",
                                (GC_LEASE, holder))

    async def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
