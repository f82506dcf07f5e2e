"""PostgreSQL index specifics: replicas migrating the schema together, a schema newer than
this sigil, and gc's check-and-delete serialised against another replica's put_manifest."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.pgindex import SCHEMA_VERSION, PgIndex

LAYER = Digest.of(b"layer")
MANIFEST = Digest.of(b"manifest")


async def test_replicas_starting_together_migrate_once(pg_dsn: str) -> None:
    indexes = await asyncio.gather(*(PgIndex.open(pg_dsn, max_connections=1) for _ in range(5)))
    try:
        await indexes[0].put_blob(LAYER, 5)
        assert await indexes[4].blob_size(LAYER) == 5
    finally:
        for index in indexes:
            await index.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetch("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    finally:
        await conn.close()


async def test_newer_schema_is_refused(pg_dsn: str) -> None:
    index = await PgIndex.open(pg_dsn)
    await index.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StorageError, match=f"has schema {SCHEMA_VERSION + 1}, newer"):
        await PgIndex.open(pg_dsn)


async def test_delete_unreferenced_waits_out_a_concurrent_put_manifest(pg_dsn: str) -> None:
    """Replica A's gc deletes LAYER (unreferenced) while replica B records a manifest that
    references it: B's put_manifest waits for A's check-and-delete to finish, so B never
    records a reference to an object gc is deleting without knowing it (B then finds the
    object gone and fetches it again); a gc check after B's commit keeps the object."""
    a, b = await PgIndex.open(pg_dsn), await PgIndex.open(pg_dsn)
    events: list[str] = []
    inside = asyncio.Event()
    try:
        async def slow_delete() -> bool:
            inside.set()
            await asyncio.sleep(0.5)
            events.append("deleted")
            return True

        async def record() -> None:
            await inside.wait()
            await b.put_manifest(MANIFEST, "manifest", 10, [LAYER], now=1.0)
            events.append("recorded")

        deleted, _ = await asyncio.gather(a.delete_unreferenced(LAYER, slow_delete), record())
        assert deleted and events == ["deleted", "recorded"]

        async def never() -> bool:
            raise AssertionError("a referenced object must not be deleted")

        assert not await a.delete_unreferenced(LAYER, never)
    finally:
        await a.close()
        await b.close()


def test_base_install_imports_no_fleet_client() -> None:
    """The server, the CLI and sigil.storage import neither aiobotocore nor asyncpg: they are
    the optional `fleet` extra, imported only when a fleet backend is configured."""
    code = ("import sys, sigil.cli, sigil.server.app, sigil.storage, sigil.storage.backends; "
            "print(sorted(m for m in ('aiobotocore', 'botocore', 'asyncpg') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
