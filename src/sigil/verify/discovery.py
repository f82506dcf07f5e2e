"""Finding the signatures and attestations of a manifest (DESIGN.md "Verification").

Discovery only *collects bytes*; it decides nothing. Everything it reads (tags, referrer
``artifactType``, layer annotations, media types) is an unsigned hint that chooses what to try;
the engine decides on signed content only. Where it looks, for ``sha256:<hex>`` in ``repo``:

1. legacy cosign tags ``sha256-<hex>.sig`` and ``sha256-<hex>.att``
   (cosign ``pkg/oci/remote``: ``SignatureTag`` / ``AttestationTag``);
2. OCI 1.1 referrers (distribution-spec "Listing Referrers"), or, when the API is absent,
   the referrers tag schema ``sha256-<hex>`` (distribution-spec "Referrers Tag Schema").
   Every referrer's own ``subject`` must name the digest, else it is ignored. Attestation
   referrers (Docker Hardened Images: ``artifactType application/vnd.in-toto+json``) get
   their own signature discovery one level down, since their signature is a referrer of the
   attestation manifest;
3. for an index, BuildKit attestation manifests inside it
   (``vnd.docker.reference.type: attestation-manifest``) and the image children with their
   own referrers (needed when a policy requires attestations);
4. the same in a policy's ``signatureRepository`` (cosign ``COSIGN_REPOSITORY``).

Everything is capped by :class:`sigil.verify.policy.Limits` (manifest count, blob size, total
bytes); the engine bounds the time.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sigil.errors import DigestInvalid, ManifestInvalid, SigilError
from sigil.oci.digest import Digest
from sigil.oci.manifest import IMAGE_TYPES, Manifest
from sigil.verify.authority import IN_TOTO, SIMPLE_SIGNING
from sigil.verify.dsse import ENVELOPE_MEDIA_TYPE
from sigil.verify.policy import Limits

COSIGN_SIG_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
BUNDLE_MEDIA_TYPES = frozenset({
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
})
# Layer media types whose blobs are worth fetching; anything else is never interpreted.
KNOWN_LAYER_TYPES = frozenset({SIMPLE_SIGNING, ENVELOPE_MEDIA_TYPE, IN_TOTO}) | BUNDLE_MEDIA_TYPES
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"

T = TypeVar("T")


class ArtifactSource(Protocol):
    """What discovery needs from the mirror (implemented over the store + upstream client)."""

    async def get_manifest(self, repo: str, reference: str) -> Manifest | None:
        """The manifest for a tag or digest, or None when the registry answers 404."""
        ...

    async def get_blob(self, repo: str, digest: Digest, max_bytes: int) -> bytes:
        """A blob, at most ``max_bytes``, sha256-checked by the source."""
        ...

    async def get_referrers(self, repo: str, digest: Digest) -> Manifest | None:
        """The OCI 1.1 referrers index, or None when the referrers API is absent (404)."""
        ...


@dataclass
class Artifact:
    """A signature or attestation manifest found for a subject, with its fetched layer blobs."""

    repo: str
    manifest: Manifest
    via: str                                        # "tag .sig", "referrers", "index", ...
    blobs: dict[Digest, bytes] = field(default_factory=dict)
    signatures: list[Artifact] = field(default_factory=list)  # referrers of this manifest

    def related(self) -> list[tuple[str, Digest]]:
        """(repo, digest) of this manifest, its config and every layer."""
        return [(self.repo, self.manifest.digest)] + [(self.repo, d)
                                                      for d in self.manifest.blob_digests()]


@dataclass
class Discovery:
    """Everything found for one subject manifest."""

    repo: str
    subject: Manifest
    artifacts: list[Artifact] = field(default_factory=list)
    # BuildKit in-index attestation manifests, keyed by the platform manifest they describe.
    index_attestations: dict[Digest, list[Artifact]] = field(default_factory=dict)
    # Image children of an index (present when children were requested).
    children: dict[Digest, Discovery] = field(default_factory=dict)
    children_complete: bool = True
    related: list[tuple[str, Digest]] = field(default_factory=list)  # tag-schema indexes
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # fetches that failed (availability)
    capped: list[str] = field(default_factory=list)  # caps that stopped discovery


class Discoverer:
    """One discovery run with its budget; create one per decision."""

    def __init__(self, source: ArtifactSource, limits: Limits) -> None:
        self.source = source
        self.limits = limits
        self._manifests = 0
        self._bytes = 0

    async def discover(self, repo: str, subject: Manifest, *, extra_repos: Iterable[str] = (),
                       children: bool = False) -> Discovery:
        """Collect the signatures/attestations of ``subject`` (and of its image children when
        ``children`` and it is an index)."""
        disc = Discovery(repo=repo, subject=subject)
        repos = [repo] + [r for r in dict.fromkeys(extra_repos) if r != repo]
        for r in repos:
            disc.artifacts.extend(await self._attached(disc, r, subject.digest, depth=0))
        if subject.is_index:
            await self._index(disc, repo, subject, repos, children)
        return disc

    # --- fetching with budget ---------------------------------------------------------------

    async def _guard(self, disc: Discovery, what: str,
                     call: Callable[[], Awaitable[T]]) -> T | None:
        """Run one fetch; malformed content is skipped, availability failures recorded."""
        try:
            return await call()
        except (ManifestInvalid, DigestInvalid) as exc:
            disc.notes.append(f"{what}: skipped, {exc}")
        except SigilError as exc:
            disc.errors.append(f"{what}: {exc}")
        return None

    async def _manifest(self, disc: Discovery, repo: str, reference: str,
                        expect: Digest | None = None) -> Manifest | None:
        if self._manifests >= self.limits.max_artifacts:
            if f"cap reached: more than {self.limits.max_artifacts} manifests" not in disc.capped:
                disc.capped.append(f"cap reached: more than {self.limits.max_artifacts} manifests")
            return None
        self._manifests += 1
        found = await self._guard(disc, f"{repo}:{reference}",
                                  lambda: self.source.get_manifest(repo, reference))
        if found is not None and expect is not None and found.digest != expect:
            disc.notes.append(f"{repo}@{expect}: source returned other bytes, ignored")
            return None
        return found

    async def _blobs(self, disc: Discovery, artifact: Artifact) -> None:
        for layer in artifact.manifest.layers:
            base_type = layer.media_type
            if base_type not in KNOWN_LAYER_TYPES or layer.digest in artifact.blobs:
                continue
            if layer.size > self.limits.max_blob_bytes:
                disc.notes.append(f"{artifact.repo}@{layer.digest}: layer of {layer.size} bytes "
                                  f"over the {self.limits.max_blob_bytes}-byte cap, skipped")
                continue
            if self._bytes + layer.size > self.limits.max_total_bytes:
                disc.capped.append(f"cap reached: more than {self.limits.max_total_bytes} bytes")
                return
            self._bytes += layer.size
            blob = await self._guard(disc, f"{artifact.repo}@{layer.digest}",
                                     functools.partial(self.source.get_blob, artifact.repo,
                                                       layer.digest, self.limits.max_blob_bytes))
            if blob is None:
                continue
            # Defence in depth: the source checks sha256, so do we (content addressing is
            # what links a signed manifest to these bytes).
            if Digest.of(blob) != layer.digest:
                disc.notes.append(f"{artifact.repo}@{layer.digest}: blob digest mismatch, ignored")
                continue
            artifact.blobs[layer.digest] = blob

    # --- where to look --------------------------------------------------------------------

    async def _attached(self, disc: Discovery, repo: str, digest: Digest,
                        depth: int) -> list[Artifact]:
        """Artifacts attached to ``digest`` in ``repo``: cosign tags and referrers."""
        found: list[Artifact] = []
        suffixes = (".sig", ".att") if depth == 0 else (".sig",)
        tagged = await asyncio.gather(*(self._manifest(disc, repo, digest.tag_form + s)
                                        for s in suffixes))
        for suffix, m in zip(suffixes, tagged, strict=False):
            if m is None:
                continue
            if m.media_type not in IMAGE_TYPES:
                disc.notes.append(f"{repo}:{digest.tag_form}{suffix} is not an image manifest")
                continue
            found.append(Artifact(repo=repo, manifest=m, via=f"tag {suffix}"))
            disc.notes.append(f"found {repo}:{digest.tag_form}{suffix} ({m.digest})")

        index = await self._guard(disc, f"referrers of {repo}@{digest}",
                                  lambda: self.source.get_referrers(repo, digest))
        via = "referrers"
        if index is None:
            # distribution-spec: when the referrers API answers 404, clients use the tag schema.
            index = await self._manifest(disc, repo, digest.tag_form)
            via = "referrers tag schema"
            if index is not None:
                if not index.is_index:
                    disc.notes.append(f"{repo}:{digest.tag_form} is not an index, ignored")
                    index = None
                else:
                    disc.related.append((repo, index.digest))
        if index is not None:
            disc.notes.append(f"{via} of {digest} in {repo}: {len(index.manifests)} entries")
            for desc in index.manifests:
                m = await self._manifest(disc, repo, str(desc.digest), expect=desc.digest)
                if m is None:
                    continue
                # The referrer's own subject is inside its (possibly signed) bytes; a referrers
                # list is just a hint and may be wrong or hostile.
                if m.subject is None or m.subject.digest != digest:
                    disc.notes.append(f"referrer {m.digest} does not name {digest} as subject, "
                                      f"ignored")
                    continue
                if m.media_type not in IMAGE_TYPES:
                    disc.notes.append(f"referrer {m.digest} is not an image manifest, ignored")
                    continue
                found.append(Artifact(repo=repo, manifest=m, via=via))
        for artifact in found:
            await self._blobs(disc, artifact)
        if depth == 0:
            for artifact in found:
                if _may_carry_raw_statements(artifact.manifest):
                    # DHI: an attestation manifest is signed by its own signature referrer.
                    artifact.signatures = await self._attached(disc, repo,
                                                               artifact.manifest.digest, depth=1)
        return found

    async def _index(self, disc: Discovery, repo: str, index: Manifest, repos: list[str],
                     children: bool) -> None:
        images = []
        for desc in index.manifests:
            if desc.annotations.get(REFERENCE_TYPE) == ATTESTATION_MANIFEST:
                # BuildKit attestation manifest; authenticated only by the index signature.
                try:
                    target = Digest.parse(desc.annotations.get(REFERENCE_DIGEST, ""))
                except DigestInvalid:
                    disc.notes.append(f"attestation manifest {desc.digest}: bad "
                                      f"{REFERENCE_DIGEST}, ignored")
                    continue
                if not children:
                    continue
                m = await self._manifest(disc, repo, str(desc.digest), expect=desc.digest)
                if m is None or m.media_type not in IMAGE_TYPES:
                    continue
                art = Artifact(repo=repo, manifest=m, via="index attestation")
                await self._blobs(disc, art)
                disc.index_attestations.setdefault(target, []).append(art)
            elif desc.media_type in IMAGE_TYPES:
                images.append(desc)
        if not children:
            return
        if len(images) > self.limits.max_children:
            disc.children_complete = False
            disc.capped.append(f"cap reached: index has {len(images)} image children, more "
                               f"than {self.limits.max_children}")
            return
        for desc in images:
            m = await self._manifest(disc, repo, str(desc.digest), expect=desc.digest)
            if m is None:
                disc.children_complete = False
                disc.errors.append(f"child {desc.digest} could not be fetched")
                continue
            child = Discovery(repo=repo, subject=m)
            for r in repos:
                child.artifacts.extend(await self._attached(child, r, m.digest, depth=0))
            disc.children[desc.digest] = child
            disc.notes.extend(f"child {desc.digest}: {n}" for n in child.notes)
            disc.errors.extend(f"child {desc.digest}: {e}" for e in child.errors)
            disc.capped.extend(c for c in child.capped if c not in disc.capped)
            disc.related.extend(child.related)


def _may_carry_raw_statements(manifest: Manifest) -> bool:
    """Hint only: does this referrer look like an attestation manifest whose layers are
    authenticated by a signature on the manifest (rather than by their own DSSE signature)?"""
    return manifest.artifact_type == IN_TOTO or any(layer.media_type == IN_TOTO
                                                     for layer in manifest.layers)
