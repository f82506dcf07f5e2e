"""``sigil import``: check an archive completely, re-verify it offline, load what passes.

1. **Structure and digests first.** Every member is checked while it streams past: only OCI
   layout names, regular files; ``oci-layout`` and ``index.json`` exactly as sigil writes them
   (canonical JSON, so one changed byte shows); every blob hashed against its name and size;
   the contents document must list exactly the blobs present (plus, for a delta, blobs its
   base left in the store). Blobs go into a private working store under the store root (same
   filesystem, so loading is a hard link). Any problem refuses the whole archive; nothing of it
   reaches the store.
2. **Offline re-verification.** A real :class:`~sigil.mirror.Mirror` over the working store
   and its index, built exactly as ``sigil serve --offline`` builds it (``server.offline`` on,
   :class:`~sigil.upstream.offline.OfflineUpstreamClient` for every upstream: no connection,
   tags and referrers only from the index), with the *local* policy: the same discovery,
   digest checks and engine as serving. What the archive does not hold does not exist there.
   The archive's policy and trust files are only compared with the local ones (a diff in the
   report).
3. **Load per image.** For each image that passed: blobs, then manifest rows and referrer
   links depth first (each after what it reaches, signature tags included), then its own
   tags last, so a tag never names an incomplete image, even after a crash.
   Verdicts and allows are *not* copied: the serving mirror decides again from stored
   artifacts under its own policy.

The store and index are the configured backends, opened as ``sigil serve`` opens them. On a
remote object store (``storage.backend: s3``) step 1 streams each blob straight into an upload
of the bucket, committed only once its sha256 matched (nothing of it is staged on local disk:
the scratch is the upload's few in-memory parts); the archive's manifests are staged in the
private working directory and reach the bucket only in step 3, each right before its row
(:class:`_StagedManifests` says why). The offline mirror of step 2 reads through a private
SQLite index that lists only the archive's content. Committed blobs are invisible (no index
row: a remote store is asked through its index) until step 3 writes the rows into the
configured index (PostgreSQL); the blobs this import committed and did not load (a refused
archive, a denied image) are deleted again when the archive is done, through the index's
check-and-delete, so a refused archive leaves the bucket as it found it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil import __version__
from sigil.airgap import ArchiveError
from sigil.airgap.layout import (
    ARCHIVE_ANNOTATION,
    ARCHIVE_ARTIFACT,
    CONTENTS_TYPE,
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT_BYTES,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    MAX_METADATA_BYTES,
    POLICY_TYPE,
    REPORT_TYPE,
    Member,
    blob_name,
    canonical_json,
    open_archive,
    read_small,
)
from sigil.airgap.report import RecordingPolicy, text_diff, trust_diff, trust_files, verdict_json
from sigil.config import Config, UpstreamConfig
from sigil.errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    RegistryError,
    SigilError,
    StorageError,
    Unavailable,
)
from sigil.mirror import AllowAll, Mirror, PolicyHook
from sigil.oci.digest import Digest
from sigil.oci.manifest import MAX_MANIFEST_BYTES, OCI_MANIFEST, Manifest, parse_manifest
from sigil.oci.reference import validate_name, validate_tag
from sigil.progress import ProgressReporter, Transfer, progress_for
from sigil.routing import Route
from sigil.storage import BlobStore, Index
from sigil.storage.backends import open_backends
from sigil.storage.blobs import ObjectInfo
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    ObjectReader,
    ObjectStore,
    PendingUpload,
    SqliteAsyncIndex,
    UploadSession,
)
from sigil.storage.index import ImageRecord, ManifestRecord, TagRecord
from sigil.upstream.offline import offline_clients, offline_config

# Cosign and referrers tag-schema tags name the subject they belong to (as in mirror.py).
_SUBJECT_TAG = re.compile(r"^sha256-([a-f0-9]{64})(?:\.(?:sig|att|sbom))?$")
# Working stores of imports in progress: <root>/.airgap-import-<pid>-<uuid>.
WORK_PREFIX = ".airgap-import-"
# Room kept free beyond the archive's own bytes (index growth, logs).
FREE_SPACE_MARGIN = 64 * 1024 * 1024


@dataclass
class Metadata:
    """sigil's own part of an archive, read and digest-checked."""

    archive_digest: str = ""
    index_doc: dict[str, Any] = field(default_factory=dict)
    archive_manifest: Manifest | None = None
    contents: dict[str, Any] = field(default_factory=dict)
    small: dict[str, bytes] = field(default_factory=dict)   # metadata blobs by digest


