"""Open the configured storage and index backends behind the contracts of
:mod:`sigil.storage.contracts`.

``storage.backend``: ``filesystem`` (default) or ``s3``; ``index.backend``: ``sqlite`` (default)
or ``postgres``. Leases come with the index (the SQLite lease file beside the index, or the
PostgreSQL ``leases`` table); the processes of one host (``--workers N``) that follow each
other's staging files use the host's lease file whatever the index
(:attr:`Backends.host_leases`). The fleet backends import their client libraries only when chosen,
so the base install needs neither aiobotocore nor asyncpg.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sigil.config import Config
from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    GcLease,
    ObjectStore,
    SqliteAsyncIndex,
)
from sigil.storage.index import Index
from sigil.storage.lease import FetchLeases, LeaseInfo
from sigil.storage.lease_sqlite import SqliteFetchLeases

_FLEET_EXTRA = "pip install 'sigil[fleet]'"


class Leases(FetchLeases, GcLease, Protocol):
    """Fetch leases and the gc lease, from one table."""

    async def close(self) -> None: ...


@dataclass
class Backends:
    """The opened store, index and leases of one process."""

    objects: ObjectStore
    index: AsyncIndex
    leases: Leases
    #: Fetch leases among the processes of this host (the SQLite lease file under
    #: ``storage.root``): what ``--workers N`` single-flight uses when the holder's location
    #: is a staging path, which only this host can open. The same object as :attr:`leases`
    #: over a SQLite index.
    host_leases: Leases

    async def close(self) -> None:
        """Close everything (each once; the PostgreSQL pool is shared)."""
        await self.objects.close()
        leases: object = self.leases
        if self.host_leases is not self.leases:
            await self.host_leases.close()
        if leases is not self.index:
            await self.leases.close()
        await self.index.close()


class _LazySqliteLeases:
    """The host's lease file, created only when first used: a single process never needs
    it (its in-process table suffices), and then leaves no ``leases.sqlite`` behind."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._leases: SqliteFetchLeases | None = None

    def _open(self) -> SqliteFetchLeases:
        if self._leases is None:
            self._leases = SqliteFetchLeases(self._root)
        return self._leases

    async def acquire(self, digest: Digest, holder: str, location: str,
                      ttl: float) -> LeaseInfo:
        """See SqliteFetchLeases.acquire."""
        return await self._open().acquire(digest, holder, location, ttl)

    async def renew(self, digest: Digest, holder: str, ttl: float,
                    size: int | None = None) -> bool:
        """See SqliteFetchLeases.renew."""
        return await self._open().renew(digest, holder, ttl, size)

    async def release(self, digest: Digest, holder: str) -> None:
        """See SqliteFetchLeases.release."""
        await self._open().release(digest, holder)

    async def current(self, digest: Digest) -> LeaseInfo | None:
        """See SqliteFetchLeases.current."""
        return await self._open().current(digest)

    async def acquire_gc(self, holder: str, ttl: float) -> bool:
        """See SqliteFetchLeases.acquire_gc."""
        return await self._open().acquire_gc(holder, ttl)

    async def renew_gc(self, holder: str, ttl: float) -> bool:
        """See SqliteFetchLeases.renew_gc."""
        return await self._open().renew_gc(holder, ttl)

    async def release_gc(self, holder: str) -> None:
        """See SqliteFetchLeases.release_gc."""
        await self._open().release_gc(holder)

    async def close(self) -> None:
        """Close the file if it was opened."""
        if self._leases is not None:
            await self._leases.close()


async def open_objects(config: Config) -> ObjectStore:
    """The configured object store."""
    if config.storage.backend == "s3":
        assert config.storage.s3 is not None  # config validation guarantees it
        try:
            from sigil.storage.s3 import S3ObjectStore
        except ImportError as exc:
            raise StorageError(f"storage.backend: s3 needs aiobotocore: {_FLEET_EXTRA}"
                               ) from exc
        return await S3ObjectStore.open(config.storage.s3)
    return FilesystemObjectStore(BlobStore(Path(config.storage.root)))


async def open_backends(config: Config) -> Backends:
    """Open store, index and leases as configured (StorageError with the key at fault)."""
    objects = await open_objects(config)
    root = Path(config.storage.root)
    try:
        if config.index.backend == "postgres":
            assert config.index.postgres_dsn is not None
            try:
                from sigil.storage.pgindex import PgIndex
            except ImportError as exc:
                raise StorageError(f"index.backend: postgres needs asyncpg: {_FLEET_EXTRA}"
                                   ) from exc
            pg = await PgIndex.open(config.index.postgres_dsn, source=config.index.dsn_source,
                                    max_connections=config.index.max_connections)
            return Backends(objects, pg, pg, _LazySqliteLeases(root))
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        path = root / "index.sqlite"
        leases = _LazySqliteLeases(root)
        return Backends(objects, SqliteAsyncIndex(Index(path)), leases, leases)
    except BaseException:
        await objects.close()
        raise
