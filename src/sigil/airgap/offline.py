"""An upstream client that never opens a connection: answers come from a store and index.

``sigil import`` re-verifies every image through a real :class:`~sigil.mirror.Mirror` whose
only "upstream" is this class, so discovery, digest checks and the policy engine run exactly
as in ``sigil serve`` while nothing can reach the network. What the archive does not hold does
not exist here: manifests and tags absent from the index are ``MANIFEST_UNKNOWN``, blobs absent
from the store ``BLOB_UNKNOWN``; the referrers "API" lists the referrers recorded in the index
(only a hint: discovery re-reads each one and checks that its ``subject`` names the digest).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sigil.airgap.layout import canonical_json
from sigil.config import UpstreamConfig
from sigil.errors import BlobUnknown, DigestInvalid, ManifestInvalid, ManifestUnknown, Unavailable
from sigil.oci.digest import Digest
from sigil.oci.manifest import OCI_INDEX
from sigil.storage import BlobStore, Index
from sigil.upstream import UpstreamClient
from sigil.upstream.client import FetchedManifest, ManifestHead, UpstreamBlob


class OfflineUpstream(UpstreamClient):
    """:class:`UpstreamClient` answering from ``store`` + ``index`` only (no sockets)."""

    def __init__(self, config: UpstreamConfig, store: BlobStore, index: Index) -> None:
        super().__init__(config)
        self._store = store
        self._index = index

    def _session(self):  # type: ignore[no-untyped-def]
        # Fail closed if anything ever tries the network through this client.
        raise Unavailable(f"upstream {self.name}: offline, no connection is opened")

    def _digest_for(self, repo: str, reference: str) -> Digest:
        if Digest.is_digest(reference):
            digest = Digest.parse(reference)
            if self._index.get_manifest(digest) is None:
                raise ManifestUnknown(f"{repo}@{digest} is not in the archive")
            return digest
        row = self._index.get_tag(self.name, repo, reference)
        if row is None:
            raise ManifestUnknown(f"{repo}:{reference} is not in the archive")
        return row.digest

    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead:
        """Digest, media type and size of a stored manifest (tag or digest)."""
        digest = self._digest_for(repo, reference)
        row = self._index.get_manifest(digest)
        assert row is not None
        return ManifestHead(digest=str(digest), media_type=row.media_type, size=row.size)

    async def get_manifest(self, repo: str, reference: str, accept: str,
                           max_bytes: int = 4 * 1024 * 1024) -> FetchedManifest:
        """The stored manifest bytes."""
        digest = self._digest_for(repo, reference)
        row = self._index.get_manifest(digest)
        if row is None or not self._store.has(digest):
            raise ManifestUnknown(f"{repo}@{digest} is not in the archive")
        if row.size > max_bytes:
            raise ManifestInvalid(f"manifest {digest} exceeds {max_bytes} bytes")
        raw = await asyncio.to_thread(self._store.read_bytes, digest)
        return FetchedManifest(raw=raw, media_type=row.media_type, digest=str(digest))

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest | str) -> AsyncIterator[UpstreamBlob]:
        """Never: a blob that is not in the store does not exist offline."""
        raise BlobUnknown(f"{repo}@{digest} is not in the archive")
        yield  # pragma: no cover - a generator for asynccontextmanager

    async def get_blob_bytes(self, repo: str, digest: Digest | str, max_bytes: int) -> bytes:
        """A small stored blob, re-hashed."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        if not self._store.has(parsed):
            raise BlobUnknown(f"{repo}@{parsed} is not in the archive")
        if (self._store.size(parsed) or 0) > max_bytes:
            raise ManifestInvalid(f"blob {parsed} exceeds {max_bytes} bytes")
        data = await asyncio.to_thread(self._store.read_bytes, parsed)
        if Digest.of(data) != parsed:
            raise DigestInvalid(f"stored blob {parsed} does not match its digest")
        return data

    async def get_tags(self, repo: str, n: int | None = None,
                       last: str | None = None) -> tuple[bytes, str | None]:
        """No tag list offline (export lists tags; import never needs them)."""
        raise Unavailable(f"upstream {self.name}: offline, no tag list")

    async def get_referrers(self, repo: str, digest: Digest | str,
                            artifact_type: str | None = None) -> bytes | None:
        """An index of the referrers recorded for ``digest``; None when there are none."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        descriptors = []
        for referrer in self._index.get_referrers(parsed):
            row = self._index.get_manifest(referrer)
            if row is not None:
                descriptors.append({"mediaType": row.media_type, "digest": str(referrer),
                                    "size": row.size})
        if not descriptors:
            return None  # as a registry without the API: the tag schema is tried next
        return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": descriptors})
