"""Open the configured storage and index backends behind the contracts of
:mod:`sigil.storage.contracts`.

``storage.backend``: ``filesystem`` (default) or ``s3``; ``index.backend``: ``sqlite`` (default)
or ``postgres``. Leases come with the index (the SQLite lease file beside the index, or the
PostgreSQL ``leases`` table). The fleet backends import their client libraries only when chosen,
so the base install needs neither aiobotocore nor asyncpg.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sigil.config import Config
from sigil.errors import StorageError
from sigil.storage.blobs import BlobStore
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    GcLease,
    ObjectStore,
    SqliteAsyncIndex,
)
from sigil.storage.index import Index
from sigil.storage.lease import FetchLeases
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

    async def close(self) -> None:
        """Close all three (each closes once; the PostgreSQL pool is shared)."""
        await self.objects.close()
        leases: object = self.leases
        if leases is not self.index:
            await self.leases.close()
        await self.index.close()


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
            return Backends(objects, pg, pg)
        root = Path(config.storage.root)
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        path = root / "index.sqlite"
        return Backends(objects, SqliteAsyncIndex(Index(path)), SqliteFetchLeases(root))
    except BaseException:
        await objects.close()
        raise
