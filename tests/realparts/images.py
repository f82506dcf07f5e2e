"""Build OCI / Docker images and artifacts and push them through the registry HTTP API.

Content is built by small pure functions (:func:`make_tar_layer`, :func:`image_config`,
:func:`image_manifest`, :func:`index_manifest`, ...) and pushed by :class:`RegistryPusher`
(aiohttp, monolithic uploads: ``POST /v2/<name>/blobs/uploads/`` then ``PUT <location>?digest=``).

Registries do not look inside layers, so random bytes are fine for upstream/mirror tests;
clients that unpack (podman, containerd) need real layers, which is what :func:`make_tar_layer`
builds and what :meth:`RegistryPusher.make_image` uses by default.

Distribution 2.8 has no referrers API: :meth:`RegistryPusher.push_tag_schema_referrer` pushes an
OCI 1.1 artifact manifest with a ``subject`` and rebuilds the ``sha256-<hex>`` tag-schema index
(OCI distribution spec 1.1, "Referrers Tag Schema").
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self
from urllib.parse import quote, urljoin

import aiohttp
import yarl

# -- media types ---------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"

#: Every manifest type; distribution 2.8 answers 404 for an OCI manifest or index unless the
#: Accept header names its type, so always send all of them.
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)

#: The OCI 1.1 empty JSON blob, the config of artifacts.
EMPTY_JSON = b"{}"

Media = Literal["oci", "docker"]

_FLAVOURS: dict[str, dict[str, str]] = {
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG,
            "layer": OCI_LAYER_GZIP},
    "docker": {"manifest": DOCKER_MANIFEST, "index": DOCKER_LIST, "config": DOCKER_CONFIG,
               "layer": DOCKER_LAYER_GZIP},
}


# -- pure builders -------------------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(size: int, *, seed: int | str | None = None) -> bytes:
    """``size`` random bytes: reproducible for a given ``seed``, from ``os.urandom`` without."""
    if seed is None:
        return os.urandom(size)
    return random.Random(seed).randbytes(size)


def make_tar_layer(files: Mapping[str, bytes], *, mode: int = 0o644) -> bytes:
    """A real gzip-compressed tar of regular ``files`` (path -> content), byte-for-byte stable.

    Parent directories are added, owners are root and mtimes 0, so the same files always
    give the same digest. Clients that unpack (podman, containerd) accept it as a layer.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent not in dirs:
                    dirs.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode = len(files[path]), mode
            tar.addfile(info, io.BytesIO(files[path]))
    return gzip.compress(raw.getvalue(), mtime=0)


def diff_id(layer: bytes) -> str:
    """The config ``rootfs.diff_ids`` entry: digest of the uncompressed layer.

    Bytes that are not gzip (random test layers) are taken as already uncompressed.
    """
    if layer[:2] == b"\x1f\x8b":
        try:
            return sha256_digest(gzip.decompress(layer))
        except (OSError, EOFError):
            pass
    return sha256_digest(layer)


def parse_platform(platform: str) -> dict[str, str]:
    """``"linux/arm64/v8"`` -> ``{"os": "linux", "architecture": "arm64", "variant": "v8"}``."""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not {platform!r}")
    result = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        result["variant"] = parts[2]
    return result


def descriptor(
    media_type: str,
    data: bytes,
    *,
    annotations: Mapping[str, str] | None = None,
    platform: str | None = None,
    artifact_type: str | None = None,
) -> dict[str, Any]:
    """An OCI content descriptor for ``data``."""
    desc: dict[str, Any] = {"mediaType": media_type, "digest": sha256_digest(data),
                            "size": len(data)}
    if artifact_type is not None:
        desc["artifactType"] = artifact_type
    if platform is not None:
        desc["platform"] = parse_platform(platform)
    if annotations:
        desc["annotations"] = dict(annotations)
    return desc


