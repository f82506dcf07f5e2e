"""``sigil export``: carry verified images, their signatures and the trust that proves them.

Everything goes through a real :class:`~sigil.mirror.Mirror` over a *working store* (a
directory ``OUT.sigil-work`` next to the output, or the config's own store with
``--to-store``): the same upstream client, digest checks, discovery and policy engine as
``sigil serve``. A denied image is left out (or, with ``--allow-unverified``, carried and
marked unverified). For each image the archive gets the manifests and blobs byte for byte and
every signature/attestation artifact found for it (``.sig``/``.att``/``.sbom`` tags, the
``sha256-<hex>`` tag-schema index, referrers, BuildKit attestation manifests, whatever the
verdict used); plus the policy file, the keys and trusted roots it names, and a report.

Interrupted (upstream down, Ctrl-C) and re-run, it resumes: finished blobs are in the working
store and are not fetched again. The output appears only when complete (``*.partial`` renamed).

A fleet config (``storage.backend: s3`` and/or ``index.backend: postgres``) makes the working
store the configured backends themselves, opened as ``sigil serve`` opens them: blobs the fleet
already holds are not fetched again, what the export fetches warms the fleet's store, and
``OUT.sigil-work`` holds only the local scratch files of downloads in flight. Blobs are streamed
from the bucket into the archive and re-hashed on the way (a corrupt stored object is never
archived).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil import __version__
from sigil.airgap import ArchiveError
from sigil.airgap.layout import (
    ARCHIVE_ANNOTATION,
    ARCHIVE_ARTIFACT,
    BASE_ANNOTATION,
    CONTENTS_TYPE,
    EMPTY_BYTES,
    EMPTY_TYPE,
    INDEX_FILE,
    LAYOUT_BYTES,
    LAYOUT_FILE,
    POLICY_TYPE,
    REF_NAME,
    REPORT_TYPE,
    TITLE,
    TRUST_TYPE,
    Entry,
    LayoutWriter,
    blob_name,
    canonical_json,
)
from sigil.airgap.plan import Plan, PlanEntry
from sigil.airgap.report import RecordingPolicy, trust_files, verdict_json
from sigil.config import Config
from sigil.errors import (
    BlobUnknown,
    Denied,
    SigilError,
    TooManyRequests,
    Unavailable,
)
from sigil.mirror import AllowAll, Mirror, PolicyHook
from sigil.oci.digest import Digest
from sigil.oci.manifest import MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, Manifest, parse_manifest
from sigil.progress import ProgressReporter, Transfer, progress_for
from sigil.routing import Route
from sigil.storage import BlobStore, Index
from sigil.storage.backends import open_backends
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    ObjectStore,
    SqliteAsyncIndex,
)
from sigil.upstream import UpstreamClient
from sigil.verify.discovery import ATTESTATION_MANIFEST, REFERENCE_DIGEST, REFERENCE_TYPE

# Signature-ish tags cosign and the referrers tag schema hang off a subject digest.
ARTIFACT_SUFFIXES = (".sig", ".att", ".sbom", "")
MAX_ARTIFACT_DEPTH = 2          # an attestation's own signature is one level down (DHI)
MAX_TAGS_PAGES = 100
BLOB_CONCURRENCY = 4
_TRANSIENT = (Unavailable, TooManyRequests)


class _BlobError(SigilError):
    """A blob could not be fetched in phase 2 (``cause`` says why)."""

    def __init__(self, digest: Digest, cause: SigilError) -> None:
        super().__init__(str(cause))
        self.digest = digest
        self.cause = cause


@dataclass
class ImageRecord:
    """One exported image and everything that belongs to it."""

    name: str                         # as clients name it: docker.io/library/alpine:3.20
    upstream: str
    repo: str
    reference: str
    digest: Digest
    media_type: str
    verified: bool
    verdict: dict[str, Any]
    manifests: dict[Digest, str] = field(default_factory=dict)   # digest -> media type
    blobs: set[Digest] = field(default_factory=set)
    blob_repos: dict[Digest, str] = field(default_factory=dict)  # where a blob was found
    tags: dict[tuple[str, str], tuple[Digest, str]] = field(default_factory=dict)

    def contents(self) -> dict[str, Any]:
        """The image's entry in the archive's contents document."""
        return {"name": self.name, "upstream": self.upstream, "repo": self.repo,
                "reference": self.reference, "digest": str(self.digest),
                "mediaType": self.media_type, "verified": self.verified,
                "manifests": sorted(str(d) for d in self.manifests),
                "blobs": sorted(str(d) for d in self.blobs),
                "tags": [[repo, tag, str(d), mt] for (repo, tag), (d, mt)
                         in sorted(self.tags.items())]}


@dataclass
class ExportResult:
    """What ``sigil export`` did; ``exit_code`` 0 only if every plan entry was exported."""

    report: dict[str, Any]
    exit_code: int
    output: Path | None


@dataclass
class _Base:
    digest: str
    sizes: dict[str, int]


async def load_base(path: Path) -> _Base:
    """The blobs a previous archive (or its ``*.manifest.json`` side file) holds."""
    side = path if path.name.endswith(".manifest.json") else path.with_name(
        path.name + ".manifest.json")
    if side.is_file():
        try:
            data = json.loads(side.read_bytes())
            return _Base(str(data["archive"]), {str(k): int(v) for k, v in data["blobs"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArchiveError(f"{side}: not a sigil archive side file ({exc})") from exc
    from sigil.airgap.importer import read_metadata

    meta = await read_metadata(path)
    return _Base(meta.archive_digest, {k: int(v) for k, v in meta.contents["sizes"].items()})


class Exporter:
    """One ``sigil export`` run."""

    def __init__(self, config: Config, plan: Plan, out: Path | None, *,
                 since: Path | None = None, allow_unverified: bool = False,
                 keep_work: bool = False, progress: ProgressReporter | None = None) -> None:
        self.config = config
        self.plan = plan
        self.out = out
        self.since = since
        self.allow_unverified = allow_unverified
        self.keep_work = keep_work
        # Bars on a terminal, plain lines otherwise (sigil.progress); ``progress`` is the
        # running transfer while run() is (a no-op one before).
        self.reporter = progress or progress_for(sys.stderr, "sigil")
        self.progress = Transfer()
        self.to_store = out is None
        self.records: list[ImageRecord] = []
        self.denied: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.interrupted: list[dict[str, Any]] = []
        self.sizes: dict[Digest, int] = {}
        self._slots = asyncio.Semaphore(BLOB_CONCURRENCY)
        # Where each blob comes from: (route, repository, image name), learnt in phase 1.
        self.origins: dict[Digest, tuple[Route, str, str]] = {}
        self.fetched_bytes = 0
        self._early: dict[Digest, asyncio.Task[None]] = {}

    @property
    def work_dir(self) -> Path:
        """The working store: next to the output, or the configured store (``--to-store``).
        With fleet backends, only the local scratch of downloads (the store is the fleet's)."""
        if self.out is None:
            return Path(self.config.storage.root)
        return self.out.with_name(self.out.name + ".sigil-work")

    async def _open_store(self) -> tuple[ObjectStore, AsyncIndex, Callable[[], Awaitable[None]]]:
        """The working store's objects and index, and how to close them: the configured
        backends (``--to-store``, or any fleet config), else a private filesystem store and
        SQLite index in work_dir."""
        if self.to_store or is_fleet(self.config):
            # A StorageError here (bucket or database unreachable) names the config key.
            backends = await open_backends(self.config)
            return backends.objects, backends.index, backends.close
        root = self.work_dir
        index = SqliteAsyncIndex(Index(root / "index.sqlite"))
        return FilesystemObjectStore(BlobStore(root)), index, index.close

    def _policy(self) -> PolicyHook:
        if not self.config.policy:
            return AllowAll()
        from sigil.verify.engine import Verifier
        from sigil.verify.policy import load_policy

        return Verifier(load_policy(self.config.policy))

    async def run(self) -> ExportResult:
        """Export the plan; never raises for a single image (it is listed instead)."""
        with self.reporter.transfer("export") as self.progress:
            return await self._run()

    async def _run(self) -> ExportResult:
        base = await load_base(self.since) if self.since is not None else None
        policy = RecordingPolicy(self._policy())
        root = self.work_dir
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        if not self.to_store:
            # A download an interrupted run left half done (fleet: its local scratch copy;
            # its multipart upload is aborted by the fleet's start-up or gc cleanup).
            BlobStore(root).cleanup_staging()
        # The mirror and the export read and write the same working store through the async
        # storage contracts (self._blobs, self._index).
        try:
            self._blobs, self._index, close_store = await self._open_store()
        except BaseException:
            if created and self.out is not None:  # backends unreachable: leave nothing
                shutil.rmtree(root, ignore_errors=True)
            raise
        # Downloads into a remote store keep their scratch copy under storage.root: here the
        # work directory, so a replica starting on this host never removes one in flight.
        clients: dict[str, UpstreamClient] = {}
        try:
            mirror_config = dataclasses.replace(
                self.config, storage=dataclasses.replace(self.config.storage, root=str(root)))
            # Inside the try: a client that fails to build (a bad CA file, say) must not leave
            # the S3 and PostgreSQL pools just opened, or the clients built before it, open.
            for upstream in self.config.upstreams:
                clients[upstream.name] = UpstreamClient(upstream)
            mirror = Mirror(mirror_config, self._blobs, self._index, clients, policy)
            # Phase 1: manifests, verdicts and artifacts of every image (small). Phase 2: the
            # blobs, fetched in parallel and appended to the archive as each one completes.
            for entry in self.plan.entries:
                await self._entry(mirror, policy, entry)
            output = None
            report = self._report(policy)
            try:
                if self.to_store:
                    await self._fetch_all(mirror)
                elif not self.interrupted:
                    assert self.out is not None
                    await self._write(mirror, report, base)
                    output = self.out
            except SigilError as exc:
                self._blob_failed(exc)
                report = self._report(policy)
            # Downloads started early finish (a resumed run then has them); their errors
            # were reported above or concern images left out.
            await asyncio.gather(*self._early.values(), return_exceptions=True)
            await mirror.downloads.drain(5.0)
        finally:
            for client in clients.values():
                await client.close()
            await close_store()
        report["fetched_bytes"] = self.fetched_bytes
        if output is not None and not self.keep_work:
            shutil.rmtree(root, ignore_errors=True)
        code = 1 if (self.denied or self.failed or self.interrupted) else 0
        return ExportResult(report, code, output)

    # ---------------------------------------------------------------- plan walking
    async def _entry(self, mirror: Mirror, policy: RecordingPolicy, entry: PlanEntry) -> None:
        refs: list[str]
        if entry.reference is not None:
            refs = [entry.reference]
        else:
            try:
                refs = await self._matching_tags(mirror, entry)
            except SigilError as exc:
                target = self.interrupted if isinstance(exc, _TRANSIENT) else self.failed
                target.append({"entry": entry.where, "name": entry.route.image,
                               "error": str(exc)})
                return
            if not refs:
                self.failed.append({"entry": entry.where, "name": entry.route.image,
                                    "error": "no upstream tag matches the plan's regexes"})
                return
        self.progress.expect(items=len(refs))
        for ref in refs:
            name = entry.route.image + (f"@{ref}" if Digest.is_digest(ref) else f":{ref}")
            try:
                record = await self._image(mirror, policy, entry, ref, name)
            except SigilError as exc:
                item = {"entry": entry.where, "name": name, "error": str(exc)}
                if isinstance(exc, _TRANSIENT):
                    self.interrupted.append(item)
                else:
                    self.failed.append(item)
                continue
            finally:
                self.progress.advance(items=1)
            if record is not None:
                self.records.append(record)

    async def _matching_tags(self, mirror: Mirror, entry: PlanEntry) -> list[str]:
        tags: list[str] = []
        last: str | None = None
        for _ in range(MAX_TAGS_PAGES):
            page, last = await mirror.tags(entry.route, None, last)
            tags.extend(page["tags"])
            if not last:
                break
        return sorted(t for t in dict.fromkeys(tags)
                      if any(p.search(t) for p in entry.tag_patterns))

    async def _image(self, mirror: Mirror, policy: RecordingPolicy, entry: PlanEntry,
                     ref: str, name: str) -> ImageRecord | None:
        route = entry.route
        verified = True
        try:
            served = await mirror.manifest(route, ref)
            manifest = parse_manifest(served.raw, served.media_type)
        except Denied as exc:
            manifest = await mirror.fetch_manifest(route, ref)
            verdict = policy.verdicts.get(str(manifest.digest))
            if verdict is None:  # a deny cached by an earlier run: explain it again
                verdict = await policy.inner.evaluate(route.image, route.repo, manifest,
                                                      mirror.source(route))
            detail = verdict_json(verdict)
            if not self.allow_unverified:
                self.denied.append({"entry": entry.where, "name": name,
                                    "digest": str(manifest.digest),
                                    "reason": detail.get("reason", "denied"),
                                    "message": detail.get("message", str(exc)),
                                    "checks": detail.get("checks", [])})
                return None
            verified = False
        verdict = policy.verdicts.get(str(manifest.digest))
        if verdict is None:  # decided in an earlier (resumed) run: explain it again
            verdict = await policy.inner.evaluate(route.image, route.repo, manifest,
                                                  mirror.source(route))
        record = ImageRecord(name=name, upstream=route.upstream.name, repo=route.repo,
                             reference=ref, digest=manifest.digest,
                             media_type=manifest.media_type, verified=verified,
                             verdict=verdict_json(verdict))
        if not Digest.is_digest(ref):
            record.tags[(route.repo, ref)] = (manifest.digest, manifest.media_type)
        await self._closure(mirror, entry, route, manifest, record, verified, top=True)
        subjects = list(record.manifests)
        for subject in subjects:
            await self._artifacts(mirror, route, record, subject, depth=0)
        for repo, digest in getattr(verdict, "related", []):
            await self._related(mirror, route, record, repo, digest)
        for digest in record.blobs:
            self.origins.setdefault(digest, (route, record.blob_repos.get(digest, record.repo),
                                             record.name))
            if digest not in self._early:
                # Start fetching now, while the next images are resolved and verified.
                self._early[digest] = asyncio.create_task(self._blob(mirror, digest))
        return record

    async def _manifest(self, mirror: Mirror, route: Route, reference: str,
                        verified: bool) -> Manifest:
        if verified:
            served = await mirror.manifest(route, reference)
            return parse_manifest(served.raw, served.media_type)
        return await mirror.fetch_manifest(route, reference)

    async def _closure(self, mirror: Mirror, entry: PlanEntry, route: Route,
                       manifest: Manifest, record: ImageRecord, verified: bool, *,
                       top: bool) -> None:
        record.manifests[manifest.digest] = manifest.media_type
        self.sizes[manifest.digest] = len(manifest.raw)
        if not manifest.is_index:
            for desc in ([manifest.config] if manifest.config else []) + list(manifest.layers):
                record.blobs.add(desc.digest)
                self.sizes[desc.digest] = desc.size
            return
        kept: set[Digest] = set()
        attestations = []
        for desc in manifest.manifests:
            if desc.annotations.get(REFERENCE_TYPE) == ATTESTATION_MANIFEST:
                attestations.append(desc)
            elif desc.media_type in MANIFEST_TYPES and (not top or
                                                        entry.wants_platform(desc.platform)):
                kept.add(desc.digest)
                child = await self._manifest(mirror, route, str(desc.digest), verified)
                await self._closure(mirror, entry, route, child, record, verified, top=False)
        for desc in attestations:
            target = desc.annotations.get(REFERENCE_DIGEST, "")
            if Digest.is_digest(target) and Digest.parse(target) in kept:
                child = await self._manifest(mirror, route, str(desc.digest), verified)
                await self._closure(mirror, entry, route, child, record, verified, top=False)

    async def _add_artifact(self, mirror: Mirror, route: Route, record: ImageRecord,
                            repo: str, manifest: Manifest, depth: int) -> None:
        if manifest.digest in record.manifests:
            return
        record.manifests[manifest.digest] = manifest.media_type
        self.sizes[manifest.digest] = len(manifest.raw)
        for desc in ([manifest.config] if manifest.config else []) + list(manifest.layers):
            record.blobs.add(desc.digest)
            record.blob_repos.setdefault(desc.digest, repo)
            self.sizes[desc.digest] = desc.size
        if not manifest.is_index and depth < MAX_ARTIFACT_DEPTH:
            await self._artifacts(mirror, route, record, manifest.digest, depth + 1, repo=repo)

    async def _artifacts(self, mirror: Mirror, route: Route, record: ImageRecord,
                         subject: Digest, depth: int, repo: str | None = None) -> None:
        """The signature tags and referrers of ``subject`` (tags and referrers are hints:
        referrers count only if their own ``subject`` names the digest)."""
        repos = [repo or route.repo]
        if route.upstream.signature_repository and depth == 0:
            repos.append(route.upstream.signature_repository)
        for r in dict.fromkeys(repos):
            source = mirror.source(route)
            for suffix in ARTIFACT_SUFFIXES:
                tag = subject.tag_form + suffix
                found = await source.get_manifest(r, tag)
                if found is None:
                    continue
                record.tags[(r, tag)] = (found.digest, found.media_type)
                if found.is_index:  # the referrers tag schema: a list of referrers
                    record.manifests[found.digest] = found.media_type
                    self.sizes[found.digest] = len(found.raw)
                    for desc in found.manifests:
                        await self._referrer(mirror, route, record, r, subject, desc.digest,
                                             depth)
                else:
                    await self._add_artifact(mirror, route, record, r, found, depth)
            listed = await source.get_referrers(r, subject)
            for desc in listed.manifests if listed is not None else ():
                await self._referrer(mirror, route, record, r, subject, desc.digest, depth)

    async def _referrer(self, mirror: Mirror, route: Route, record: ImageRecord, repo: str,
                        subject: Digest, digest: Digest, depth: int) -> None:
        found = await mirror.source(route).get_manifest(repo, str(digest))
        if found is None or found.subject is None or found.subject.digest != subject:
            return
        await self._add_artifact(mirror, route, record, repo, found, depth)

    async def _related(self, mirror: Mirror, route: Route, record: ImageRecord, repo: str,
                       digest: Digest) -> None:
        if digest in record.manifests or digest in record.blobs:
            return
        row = await self._index.get_manifest(digest)
        size = await self._blobs.size(digest)
        if row is not None and size is not None:
            raw = await self._blobs.read_bytes(digest)
            await self._add_artifact(mirror, route, record, repo,
                                     parse_manifest(raw, row.media_type), MAX_ARTIFACT_DEPTH)
        elif size is not None:
            record.blobs.add(digest)
            self.sizes[digest] = size

    # ---------------------------------------------------------------------- blobs
    async def _blob(self, mirror: Mirror, digest: Digest) -> None:
        """Make sure ``digest`` is in the working store (fetched through ``Downloads``)."""
        store, index = self._blobs, self._index
        size = await store.size(digest)
        if size is not None:  # resumed, or (fleet) already in the shared store: reused
            if await index.blob_size(digest) is not None or \
                    await index.get_manifest(digest) is not None:
                return
            # Stored but unindexed: a local file was committed by this export's own verified
            # download; an object in a shared bucket may be anything (a killed import's or
            # download's leftover, a write behind sigil's back) and serving replicas trust
            # what the index lists, so it is indexed only if its bytes hash right, else
            # fetched again (the download overwrites it).
            if isinstance(store, FilesystemObjectStore) or \
                    await store.hash_object(digest) == digest:
                await index.put_blob(digest, size)
                return
        route, repo, _ = self.origins[digest]
        async with self._slots:
            client = mirror.clients[route.upstream.name]
            # The same Downloads machinery as serving: staged, sha256-checked, then committed.
            download, _ = mirror.downloads.get_or_start(
                digest, lambda: client.open_blob(repo, digest),
                self._index.put_blob)
            await download.finished.wait()
            if download.error is not None:
                error = download.error
                raise _BlobError(digest, error if isinstance(error, SigilError)
                                 else Unavailable(str(error)))
            self.fetched_bytes += download.written

    async def _fetched(self, mirror: Mirror, digest: Digest) -> None:
        """Wait for the blob's early fetch (or fetch it now)."""
        early = self._early.get(digest)
        await (early if early is not None else self._blob(mirror, digest))

    async def _fetch_all(self, mirror: Mirror) -> None:
        """``--to-store``: every blob of every exported image into the store."""
        digests = sorted(self.origins, key=str)
        self.progress.expect(nbytes=sum(self.sizes.get(d, 0) for d in digests))

        async def one(digest: Digest) -> None:
            await self._fetched(mirror, digest)
            self.progress.advance(nbytes=self.sizes.get(digest, 0))

        results = await asyncio.gather(*(one(d) for d in digests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _blob_failed(self, exc: SigilError) -> None:
        cause = exc.cause if isinstance(exc, _BlobError) else exc
        name = self.origins[exc.digest][2] if isinstance(exc, _BlobError) else "archive"
        item = {"name": name, "error": str(cause)}
        (self.interrupted if isinstance(cause, _TRANSIENT) else self.failed).append(item)

    # --------------------------------------------------------------------- output
    def _report(self, policy: RecordingPolicy) -> dict[str, Any]:
        images = []
        for record in self.records:
            verdict = record.verdict
            images.append({"name": record.name, "digest": str(record.digest),
                           "verified": record.verified,
                           "decision": "allow" if verdict.get("allowed") else "deny",
                           "reason": verdict.get("reason"), "message": verdict.get("message"),
                           "policies": verdict.get("policies", []),
                           "checks": verdict.get("checks", []),
                           "artifacts": sorted(str(d) for d in record.manifests
                                               if d != record.digest)})
        return {"kind": "sigil-export", "sigil": __version__,
                "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "plan": self.plan.file, "policy": {"file": self.config.policy,
                                                   "fingerprint": policy.fingerprint},
                "images": images, "denied": self.denied, "failed": self.failed,
                "interrupted": self.interrupted}

    async def _copy_blob(self, writer: LayoutWriter, digest: Digest,
                         written: Callable[[int], None]) -> None:
        """Append a stored blob to the archive: a local file is copied (in the kernel where
        it can be), a remote object streamed and re-hashed on the way."""
        store = self._blobs
        path = store.local_path(digest)
        if path is not None:
            await asyncio.to_thread(writer.add, Entry(blob_name(digest.hex), path=path), written)
            return
        lost = ArchiveError(f"working store lost {digest}; re-run the export")
        if isinstance(store, FilesystemObjectStore):
            raise lost
        hashed = hashlib.sha256()
        try:
            async with store.open_range(digest) as reader:
                await asyncio.to_thread(writer.begin, blob_name(digest.hex), reader.total)
                async for chunk in reader:
                    hashed.update(chunk)
                    await asyncio.to_thread(writer.write, chunk)
                    self.progress.advance(nbytes=len(chunk))
        except BlobUnknown as exc:
            raise lost from exc
        if Digest(hashed.hexdigest()) != digest:
            raise ArchiveError(f"the stored object {digest} does not match its digest (corrupt "
                               "in the store: run sigil fsck, then re-run the export)")
        await asyncio.to_thread(writer.end)

    async def _write(self, mirror: Mirror, report: dict[str, Any], base: _Base | None) -> None:
        assert self.out is not None
        store = self._blobs
        manifests: dict[Digest, str] = {}
        needed: set[Digest] = set()
        for record in self.records:
            manifests.update(record.manifests)
            needed |= set(record.manifests) | record.blobs
        for digest in needed:
            if digest not in self.sizes or not self.sizes[digest]:
                self.sizes[digest] = await store.size(digest) or 0
        held = sorted((d for d in needed if base is None or str(d) not in base.sizes), key=str)
        entries_index: list[dict[str, Any]] = []
        names: set[str] = set()
        for record in self.records:
            named = [((record.repo, record.reference), (record.digest, record.media_type))
                     ] if Digest.is_digest(record.reference) else []
            for (repo, tag), (digest, media_type) in named + sorted(record.tags.items()):
                sep = "@" if Digest.is_digest(tag) else ":"
                ref_name = f"{record.upstream}/{repo}{sep}{tag}"
                if ref_name in names:
                    continue
                names.add(ref_name)
                entries_index.append({"mediaType": media_type, "digest": str(digest),
                                      "size": self.sizes[digest],
                                      "annotations": {REF_NAME: ref_name}})
        sigil_blobs: list[tuple[str, bytes, str, dict[str, str]]] = []
        report_bytes = canonical_json(report)
        sigil_blobs.append((REPORT_TYPE, report_bytes, "report.json", {}))
        policy_info = None
        trust_info = []
        if self.config.policy:
            policy_bytes = await asyncio.to_thread(Path(self.config.policy).read_bytes)
            policy_info = {"file": self.config.policy, "digest": str(Digest.of(policy_bytes))}
            sigil_blobs.append((POLICY_TYPE, policy_bytes, Path(self.config.policy).name, {}))
            for i, trust in enumerate(trust_files(self.config.policy)):
                digest = Digest.of(trust.data)
                trust_info.append({"key": trust.key, "path": trust.path,
                                   "sha256": trust.sha256, "digest": str(digest)})
                sigil_blobs.append((TRUST_TYPE, trust.data,
                                    f"trust/{i}-{Path(trust.path).name}",
                                    {"dev.sigil.airgap.policy-key": trust.key}))
        contents = {
            "sigilAirgap": 1, "base": base.digest if base else None,
            "images": [r.contents() for r in self.records],
            "manifests": {str(d): mt for d, mt in manifests.items()},
            "sizes": {str(d): self.sizes[d] for d in sorted(needed, key=str)},
            "held": [str(d) for d in held], "index": entries_index,
            "report": str(Digest.of(report_bytes)), "policy": policy_info, "trust": trust_info,
        }
        contents_bytes = canonical_json(contents)
        layers: list[tuple[str, bytes, str, dict[str, str]]] = [
            (CONTENTS_TYPE, contents_bytes, "contents.json", {}), *sigil_blobs]
        archive_manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARCHIVE_ARTIFACT,
            "config": {"mediaType": EMPTY_TYPE, "digest": str(Digest.of(EMPTY_BYTES)),
                       "size": len(EMPTY_BYTES)},
            "layers": [{"mediaType": mt, "digest": str(Digest.of(data)), "size": len(data),
                        "annotations": {TITLE: title, **extra}}
                       for mt, data, title, extra in layers]}
        if base is not None:
            archive_manifest["annotations"] = {BASE_ANNOTATION: base.digest}
        archive_bytes = canonical_json(archive_manifest)
        archive_digest = Digest.of(archive_bytes)
        sigil_entry: dict[str, Any] = {
            "mediaType": OCI_MANIFEST, "digest": str(archive_digest), "size": len(archive_bytes),
            "artifactType": ARCHIVE_ARTIFACT, "annotations": {ARCHIVE_ANNOTATION: "v1"}}
        index_doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                     "manifests": entries_index + [sigil_entry]}
        if base is not None:
            index_doc["annotations"] = {BASE_ANNOTATION: base.digest}
            sigil_entry["annotations"][BASE_ANNOTATION] = base.digest
        files = [Entry(LAYOUT_FILE, data=LAYOUT_BYTES),
                 Entry(INDEX_FILE, data=canonical_json(index_doc)),
                 Entry(blob_name(archive_digest.hex), data=archive_bytes)]
        small = {Digest.of(EMPTY_BYTES): EMPTY_BYTES}
        for _, data, _, _ in layers:
            small[Digest.of(data)] = data
        for digest, data in small.items():
            files.append(Entry(blob_name(digest.hex), data=data))
        pending = [d for d in held if d not in small]
        self.progress.expect(nbytes=sum(f.size for f in files)
                             + sum(self.sizes[d] for d in pending))
        loop = asyncio.get_running_loop()

        def written(n: int) -> None:
            loop.call_soon_threadsafe(lambda: self.progress.advance(nbytes=n))

        writer = LayoutWriter(self.out)
        ready: asyncio.Queue[Digest | BaseException] = asyncio.Queue()

        async def fetch(digest: Digest) -> None:
            try:
                await self._fetched(mirror, digest)
            except SigilError as exc:
                ready.put_nowait(exc)
            else:
                ready.put_nowait(digest)

        tasks = [asyncio.create_task(fetch(d)) for d in pending]
        try:
            for entry in files:
                await asyncio.to_thread(writer.add, entry, written)
            for _ in pending:
                # Blobs go into the archive in the order their downloads finish, while the
                # others are still downloading: the copy overlaps the network.
                item = await ready.get()
                if isinstance(item, BaseException):
                    raise item
                await self._copy_blob(writer, item, written)
            await asyncio.to_thread(writer.close)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.abort()
            raise
        available = dict(base.sizes) if base else {}
        available.update({str(d): self.sizes[d] for d in needed})
        side = {"sigilAirgap": 1, "archive": str(archive_digest), "output": self.out.name,
                "base": base.digest if base else None, "blobs": available}
        side_path = self.out.with_name(self.out.name + ".manifest.json")
        side_path.write_bytes(canonical_json(side))
        report["archive"] = str(archive_digest)
        report["held_blobs"] = len(held)
        report["held_bytes"] = sum(self.sizes[d] for d in held)


def is_fleet(config: Config) -> bool:
    """Is the configured store or index a shared (fleet) backend?"""
    return config.storage.backend == "s3" or config.index.backend == "postgres"