class _StagedManifests:
    """The working store of an import into a remote store: blobs go into the bucket itself
    (each committed only once its sha256 matched; invisible until indexed), the archive's
    *manifests* into a private local store until step 3 publishes each right before its
    row. A replica's pull-through of a manifest checks the bucket and then writes the row
    (``Mirror._store_manifest``), and no check-and-delete can come between the two: had a
    refused import committed the manifest, its rollback could delete the object the replica
    had just found and leave that replica's row without it. A replica commits a blob only
    once a recorded manifest references it, so the rollback's check-and-delete keeps those.

    Reads look in the private store first, then the bucket (a delta's base, content the
    bucket held already)."""

    def __init__(self, target: ObjectStore, local: FilesystemObjectStore) -> None:
        self.target = target
        self.local = local
        self.manifests: set[str] = set()   # set once the contents document is read

    def staged(self, digest: Digest) -> bool:
        """True if ``digest`` is written to the private store rather than the bucket."""
        return str(digest) in self.manifests

    async def _holder(self, digest: Digest) -> ObjectStore:
        return self.local if await self.local.has(digest) else self.target

    async def has(self, digest: Digest) -> bool:
        """True if stored privately or in the bucket."""
        return await self.local.has(digest) or await self.target.has(digest)

    async def size(self, digest: Digest) -> int | None:
        """The size from whichever store holds the object."""
        return await (await self._holder(digest)).size(digest)

    @asynccontextmanager
    async def open_range(self, digest: Digest, offset: int = 0,
                         length: int | None = None) -> AsyncIterator[ObjectReader]:
        """A stream from whichever store holds the object."""
        async with (await self._holder(digest)).open_range(digest, offset, length) as reader:
            yield reader

    async def read_bytes(self, digest: Digest) -> bytes:
        """The bytes from whichever store holds the object."""
        return await (await self._holder(digest)).read_bytes(digest)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """A manifest into the private store, anything else into the bucket."""
        await (self.local if self.staged(digest) else self.target).put_bytes(digest, data)

    async def begin_upload(self, expected: Digest) -> UploadSession:
        """A manifest into the private store, anything else into the bucket."""
        return await (self.local if self.staged(expected) else self.target).begin_upload(
            expected)

    async def publish(self, digest: Digest, raw: bytes) -> None:
        """Put a verified manifest into the bucket (step 3, right before its row)."""
        if not await self.target.has(digest):
            await self.target.put_bytes(digest, raw)

    def local_path(self, digest: Digest) -> Path | None:
        """The private file of a staged manifest (nothing else is local)."""
        return self.local.local_path(digest)

    # The rest of the ObjectStore contract: the bucket's (the import does not use it).
    async def delete(self, digest: Digest) -> bool:
        """Delete from the bucket."""
        return await self.target.delete(digest)

    def iter_objects(self) -> AsyncIterator[ObjectInfo]:
        """The bucket's objects."""
        return self.target.iter_objects()

    async def hash_object(self, digest: Digest) -> Digest | None:
        """Re-hash from whichever store holds the object."""
        return await (await self._holder(digest)).hash_object(digest)

    async def quarantine(self, digest: Digest) -> bool:
        """Quarantine in the bucket."""
        return await self.target.quarantine(digest)

    async def pending_uploads(self) -> list[PendingUpload]:
        """The bucket's pending uploads."""
        return await self.target.pending_uploads()

    async def cleanup_abandoned(self, older_than: float,
                                keep: Callable[[Digest], Awaitable[bool]] | None = None) -> int:
        """Nothing: the bucket's abandoned uploads are the fleet's cleanup's business."""
        return 0

    async def presign_url(self, digest: Digest, expires: float) -> str | None:
        """No direct URLs for a working store."""
        return None

    async def close(self) -> None:
        """Nothing: the bucket is closed with the backends, the private store with the
        working directory."""