def image_config(platform: str, diff_ids: Sequence[str], **extra: Any) -> bytes:
    """An image config JSON (``architecture``, ``os``, ``rootfs``) for ``platform``."""
    config: dict[str, Any] = {
        **parse_platform(platform),
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["/hello"], "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "sigil realparts"}
                    for _ in diff_ids],
    }
    config.update(extra)
    return _json(config)


def image_manifest(
    config: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    *,
    media: Media = "oci",
    subject: Mapping[str, Any] | None = None,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Image manifest bytes (OCI or Docker schema 2) from config and layer descriptors."""
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": _FLAVOURS[media]["manifest"]}
    if artifact_type is not None:
        manifest["artifactType"] = artifact_type
    manifest["config"] = dict(config)
    manifest["layers"] = [dict(layer) for layer in layers]
    if subject is not None:
        manifest["subject"] = dict(subject)
    if annotations:
        manifest["annotations"] = dict(annotations)
    return _json(manifest)


def index_manifest(
    manifests: Sequence[Mapping[str, Any]],
    *,
    media: Media = "oci",
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Image index (OCI) or manifest list (Docker) bytes from child descriptors."""
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": _FLAVOURS[media]["index"],
        "manifests": [dict(m) for m in manifests],
    }
    if annotations:
        index["annotations"] = dict(annotations)
    return _json(index)


def tag_schema_tag(subject_digest: str) -> str:
    """The referrers tag-schema tag for a digest: ``sha256:<hex>`` -> ``sha256-<hex>``."""
    algorithm, _, hexpart = subject_digest.partition(":")
    if not hexpart:
        raise ValueError(f"not a digest: {subject_digest!r}")
    return f"{algorithm}-{hexpart}"


def cosign_tag(subject_digest: str, suffix: str = "sig") -> str:
    """A legacy cosign tag: ``sha256-<hex>.sig`` (or ``.att``, ``.sbom``)."""
    return f"{tag_schema_tag(subject_digest)}.{suffix}"


def simple_signing_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The cosign simple-signing payload that a legacy ``.sig`` layer signs."""
    return _json({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    })


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- results -------------------------------------------------------------------------------------


class Pushed(NamedTuple):
    """A manifest now in the registry: unpacks as ``(digest, manifest, blobs)``.

    ``blobs`` are the blob digests it needs: config first, then layers; for an index, the
    blobs of all its children that the same pusher pushed.
    """

    digest: str
    manifest: bytes
    blobs: tuple[str, ...]

    @property
    def media_type(self) -> str:
        """The ``mediaType`` field of the manifest."""
        media_type: str = json.loads(self.manifest)["mediaType"]
        return media_type

    @property
    def size(self) -> int:
        """Length of the manifest in bytes."""
        return len(self.manifest)

    @property
    def parsed(self) -> dict[str, Any]:
        """The manifest as JSON."""
        parsed: dict[str, Any] = json.loads(self.manifest)
        return parsed

    @property
    def children(self) -> tuple[str, ...]:
        """Child manifest digests of an index (empty for an image manifest)."""
        return tuple(m["digest"] for m in self.parsed.get("manifests", ()))

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """A descriptor of this manifest, e.g. for an index entry or an artifact's subject."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class MultiPlatform:
    """An index and its per-platform children (platform string -> child)."""

    index: Pushed
    children: dict[str, Pushed]


