"""The shared index on PostgreSQL (``index.backend: postgres``), through asyncpg.

The same tables and operations as the SQLite :mod:`sigil.storage.index` (tags, manifests and
their references, referrers, blobs, the blob gate, verdicts keyed by (digest, policy
fingerprint), access times, the gc graph), plus what several replicas sharing it need:

- **Fetch leases** (:class:`~sigil.storage.lease.FetchLeases`) and the **gc lease**
  (:class:`~sigil.storage.contracts.GcLease`) in one ``leases`` table. Acquisition is one
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at <= now()`` statement, atomic under
  the row lock PostgreSQL takes for the conflict; expiry is judged by the database server's
  ``now()`` only, never by a replica's clock, so clock skew between replicas cannot give two
  holders at once.
- **Check-and-delete** for gc (:meth:`PgIndex.delete_unreferenced`): advisory locks keyed on
  the digest. Writers that create references (``put_manifest``, ``add_referrer``) or record a
  blob (``put_blob``) take them shared (transaction-scoped) for every digest they protect; gc
  takes the one digest it is deleting exclusive (session-scoped, across the row drop and the
  object delete), and ``forget_manifests`` a global key exclusive. A writer holds only shared
  locks and the deleters one exclusive lock each, so no two of them can wait on each other in
  a cycle.
- **Index-driven gc queries** (:meth:`PgIndex.gc_candidates`, :meth:`PgIndex.stored_bytes`),
  so a gc pass never lists the whole bucket.

The schema is created or upgraded at start-up under an advisory lock (several replicas may start
at once). Connection problems at start-up raise :class:`~sigil.errors.StorageError` (the CLI
exits 2); any database failure during use becomes :class:`~sigil.errors.Unavailable` (503
``UNAVAILABLE``), and the pool reconnects by itself once the server is back. No asyncpg
exception leaves this module. The DSN may carry a password: it is never logged or put in a
message (only host, port and database are).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg

from sigil.errors import StorageError, Unavailable
from sigil.oci.digest import Digest
from sigil.storage.index import (
    TOUCH_PRECISION,
    Graph,
    ImageRecord,
    ManifestRow,
    TagRow,
    VerdictRow,
)
from sigil.storage.lease import LeaseInfo

SCHEMA_VERSION = 2
# Serialises schema migrations of replicas starting together (an arbitrary constant).
_MIGRATION_LOCK = 0x5161_1001
# The key every reference writer takes shared and forget_manifests takes exclusive.
_FORGET_KEY = "sigil:forget-manifests"
GC_LEASE = "gc"
# Bounds that keep a dead or stalled database from hanging requests.
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
# Whole-table reads of a graph snapshot (fsck) may take longer than a request's statement.
SNAPSHOT_TIMEOUT = 600.0

_SCHEMA_V1 = """
CREATE TABLE tags (
    upstream   text NOT NULL,
    repo       text NOT NULL,
    tag        text NOT NULL,
    digest     text NOT NULL,
    media_type text NOT NULL,
    checked_at double precision NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
);
CREATE INDEX tags_by_digest ON tags (digest);
CREATE TABLE manifests (
    digest      text PRIMARY KEY,
    media_type  text NOT NULL,
    size        bigint NOT NULL,
    last_access double precision NOT NULL
);
CREATE INDEX manifests_by_access ON manifests (last_access);
CREATE TABLE refs (
    parent text NOT NULL,
    child  text NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE INDEX refs_by_child ON refs (child);
CREATE TABLE referrers (
    subject  text NOT NULL,
    referrer text NOT NULL,
    PRIMARY KEY (subject, referrer)
);
CREATE INDEX referrers_by_referrer ON referrers (referrer);
CREATE TABLE blobs (
    digest text PRIMARY KEY,
    size   bigint NOT NULL
);
CREATE TABLE allows (
    fingerprint text NOT NULL,
    upstream    text NOT NULL,
    repo        text NOT NULL,
    digest      text NOT NULL,
    PRIMARY KEY (fingerprint, upstream, repo, digest)
);
CREATE INDEX allows_by_digest ON allows (digest);
CREATE TABLE verdicts (
    digest      text NOT NULL,
    fingerprint text NOT NULL,
    allowed     boolean NOT NULL,
    detail      text NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (digest, fingerprint)
);
-- name: 'sha256:<hex>' (fetch lease) or 'gc'. expires_at is on the database's clock.
CREATE TABLE leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    location   text NOT NULL,
    expires_at timestamptz NOT NULL,
    size       bigint
);
"""
# v2: small named values every replica shares (the orphan sweep's cursor).
_SCHEMA_V2 = """
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
"""
# Index i upgrades the schema from version i to i + 1.
_MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2)

# Everything asyncpg (or the socket under it) raises when the database is unreachable, restarts,
# times out or refuses a statement.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
    OSError, TimeoutError)


if TYPE_CHECKING:  # the stubs make it generic; at run time it is a plain class
    from asyncpg.pool import PoolConnectionProxy

    _Conn = PoolConnectionProxy[asyncpg.Record]


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a DSN, without user or password (for messages)."""
    try:
        parts = urlsplit(dsn)
        if parts.scheme in ("postgres", "postgresql"):
            host = parts.hostname or "localhost"
            return f"{host}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        pass
    return "(keyword DSN)"


