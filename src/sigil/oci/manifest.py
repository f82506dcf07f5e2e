"""Media types and manifest / index parsing.

sigil serves upstream manifest bytes untouched; this module only reads them to learn what they
reference (children of an index, config and layer blobs of an image, the ``subject``), with
limits on size and nesting so that hostile JSON cannot exhaust the mirror.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sigil.errors import ManifestInvalid
from sigil.oci.digest import Digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
# What sigil asks upstream for when the client's Accept is absent or too narrow.
DEFAULT_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"

# distribution refuses manifests over 4 MiB (its default manifest size limit); so do we.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor (the fields sigil uses)."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Parse a descriptor object; raise :class:`ManifestInvalid` when malformed."""
        if not isinstance(obj, dict):
            raise ManifestInvalid("descriptor is not an object")
        media_type = obj.get("mediaType")
        size = obj.get("size")
        digest = obj.get("digest")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise ManifestInvalid("descriptor lacks mediaType or digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid("descriptor has an invalid size")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ManifestInvalid("descriptor annotations must map strings to strings")
        platform = obj.get("platform")
        artifact_type = obj.get("artifactType")
        return cls(
            media_type=media_type,
            digest=Digest.parse(digest),
            size=size,
            annotations=annotations,
            platform=platform if isinstance(platform, dict) else None,
            artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a JSON object (for referrers indexes sigil builds)."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                               "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = self.platform
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed image manifest or index. ``raw`` is exactly the bytes that were digested."""

    raw: bytes
    digest: Digest
    media_type: str
    manifests: tuple[Descriptor, ...] = ()  # index children
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def blob_digests(self) -> list[Digest]:
        """Config and layer digests (what an image manifest makes servable)."""
        out = [d.digest for d in self.layers]
        if self.config is not None:
            out.insert(0, self.config.digest)
        return out


def _depth(obj: Any, limit: int) -> int:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def load_json(raw: bytes | str, *, what: str = "manifest", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode bounded JSON; raise :class:`ManifestInvalid` on anything malformed."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ManifestInvalid(f"{what} is not valid JSON") from exc
    if _depth(obj, max_depth) > max_depth:
        raise ManifestInvalid(f"{what} JSON is nested too deeply")
    return obj


def parse_manifest(raw: bytes, media_type: str | None = None) -> Manifest:
    """Parse manifest bytes. ``media_type`` is the upstream Content-Type; the body's own
    ``mediaType`` wins when present, and the two must not disagree."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest exceeds {MAX_MANIFEST_BYTES} bytes")
    obj = load_json(raw)
    if not isinstance(obj, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    body_type = obj.get("mediaType")
    header_type = (media_type or "").split(";")[0].strip() or None
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid("manifest mediaType is not a string")
    if body_type and header_type and body_type != header_type and header_type in MANIFEST_TYPES:
        raise ManifestInvalid(f"manifest mediaType {body_type!r} contradicts {header_type!r}")
    kind = body_type or header_type
    if kind is None:
        # OCI allows mediaType to be omitted; infer from structure.
        kind = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if kind not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {kind!r}")
    if obj.get("schemaVersion") != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestInvalid("manifest annotations must be an object")
    subject = Descriptor.from_json(obj["subject"]) if obj.get("subject") is not None else None
    artifact_type = obj.get("artifactType") if isinstance(obj.get("artifactType"), str) else None
    digest = Digest.of(raw)
    if kind in INDEX_TYPES:
        children = obj.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid("index lacks a manifests list")
        return Manifest(raw=raw, digest=digest, media_type=kind,
                        manifests=tuple(Descriptor.from_json(c) for c in children),
                        subject=subject, artifact_type=artifact_type, annotations=annotations)
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ManifestInvalid("image manifest lacks a layers list")
    return Manifest(raw=raw, digest=digest, media_type=kind,
                    config=Descriptor.from_json(obj.get("config")),
                    layers=tuple(Descriptor.from_json(layer) for layer in layers),
                    subject=subject, artifact_type=artifact_type, annotations=annotations)