@dataclass(frozen=True)
class Layer:
    """A blob to put in a manifest's ``layers``: its bytes, media type and annotations."""

    data: bytes
    media_type: str = OCI_LAYER_GZIP
    annotations: Mapping[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        """The descriptor of this layer."""
        return descriptor(self.media_type, self.data, annotations=self.annotations)


class PushError(RuntimeError):
    """The registry answered a push or fetch with an unexpected status."""


# -- the pusher ----------------------------------------------------------------------------------


class RegistryPusher:
    """Pushes blobs and manifests to one registry (``base_url`` like ``http://127.0.0.1:5000``).

    Use as ``async with RegistryPusher(registry.url) as pusher: ...``. No proxy is used
    (``trust_env=False``) and every request is bounded by ``timeout`` seconds.
    """

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._platforms: dict[str, str] = {}  # manifest digest -> platform, for make_index

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open aiohttp session (only inside ``async with``)."""
        if self._session is None:
            raise RuntimeError("use RegistryPusher inside 'async with'")
        return self._session

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v2/{path}"

    # -- blobs ---------------------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """``HEAD /v2/<repo>/blobs/<digest>`` answered 200."""
        async with self.session.head(self._url(f"{repo}/blobs/{digest}")) as resp:
            return resp.status == 200

    async def push_blob(self, repo: str, data: bytes, *, skip_existing: bool = True) -> str:
        """Upload ``data`` to ``repo`` in one PUT and return its digest."""
        digest = sha256_digest(data)
        if skip_existing and await self.blob_exists(repo, digest):
            return digest
        async with self.session.post(self._url(f"{repo}/blobs/uploads/")) as resp:
            await _expect(resp, 202, f"start upload to {repo}")
            location = resp.headers["Location"]
        location = urljoin(self.base_url + "/", location)
        separator = "&" if "?" in location else "?"
        target = yarl.URL(f"{location}{separator}digest={quote(digest)}", encoded=True)
        async with self.session.put(
            target,
            # A file object above 1 MiB: aiohttp warns (an error here) about large raw bodies.
            data=io.BytesIO(data) if len(data) > 1024 * 1024 else data,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(len(data))},
        ) as resp:
            await _expect(resp, 201, f"upload {digest} to {repo}")
            returned = resp.headers.get("Docker-Content-Digest")
        if returned not in (None, digest):
            raise PushError(f"registry stored {returned} for blob {digest}")
        return digest

    async def get_blob(self, repo: str, digest: str) -> bytes | None:
        """The blob's bytes, or ``None`` on 404."""
        async with self.session.get(self._url(f"{repo}/blobs/{digest}")) as resp:
            if resp.status == 404:
                return None
            await _expect(resp, 200, f"get blob {repo}@{digest}")
            return await resp.read()

    async def delete_blob(self, repo: str, digest: str) -> None:
        """``DELETE /v2/<repo>/blobs/<digest>`` (the registry has delete enabled)."""
        async with self.session.delete(self._url(f"{repo}/blobs/{digest}")) as resp:
            await _expect(resp, 202, f"delete blob {repo}@{digest}")

    # -- manifests -----------------------------------------------------------------------------

    async def push_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """PUT manifest ``data`` under ``ref`` (a tag or its digest) and return its digest."""
        digest = sha256_digest(data)
        async with self.session.put(
            self._url(f"{repo}/manifests/{ref}"), data=data,
            headers={"Content-Type": media_type},
        ) as resp:
            await _expect(resp, 201, f"put manifest {repo}:{ref}")
            returned = resp.headers.get("Docker-Content-Digest")
        if returned not in (None, digest):
            raise PushError(f"registry computed {returned} for manifest {digest}")
        return digest

    async def get_manifest(
        self, repo: str, ref: str, *, accept: str = MANIFEST_ACCEPT
    ) -> tuple[bytes, str, str] | None:
        """``(bytes, media type, Docker-Content-Digest)`` of a manifest, or ``None`` on 404."""
        async with self.session.get(
            self._url(f"{repo}/manifests/{ref}"), headers={"Accept": accept}
        ) as resp:
            if resp.status == 404:
                return None
            await _expect(resp, 200, f"get manifest {repo}:{ref}")
            body = await resp.read()
            return body, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]

    async def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest by digest (2.8 cannot delete a tag alone)."""
        async with self.session.delete(self._url(f"{repo}/manifests/{digest}")) as resp:
            await _expect(resp, 202, f"delete manifest {repo}@{digest}")

    async def list_tags(self, repo: str) -> list[str]:
        """The repository's tags (empty if it does not exist)."""
        async with self.session.get(self._url(f"{repo}/tags/list")) as resp:
            if resp.status == 404:
                return []
            await _expect(resp, 200, f"list tags of {repo}")
            tags: list[str] | None = (await resp.json())["tags"]
            return tags or []

    # -- images --------------------------------------------------------------------------------

    async def make_image(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[bytes] | None = None,
        *,
        platform: str | None = None,
        media: Media = "oci",
        annotations: Mapping[str, str] | None = None,
    ) -> Pushed:
        """Push a single-platform image: layers, config, then the manifest under ``tag``.

        ``layers`` defaults to one real tar layer with a unique file, so clients can unpack
        it. ``tag=None`` pushes by digest only (an index child). ``platform`` defaults to
        ``linux/amd64``.
        """
        platform = platform or "linux/amd64"
        if layers is None:
            layers = [make_tar_layer({"hello": f"{repo} {tag} {platform} ".encode()
                                      + random_bytes(16).hex().encode()})]
        flavour = _FLAVOURS[media]
        config = image_config(platform, [diff_id(layer) for layer in layers])
        await asyncio.gather(*(self.push_blob(repo, blob) for blob in (config, *layers)))
        manifest = image_manifest(
            descriptor(flavour["config"], config),
            [descriptor(flavour["layer"], layer) for layer in layers],
            media=media, annotations=annotations,
        )
        digest = await self.push_manifest(repo, tag or sha256_digest(manifest), manifest,
                                          flavour["manifest"])
        self._platforms[digest] = platform
        blobs = tuple(dict.fromkeys(sha256_digest(b) for b in (config, *layers)))
        return Pushed(digest, manifest, blobs)

    async def make_index(
        self,
        repo: str,
        tag: str | None,
        children: Sequence[Pushed | tuple[Pushed, str]],
        *,
        media: Media = "oci",
        annotations: Mapping[str, str] | None = None,
    ) -> Pushed:
        """Push an index (OCI) or manifest list (Docker) of already pushed ``children``.

        A child is a :class:`Pushed` made by this pusher (its platform is remembered) or a
        ``(pushed, "os/arch[/variant]")`` pair.
        """
        entries: list[dict[str, Any]] = []
        blobs: list[str] = []
        for child in children:
            if isinstance(child, Pushed):
                pushed, platform = child, self._platforms[child.digest]
            else:
                pushed, platform = child
            entries.append(pushed.descriptor(platform=parse_platform(platform)))
            blobs.extend(pushed.blobs)
        manifest = index_manifest(entries, media=media, annotations=annotations)
        digest = await self.push_manifest(repo, tag or sha256_digest(manifest), manifest,
                                          _FLAVOURS[media]["index"])
        return Pushed(digest, manifest, tuple(dict.fromkeys(blobs)))

    async def make_multiplatform_image(
        self,
        repo: str,
        tag: str,
        platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
        *,
        media: Media = "oci",
        layer_size: int | None = None,
    ) -> MultiPlatform:
        """Push one child image per platform (by digest) and an index of them under ``tag``.

        Each child gets its own layer: a real tar by default, ``layer_size`` random bytes if
        given (fine for registries, not for clients that unpack).
        """
        children: dict[str, Pushed] = {}
        for platform in platforms:
            layers = None if layer_size is None else [random_bytes(layer_size)]
            children[platform] = await self.make_image(
                repo, None, layers, platform=platform, media=media
            )
        index = await self.make_index(repo, tag, list(children.values()), media=media)
        return MultiPlatform(index, children)

    # -- signatures, attestations, referrers ---------------------------------------------------

    async def push_artifact(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[Layer],
        *,
        config: Layer | None = None,
        artifact_type: str | None = None,
        subject: Pushed | Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
        media: Media = "oci",
    ) -> Pushed:
        """Push an arbitrary manifest (e.g. under ``sha256-<hex>.sig``) and its blobs.

        ``config`` defaults to the OCI empty JSON (``application/vnd.oci.empty.v1+json``).
        ``subject`` (a :class:`Pushed` or a descriptor) makes it an OCI 1.1 referrer; this does
        not update the tag-schema index (see :meth:`push_tag_schema_referrer`).
        """
        config = config or Layer(EMPTY_JSON, OCI_EMPTY)
        await asyncio.gather(*(self.push_blob(repo, b.data) for b in (config, *layers)))
        subject_desc = subject.descriptor() if isinstance(subject, Pushed) else subject
        manifest = image_manifest(
            config.descriptor(), [layer.descriptor() for layer in layers], media=media,
            subject=subject_desc, artifact_type=artifact_type, annotations=annotations,
        )
        digest = await self.push_manifest(repo, tag or sha256_digest(manifest), manifest,
                                          _FLAVOURS[media]["manifest"])
        blobs = tuple(dict.fromkeys(sha256_digest(b.data) for b in (config, *layers)))
        return Pushed(digest, manifest, blobs)

    async def push_cosign_signatures(
        self, repo: str, subject_digest: str, layers: Sequence[Layer], *, suffix: str = "sig"
    ) -> Pushed:
        """Push a legacy cosign signature (or ``suffix="att"`` attestation) image.

        Each layer is one signature: e.g. ``Layer(simple_signing_payload(...),
        COSIGN_SIMPLESIGNING, {"dev.cosignproject.cosign/signature": b64sig})``. The config is
        what cosign writes: an OCI image config whose ``diff_ids`` are the layer digests.
        """
        config = _json({
            "architecture": "", "os": "", "config": {},
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "rootfs": {"type": "layers",
                       "diff_ids": [sha256_digest(layer.data) for layer in layers]},
        })
        return await self.push_artifact(
            repo, cosign_tag(subject_digest, suffix), layers, config=Layer(config, OCI_CONFIG)
        )

    async def push_tag_schema_referrer(
        self,
        repo: str,
        subject: Pushed,
        layers: Sequence[Layer],
        *,
        artifact_type: str,
        annotations: Mapping[str, str] | None = None,
    ) -> tuple[Pushed, Pushed]:
        """Push an OCI 1.1 artifact referring to ``subject`` and add it to the tag schema.

        Returns ``(artifact, referrers index)``; the index is tagged ``sha256-<hex>`` of the
        subject, as a registry without the referrers API (distribution 2.8) needs.
        """
        artifact = await self.push_artifact(
            repo, None, layers, artifact_type=artifact_type, subject=subject,
            annotations=annotations,
        )
        index = await self.add_tag_schema_referrer(
            repo, subject.digest,
            artifact.descriptor(artifactType=artifact_type,
                                **({"annotations": dict(annotations)} if annotations else {})),
        )
        return artifact, index

    async def add_tag_schema_referrer(
        self, repo: str, subject_digest: str, referrer: Mapping[str, Any]
    ) -> Pushed:
        """Rebuild the ``sha256-<hex>`` index of ``subject_digest`` with ``referrer`` added."""
        tag = tag_schema_tag(subject_digest)
        current = await self.get_manifest(repo, tag, accept=OCI_INDEX)
        entries: list[dict[str, Any]] = json.loads(current[0])["manifests"] if current else []
        entries = [e for e in entries if e["digest"] != referrer["digest"]]
        entries.append(dict(referrer))
        manifest = index_manifest(entries)
        digest = await self.push_manifest(repo, tag, manifest, OCI_INDEX)
        return Pushed(digest, manifest, ())


async def _expect(resp: aiohttp.ClientResponse, status: int, what: str) -> None:
    if resp.status != status:
        body = (await resp.read())[:2000].decode(errors="replace")
        raise PushError(f"{what}: HTTP {resp.status} (expected {status}): {body}")
