"""The one place that knows the order of operations (DESIGN §2 Data flow).

1. resolve tag -> digest (tag cache, HEAD revalidation after ``tag_ttl``, stale on failure);
2. manifest bytes by digest (memory, store, else upstream; sha256 checked before anything);
3. verdict for (digest, policy fingerprint, image) (cache, else the policy);
4. serve the exact verified bytes; record its children and blobs as servable in that repository.

Offline (``server.offline``) the order is the same, with the store as the only source: stored
tags are authoritative whatever their age, a store miss is "not found" at once (the clients are
:class:`sigil.upstream.offline.OfflineUpstreamClient`, which never connect), tag lists and
referrers come from the index, and verdicts are still decided (from stored signatures) for
every digest not yet allowed under the current policy.

Blobs are served only when a verified manifest of that repository made them servable (the
"blob gate"); a cold blob is fetched once however many clients ask (:mod:`sigil.downloads`).
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sigil import metrics
from sigil.config import Config
from sigil.downloads import Download, Downloads, RelayPeers
from sigil.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unavailable,
)
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.oci.manifest import (
    DEFAULT_ACCEPT,
    OCI_INDEX,
    Manifest,
    parse_manifest,
)
from sigil.oci.reference import validate_tag
from sigil.routing import Route
from sigil.singleflight import SingleFlight
from sigil.storage import TagRow
from sigil.storage.contracts import AsyncIndex, FilesystemObjectStore, ObjectStore
from sigil.storage.lease import FetchLeases
from sigil.upstream import FetchedManifest, ManifestHead, UpstreamBlob

log = get_logger("sigil.mirror")

# Cosign and referrers tag-schema tags name the subject they belong to.
_SUBJECT_TAG = re.compile(r"^sha256-([a-f0-9]{64})(?:\.(?:sig|att|sbom))?$")
# Layer media types a container runtime would unpack and run (OCI and Docker, any compression).
_RUNNABLE_LAYER = re.compile(r"image\.layer|image\.rootfs|tar")
# Verdicts are re-evaluated after this long even with an unchanged policy (revocations, new
# signatures); denials sooner, so a signature published after a deny is picked up quickly.
ALLOW_TTL = 3600.0
DENY_TTL = 60.0
MAX_REFERRERS = 64
MEMORY_MANIFEST_BYTES = 64 * 1024 * 1024
# The in-memory tables in front of the index (tags, allows, access times) are emptied when
# they reach this many entries: they are caches of the index, so a long-running mirror that
# sees millions of digests keeps bounded memory and only pays an index read to refill them.
MEMORY_TABLE_ENTRIES = 200_000


@dataclass(frozen=True)
class Verdict:
    """A policy decision as the mirror needs it (verify/engine builds richer ones)."""

    allowed: bool
    message: str = ""
    reason: str = "ok"
    related: list[tuple[str, Digest]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "message": self.message, "reason": self.reason}


class Upstream(Protocol):
    """What the mirror needs from an upstream: :class:`sigil.upstream.UpstreamClient`
    online, :class:`sigil.upstream.offline.OfflineUpstreamClient` offline."""

    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead: ...

    async def get_manifest(self, repo: str, reference: str, accept: str) -> FetchedManifest: ...

    def open_blob(self, repo: str, digest: Digest | str
                  ) -> AbstractAsyncContextManager[UpstreamBlob]: ...

    async def get_blob_bytes(self, repo: str, digest: Digest | str, max_bytes: int) -> bytes: ...

    async def get_tags(self, repo: str, n: int | None = None,
                       last: str | None = None) -> tuple[bytes, str | None]: ...

    async def get_referrers(self, repo: str, digest: Digest | str,
                            artifact_type: str | None = None) -> bytes | None: ...

    async def close(self) -> None: ...


class PolicyHook(Protocol):
    """What sits between "manifest bytes known" and "bytes leave"."""

    @property
    def fingerprint(self) -> str: ...

    async def evaluate(self, image: str, repo: str, manifest: Manifest,
                       source: Any) -> Any:
        """Return an object with ``allowed``, ``message``, ``reason``, ``related``."""
        ...


class AllowAll:
    """The verdict hook used when no policy file is configured: everything passes.

    Stated loudly at start-up; a configured policy replaces it (fail-closed engine)."""

    fingerprint = "allow-all"

    async def evaluate(self, image: str, repo: str, manifest: Manifest, source: Any) -> Verdict:
        return Verdict(allowed=True, message="no policy configured", reason="no_policy")


@dataclass(frozen=True, slots=True)
class ServedManifest:
    """Exact manifest bytes to send, with the headers they need."""

    raw: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True, slots=True)
class CachedBlob:
    """A blob present in the store: a local file (``path``, sent by the server itself) or a
    remote object (``path`` None: streamed from the store or redirected to it)."""

    path: Path | None
    digest: Digest
    size: int | None = None


class _ManifestCache:
    """A small LRU of manifest bytes in memory, bounded in bytes: the warm HEAD/GET path."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._items: OrderedDict[Digest, ServedManifest] = OrderedDict()

    def get(self, digest: Digest) -> ServedManifest | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def put(self, item: ServedManifest) -> None:
        if item.digest in self._items:
            return
        self._items[item.digest] = item
        self._size += len(item.raw)
        while self._size > self._max and self._items:
            _, old = self._items.popitem(last=False)
            self._size -= len(old.raw)