class _Checker:
    """Checks an archive member by member (see the module docstring, step 1)."""

    def __init__(self, path: Path, work: ObjectStore | None = None,
                 target: ObjectStore | None = None, progress: Transfer | None = None) -> None:
        self.label = str(path)
        # ``work``: where blobs go while checked (the private store, or a remote target
        # itself); ``target``: the configured store, whose objects are not written again.
        self.work = work
        self.target = target
        self.progress = progress
        # Objects this import committed to a shared ``target`` (blobs: manifests are staged
        # privately) that were not there before: deleted again unless an image loads them.
        self.created: set[Digest] = set()
        self.meta = Metadata()
        self.seen: set[str] = set()
        self.layout_seen = False
        self._metadata_digests: set[str] = set()
        self.received: set[str] = set()

    def refuse(self, problem: str) -> ArchiveError:
        return ArchiveError(f"{self.label}: {problem}; nothing was loaded")

    def wanted(self) -> list[str]:
        """Members needed before any image blob: the archive manifest, then its layers."""
        names = []
        if self.meta.archive_digest:
            names.append(blob_name(self.meta.archive_digest.removeprefix("sha256:")))
        names += [blob_name(d.removeprefix("sha256:")) for d in sorted(self._metadata_digests)]
        return names

    @property
    def contents_ready(self) -> bool:
        return bool(self.meta.contents)

    async def feed(self, member: Member) -> None:
        if member.name in self.seen:
            raise self.refuse(f"member {member.name} appears twice")
        self.seen.add(member.name)
        if member.name == LAYOUT_FILE:
            self._layout(read_small(member, 4096, self.label))
        elif member.name == INDEX_FILE:
            if not self.layout_seen:
                raise self.refuse("index.json comes before oci-layout (not a sigil archive)")
            self._index(read_small(member, MAX_METADATA_BYTES, self.label))
        else:
            hex_digest = member.blob_hex
            assert hex_digest is not None  # check_member_name admits nothing else
            digest = f"sha256:{hex_digest}"
            if not self.meta.archive_digest:
                raise self.refuse(f"blob {digest} comes before index.json (not a sigil "
                                  "archive, or damaged)")
            if digest == self.meta.archive_digest:
                self._archive_manifest(self._small_blob(member, digest))
            elif digest in self._metadata_digests:
                data = self._small_blob(member, digest)
                self.meta.small[digest] = data
                if self.meta.archive_manifest is not None and digest == str(
                        self.meta.archive_manifest.layers[0].digest):
                    self._contents(data)
                await self._adopt_small()
            else:
                await self._blob(member, digest)

    def _layout(self, data: bytes) -> None:
        try:
            version = json.loads(data).get("imageLayoutVersion")
        except (ValueError, AttributeError) as exc:
            raise self.refuse("oci-layout is not JSON") from exc
        if version != LAYOUT_VERSION:
            raise self.refuse(f"unsupported oci-layout version {str(version)[:40]!r} "
                              f"(expected {LAYOUT_VERSION})")
        if data != LAYOUT_BYTES:
            raise self.refuse("oci-layout was modified (not the bytes sigil writes)")
        self.layout_seen = True

    def _index(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise self.refuse(f"index.json is not JSON ({exc})") from exc
        if not isinstance(doc, dict) or canonical_json(doc) != data:
            raise self.refuse("index.json was modified (not the canonical JSON sigil writes)")
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise self.refuse("index.json has no manifests list")
        ours = [e for e in entries if isinstance(e, dict)
                and (e.get("annotations") or {}).get(ARCHIVE_ANNOTATION) == "v1"]
        if len(ours) != 1 or not Digest.is_digest(str(ours[0].get("digest"))):
            raise self.refuse("index.json does not name exactly one sigil archive manifest "
                              "(not a sigil archive)")
        self.meta.index_doc = doc
        self.meta.archive_digest = str(ours[0]["digest"])

    def _small_blob(self, member: Member, digest: str) -> bytes:
        data = read_small(member, MAX_METADATA_BYTES, self.label)
        if str(Digest.of(data)) != digest:
            raise self.refuse(f"blob {digest} does not match its digest (changed bytes)")
        return data

    def _archive_manifest(self, data: bytes) -> None:
        try:
            manifest = parse_manifest(data, OCI_MANIFEST)
        except ManifestInvalid as exc:
            raise self.refuse(f"archive manifest is malformed ({exc})") from exc
        if manifest.artifact_type != ARCHIVE_ARTIFACT or not manifest.layers \
                or manifest.layers[0].media_type != CONTENTS_TYPE or manifest.config is None:
            raise self.refuse("archive manifest is not a sigil archive manifest")
        self.meta.archive_manifest = manifest
        self._metadata_digests = {str(d) for d in manifest.blob_digests()}

    def _contents(self, data: bytes) -> None:
        try:
            contents = json.loads(data)
            if contents.get("sigilAirgap") != 1:
                raise ValueError("unknown sigilAirgap version")
            for key in ("images", "manifests", "sizes", "held", "index"):
                if key not in contents:
                    raise ValueError(f"missing {key!r}")
            for d in list(contents["sizes"]) + list(contents["held"]):
                Digest.parse(d)
        except (ValueError, AttributeError, TypeError, SigilError) as exc:
            raise self.refuse(f"contents document is malformed ({exc})") from exc
        self.meta.contents = contents
        if isinstance(self.work, _StagedManifests):
            self.work.manifests = set(contents["manifests"])
        self._check_space()

    async def _adopt_small(self) -> None:
        """Metadata blobs that images use too (the empty config ``{}``) are image blobs."""
        if not self.contents_ready or self.work is None:
            return
        held = set(self.meta.contents["held"])
        for digest, data in self.meta.small.items():
            if digest in held and digest not in self.received:
                parsed = Digest.parse(digest)
                if not await self._in_target(parsed):
                    await self.work.put_bytes(parsed, data)
                    self._note_created(parsed)
                self.received.add(digest)

    async def _in_target(self, digest: Digest) -> bool:
        return self.target is not None and await self.target.has(digest)

    def _note_created(self, digest: Digest) -> None:
        if isinstance(self.work, _StagedManifests) and not self.work.staged(digest):
            self.created.add(digest)   # committed to the shared bucket

    def _check_space(self) -> None:
        if self.work is None:
            return
        sizes = self.meta.contents["sizes"]
        held: list[str] = self.meta.contents["held"]
        work, target = self.work, self.target
        if isinstance(work, _StagedManifests):
            # A remote store: blobs stream into the bucket, nothing of them on local disk;
            # only the manifests are staged there (and the private index).
            held = [d for d in held if work.staged(Digest.parse(d))]
            work, target = work.local, None
        if isinstance(work, FilesystemObjectStore):
            needed = sum(int(sizes.get(d, 0)) for d in held
                         if not isinstance(target, FilesystemObjectStore)
                         or not target.blobs.has(Digest.parse(d)))
            free = shutil.disk_usage(work.blobs.root).free
            if needed + FREE_SPACE_MARGIN > free:
                raise self.refuse(f"needs {needed} bytes (+{FREE_SPACE_MARGIN} spare) on "
                                  f"{work.blobs.root.parent}, only {free} free")
        if self.progress is not None:
            self.progress.expect(items=len(self.meta.contents["held"]),
                                 nbytes=sum(int(sizes.get(d, 0))
                                            for d in self.meta.contents["held"]))

    async def _blob(self, member: Member, digest: str) -> None:
        if not self.contents_ready:
            raise self.refuse(f"blob {digest} comes before sigil's contents document")
        contents = self.meta.contents
        if digest not in set(contents["held"]):
            raise self.refuse(f"blob {digest} is not listed in the archive's contents")
        expected_size = int(contents["sizes"][digest])
        if member.size != expected_size:
            raise self.refuse(f"blob {digest} is {member.size} bytes, the contents say "
                              f"{expected_size}")
        if digest in contents["manifests"] and expected_size > MAX_MANIFEST_BYTES:
            # Refused before a byte of it is written: a manifest is read whole later.
            raise self.refuse(f"manifest {digest} is {expected_size} bytes (at most "
                              f"{MAX_MANIFEST_BYTES})")
        parsed = Digest.parse(digest)
        if self.work is None:
            return
        if await self._in_target(parsed):
            actual = _hash_stream(member, self.progress)  # verify, but do not write again
            if actual != parsed:
                raise self.refuse(f"blob {digest} does not match its digest (changed bytes)")
        else:
            # Committed (renamed into the private store, or published in the bucket) only
            # if the bytes hash to the digest; otherwise discarded.
            upload = await self.work.begin_upload(parsed)
            try:
                written = 0
                for chunk in _chunks(member, self.progress):
                    await upload.write(chunk)
                    written += len(chunk)
                if written != member.size:
                    raise self.refuse(f"blob {digest} is truncated")
                await upload.commit()
            except DigestInvalid as exc:
                raise self.refuse(f"blob {digest} does not match its digest "
                                  "(changed bytes)") from exc
            finally:
                await upload.abort()  # a no-op once committed
            self._note_created(parsed)
        if self.progress is not None:
            self.progress.advance(items=1)
        self.received.add(digest)

    def finish(self) -> None:
        """Whole-archive checks once every member has been seen."""
        meta = self.meta
        if not self.layout_seen:
            raise self.refuse("no oci-layout file (not an OCI image layout, or truncated)")
        if not meta.archive_digest:
            raise self.refuse("no index.json (not an OCI image layout, or truncated)")
        if meta.archive_manifest is None:
            raise self.refuse(f"index.json names blob {meta.archive_digest}, which is "
                              "missing (truncated?)")
        missing_meta = sorted(self._metadata_digests - set(meta.small))
        if missing_meta:
            raise self.refuse(f"index names missing blob {missing_meta[0]} (truncated?)")
        contents = meta.contents
        missing = sorted(set(contents["held"]) - self.received)
        if self.work is not None and missing:
            raise self.refuse(f"index names missing blob {missing[0]} ({len(missing)} "
                              "missing; truncated?)")
        expected_index = contents["index"] + [e for e in meta.index_doc["manifests"]
                                              if (e.get("annotations") or {})
                                              .get(ARCHIVE_ANNOTATION) == "v1"]
        if meta.index_doc["manifests"] != expected_index:
            raise self.refuse("index.json does not match the archive's contents document "
                              "(changed entries)")
        for entry in contents["index"]:
            if entry.get("digest") not in contents["manifests"]:
                raise self.refuse(f"index.json names {entry.get('digest')}, which the "
                                  "archive does not hold")
        layers = {str(d.digest): d.media_type for d in meta.archive_manifest.layers}
        if contents.get("report") not in layers or layers[contents["report"]] != REPORT_TYPE:
            raise self.refuse("the report is not part of the archive manifest")
        policy = contents.get("policy")
        if policy and layers.get(policy.get("digest")) != POLICY_TYPE:
            raise self.refuse("the policy file is not part of the archive manifest")
        for trust in contents.get("trust") or []:
            if trust.get("digest") not in layers:
                raise self.refuse(f"trust file {trust.get('path')} is not part of the "
                                  "archive manifest")


def _check_names(path: Path, image: dict[str, Any]) -> None:
    """Names in the contents document are data from the other side: validate them like a
    client request before they reach the index."""
    try:
        validate_name(str(image.get("repo")))
        reference = str(image.get("reference"))
        if Digest.is_digest(reference):
            Digest.parse(reference)
        else:
            validate_tag(reference)
        for repo, tag, digest, _ in image.get("tags", []):
            validate_name(str(repo))
            validate_tag(str(tag))
            Digest.parse(str(digest))
    except (RegistryError, ValueError, TypeError) as exc:
        raise ArchiveError(f"{path}: image {str(image.get('name'))[:200]!r} has an invalid "
                           f"name ({exc}); nothing was loaded") from exc


def _chunks(member: Member, progress: Transfer | None) -> Iterator[bytes]:
    """The member's data in COPY_CHUNK pieces, each counted in ``progress``; fewer bytes than
    ``member.size`` if the archive ends early (the caller's size or digest check says so)."""
    left = member.size
    while left > 0:
        chunk = member.read(min(COPY_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        if progress is not None:
            progress.advance(nbytes=len(chunk))
        yield chunk


def _hash_stream(member: Member, progress: Transfer | None) -> Digest:
    h = hashlib.sha256()
    for chunk in _chunks(member, progress):
        h.update(chunk)
    return Digest(h.hexdigest())


async def read_metadata(path: Path) -> Metadata:
    """sigil's metadata of an archive (for ``--since``), without reading its image blobs."""
    checker = _Checker(path)
    with open_archive(path) as reader:
        for member in reader.members(checker.wanted):
            if member.blob_hex and checker.contents_ready \
                    and f"sha256:{member.blob_hex}" not in checker.wanted():
                break
            await checker.feed(member)
    if not checker.contents_ready:
        raise checker.refuse("no sigil contents document found")
    return checker.meta


# ------------------------------------------------------------------------------ import
class Importer:
    """One ``sigil import`` run over one or more archives (in order: a base before its
    deltas), into the configured store and index."""

    def __init__(self, config: Config, *, progress: ProgressReporter | None = None) -> None:
        self.config = config
        self.root = Path(config.storage.root)
        # Bars on a terminal, plain lines otherwise: one transfer per archive.
        self.reporter = progress or progress_for(sys.stderr, "sigil")

    def _policy(self) -> PolicyHook:
        if not self.config.policy:
            return AllowAll()
        from sigil.verify.engine import Verifier
        from sigil.verify.policy import load_policy

        return Verifier(load_policy(self.config.policy))

    @property
    def store_name(self) -> str:
        """The target store as the report and messages name it."""
        storage, index = self.config.storage, self.config.index
        if storage.backend != "s3" and index.backend != "postgres":
            return str(self.root)
        objects = str(self.root)
        if storage.s3 is not None:
            objects = f"s3://{storage.s3.bucket}/{storage.s3.prefix}"
        if index.backend == "postgres":
            from sigil.storage.pgindex import describe_dsn

            return f"{objects} (index: postgres {describe_dsn(index.postgres_dsn or '')})"
        return objects

    async def run(self, archives: list[Path]) -> dict[str, Any]:
        """Import every archive; the report says what was loaded and refused. The backends
        are opened first: unreachable ones raise StorageError (naming the config key)."""
        policy = RecordingPolicy(self._policy())
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_stale_work_dirs(self.root)
        backends = await open_backends(self.config)
        results = []
        try:
            for path in archives:
                results.append(await self._archive(path, backends.objects, backends.index,
                                                   policy))
        finally:
            await backends.close()
        ok = all(r["result"] == "loaded" for r in results)
        return {"kind": "sigil-import", "sigil": __version__,
                "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "store": self.store_name,
                "policy": {"file": self.config.policy, "fingerprint": policy.fingerprint},
                "ok": ok, "archives": results}

    async def _archive(self, path: Path, target: ObjectStore, index: AsyncIndex,
                       policy: RecordingPolicy) -> dict[str, Any]:
        result: dict[str, Any] = {"archive": str(path), "result": "refused", "images": []}
        # Under the store root: the same filesystem, so loading a blob is a hard link; the
        # name starts with a dot so no store walk (gc, fsck: blobs/ only) ever looks at it.
        # Over a remote store it holds the private index of step 2 and the archive's
        # manifests until step 3 publishes them (_StagedManifests).
        work_dir = self.root / f"{WORK_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        private = FilesystemObjectStore(BlobStore(work_dir))
        work: ObjectStore = private if isinstance(
            target, FilesystemObjectStore) else _StagedManifests(target, private)
        work_dir.mkdir(parents=True, exist_ok=True)
        windex = Index(work_dir / "index.sqlite")
        loaded: set[Digest] = set()
        checker: _Checker | None = None
        try:
            with self.reporter.transfer(f"import {path.name}") as progress:
                checker = _Checker(path, work, target, progress)
                await self._check_verify_load(path, result, checker, windex, target, index,
                                              policy, loaded, work_dir)
        except ArchiveError as exc:
            result["error"] = str(exc)
        except (Unavailable, StorageError, BlobUnknown) as exc:
            # The store or the index failed under us (or an object it held went away: a gc,
            # another import's rollback): images loaded before stay (each is complete); the
            # rest of the archive is not loaded.
            if isinstance(exc, BlobUnknown):
                detail = exc.detail if isinstance(exc.detail, dict) else {}
                exc = _vanished(str(detail.get("digest", "an object")))
            result["error"] = f"{path}: {exc}; the archive was not (fully) loaded"
            if result["images"] and any(i["result"] == "loaded" for i in result["images"]):
                result["result"] = "partial"
        finally:
            windex.close()
            shutil.rmtree(work_dir, ignore_errors=True)
            if checker is not None:
                await _discard(target, index, checker.created - loaded)
        return result

    async def _check_verify_load(self, path: Path, result: dict[str, Any], checker: _Checker,
                                 windex: Index, target: ObjectStore, index: AsyncIndex,
                                 policy: RecordingPolicy, loaded: set[Digest],
                                 work_dir: Path) -> None:
        """Steps 1-3 of the module docstring for one archive, filling ``result`` (and
        ``loaded``: the objects loaded images hold)."""
        with open_archive(path) as reader:
            for member in reader.members(checker.wanted):
                await checker.feed(member)
        checker.finish()
        assert checker.work is not None
        work = checker.work
        meta = checker.meta
        result["digest"] = meta.archive_digest
        result["base"] = meta.contents.get("base")
        await self._link_base(path, meta, target, work)
        await self._fill_index(path, meta, work, windex)
        result.update(self._compare_policy(meta))
        images = await self._verify(meta, work, windex, policy, work_dir)
        result["images"] = images
        for image, entry in zip(meta.contents["images"], images, strict=True):
            if entry["result"] == "verified":
                ignored = await self._load(image, meta, windex, work, target, index, loaded)
                entry["result"] = "loaded"
                if ignored:
                    entry["ignored"] = ignored
        refused = [i for i in images if i["result"] != "loaded"]
        result["result"] = "loaded" if not refused else "partial"

    async def _link_base(self, path: Path, meta: Metadata, target: ObjectStore,
                         work: ObjectStore) -> None:
        contents = meta.contents
        held = set(contents["held"])
        outside = sorted(set(contents["sizes"]) - held)
        if outside and not contents.get("base"):
            raise ArchiveError(f"{path}: lists {len(outside)} blob(s) it does not hold and "
                               "names no base; nothing was loaded")
        missing = [d for d in outside if not await target.has(Digest.parse(d))]
        if missing:
            raise ArchiveError(f"{path}: delta of base archive {contents['base']}, which is not "
                               f"imported in {self.store_name} ({len(missing)} blob(s) "
                               f"missing, e.g. {missing[0]}); import the base first; nothing "
                               "was loaded")
        if work is target or not isinstance(work, FilesystemObjectStore) \
                or not isinstance(target, FilesystemObjectStore):
            return  # a remote store: the working store is the target, nothing to link
        for d in outside + sorted(held):
            digest = Digest.parse(d)
            if not work.blobs.has(digest) and target.blobs.has(digest):
                _link(target.blobs.path(digest), work.blobs.path(digest))

    async def _fill_index(self, path: Path, meta: Metadata, work: ObjectStore,
                          windex: Index) -> None:
        contents = meta.contents
        manifests: dict[str, str] = contents["manifests"]
        now = time.time()
        for d in sorted(contents["sizes"]):
            digest = Digest.parse(d)
            if d in manifests:
                try:
                    parsed = parse_manifest(await work.read_bytes(digest), manifests[d])
                except ManifestInvalid as exc:
                    raise ArchiveError(f"{path}: manifest {d} is malformed ({exc}); nothing "
                                       "was loaded") from exc
                refs = [c.digest for c in parsed.manifests] + parsed.blob_digests()
                windex.put_manifest(digest, parsed.media_type, len(parsed.raw), refs, now=now)
                if parsed.subject is not None:
                    windex.add_referrer(parsed.subject.digest, digest)
            else:
                windex.put_blob(digest, int(contents["sizes"][d]))
        for image in contents["images"]:
            _check_names(path, image)
            if image.get("digest") not in manifests:
                raise ArchiveError(f"{path}: image {image.get('name')} names a manifest the "
                                   "archive does not hold; nothing was loaded")
            for repo, tag, d, media_type in image.get("tags", []):
                if d not in manifests:
                    raise ArchiveError(f"{path}: tag {repo}:{tag} names {d}, which the "
                                       "archive does not hold; nothing was loaded")
                windex.put_tag(image["upstream"], repo, tag, Digest.parse(d), media_type, now)
            for d in image.get("manifests", []) + image.get("blobs", []):
                if d not in contents["sizes"]:
                    raise ArchiveError(f"{path}: image {image.get('name')} needs {d}, which "
                                       "the archive does not list; nothing was loaded")

    def _compare_policy(self, meta: Metadata) -> dict[str, Any]:
        contents = meta.contents
        archived = contents.get("policy") or {}
        archived_bytes = meta.small.get(str(archived.get("digest")), b"")
        local_bytes = Path(self.config.policy).read_bytes() if self.config.policy else b""
        diff = text_diff(archived_bytes, local_bytes,
                         f"archive:{archived.get('file')}", f"local:{self.config.policy}")
        local_trust = trust_files(self.config.policy) if self.config.policy else []
        return {"policy_differs": bool(diff), "policy_diff": diff,
                "trust_diff": trust_diff(contents.get("trust") or [], local_trust)}

    def _upstream(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.config.upstreams if u.name == name), None)

    async def _verify(self, meta: Metadata, work: ObjectStore, windex: Index,
                      policy: RecordingPolicy, work_dir: Path) -> list[dict[str, Any]]:
        # The serve --offline mirror over the working store: only archive content exists
        # (over a remote store, the bucket is read only for what the private index lists).
        offline = offline_config(self.config)
        offline = dataclasses.replace(
            offline, storage=dataclasses.replace(offline.storage, root=str(work_dir)))
        clients = offline_clients(offline)
        mirror = Mirror(offline, work, SqliteAsyncIndex(windex), clients, policy)
        out = []
        for image in meta.contents["images"]:
            entry: dict[str, Any] = {"name": image["name"], "digest": image["digest"],
                                     "exported_verified": image.get("verified")}
            upstream = self._upstream(image["upstream"])
            if upstream is None:
                entry.update(result="refused", reason="upstream_unknown",
                             message=f"upstream {image['upstream']!r} is not configured in "
                                     f"{self.config.source}")
                out.append(entry)
                continue
            route = Route(upstream, image["repo"], f"{upstream.name}/{image['repo']}")
            try:
                served = await mirror.manifest(route, image["reference"])
            except Denied as exc:
                verdict = policy.verdicts.get(image["digest"])
                detail = verdict_json(verdict) if verdict is not None else {}
                entry.update(result="refused", reason=detail.get("reason", "denied"),
                             message=detail.get("message") or str(exc),
                             checks=detail.get("checks", []))
                out.append(entry)
                continue
            except SigilError as exc:
                entry.update(result="refused", reason="error", message=str(exc))
                out.append(entry)
                continue
            if str(served.digest) != image["digest"]:
                entry.update(result="refused", reason="digest_mismatch",
                             message=f"{image['reference']} resolved to {served.digest}")
                out.append(entry)
                continue
            verdict = policy.verdicts.get(image["digest"])
            detail = verdict_json(verdict) if verdict is not None else {}
            entry.update(result="verified", reason=detail.get("reason", "ok"),
                         message=detail.get("message", ""), checks=detail.get("checks", []))
            out.append(entry)
        for client in clients.values():
            await client.close()
        return out

    async def _load(self, image: dict[str, Any], meta: Metadata, windex: Index,
                    work: ObjectStore, target: ObjectStore, index: AsyncIndex,
                    loaded: set[Digest]) -> int:
        """Load one verified image: its objects, then all its rows at once (see step 3).

        Only what hangs off the verified digest is loaded: its children, config and layers,
        and the artifacts that name it (referrers by ``subject``, ``sha256-<hex>`` tags) with
        theirs. The contents document is data from the other side; anything else it lists
        under the image is ignored (the count is returned) rather than loaded unverified.
        What is loaded is added to ``loaded`` once its rows are in (an image whose rows
        failed leaves its objects to the rollback).

        A replica serving meanwhile never sees part of an image: every row of it (blobs,
        manifests with their references and referrer links, the artifacts its
        ``sha256-<hex>`` tags name and those tags, its own tags) is written in one index
        transaction (:meth:`AsyncIndex.record_image`), so a manifest visible by digest
        already has the signatures its verification looks for (a pull in between would
        otherwise be denied, and the deny cached), and a tag never names a manifest whose
        rows are missing. A failure midway leaves none of them. Every object is looked for
        again where no check-and-delete (gc, another import's rollback) can come between
        that look and the rows (the ``check`` of record_image): an object removed before is
        never indexed (StorageError, the rest of the archive is refused)."""
        contents = meta.contents
        manifests: dict[str, str] = contents["manifests"]
        listed_manifests = set(image["manifests"])
        subject_tags: dict[str, list[tuple[str, str, str, str]]] = {}
        own_tags = []
        for repo, tag, d, media_type in image["tags"]:
            match = _SUBJECT_TAG.match(tag)
            if match:
                subject_tags.setdefault(f"sha256:{match.group(1)}", []).append(
                    (repo, tag, d, media_type))
            elif d == image["digest"]:
                own_tags.append((repo, tag, d, media_type))
        reached: set[str] = set()
        successors: dict[str, list[str]] = {}
        # Subject tags to write once the artifact they name is in: artifact -> tag rows.
        tags_of: dict[str, list[tuple[str, str, str, str]]] = {}
        frontier = [image["digest"]]
        while frontier:
            d = frontier.pop()
            if d in reached or d not in listed_manifests:
                continue
            reached.add(d)
            digest = Digest.parse(d)
            nxt = [str(c) for c in windex.get_references(digest) if str(c) in manifests]
            nxt += [str(r) for r in windex.get_referrers(digest)]
            for row in subject_tags.get(d, []):
                tags_of.setdefault(row[2], []).append(row)
                nxt.append(row[2])
            successors[d] = nxt
            frontier.extend(nxt)
        blobs: set[str] = set()
        for d in reached:
            blobs.update(str(c) for c in windex.get_references(Digest.parse(d))
                         if str(c) not in manifests)
        blobs &= set(image["blobs"])
        ignored = len(listed_manifests - reached) + len(set(image["blobs"]) - blobs
                                                       - listed_manifests)
        for d in sorted(blobs) + sorted(reached):
            digest = Digest.parse(d)
            if isinstance(work, FilesystemObjectStore) and isinstance(
                    target, FilesystemObjectStore) and work is not target:
                if not target.blobs.has(digest):
                    _link(work.blobs.path(digest), target.blobs.path(digest))
            elif not await work.has(digest):  # a remote store: committed (staged) in step 1
                raise _vanished(digest)
        records: list[ManifestRecord] = []
        tags: list[TagRecord] = []
        for d in _depth_first(image["digest"], successors):
            digest = Digest.parse(d)
            raw = await work.read_bytes(digest)
            if Digest.of(raw) != digest:   # the row must describe the bytes step 2 verified
                raise StorageError(f"{digest} changed in the store during the import (it "
                                   "does not match its digest: run sigil fsck); re-run the "
                                   "import")
            parsed = parse_manifest(raw, manifests[d])
            if isinstance(work, _StagedManifests):
                await work.publish(digest, parsed.raw)
            refs = tuple([c.digest for c in parsed.manifests] + parsed.blob_digests())
            records.append(ManifestRecord(digest, parsed.media_type, len(parsed.raw), refs,
                                          parsed.subject.digest if parsed.subject else None))
            tags += [TagRecord(image["upstream"], repo, tag, digest, media_type)
                     for repo, tag, _, media_type in tags_of.get(d, [])]
        tags += [TagRecord(image["upstream"], repo, tag, Digest.parse(d), media_type)
                 for repo, tag, d, media_type in own_tags if d in reached]
        stored = [*(Digest.parse(d) for d in sorted(blobs)), *(m.digest for m in records)]

        async def all_stored() -> None:
            # Where the index guarantees no delete comes between this and the rows.
            for digest in stored:
                if not await target.has(digest):
                    raise _vanished(digest)

        await index.record_image(ImageRecord(
            tuple((Digest.parse(d), int(contents["sizes"][d])) for d in sorted(blobs)),
            tuple(records), tuple(tags), time.time()), check=all_stored)
        # Only now are they the image's: if its rows failed, the rollback takes its objects.
        loaded.update(Digest.parse(d) for d in blobs | reached)
        return ignored


def _depth_first(root: str, successors: dict[str, list[str]]) -> list[str]:
    """The manifests reached from ``root``, each after everything reached from it (a cycle,
    possible only through tags, is cut where it closes)."""
    if root not in successors:
        return []
    order: list[str] = []
    done: set[str] = {root}
    stack: list[tuple[str, Iterator[str]]] = [(root, iter(successors.get(root, [])))]
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            order.append(node)
        elif child not in done and child in successors:
            done.add(child)
            stack.append((child, iter(successors[child])))
    return order


def _vanished(digest: Digest | str) -> StorageError:
    return StorageError(f"{digest} vanished from the store during the import (removed by a "
                        "gc or by another import's rollback); re-run the import")


async def _discard(objects: ObjectStore, index: AsyncIndex, created: set[Digest]) -> None:
    """Delete objects an import committed to a shared store and did not load, unless the
    index knows them meanwhile (another replica stored or pulled the same content): the
    index's check-and-delete keeps anything a manifest recorded by any process references."""
    for digest in sorted(created, key=str):
        try:
            if await index.get_manifest(digest) is None and \
                    await index.blob_size(digest) is None:
                await index.delete_unreferenced(digest, functools.partial(objects.delete, digest))
        except (Unavailable, StorageError):
            # Left over: unindexed, so never served; fsck lists it, gc may reclaim it.
            continue


def _remove_stale_work_dirs(root: Path) -> None:
    """Remove working stores of imports that were killed (their process is gone); those of
    an import running now next to this one are left alone."""
    for entry in root.glob(f"{WORK_PREFIX}*"):
        pid_text = entry.name[len(WORK_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def _link(source: Path, target: Path) -> None:
    """Put an immutable, verified object at ``target`` (hard link; copy across devices)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        return
    except OSError:
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        shutil.copyfile(source, partial)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, target)
    fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def render(report: dict[str, Any]) -> str:
    """Human-readable import report."""
    lines = []
    if not report["policy"]["file"]:
        lines.append("WARNING: no policy configured: images were loaded without verification "
                     "(set `policy` in the config)")
    for archive in report["archives"]:
        lines.append(f"archive {archive['archive']}: {archive['result'].upper()}"
                     + (f" ({archive['digest']})" if archive.get("digest") else ""))
        if archive.get("error"):
            lines.append(f"    {archive['error']}")
        if archive.get("policy_differs"):
            lines.append("    the archive's policy differs from the local one (the local "
                         "policy decided):")
            lines.extend(f"      {line}" for line in archive["policy_diff"])
        lines.extend(f"    trust: {line}" for line in archive.get("trust_diff", []))
        for image in archive.get("images", []):
            lines.append(f"    {image['result']:8} {image['name']}  {image['digest']}"
                         + ("" if image["result"] == "loaded"
                            else f"  ({image.get('reason')}: {image.get('message')})"))
    return "\n".join(lines)
