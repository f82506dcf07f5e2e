"""The upstream of an offline sigil (``server.offline`` / ``serve --offline``): nothing.

:class:`OfflineUpstreamClient` has the public interface of
:class:`sigil.upstream.client.UpstreamClient` and owns no session, socket or credentials: each
call answers at once what the real client answers for a 404, so that everything the store does
not hold is simply "not found" (``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``, no referrers) and
verification fails closed on it, never waits for a network that is not there. Each call is
counted in ``sigil_offline_misses_total``.

The mirror itself treats stored tags as authoritative when offline (it never asks this client
to revalidate one), so in practice only a store miss by digest reaches it; it is the guarantee
that no code path can open a connection, not the place where offline behaviour is decided.

:func:`offline_config` and :func:`offline_clients` are how every offline user builds that
mirror (``sigil serve --offline``, ``sigil verify --offline`` and the re-verification of
``sigil import``), so they all decide from the store alone in the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from types import TracebackType
from typing import Self

from sigil import metrics
from sigil.config import Config, UpstreamConfig
from sigil.errors import BlobUnknown, ManifestUnknown, NameUnknown
from sigil.oci.digest import Digest
from sigil.oci.manifest import MAX_MANIFEST_BYTES
from sigil.upstream.client import (
    KIND_BLOB,
    KIND_MANIFEST,
    KIND_MANIFEST_HEAD,
    KIND_REFERRERS,
    KIND_TAGS,
    FetchedManifest,
    ManifestHead,
    UpstreamBlob,
)

OFFLINE_NOTE = "sigil serves offline: nothing is fetched from upstreams"


class OfflineUpstreamClient:
    """Stand-in for :class:`~sigil.upstream.client.UpstreamClient` that never connects."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name

    def _miss(self, kind: str) -> None:
        metrics.OFFLINE_MISSES.labels(self.name, kind).inc()

    def _manifest_unknown(self, kind: str, repo: str, reference: str) -> ManifestUnknown:
        self._miss(kind)
        return ManifestUnknown(f"manifest {repo}:{reference} of {self.name} is not in the "
                               f"store ({OFFLINE_NOTE})")

    def _blob_unknown(self, repo: str, digest: Digest | str) -> BlobUnknown:
        self._miss(KIND_BLOB)
        return BlobUnknown(f"blob {repo}@{digest} of {self.name} is not in the store "
                           f"({OFFLINE_NOTE})")

    # -- lifecycle (nothing to open or close) -------------------------------------------------
    async def start(self) -> None:
        """Nothing to start: there is no session."""

    async def close(self) -> None:
        """Nothing to close."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- the UpstreamClient API, each answering "not found" at once ---------------------------
    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead:
        """Raise ManifestUnknown (the store was already asked)."""
        raise self._manifest_unknown(KIND_MANIFEST_HEAD, repo, reference)

    async def get_manifest(self, repo: str, reference: str, accept: str,
                           max_bytes: int = MAX_MANIFEST_BYTES) -> FetchedManifest:
        """Raise ManifestUnknown (the store was already asked)."""
        raise self._manifest_unknown(KIND_MANIFEST, repo, reference)

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest | str) -> AsyncIterator[UpstreamBlob]:
        """Raise BlobUnknown on open."""
        raise self._blob_unknown(repo, digest)
        yield  # pragma: no cover - makes this an async generator, as the real one is

    async def get_blob_bytes(self, repo: str, digest: Digest | str, max_bytes: int) -> bytes:
        """Raise BlobUnknown."""
        raise self._blob_unknown(repo, digest)

    async def get_tags(self, repo: str, n: int | None = None,
                       last: str | None = None) -> tuple[bytes, str | None]:
        """Raise NameUnknown (offline, the mirror lists the index's stored tags instead)."""
        self._miss(KIND_TAGS)
        raise NameUnknown(f"repository {repo} of {self.name}: no tag list ({OFFLINE_NOTE})")

    async def get_referrers(self, repo: str, digest: Digest | str,
                            artifact_type: str | None = None) -> bytes | None:
        """None, the real client's answer to a 404 ("no referrers API here"): offline, the
        mirror lists the referrer links of the index instead."""
        self._miss(KIND_REFERRERS)
        return None


def offline_config(config: Config) -> Config:
    """``config`` with ``server.offline`` switched on (itself when it already is)."""
    if config.server.offline:
        return config
    return replace(config, server=replace(config.server, offline=True))


def offline_clients(config: Config) -> dict[str, OfflineUpstreamClient]:
    """One never-connecting client per configured upstream, by name (a Mirror's ``clients``)."""
    return {u.name: OfflineUpstreamClient(u) for u in config.upstreams}