_Table = TypeVar("_Table", bound="set[Any] | dict[Any, Any]")


def _count_stored(size: int) -> None:
    """Keep the store gauges current between gc passes (which set them exactly)."""
    metrics.STORE_BYTES.inc(size)
    metrics.STORE_OBJECTS.inc()


def _bounded(table: _Table) -> _Table:
    """``table``, emptied first if it has reached MEMORY_TABLE_ENTRIES."""
    if len(table) >= MEMORY_TABLE_ENTRIES:
        table.clear()
    return table


class Mirror:
    """Pull-through logic for every upstream, over one store and index."""

    def __init__(self, config: Config, store: ObjectStore, index: AsyncIndex,
                 clients: Mapping[str, Upstream], policy: PolicyHook | None = None,
                 leases: FetchLeases | None = None, *,
                 relay: RelayPeers | None = None) -> None:
        self.config = config
        self.store = store
        self.index = index
        # A remote store (S3) answers has/size with a request each: what is stored is then
        # asked of the index instead (its rows are written after each commit).
        self._local_store = isinstance(store, FilesystemObjectStore)
        self.clients = clients
        # Offline: the store is the only source (module docstring); ``clients`` never connect.
        self.offline = config.server.offline
        self.policy: PolicyHook = policy or AllowAll()
        # leases: single-flight across workers (one host) or replicas (relay: the peers).
        self.downloads = Downloads(store, leases, scratch=Path(config.storage.root),
                                   relay=relay)
        self._manifests = _ManifestCache(MEMORY_MANIFEST_BYTES)
        self._tags: dict[tuple[str, str, str], TagRow] = {}
        self._allowed: set[tuple[str, str, Digest, str]] = set()
        self._expanded: set[tuple[str, str, Digest, str]] = set()
        self._served_flights: SingleFlight[ServedManifest] = SingleFlight()
        self._verdict_flights: SingleFlight[Any] = SingleFlight()
        self._touched: dict[Digest, float] = {}

    # ------------------------------------------------------------------ policy
    def set_policy(self, policy: PolicyHook) -> None:
        """Swap the policy (reload). Old allows stop counting: they carry the old fingerprint."""
        self.policy = policy
        self._allowed.clear()
        self._expanded.clear()

    async def _is_allowed(self, route: Route, digest: Digest) -> bool:
        key = (route.upstream.name, route.repo, digest, self.policy.fingerprint)
        if key in self._allowed:
            return True
        if await self.index.is_allowed(route.upstream.name, route.repo, digest,
                                 self.policy.fingerprint):
            _bounded(self._allowed).add(key)
            return True
        return False

    async def _allow(self, route: Route, repo: str, digests: list[Digest]) -> None:
        fingerprint = self.policy.fingerprint
        await self.index.allow(route.upstream.name, repo, digests, fingerprint)
        allowed = _bounded(self._allowed)
        for digest in digests:
            allowed.add((route.upstream.name, repo, digest, fingerprint))

    # --------------------------------------------------------------- manifests
    async def manifest(self, route: Route, reference: str) -> ServedManifest:
        """The verified manifest for a tag or digest reference (GET and HEAD alike)."""
        if Digest.is_digest(reference):
            digest = Digest.parse(reference)
            hit = self._manifests.get(digest) is not None or await self._has_manifest(digest)
            metrics.CACHE.labels("manifest", "hit" if hit else "miss").inc()
            served = await self._load(route, digest)
        else:
            validate_tag(reference)
            served = await self._resolve_tag(route, reference)
        await self._gate_manifest(route, served, reference)
        await self._touch(served.digest)
        return served

    async def fetch_manifest(self, route: Route, reference: str) -> Manifest:
        """The manifest for a tag or digest, digest-checked but *not* gated by the policy
        (for ``sigil verify``, which reports the verdict instead of enforcing it)."""
        if Digest.is_digest(reference):
            served = await self._load(route, Digest.parse(reference))
        else:
            served = await self._resolve_tag(route, validate_tag(reference))
        return parse_manifest(served.raw, served.media_type)

    async def _resolve_tag(self, route: Route, tag: str) -> ServedManifest:
        key = (route.upstream.name, route.repo, tag)
        now = time.time()
        entry = self._tags.get(key)
        # Offline the index is the source: a stored tag is the answer whatever its age (nothing
        # is stale without an upstream; not counted in sigil_stale_serves_total), and its
        # in-memory copy is read again from the index after tag_ttl, so a tag that an import
        # moved is seen as an online tag moved upstream is. The copy's checked_at is when the
        # index was read; the row keeps its own.
        if entry is None or (self.offline and now - entry.checked_at >= route.upstream.tag_ttl):
            entry = await self.index.get_tag(*key)
            if entry is not None:
                if self.offline:
                    entry = replace(entry, checked_at=now)
                _bounded(self._tags)[key] = entry
        if entry is not None and (now - entry.checked_at < route.upstream.tag_ttl
                                  or self.offline):
            cached = self._manifests.get(entry.digest)
            if cached is not None or await self._has_manifest(entry.digest):
                metrics.CACHE.labels("tag", "hit").inc()
                return cached or await self._load(route, entry.digest)
        metrics.CACHE.labels("tag", "miss").inc()
        if self.offline:
            # Not imported (or its manifest is gone). Never _revalidate_tag: its 404 handling
            # would delete the stored tag.
            metrics.OFFLINE_MISSES.labels(route.upstream.name, "tag").inc()
            raise ManifestUnknown(f"{route.client_name}:{tag} is not in the store (sigil "
                                  "serves offline: only imported or earlier pulled tags)")
        try:
            return await self._served_flights.do(("tag", *key),
                                          lambda: self._revalidate_tag(route, tag, key))
        except (Unavailable, TooManyRequests) as exc:
            # Upstream down or rate-limited: a cached tag younger than max_stale still serves.
            if entry is not None and now - entry.checked_at < route.upstream.max_stale \
                    and await self._has_manifest(entry.digest):
                metrics.STALE_SERVES.labels(route.upstream.name).inc()
                log.warning("tag.stale", upstream=route.upstream.name, repo=route.repo,
                            tag=tag, age=round(now - entry.checked_at), error=exc.code)
                return await self._load(route, entry.digest)
            raise

    async def _revalidate_tag(self, route: Route, tag: str,
                              key: tuple[str, str, str]) -> ServedManifest:
        client = self.clients[route.upstream.name]
        try:
            head = await client.head_manifest(route.repo, tag, DEFAULT_ACCEPT)
        except ManifestUnknown:
            await self._forget_tag(key)
            raise
        served: ServedManifest | None = None
        if head.digest:
            try:
                digest = Digest.parse(head.digest)
            except RegistryError:
                digest = None
            if digest is not None:
                # The HEAD digest is only a hint of what to fetch: _load checks the bytes.
                served = await self._load(route, digest)
        if served is None:
            fetched = await client.get_manifest(route.repo, tag, DEFAULT_ACCEPT)
            served = await self._store_manifest(Digest.of(fetched.raw), fetched.raw,
                                                fetched.media_type)
        entry = TagRow(served.digest, served.media_type, time.time())
        _bounded(self._tags)[key] = entry
        await self.index.put_tag(*key, served.digest, served.media_type, entry.checked_at)
        return served

    async def _forget_tag(self, key: tuple[str, str, str]) -> None:
        self._tags.pop(key, None)
        await self.index.delete_tag(*key)

    async def _has_manifest(self, digest: Digest) -> bool:
        """Is the manifest stored? A stat locally; the index row with a remote store (the
        row is written after the object, and _load still reads and checks the bytes)."""
        if self._local_store:
            return await self.store.has(digest)
        return await self.index.get_manifest(digest) is not None

    async def _has_blob(self, digest: Digest) -> int | None:
        """The stored blob's size, or None: a stat locally, the index row remotely."""
        if self._local_store:
            return await self.store.size(digest)
        try:
            return await self.index.blob_size(digest)
        except Unavailable:
            # The index database is down: committed blobs are still served where the store
            # answers (the gate already passed, from memory).
            return await self.store.size(digest)

    async def _load(self, route: Route, digest: Digest) -> ServedManifest:
        """Manifest bytes by digest: memory, store, else upstream (digest-checked)."""
        cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        row = await self.index.get_manifest(digest)
        raw = await self._read_stored(digest) if row is not None else None
        if row is not None and raw is not None:
            if Digest.of(raw) == digest:
                served = ServedManifest(raw, row.media_type, digest)
                self._manifests.put(served)
                return served
            log.error("store.corrupt", digest=str(digest))  # fsck will quarantine it
        return await self._served_flights.do(("manifest", route.upstream.name, digest),
                                      lambda: self._fetch_manifest(route, digest))

    async def _fetch_manifest(self, route: Route, digest: Digest) -> ServedManifest:
        # Offline the client raises ManifestUnknown at once: a digest not in the store.
        client = self.clients[route.upstream.name]
        fetched = await client.get_manifest(route.repo, str(digest), DEFAULT_ACCEPT)
        if Digest.of(fetched.raw) != digest:
            raise ManifestInvalid(f"upstream {route.upstream.name} sent a manifest that does "
                                  f"not match digest {digest}")
        return await self._store_manifest(digest, fetched.raw, fetched.media_type)

    async def _store_manifest(self, digest: Digest, raw: bytes, media_type: str | None
                              ) -> ServedManifest:
        manifest = parse_manifest(raw, media_type)  # malformed JSON is never cached
        if not await self.store.has(digest):
            await self.store.put_bytes(digest, raw)
            _count_stored(len(raw))
        refs = [d.digest for d in manifest.manifests] + manifest.blob_digests()
        await self.index.put_manifest(digest, manifest.media_type, len(raw), refs)
        # gc may have deleted the object between the check above and the row (its delete
        # holds put_manifest back until it is over, then the row goes in over nothing). From
        # the row on, gc keeps the object (a stored manifest is referenced): look once more.
        if not await self.store.has(digest):
            log.info("store.manifest_restored", digest=str(digest))
            await self.store.put_bytes(digest, raw)
            _count_stored(len(raw))
        if manifest.subject is not None:
            await self.index.add_referrer(manifest.subject.digest, digest)
        served = ServedManifest(raw, manifest.media_type, digest)
        self._manifests.put(served)
        return served

    async def _read_stored(self, digest: Digest) -> bytes | None:
        """A stored object's bytes (small: manifests, signatures), or None if absent."""
        try:
            return await self.store.read_bytes(digest)
        except BlobUnknown:
            return None

    async def _touch(self, digest: Digest) -> None:
        now = time.time()
        if now - self._touched.get(digest, 0.0) > 60:
            _bounded(self._touched)[digest] = now
            try:
                await self.index.touch(digest, now)
            except Unavailable as exc:
                # An access time is advice for gc: a manifest served from memory while the
                # index database is down must not fail for it.
                log.warning("index.touch_failed", digest=str(digest), error=str(exc))

    # ------------------------------------------------------------- the verdict
    async def _gate_manifest(self, route: Route, served: ServedManifest, reference: str) -> None:
        """Raise Denied unless this manifest may leave the mirror under the current policy."""
        expanded_key = (route.upstream.name, route.repo, served.digest, self.policy.fingerprint)
        if await self._is_allowed(route, served.digest):
            # Verified before, or a child / signature of a verified manifest: its own
            # references become servable too (once per process; the index keeps them).
            if expanded_key not in self._expanded:
                manifest = parse_manifest(served.raw, served.media_type)
                await self._allow(route, route.repo, self._servable_refs(manifest))
                _bounded(self._expanded).add(expanded_key)
            return
        manifest = parse_manifest(served.raw, served.media_type)
        subject_tag = _SUBJECT_TAG.match(reference)
        if subject_tag is not None:
            # A .sig/.att/tag-schema artifact: servable when its subject passed, so clients can
            # verify again through the mirror. It is not itself a subject of the policy, so it
            # must be inert: the tag name is only a hint, and a runnable image stored under
            # it must not leave the mirror unverified.
            if not await self._is_allowed(route, Digest(subject_tag.group(1))):
                raise Denied(f"{reference} belongs to a subject that has not been verified")
            if not await self._allow_artifact(route, route.repo, manifest):
                raise Denied(f"{reference} is not a signature or attestation artifact")
            return
        if (manifest.subject is not None
                and await self._is_allowed(route, manifest.subject.digest)
                and await self._allow_artifact(route, route.repo, manifest, index_ok=False)):
            return  # a referrer (signature, attestation, SBOM) of a verified subject
        verdict = await self._verdict(route, manifest)
        if not verdict.allowed:
            raise Denied(verdict.message or "denied by policy",
                         detail={"policy": verdict.to_json()})
        allows = [served.digest, *self._servable_refs(manifest)]
        await self._allow(route, route.repo, allows)
        _bounded(self._expanded).add(expanded_key)
        # The signatures and attestations the decision used become servable (inert ones).
        for repo, digest in verdict.related:
            row = await self.index.get_manifest(digest)
            raw = await self._read_stored(digest) if row is not None else None
            if row is None or raw is None:
                continue  # a blob: servable through its (inert) manifest
            await self._allow_artifact(route, repo, parse_manifest(raw, row.media_type))

    async def _allow_artifact(self, route: Route, repo: str, manifest: Manifest, *,
                        index_ok: bool = True) -> bool:
        """Make a signature/attestation artifact servable in ``repo`` if it is inert.

        An index (the ``sha256-<hex>`` tag schema) is only a list of descriptors: it is
        servable itself, its children are not (each must qualify on its own). An image
        manifest qualifies when none of its layers is a runnable image layer."""
        if manifest.is_index:
            if index_ok:
                await self._allow(route, repo, [manifest.digest])
            return index_ok
        if any(_RUNNABLE_LAYER.search(layer.media_type) for layer in manifest.layers):
            log.warning("artifact.not_inert", repo=repo, digest=str(manifest.digest))
            return False
        await self._allow(route, repo, [manifest.digest, *manifest.blob_digests()])
        return True


    @staticmethod
    def _servable_refs(manifest: Manifest) -> list[Digest]:
        return [d.digest for d in manifest.manifests] + manifest.blob_digests()

    async def _verdict(self, route: Route, manifest: Manifest) -> Any:
        # Cached per image as well as per policy: a policy decides by image name (its
        # ``images`` globs), so the same digest may pass in one repository and not in another.
        # Keyed by digest alone, an allow in one repository served the image in all of them.
        fingerprint = f"{self.policy.fingerprint} {route.image}"
        row = await self.index.get_verdict(manifest.digest, fingerprint, time.time())
        if row is not None:
            metrics.VERDICT_CACHE.labels("hit").inc()
            detail = json.loads(row.detail) if row.detail else {}
            return Verdict(allowed=bool(row.allowed), message=detail.get("message", ""),
                           reason=detail.get("reason", "cached"),
                           related=[(r, Digest.parse(d)) for r, d in detail.get("related", [])])
        metrics.VERDICT_CACHE.labels("miss").inc()

        async def evaluate() -> Any:
            verdict = await self.policy.evaluate(route.image, route.repo, manifest,
                                                 self.source(route))
            # A deny caused by the moment (upstream down, timeout) is not a decision to keep.
            if getattr(verdict, "cacheable", True):
                related = [(r, str(d)) for r, d in getattr(verdict, "related", [])]
                detail = json.dumps({"message": verdict.message, "reason": verdict.reason,
                                     "related": related})
                ttl = ALLOW_TTL if verdict.allowed else DENY_TTL
                await self.index.put_verdict(manifest.digest, fingerprint, bool(verdict.allowed),
                                       detail, time.time() + ttl)
            return verdict

        return await self._verdict_flights.do(("verdict", manifest.digest, fingerprint),
                                              evaluate)

    def source(self, route: Route) -> MirrorSource:
        """The artifact source verification reads signatures through (same cache, same
        digest checks, same upstream client)."""
        return MirrorSource(self, route)

    # ------------------------------------------------------------------- blobs
    async def blob(self, route: Route, digest: Digest) -> CachedBlob | Download:
        """A cached blob, or the (possibly shared) download of it. Enforces the blob gate."""
        if not await self._is_allowed(route, digest):
            raise BlobUnknown(f"blob {digest} is not referenced by a verified manifest of "
                              f"{route.client_name}")
        size = await self._has_blob(digest)
        if size is not None:
            metrics.CACHE.labels("blob", "hit").inc()
            return CachedBlob(self.store.local_path(digest), digest, size)
        metrics.CACHE.labels("blob", "miss").inc()
        if self.offline:
            # Allowed (a verified manifest names it) but never imported: not found at once,
            # rather than a download that could only fail.
            metrics.OFFLINE_MISSES.labels(route.upstream.name, "blob").inc()
            raise BlobUnknown(f"blob {digest} of {route.client_name} is not in the store "
                              "(sigil serves offline)")
        client = self.clients[route.upstream.name]
        download, _ = self.downloads.get_or_start(
            digest, lambda: client.open_blob(route.repo, digest),
            self._blob_committed)
        return download

    async def _blob_committed(self, digest: Digest, size: int) -> None:
        await self.index.put_blob(digest, size)
        _count_stored(size)

    # ------------------------------------------------------- tags and referrers
    async def tags(self, route: Route, n: int | None, last: str | None
                   ) -> tuple[dict[str, Any], str | None]:
        """The upstream tag list (tags are hints, not verified content); offline, the tags
        the index holds for the repository."""
        if self.offline:
            return await self._stored_tags(route, n, last)
        client = self.clients[route.upstream.name]
        body, next_link = await client.get_tags(route.repo, n, last)
        try:
            data = json.loads(body)
            tags = data.get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError("tags must be a list of strings")
        except (ValueError, AttributeError) as exc:
            raise ManifestInvalid(f"upstream {route.upstream.name} sent a malformed tag list"
                                  ) from exc
        next_last = None
        if next_link:
            match = re.search(r"[?&]last=([^&>]+)", next_link)
            next_last = match.group(1) if match else None
        return {"name": route.client_name, "tags": tags}, next_last

    async def _stored_tags(self, route: Route, n: int | None, last: str | None
                     ) -> tuple[dict[str, Any], str | None]:
        """The offline tag list: stored tags in lexical order, paginated like distribution
        (``last`` excludes up to that tag, ``n`` bounds the page; a next page is signalled)."""
        upstream = route.upstream.name
        # One page from the index (one more tag than asked tells whether a next page exists).
        tags = await self.index.list_tags(upstream, route.repo, last=last,
                                          limit=None if n is None else n + 1)
        if not tags and (last is None or not await self.index.list_tags(
                upstream, route.repo, limit=1)):
            raise NameUnknown(f"repository {route.client_name} is not in the store (sigil "
                              "serves offline)")
        next_last = None
        if n is not None and len(tags) > n:
            tags = tags[:n]
            next_last = tags[-1]
        return {"name": route.client_name, "tags": tags}, next_last

    async def stored_referrers(self, digest: Digest) -> Manifest | None:
        """The referrers index of ``digest`` built from the index's referrer links (offline,
        in place of the upstream API): every stored manifest whose ``subject`` names it. None
        when there is none, like an upstream without the API, so callers fall back to the
        ``sha256-<hex>`` tag schema (which may be stored too). Each entry is still checked
        against its own bytes by whoever reads it: this list is a hint like any other."""
        entries = []
        for referrer in (await self.index.get_referrers(digest))[:MAX_REFERRERS]:
            row = await self.index.get_manifest(referrer)
            if row is not None and await self._has_manifest(referrer):
                entries.append({"mediaType": row.media_type, "digest": str(referrer),
                                "size": row.size})
        if not entries:
            return None
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        return parse_manifest(body.encode(), OCI_INDEX)

    async def referrers(self, route: Route, digest: Digest, artifact_type: str | None
                        ) -> dict[str, Any]:
        """OCI 1.1 referrers of a verified subject, from the upstream API or the tag schema.

        Each listed referrer is checked to really name this subject before it is listed and
        made servable: the upstream's list is only a hint."""
        if not await self._is_allowed(route, digest):
            raise Denied(f"referrers are served only for verified subjects; {digest} is not "
                         f"verified in {route.client_name}")
        index = await self.source(route).get_referrers(route.repo, digest)
        if index is None:
            index = await self.source(route).get_manifest(route.repo, digest.tag_form)
        descriptors = []
        for descriptor in (index.manifests if index is not None else ())[:MAX_REFERRERS]:
            try:
                referrer = await self._load(route, descriptor.digest)
            except RegistryError:
                continue
            parsed = parse_manifest(referrer.raw, referrer.media_type)
            if parsed.subject is None or parsed.subject.digest != digest:
                continue
            kind = parsed.artifact_type or (parsed.config.media_type if parsed.config else None)
            if artifact_type and kind != artifact_type:
                continue
            if not await self._allow_artifact(route, route.repo, parsed, index_ok=False):
                continue
            entry = {"mediaType": referrer.media_type, "digest": str(descriptor.digest),
                     "size": len(referrer.raw)}
            if kind:
                entry["artifactType"] = kind
            if parsed.annotations:
                entry["annotations"] = parsed.annotations
            descriptors.append(entry)
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}


