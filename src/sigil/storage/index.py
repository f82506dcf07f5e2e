"""The SQLite index beside the content store: tags, manifests and what they reference,
referrers, the blob gate, and cached policy verdicts.

One connection in WAL mode with ``synchronous=NORMAL``: a crash can lose only the last
transactions, never corrupt the file (everything here can be re-learned from the upstream).
Calls are short and made from the event loop thread; a lock serialises them with a gc running
in a worker thread. gc's whole-graph snapshot alone uses a second, read-only connection, so it
never holds that lock.

Deleting an object is atomic against every writer of the file, in every process
(``--workers N`` and ``sigil gc`` share it):

- a synchronous delete (the local gc's unlink) runs inside one ``BEGIN IMMEDIATE`` transaction
  with its "is it referenced?" check (:meth:`Index.delete_if_unreferenced`): SQLite's write
  lock keeps every other writer out for those microseconds;
- a delete that really waits (an S3 ``DELETE``) cannot hold that lock, so it leaves a mark in
  the ``deleting`` table instead (:meth:`Index.begin_delete`, committed together with the
  check and with dropping the object's rows), runs with no lock held, and clears the mark
  (:meth:`Index.end_delete`). Writers that would reference or record a marked digest
  (``put_manifest``, ``add_referrer``, ``put_blob``) wait until the mark is gone: so when
  ``put_manifest`` returns, each reference is either protected (the check comes later and
  sees it) or already deleted with its rows gone (the mirror fetches it again). A
  ``put_blob`` that had to wait records nothing: its upload may have landed before the
  delete did.
- A mark outlives its deleter only by a crash; a mark whose holder process is gone (same
  host, dead pid) or older than :data:`DELETE_MARK_TTL` is dropped by the next writer that
  meets it. Nothing is lost by that: the rows went with the mark, so the object is at worst
  stored without an index row (fetched again, or swept by the local gc).

Digests are stored as their ``sha256:<hex>`` text, which the :class:`Digest` type validates on the
way in and on the way out.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.lease import holder_alive, process_holder_id

SCHEMA_VERSION = 3
# touch() writes a manifest's last access only when it is older than this: LRU eviction needs
# minutes of precision, not a write per request.
TOUCH_PRECISION = 60.0
# A deletion mark older than this is a crashed deleter's (an S3 DELETE with its retries takes
# seconds at most); the writer that meets it drops it.
DELETE_MARK_TTL = 300.0
# How often a writer blocked by a deletion mark looks again (doubling up to the maximum).
MARK_POLL_FIRST = 0.005
MARK_POLL_MAX = 0.2

_SCHEMA_V1 = """
CREATE TABLE tags (
    upstream   TEXT NOT NULL,
    repo       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    media_type TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_digest ON tags (digest);

-- Manifests stored as objects; last_access drives LRU eviction of root manifests.
CREATE TABLE manifests (
    digest      TEXT PRIMARY KEY,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    last_access REAL NOT NULL
) WITHOUT ROWID;

-- parent manifest -> what it points at (index children, config, layers). Immutable per parent.
CREATE TABLE refs (
    parent TEXT NOT NULL,
    child  TEXT NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE INDEX refs_by_child ON refs (child);

-- subject manifest -> referrer manifest (signatures, attestations, SBOMs): kept apart from refs
-- because the edge points the other way (the referrer names its subject), and gc keeps
-- referrers alive through their subject.
CREATE TABLE referrers (
    subject  TEXT NOT NULL,
    referrer TEXT NOT NULL,
    PRIMARY KEY (subject, referrer)
) WITHOUT ROWID;
CREATE INDEX referrers_by_referrer ON referrers (referrer);

-- Non-manifest objects (configs, layers, signature payloads).
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size   INTEGER NOT NULL
) WITHOUT ROWID;

-- The blob gate: digests servable in a repository under a policy fingerprint.
CREATE TABLE allows (
    fingerprint TEXT NOT NULL,
    upstream    TEXT NOT NULL,
    repo        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    PRIMARY KEY (fingerprint, upstream, repo, digest)
) WITHOUT ROWID;
CREATE INDEX allows_by_digest ON allows (digest);

CREATE TABLE verdicts (
    digest      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    allowed     INTEGER NOT NULL,
    detail      TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (digest, fingerprint)
) WITHOUT ROWID;
"""

# v2: objects being deleted right now (see the module docstring); holder is "host:pid:random".
_SCHEMA_V2 = """
CREATE TABLE deleting (
    digest     TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    started_at REAL NOT NULL
) WITHOUT ROWID;
"""

# v3: small shared state under a name (the orphan sweep's cursor; how many deletes began,
# which an atomic image write compares to know no delete ran between its check and its rows).
_SCHEMA_V3 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

# Index i upgrades a database from user_version i to i + 1.
_MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)
#: The meta key counting deletes begun (begin_delete, delete_if_unreferenced).
DELETES_KEY = "deletes-begun"


@dataclass(frozen=True, slots=True)
class TagRow:
    """A cached tag resolution."""

    digest: Digest
    media_type: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """A manifest held in the store."""

    digest: Digest
    media_type: str
    size: int
    last_access: float


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """A cached policy decision for (digest, fingerprint)."""

    allowed: bool
    detail: str  # JSON text: reasons, matched policies
    expires_at: float


@dataclass(frozen=True, slots=True)
class Graph:
    """A consistent snapshot of what gc needs: manifests, edges and known objects."""

    manifests: dict[Digest, ManifestRow]
    refs: dict[Digest, list[Digest]]       # parent -> children
    referrers: dict[Digest, list[Digest]]  # subject -> referrers
    blobs: dict[Digest, int]               # non-manifest objects -> size


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """One manifest of an :class:`ImageRecord`: its row, what it references, and the
    subject it is a referrer of (if any)."""

    digest: Digest
    media_type: str
    size: int
    references: tuple[Digest, ...]
    subject: Digest | None = None


@dataclass(frozen=True, slots=True)
class TagRecord:
    """One tag of an :class:`ImageRecord`."""

    upstream: str
    repo: str
    tag: str
    digest: Digest
    media_type: str


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """Every index row of one image (an air-gap import writes them in one transaction:
    :meth:`Index.try_record_image`)."""

    blobs: tuple[tuple[Digest, int], ...]
    manifests: tuple[ManifestRecord, ...]
    tags: tuple[TagRecord, ...]
    checked_at: float  # the tags' resolution time; also the manifests' first access

    def digests(self) -> set[Digest]:
        """Every digest the rows name (what a deletion under way must not cover)."""
        named = {d for d, _ in self.blobs}
        for m in self.manifests:
            named.add(m.digest)
            named.update(m.references)
        named.update(t.digest for t in self.tags)
        return named


def _d(text: str) -> Digest:
    return Digest.parse(text)


def poll_delays() -> Iterator[float]:
    """Pauses between the attempts of a writer that a deletion mark blocks: short at first
    (a delete takes milliseconds), doubling up to :data:`MARK_POLL_MAX`; endless (the mark
    ends with its deletion, or goes stale)."""
    delay = MARK_POLL_FIRST
    while True:
        yield delay
        delay = min(delay * 2, MARK_POLL_MAX)


class Blocked(Exception):
    """Internal: a write met deletion marks (rolled back; the caller waits and retries)."""

    def __init__(self, digests: set[Digest]) -> None:
        super().__init__(f"{len(digests)} digest(s) being deleted")
        self.digests = digests


class Index:
    """The sigil index database (see module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        # Who this Index is in the deletion marks it leaves (a crash is recognised by the pid).
        self.holder = process_holder_id()
        try:
            # isolation_level=None: autocommit; multi-statement writes use explicit transactions.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open index {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")  # the CLI may gc beside a server
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"index {self.path}: cannot enable WAL (got {mode!r})")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StorageError(f"index {self.path} is unusable: {exc}") from exc
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        # Several processes may open a new index at once (``--workers``): the version is read
        # again under the write lock, so only one of them applies each migration.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StorageError(f"index {self.path} has schema {version}, newer than "
                                       f"this sigil understands ({SCHEMA_VERSION})")
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    # Statement by statement inside this transaction (executescript would
                    # commit first): the schema and its version land together.
                    script = re.sub(r"--[^\n]*", "", _MIGRATIONS[target - 1])  # comments
                    for statement in script.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the index lock, so that a check and an action on the store (gc deleting an
        object nobody references) are atomic with respect to other users of this Index."""
        with self._lock:
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: take the write lock up front rather than
        fail on upgrade); sqlite errors become :class:`StorageError`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # sqlite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"index {self.path}: {exc}") from exc

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"index {self.path}: {exc}") from exc

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self._tx() as db:
            return db.execute(sql, params).rowcount

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    # --- tags ------------------------------------------------------------------------------

    def get_tag(self, upstream: str, repo: str, tag: str) -> TagRow | None:
        """The cached resolution of ``tag``; the caller compares ``checked_at`` with its TTL."""
        rows = self._query("SELECT digest, media_type, checked_at FROM tags "
                           "WHERE upstream = ? AND repo = ? AND tag = ?", (upstream, repo, tag))
        if not rows:
            return None
        digest, media_type, checked_at = rows[0]
        return TagRow(_d(str(digest)), str(media_type), float(checked_at))

    def put_tag(self, upstream: str, repo: str, tag: str, digest: Digest, media_type: str,
                checked_at: float) -> None:
        """Record (or refresh) a tag resolution."""
        self._write("INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (upstream, repo, tag) DO UPDATE SET digest = excluded.digest, "
                    "media_type = excluded.media_type, checked_at = excluded.checked_at",
                    (upstream, repo, tag, str(digest), media_type, checked_at))

    def delete_tag(self, upstream: str, repo: str, tag: str) -> bool:
        """Forget a tag; return whether it was known."""
        return self._write("DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ?",
                           (upstream, repo, tag)) > 0

    def list_tags(self, upstream: str, repo: str, *, last: str | None = None,
                  limit: int | None = None) -> list[str]:
        """The stored tags of one repository in lexical (code point) order, only those after
        ``last`` and at most ``limit`` of them: one page of the offline tag list, cut by the
        query (the primary key's order), so a repository with many tags is never read whole."""
        rows = self._query("SELECT tag FROM tags WHERE upstream = ?1 AND repo = ?2 "
                           "AND (?3 IS NULL OR tag > ?3) ORDER BY tag LIMIT ?4",
                           (upstream, repo, last, -1 if limit is None else limit))
        return [str(r[0]) for r in rows]

    # --- manifests and references ----------------------------------------------------------

    def put_manifest(self, digest: Digest, media_type: str, size: int,
                     references: Iterable[Digest], *, now: float | None = None) -> None:
        """Record a stored manifest and the digests it points at (index children, config,
        layers). ``now`` (wall-clock seconds) is its first access time. Waits (sleeping) while
        any of them is being deleted: see the module docstring."""
        refs = list(references)
        for delay in poll_delays():
            try:
                return self.try_put_manifest(digest, media_type, size, refs, now=now)
            except Blocked:
                time.sleep(delay)

    def try_put_manifest(self, digest: Digest, media_type: str, size: int,
                         references: Iterable[Digest], *, now: float | None = None) -> None:
        """:meth:`put_manifest`, or :class:`Blocked` (nothing written) if the manifest or a
        digest it references is being deleted."""
        now = time.time() if now is None else now
        refs = list(references)

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO manifests VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE "
                       "SET last_access = max(last_access, excluded.last_access)",
                       (str(digest), media_type, size, now))
            db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                           [(str(digest), str(child)) for child in refs])

        self._write_unless_deleting([digest, *refs], write)

    def get_manifest(self, digest: Digest) -> ManifestRow | None:
        """The manifest row, or None if the manifest is not stored."""
        rows = self._query("SELECT media_type, size, last_access FROM manifests WHERE digest = ?",
                           (str(digest),))
        if not rows:
            return None
        media_type, size, last_access = rows[0]
        return ManifestRow(digest, str(media_type), int(size),
                           float(last_access))

    def get_references(self, digest: Digest) -> list[Digest]:
        """What the manifest ``digest`` points at (empty if unknown)."""
        rows = self._query("SELECT child FROM refs WHERE parent = ? ORDER BY child",
                           (str(digest),))
        return [_d(str(r[0])) for r in rows]

    def touch(self, digest: Digest, now: float) -> None:
        """Note an access to a manifest (for LRU). Writes only when the stored time is older
        than :data:`TOUCH_PRECISION`, so serving hot manifests does not write per request."""
        with self._lock:
            rows = self._query("SELECT last_access FROM manifests WHERE digest = ?",
                               (str(digest),))
            if rows and float(rows[0][0]) < now - TOUCH_PRECISION:
                self._write("UPDATE manifests SET last_access = ? WHERE digest = ?",
                            (now, str(digest)))

    def add_referrer(self, subject: Digest, referrer: Digest) -> None:
        """Record that manifest ``referrer`` (a signature, attestation...) refers to
        ``subject``; gc keeps it for as long as it keeps the subject. Waits while the
        referrer is being deleted."""
        for delay in poll_delays():
            try:
                return self.try_add_referrer(subject, referrer)
            except Blocked:
                time.sleep(delay)

    def try_add_referrer(self, subject: Digest, referrer: Digest) -> None:
        """:meth:`add_referrer`, or :class:`Blocked` if the referrer is being deleted."""
        self._write_unless_deleting([referrer], lambda db: db.execute(
            "INSERT OR IGNORE INTO referrers VALUES (?, ?)", (str(subject), str(referrer))))

    def get_referrers(self, subject: Digest) -> list[Digest]:
        """The recorded referrers of ``subject``."""
        rows = self._query("SELECT referrer FROM referrers WHERE subject = ? ORDER BY referrer",
                           (str(subject),))
        return [_d(str(r[0])) for r in rows]

    # --- blobs -----------------------------------------------------------------------------

    def put_blob(self, digest: Digest, size: int) -> None:
        """Record a stored non-manifest object. If the digest is being deleted, wait for that
        to finish and write nothing (the object the caller stored may have gone with it;
        without a row it is fetched again)."""
        try:
            self.try_put_blob(digest, size)
        except Blocked:
            for delay in poll_delays():
                if not self.deleting([digest]):
                    return
                time.sleep(delay)

    def try_put_blob(self, digest: Digest, size: int) -> None:
        """Write the blob row, or raise :class:`Blocked` if the digest is being deleted."""
        self._write_unless_deleting([digest], lambda db: db.execute(
            "INSERT INTO blobs VALUES (?, ?) ON CONFLICT (digest) DO UPDATE "
            "SET size = excluded.size", (str(digest), size)))

    def blob_size(self, digest: Digest) -> int | None:
        """The recorded size of a stored non-manifest object, or None."""
        rows = self._query("SELECT size FROM blobs WHERE digest = ?", (str(digest),))
        return int(rows[0][0]) if rows else None

    # --- blob gate -------------------------------------------------------------------------

    def allow(self, upstream: str, repo: str, digests: Iterable[Digest],
              fingerprint: str) -> None:
        """Make ``digests`` servable in ``upstream``/``repo`` under policy ``fingerprint``
        (because a manifest that passed that policy references them)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO allows VALUES (?, ?, ?, ?)",
                           [(fingerprint, upstream, repo, str(d)) for d in digests])

    def is_allowed(self, upstream: str, repo: str, digest: Digest, fingerprint: str) -> bool:
        """True if ``digest`` was allowed in that repository under this exact fingerprint."""
        return bool(self._query("SELECT 1 FROM allows WHERE fingerprint = ? AND upstream = ? "
                                "AND repo = ? AND digest = ?",
                                (fingerprint, upstream, repo, str(digest))))

    def prune_allows(self, fingerprint: str) -> int:
        """Delete allows recorded under any other fingerprint (after a policy change)."""
        return self._write("DELETE FROM allows WHERE fingerprint != ?", (fingerprint,))

    # --- verdicts --------------------------------------------------------------------------

    def get_verdict(self, digest: Digest, fingerprint: str, now: float) -> VerdictRow | None:
        """The cached verdict for (digest, fingerprint), or None if absent or expired."""
        rows = self._query("SELECT allowed, detail, expires_at FROM verdicts "
                           "WHERE digest = ? AND fingerprint = ? AND expires_at > ?",
                           (str(digest), fingerprint, now))
        if not rows:
            return None
        allowed, detail, expires_at = rows[0]
        return VerdictRow(bool(allowed), str(detail), float(expires_at))

    def put_verdict(self, digest: Digest, fingerprint: str, allowed: bool, detail: str,
                    expires_at: float) -> None:
        """Cache a verdict until ``expires_at`` (wall-clock seconds)."""
        self._write("INSERT INTO verdicts VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (digest, fingerprint) DO UPDATE SET allowed = excluded.allowed, "
                    "detail = excluded.detail, expires_at = excluded.expires_at",
                    (str(digest), fingerprint, int(allowed), detail, expires_at))

    def prune_verdicts(self, now: float) -> int:
        """Delete expired verdicts."""
        return self._write("DELETE FROM verdicts WHERE expires_at <= ?", (now,))

    # --- meta: small named values shared by every process --------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def put_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (replacing any)."""
        self._write("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value", (key, value))

    def deletes_begun(self) -> int:
        """How many deletes have begun on this index so far (a counter: see try_record_image)."""
        value = self.get_meta(DELETES_KEY)
        return int(value) if value is not None else 0

    @staticmethod
    def _count_delete(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) DO UPDATE "
                   "SET value = CAST(value AS INTEGER) + 1", (DELETES_KEY,))

    # --- batches ---------------------------------------------------------------------------

    def indexed(self, digests: Iterable[Digest]) -> set[Digest]:
        """Which of ``digests`` have a manifest or a blob row, in one query (the digests go in
        as one JSON array parameter, so their number is not bound by SQLite's)."""
        keys = json.dumps(sorted({str(d) for d in digests}))
        rows = self._query("SELECT digest FROM manifests WHERE digest IN "
                           "(SELECT value FROM json_each(?1)) UNION SELECT digest FROM blobs "
                           "WHERE digest IN (SELECT value FROM json_each(?1))", (keys,))
        return {_d(str(r[0])) for r in rows}

    def try_record_image(self, image: ImageRecord, deletes_begun: int | None = None) -> None:
        """Write every row of ``image`` (blobs, manifests with their references and referrer
        links, tags) in one transaction: another reader sees all of them or none. Raise
        :class:`Blocked` (nothing written) if a digest they name is being deleted, or if
        ``deletes_begun`` is given and a delete began since the caller read
        :meth:`deletes_begun` (the caller then checks its objects again and retries)."""

        def write(db: sqlite3.Connection) -> None:
            if deletes_begun is not None:
                row = db.execute("SELECT value FROM meta WHERE key = ?",
                                 (DELETES_KEY,)).fetchone()
                if (int(row[0]) if row is not None else 0) != deletes_begun:
                    raise Blocked(set())
            db.executemany("INSERT INTO blobs VALUES (?, ?) ON CONFLICT (digest) DO UPDATE "
                           "SET size = excluded.size",
                           [(str(d), size) for d, size in image.blobs])
            for m in image.manifests:
                db.execute("INSERT INTO manifests VALUES (?, ?, ?, ?) ON CONFLICT (digest) "
                           "DO UPDATE SET last_access = max(last_access, excluded.last_access)",
                           (str(m.digest), m.media_type, m.size, image.checked_at))
                db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                               [(str(m.digest), str(c)) for c in m.references])
                if m.subject is not None:
                    db.execute("INSERT OR IGNORE INTO referrers VALUES (?, ?)",
                               (str(m.subject), str(m.digest)))
            db.executemany(
                "INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (upstream, repo, tag) "
                "DO UPDATE SET digest = excluded.digest, media_type = excluded.media_type, "
                "checked_at = excluded.checked_at",
                [(t.upstream, t.repo, t.tag, str(t.digest), t.media_type, image.checked_at)
                 for t in image.tags])

        self._write_unless_deleting(image.digests(), write)

    # --- gc / fsck support -----------------------------------------------------------------

    def graph(self) -> Graph:
        """A consistent snapshot of manifests, references, referrers and blobs.

        Read in one transaction on a private read-only connection: WAL lets it proceed beside
        the writer, so a large snapshot taken by a gc thread does not hold the lock that the
        event loop's index calls wait on.
        """
        try:
            reader = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                     isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"index {self.path}: {exc}") from exc
        try:
            reader.execute("BEGIN")  # one read transaction: the four tables agree
            manifests = {
                _d(d): ManifestRow(_d(d), media_type, size, last_access)
                for d, media_type, size, last_access in reader.execute(
                    "SELECT digest, media_type, size, last_access FROM manifests")
            }
            refs: dict[Digest, list[Digest]] = {}
            for parent, child in reader.execute("SELECT parent, child FROM refs"):
                refs.setdefault(_d(parent), []).append(_d(child))
            referrers: dict[Digest, list[Digest]] = {}
            for subject, referrer in reader.execute("SELECT subject, referrer FROM referrers"):
                referrers.setdefault(_d(subject), []).append(_d(referrer))
            blobs = {_d(d): int(size)
                     for d, size in reader.execute("SELECT digest, size FROM blobs")}
            reader.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"index {self.path}: {exc}") from exc
        finally:
            reader.close()
        return Graph(manifests, refs, referrers, blobs)

    _REFERENCED = (
        "SELECT 1 FROM manifests WHERE digest = ?1 "
        "UNION ALL SELECT 1 FROM refs r JOIN manifests m ON m.digest = r.parent "
        "WHERE r.child = ?1 "
        "UNION ALL SELECT 1 FROM referrers x JOIN manifests m ON m.digest = x.subject "
        "WHERE x.referrer = ?1 LIMIT 1")

    def is_referenced(self, digest: Digest) -> bool:
        """True if ``digest`` is a stored manifest, or a stored manifest points at it (as a
        reference, or as a referrer of it as subject). gc's deletions check this in the
        transaction that deletes (or marks for deletion), so a manifest recorded while gc was
        planning still protects what it references."""
        return bool(self._query(self._REFERENCED, (str(digest),)))

    # --- deletion (see the module docstring) -----------------------------------------------

    def _marked(self, db: sqlite3.Connection, digests: Iterable[Digest]) -> set[Digest]:
        """Which of ``digests`` a live deletion mark covers (inside a write transaction);
        stale marks met on the way (a crashed deleter's) are dropped."""
        now, live = time.time(), set[Digest]()
        if db.execute("SELECT 1 FROM deleting LIMIT 1").fetchone() is None:
            return live  # the usual case: nothing is being deleted
        for key in sorted({str(d) for d in digests}):
            row = db.execute("SELECT holder, started_at FROM deleting WHERE digest = ?",
                             (key,)).fetchone()
            if row is None:
                continue
            if float(row[1]) < now - DELETE_MARK_TTL or not holder_alive(str(row[0])):
                db.execute("DELETE FROM deleting WHERE digest = ?", (key,))
            else:
                live.add(_d(key))
        return live

    def _write_unless_deleting(self, digests: Iterable[Digest],
                               write: Callable[[sqlite3.Connection], object]) -> None:
        """Run ``write`` in a write transaction unless one of ``digests`` is being deleted
        (then roll back and raise :class:`Blocked`)."""
        with self._tx() as db:
            marked = self._marked(db, digests)
            if marked:
                raise Blocked(marked)
            write(db)

    def deleting(self, digests: Iterable[Digest]) -> set[Digest]:
        """Which of ``digests`` are being deleted right now (live marks)."""
        with self._tx() as db:
            return self._marked(db, digests)

    @staticmethod
    def _drop_rows(db: sqlite3.Connection, key: str) -> None:
        db.execute("DELETE FROM manifests WHERE digest = ?", (key,))
        db.execute("DELETE FROM blobs WHERE digest = ?", (key,))

    def begin_delete(self, digest: Digest) -> bool:
        """Start deleting ``digest`` unless something stored references it or another
        deletion of it is under way: in one transaction, drop its manifest and blob rows
        (nothing may claim it stored from now on) and mark it. Return whether it was marked;
        the caller then deletes the object and calls :meth:`end_delete`, whatever happened."""
        key = str(digest)
        with self._tx() as db:
            if db.execute(self._REFERENCED, (key,)).fetchall() or self._marked(db, [digest]):
                return False
            self._drop_rows(db, key)
            self._count_delete(db)
            db.execute("INSERT INTO deleting VALUES (?, ?, ?)", (key, self.holder, time.time()))
        return True

    def end_delete(self, digest: Digest) -> None:
        """Clear this Index's deletion mark of ``digest`` (writers waiting on it go on)."""
        self._write("DELETE FROM deleting WHERE digest = ? AND holder = ?",
                    (str(digest), self.holder))

    def delete_if_unreferenced(self, digest: Digest, delete: Callable[[], bool]) -> bool:
        """Run the blocking ``delete()`` (an unlink) inside the write transaction that finds
        ``digest`` unreferenced and unmarked, and drop its rows in it: every writer of the
        file, in any process, is kept out for that instant. Return what ``delete()``
        returned, or False if the object was kept."""
        key = str(digest)
        with self._tx() as db:
            if db.execute(self._REFERENCED, (key,)).fetchall() or self._marked(db, [digest]):
                return False
            self._count_delete(db)
            deleted = delete()
            self._drop_rows(db, key)
        return deleted

    def forget_manifests(self, digests: Iterable[Digest]) -> tuple[set[Digest], int]:
        """Drop manifests that gc evicted: their rows, outgoing references, referrer links to
        and from them, and the tags that resolve to them.

        A candidate that a stored manifest outside the set points at (one recorded after gc
        took its snapshot) is kept, and so, in turn, is what only it pointed at. Return the
        manifests actually dropped and the number of tags deleted with them. Allows are left to
        :meth:`drop_allows`.
        """
        doomed = set(digests)
        with self._tx() as db:
            changed = True
            while changed:  # fixpoint: sparing one manifest may spare its children
                changed = False
                for digest in sorted(doomed, key=str):
                    holders = db.execute(
                        "SELECT r.parent FROM refs r JOIN manifests m ON m.digest = r.parent "
                        "WHERE r.child = ?1 UNION SELECT x.subject FROM referrers x "
                        "JOIN manifests m ON m.digest = x.subject WHERE x.referrer = ?1",
                        (str(digest),)).fetchall()
                    if any(_d(h) not in doomed for (h,) in holders):
                        doomed.discard(digest)
                        changed = True
            keys = [(str(d),) for d in doomed]
            before = db.total_changes
            db.executemany("DELETE FROM tags WHERE digest = ?", keys)
            tags_deleted = db.total_changes - before
            db.executemany("DELETE FROM manifests WHERE digest = ?", keys)
            db.executemany("DELETE FROM refs WHERE parent = ?", keys)
            db.executemany("DELETE FROM referrers WHERE subject = ?", keys)
            db.executemany("DELETE FROM referrers WHERE referrer = ?", keys)
        return doomed, tags_deleted

    def forget_objects(self, digests: Iterable[Digest]) -> None:
        """Drop the manifest and blob rows of objects that left the store (fsck quarantine, gc
        sweep). References recorded by a dropped manifest stay but count for nothing until
        the manifest is stored again (edges only count from stored manifests)."""
        keys = [(str(d),) for d in digests]
        with self._tx() as db:
            db.executemany("DELETE FROM manifests WHERE digest = ?", keys)
            db.executemany("DELETE FROM blobs WHERE digest = ?", keys)

    def drop_allows(self, digests: Iterable[Digest]) -> None:
        """Drop every allow of these digests (gc: nothing stored references them any more)."""
        with self._tx() as db:
            db.executemany("DELETE FROM allows WHERE digest = ?", [(str(d),) for d in digests])