def _d(text: str) -> Digest:
    return Digest.parse(text)


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``DELETE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _lease(name: str, row: Any) -> LeaseInfo:
    return LeaseInfo(_d(name), str(row["holder"]), str(row["location"]),
                     float(row["expires_at"]), None if row["size"] is None else int(row["size"]))


class PgIndex:
    """The PostgreSQL index, fetch leases and gc lease (see module docstring)."""

    def __init__(self, pool: asyncpg.Pool, where: str) -> None:
        self._pool = pool
        self.where = where

    @classmethod
    async def open(cls, dsn: str, *, source: str = "index.postgres.dsn",
                   max_connections: int = 10) -> PgIndex:
        """Connect (a pool), create or upgrade the schema, and return the index.

        ``source`` names the config key the DSN came from, for the error message."""
        where = describe_dsn(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_connections, timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT)
        except _DB_ERRORS as exc:
            raise StorageError(f"cannot connect to the PostgreSQL index at {where} (from "
                               f"{source}): {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # a malformed DSN; its text may hold a password: not shown
            raise StorageError(f"{source}: not a valid PostgreSQL DSN") from exc
        index = cls(pool, where)
        try:
            await index._migrate()
        except BaseException:
            await index.close()
            raise
        return index

    async def _migrate(self) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                                   "(version integer NOT NULL)")
                version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                if version > SCHEMA_VERSION:
                    raise StorageError(f"the PostgreSQL index at {self.where} has schema "
                                       f"{version}, newer than this sigil understands "
                                       f"({SCHEMA_VERSION})")
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    await conn.execute(_MIGRATIONS[target - 1])
                    await conn.execute("INSERT INTO schema_version VALUES ($1)", target)
        except _DB_ERRORS as exc:
            raise StorageError(f"cannot prepare the PostgreSQL index at {self.where}: "
                               f"{type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[_Conn]:
        """A pooled connection; database failures become :class:`Unavailable`."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DB_ERRORS as exc:
            raise Unavailable(f"the index database at {self.where} is unavailable: "
                              f"{type(exc).__name__}") from exc

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[_Conn]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any) -> int:
        async with self._conn() as conn:
            return _count(await conn.execute(sql, *args))

    async def close(self) -> None:
        """Close the pool (bounded: a dead server cannot hold shutdown up)."""
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT)
        except Exception:  # already broken: drop the connections without a goodbye
            self._pool.terminate()

    # --- tags ------------------------------------------------------------------------------

    async def get_tag(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        """The cached resolution of ``tag``."""
        rows = await self._fetch("SELECT digest, media_type, checked_at FROM tags "
                                 "WHERE upstream = $1 AND repo = $2 AND tag = $3",
                                 upstream, repo, tag)
        if not rows:
            return None
        return TagRow(_d(rows[0]["digest"]), str(rows[0]["media_type"]),
                      float(rows[0]["checked_at"]))

    async def list_tags(self, upstream: str, repo: str, *, last: str | None = None,
                        limit: int | None = None) -> list[str]:
        """One page of a repository's stored tags (after ``last``, at most ``limit``), cut
        by the query. Compared and ordered by code point (``COLLATE "C"``), as SQLite and
        distribution do, whatever the database's collation."""
        rows = await self._fetch(
            'SELECT tag FROM tags WHERE upstream = $1 AND repo = $2 AND ($3::text IS NULL '
            'OR tag COLLATE "C" > $3::text) ORDER BY tag COLLATE "C" LIMIT $4',
            upstream, repo, last, limit)
        return [str(row["tag"]) for row in rows]

    async def put_tag(self, upstream: str, repo: str, tag: str, digest: Digest,
                      media_type: str, checked_at: float) -> None:
        """Record (or refresh) a tag resolution."""
        await self._execute(
            "INSERT INTO tags VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (upstream, repo, tag) "
            "DO UPDATE SET digest = excluded.digest, media_type = excluded.media_type, "
            "checked_at = excluded.checked_at",
            upstream, repo, tag, str(digest), media_type, checked_at)

    async def delete_tag(self, upstream: str, repo: str, tag: str) -> bool:
        """Forget a tag; return whether it was known."""
        return await self._execute("DELETE FROM tags WHERE upstream = $1 AND repo = $2 "
                                   "AND tag = $3", upstream, repo, tag) > 0

    # --- manifests and references ----------------------------------------------------------

    @staticmethod
    async def _protect(conn: _Conn, digests: Iterable[Digest]) -> None:
        """Shared advisory locks on the digests a write makes referenced (see module doc)."""
        keys = [_FORGET_KEY, *sorted({str(d) for d in digests})]
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(k, 0)) "
                           "FROM unnest($1::text[]) AS k", keys)

    async def put_manifest(self, digest: Digest, media_type: str, size: int,
                           references: Iterable[Digest], *, now: float | None = None) -> None:
        """Record a stored manifest and what it points at."""
        refs = sorted({str(r) for r in references})
        stamp = time.time() if now is None else now
        async with self._tx() as conn:
            await self._protect(conn, [digest, *map(_d, refs)])
            await conn.execute(
                "INSERT INTO manifests VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO UPDATE "
                "SET last_access = greatest(manifests.last_access, excluded.last_access)",
                str(digest), media_type, size, stamp)
            await conn.execute("INSERT INTO refs SELECT $1, c FROM unnest($2::text[]) AS c "
                               "ON CONFLICT DO NOTHING", str(digest), refs)

    async def get_manifest(self, digest: Digest) -> ManifestRow | None:
        """The manifest row, or None."""
        rows = await self._fetch("SELECT media_type, size, last_access FROM manifests "
                                 "WHERE digest = $1", str(digest))
        if not rows:
            return None
        return ManifestRow(digest, str(rows[0]["media_type"]), int(rows[0]["size"]),
                           float(rows[0]["last_access"]))

    async def get_references(self, digest: Digest) -> list[Digest]:
        """What the manifest points at."""
        rows = await self._fetch("SELECT child FROM refs WHERE parent = $1 ORDER BY child",
                                 str(digest))
        return [_d(r["child"]) for r in rows]

    async def touch(self, digest: Digest, now: float) -> None:
        """Note an access, writing only when the stored time is older than TOUCH_PRECISION."""
        await self._execute("UPDATE manifests SET last_access = $2 WHERE digest = $1 "
                            "AND last_access < $2 - $3::float8", str(digest), now,
                            TOUCH_PRECISION)

    async def add_referrer(self, subject: Digest, referrer: Digest) -> None:
        """Record that ``referrer`` refers to ``subject``."""
        async with self._tx() as conn:
            await self._protect(conn, [referrer])
            await conn.execute("INSERT INTO referrers VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               str(subject), str(referrer))

    async def get_referrers(self, subject: Digest) -> list[Digest]:
        """The recorded referrers of ``subject``."""
        rows = await self._fetch("SELECT referrer FROM referrers WHERE subject = $1 "
                                 "ORDER BY referrer", str(subject))
        return [_d(r["referrer"]) for r in rows]

    # --- blobs -----------------------------------------------------------------------------

    async def put_blob(self, digest: Digest, size: int) -> None:
        """Record a stored non-manifest object, under a shared advisory lock on it. If gc is
        deleting it right now (the exclusive lock is held), wait for the delete to end and
        record nothing: the object this caller stored may have been deleted after it landed,
        and without a row it is simply fetched again."""
        key = str(digest)
        async with self._tx() as conn:
            if not await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock_shared(hashtextextended($1, 0))", key):
                await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
                                   key)
                return
            await conn.execute("INSERT INTO blobs VALUES ($1, $2) ON CONFLICT (digest) DO UPDATE "
                               "SET size = excluded.size", key, size)

    async def blob_size(self, digest: Digest) -> int | None:
        """The recorded size of a stored blob, or None."""
        rows = await self._fetch("SELECT size FROM blobs WHERE digest = $1", str(digest))
        return int(rows[0]["size"]) if rows else None

    # --- blob gate -------------------------------------------------------------------------

    async def allow(self, upstream: str, repo: str, digests: Iterable[Digest],
                    fingerprint: str) -> None:
        """Make ``digests`` servable in that repository under ``fingerprint``."""
        await self._execute(
            "INSERT INTO allows SELECT $1, $2, $3, d FROM unnest($4::text[]) AS d "
            "ON CONFLICT DO NOTHING", fingerprint, upstream, repo, [str(d) for d in digests])

    async def is_allowed(self, upstream: str, repo: str, digest: Digest,
                         fingerprint: str) -> bool:
        """True if allowed in that repository under this exact fingerprint."""
        return bool(await self._fetch(
            "SELECT 1 FROM allows WHERE fingerprint = $1 AND upstream = $2 AND repo = $3 "
            "AND digest = $4", fingerprint, upstream, repo, str(digest)))

    async def prune_allows(self, fingerprint: str) -> int:
        """Delete allows recorded under any other fingerprint."""
        return await self._execute("DELETE FROM allows WHERE fingerprint <> $1", fingerprint)

    # --- verdicts --------------------------------------------------------------------------

    async def get_verdict(self, digest: Digest, fingerprint: str,
                          now: float) -> VerdictRow | None:
        """The cached verdict, or None if absent or expired."""
        rows = await self._fetch("SELECT allowed, detail, expires_at FROM verdicts "
                                 "WHERE digest = $1 AND fingerprint = $2 AND expires_at > $3",
                                 str(digest), fingerprint, now)
        if not rows:
            return None
        return VerdictRow(bool(rows[0]["allowed"]), str(rows[0]["detail"]),
                          float(rows[0]["expires_at"]))

    async def put_verdict(self, digest: Digest, fingerprint: str, allowed: bool, detail: str,
                          expires_at: float) -> None:
        """Cache a verdict until ``expires_at``."""
        await self._execute(
            "INSERT INTO verdicts VALUES ($1, $2, $3, $4, $5) ON CONFLICT (digest, fingerprint) "
            "DO UPDATE SET allowed = excluded.allowed, detail = excluded.detail, "
            "expires_at = excluded.expires_at", str(digest), fingerprint, allowed, detail,
            expires_at)

    async def prune_verdicts(self, now: float) -> int:
        """Delete expired verdicts."""
        return await self._execute("DELETE FROM verdicts WHERE expires_at <= $1", now)

    # --- gc / fsck support -----------------------------------------------------------------

    async def graph(self) -> Graph:
        """A consistent snapshot (one repeatable-read, read-only transaction)."""
        async with self._conn() as conn, conn.transaction(isolation="repeatable_read",
                                                          readonly=True):
            manifests = {
                _d(r["digest"]): ManifestRow(_d(r["digest"]), str(r["media_type"]),
                                             int(r["size"]), float(r["last_access"]))
                for r in await conn.fetch(
                    "SELECT digest, media_type, size, last_access FROM manifests",
                    timeout=SNAPSHOT_TIMEOUT)}
            refs: dict[Digest, list[Digest]] = {}
            for r in await conn.fetch("SELECT parent, child FROM refs",
                                      timeout=SNAPSHOT_TIMEOUT):
                refs.setdefault(_d(r["parent"]), []).append(_d(r["child"]))
            referrers: dict[Digest, list[Digest]] = {}
            for r in await conn.fetch("SELECT subject, referrer FROM referrers",
                                      timeout=SNAPSHOT_TIMEOUT):
                referrers.setdefault(_d(r["subject"]), []).append(_d(r["referrer"]))
            blobs = {_d(r["digest"]): int(r["size"])
                     for r in await conn.fetch("SELECT digest, size FROM blobs",
                                               timeout=SNAPSHOT_TIMEOUT)}
        return Graph(manifests, refs, referrers, blobs)

    _REFERENCED = (
        "SELECT 1 FROM manifests WHERE digest = $1 "
        "UNION ALL SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.parent "
        "WHERE r.child = $1 "
        "UNION ALL SELECT 1 FROM referrers x JOIN manifests m ON m.digest = x.subject "
        "WHERE x.referrer = $1 LIMIT 1")

    async def is_referenced(self, digest: Digest) -> bool:
        """True if a stored manifest is, or points at, ``digest``."""
        return bool(await self._fetch(self._REFERENCED, str(digest)))

    async def forget_manifests(self, digests: Iterable[Digest]) -> tuple[set[Digest], int]:
        """Drop evicted manifests (sparing any a manifest outside the set points at, and what
        only they keep), their edges and their tags; return (dropped, tags deleted)."""
        doomed = {str(d) for d in digests}
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               _FORGET_KEY)
            holders: dict[str, set[str]] = {}
            for r in await conn.fetch(
                    "SELECT r.child AS d, r.parent AS h FROM refs r JOIN manifests m "
                    "ON m.digest = r.parent WHERE r.child = ANY($1::text[]) "
                    "UNION SELECT x.referrer, x.subject FROM referrers x JOIN manifests m "
                    "ON m.digest = x.subject WHERE x.referrer = ANY($1::text[])",
                    sorted(doomed)):
                holders.setdefault(r["d"], set()).add(r["h"])
            changed = True
            while changed:  # fixpoint: sparing one manifest may spare its children
                changed = False
                for digest in sorted(doomed):
                    if holders.get(digest, set()) - doomed:
                        doomed.discard(digest)
                        changed = True
            keys = sorted(doomed)
            tags = _count(await conn.execute("DELETE FROM tags WHERE digest = ANY($1::text[])",
                                             keys))
            await conn.execute("DELETE FROM manifests WHERE digest = ANY($1::text[])", keys)
            await conn.execute("DELETE FROM refs WHERE parent = ANY($1::text[])", keys)
            await conn.execute("DELETE FROM referrers WHERE subject = ANY($1::text[]) "
                               "OR referrer = ANY($1::text[])", keys)
        return {_d(k) for k in keys}, tags

    async def forget_objects(self, digests: Iterable[Digest]) -> None:
        """Drop the manifest and blob rows of objects that left the store."""
        keys = [str(d) for d in digests]
        async with self._tx() as conn:
            await conn.execute("DELETE FROM manifests WHERE digest = ANY($1::text[])", keys)
            await conn.execute("DELETE FROM blobs WHERE digest = ANY($1::text[])", keys)

    async def drop_allows(self, digests: Iterable[Digest]) -> None:
        """Drop every allow of these digests."""
        await self._execute("DELETE FROM allows WHERE digest = ANY($1::text[])",
                            [str(d) for d in digests])

    async def delete_unreferenced(self, digest: Digest,
                                  delete: Callable[[], Awaitable[bool]]) -> bool:
        """``delete()`` under an exclusive advisory lock on the digest, if nothing references
        it. The lock is session-level, held across two steps: a committed transaction that
        checks and drops the object's rows (so no row claims it from then on, even if this
        replica dies midway), then ``delete()``. A replica's put_manifest naming the digest
        waits for the lock, then sees the object gone (and fetches it again) or finds it
        kept; a put_blob that waits records nothing (see put_blob). If the session dies, so
        does its lock; asyncpg's pool also unlocks all on release."""
        key = str(digest)
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
            try:
                async with conn.transaction():
                    if await conn.fetch(self._REFERENCED, key):
                        return False
                    await conn.execute("DELETE FROM manifests WHERE digest = $1", key)
                    await conn.execute("DELETE FROM blobs WHERE digest = $1", key)
                return await delete()
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)

    async def gc_candidates(self, accessed_before: float, limit: int) -> list[ManifestRow]:
        """Root manifests least recently used first (uses ``manifests_by_access``)."""
        rows = await self._fetch(
            "SELECT m.digest, m.media_type, m.size, m.last_access FROM manifests m "
            "WHERE m.last_access < $1 "
            "AND NOT EXISTS (SELECT 1 FROM refs r JOIN manifests p ON p.digest = r.parent "
            "WHERE r.child = m.digest) "
            "AND NOT EXISTS (SELECT 1 FROM referrers x JOIN manifests s "
            "ON s.digest = x.subject WHERE x.referrer = m.digest) "
            "ORDER BY m.last_access, m.digest LIMIT $2", accessed_before, limit)
        return [ManifestRow(_d(r["digest"]), str(r["media_type"]), int(r["size"]),
                            float(r["last_access"])) for r in rows]

    async def stored_bytes(self) -> int:
        """Bytes of every indexed manifest and blob."""
        rows = await self._fetch("SELECT coalesce((SELECT sum(size) FROM manifests), 0) "
                                 "+ coalesce((SELECT sum(size) FROM blobs), 0) AS total")
        return int(rows[0]["total"])

    async def indexed(self, digests: Iterable[Digest]) -> set[Digest]:
        """Which of ``digests`` have a manifest or a blob row (one query)."""
        keys = sorted({str(d) for d in digests})
        rows = await self._fetch("SELECT digest FROM manifests WHERE digest = ANY($1::text[]) "
                                 "UNION SELECT digest FROM blobs WHERE digest = ANY($1::text[])",
                                 keys)
        return {_d(r["digest"]) for r in rows}

    async def record_image(self, image: ImageRecord,
                           check: Callable[[], Awaitable[None]] | None = None) -> None:
        """Every row of one image in one transaction, under the shared advisory locks of
        every digest it names (as put_manifest takes them): a delete under way is waited
        for, and none can begin before the commit, so ``check``, run while they are held,
        sees objects that stay until the rows protect them."""
        async with self._tx() as conn:
            await self._protect(conn, image.digests())
            if check is not None:
                await check()
            await conn.execute(
                "INSERT INTO blobs SELECT * FROM unnest($1::text[], $2::bigint[]) "
                "ON CONFLICT (digest) DO UPDATE SET size = excluded.size",
                [str(d) for d, _ in image.blobs], [size for _, size in image.blobs])
            await conn.execute(
                "INSERT INTO manifests SELECT d, t, s, $4 FROM unnest($1::text[], $2::text[], "
                "$3::bigint[]) AS m(d, t, s) ON CONFLICT (digest) DO UPDATE "
                "SET last_access = greatest(manifests.last_access, excluded.last_access)",
                [str(m.digest) for m in image.manifests],
                [m.media_type for m in image.manifests],
                [m.size for m in image.manifests], image.checked_at)
            edges = [(str(m.digest), str(c)) for m in image.manifests for c in m.references]
            await conn.execute("INSERT INTO refs SELECT * FROM unnest($1::text[], $2::text[]) "
                               "ON CONFLICT DO NOTHING",
                               [p for p, _ in edges], [c for _, c in edges])
            links = [(str(m.subject), str(m.digest)) for m in image.manifests
                     if m.subject is not None]
            await conn.execute("INSERT INTO referrers SELECT * FROM unnest($1::text[], "
                               "$2::text[]) ON CONFLICT DO NOTHING",
                               [s for s, _ in links], [r for _, r in links])
            await conn.executemany(
                "INSERT INTO tags VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT "
                "(upstream, repo, tag) DO UPDATE SET digest = excluded.digest, "
                "media_type = excluded.media_type, checked_at = excluded.checked_at",
                [(t.upstream, t.repo, t.tag, str(t.digest), t.media_type, image.checked_at)
                 for t in image.tags])

    async def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return str(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (replacing any)."""
        await self._execute("INSERT INTO meta VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
                            "SET value = excluded.value", key, value)

    # --- leases (database clock only) ------------------------------------------------------

    _ACQUIRE = (
        "INSERT INTO leases AS l (name, holder, location, expires_at) "
        "VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8)) "
        "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
        "location = excluded.location, expires_at = excluded.expires_at, "
        "size = CASE WHEN l.holder = excluded.holder THEN l.size END "
        "WHERE l.expires_at <= now() OR l.holder = excluded.holder "
        "RETURNING holder, location, extract(epoch FROM expires_at)::float8 AS expires_at, size")
    _CURRENT = ("SELECT holder, location, extract(epoch FROM expires_at)::float8 AS expires_at, "
                "size FROM leases WHERE name = $1 AND expires_at > now()")

    async def _acquire(self, name: str, holder: str, location: str, ttl: float) -> Any:
        async with self._conn() as conn:
            for _ in range(8):  # the live holder may release between the two statements
                row = await conn.fetchrow(self._ACQUIRE, name, holder, location, ttl)
                if row is None:
                    row = await conn.fetchrow(self._CURRENT, name)
                if row is not None:
                    return row
        raise Unavailable(f"lease {name} is changing hands too fast to be acquired")

    async def acquire(self, digest: Digest, holder: str, location: str,
                      ttl: float) -> LeaseInfo:
        """Take the fetch lease if free or expired; else return the live holder's lease."""
        return _lease(str(digest), await self._acquire(str(digest), holder, location, ttl))

    async def renew(self, digest: Digest, holder: str, ttl: float,
                    size: int | None = None) -> bool:
        """Extend the lease while ``holder`` holds it; record the size once known."""
        return await self._execute(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $3::float8), "
            "size = coalesce($4, size) WHERE name = $1 AND holder = $2",
            str(digest), holder, ttl, size) > 0

    async def release(self, digest: Digest, holder: str) -> None:
        """Give the lease up if it is still ours."""
        await self._execute("DELETE FROM leases WHERE name = $1 AND holder = $2",
                            str(digest), holder)

    async def current(self, digest: Digest) -> LeaseInfo | None:
        """The live lease for ``digest``, if any."""
        rows = await self._fetch(self._CURRENT, str(digest))
        return _lease(str(digest), rows[0]) if rows else None

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        """Take the gc lease (one gc at a time across the fleet)."""
        row = await self._acquire(GC_LEASE, holder, "", ttl)
        return bool(row["holder"] == holder)

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        """Extend our gc lease; False if it was lost."""
        return await self._execute(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $3::float8) "
            "WHERE name = $1 AND holder = $2", GC_LEASE, holder, ttl) > 0

    async def release_gc(self, holder: str) -> None:
        """Give the gc lease up if it is ours."""
        await self._execute("DELETE FROM leases WHERE name = $1 AND holder = $2",
                            GC_LEASE, holder)

    async def database_now(self) -> float:
        """The database server's clock (seconds since the epoch): what lease expiry uses."""
        rows = await self._fetch("SELECT extract(epoch FROM now())::float8 AS now")
        return float(rows[0]["now"])