class MirrorSource:
    """:class:`sigil.verify.discovery.ArtifactSource` over the mirror's cache and upstream."""

    def __init__(self, mirror: Mirror, route: Route) -> None:
        self._mirror = mirror
        self._route = route

    def _route_for(self, repo: str) -> Route:
        return Route(self._route.upstream, repo, repo)

    async def get_manifest(self, repo: str, reference: str) -> Manifest | None:
        route = self._route_for(repo)
        try:
            if Digest.is_digest(reference):
                served = await self._mirror._load(route, Digest.parse(reference))
            else:
                served = await self._mirror._resolve_tag(route, validate_tag(reference))
        except ManifestUnknown:
            return None
        return parse_manifest(served.raw, served.media_type)

    async def get_blob(self, repo: str, digest: Digest, max_bytes: int) -> bytes:
        store = self._mirror.store
        size = await self._mirror._has_blob(digest)
        if size is not None:
            if size > max_bytes:
                raise ManifestInvalid(f"blob {digest} exceeds {max_bytes} bytes")
            data = await self._mirror._read_stored(digest)
            if data is not None and Digest.of(data) == digest:
                return data
        # Offline the client raises BlobUnknown at once: discovery records it and the
        # verdict fails closed (a deny that is not cached, so a later import can fix it).
        client = self._mirror.clients[self._route.upstream.name]
        data = await client.get_blob_bytes(repo, digest, max_bytes)
        await store.put_bytes(digest, data)
        await self._mirror._blob_committed(digest, len(data))
        return data

    async def get_referrers(self, repo: str, digest: Digest) -> Manifest | None:
        if self._mirror.offline:
            return await self._mirror.stored_referrers(digest)
        client = self._mirror.clients[self._route.upstream.name]
        body = await client.get_referrers(repo, digest, None)
        if body is None:
            return None
        return parse_manifest(body, OCI_INDEX)
