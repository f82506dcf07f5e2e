"""PostgreSQL index specifics: replicas migrating the schema together, a schema newer than
this sigil, gc's check-and-delete serialised against another replica's put_manifest; and the
configured backend pairs opened through open_backends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from sigil.config import S3Config, build_config
from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.backends import open_backends
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
        assert await conn.fetch("SELECT version FROM schema_version ORDER BY version") == [
            (v,) for v in range(1, SCHEMA_VERSION + 1)]
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


async def test_open_backends_from_config(tmp_path: Path, s3_config: S3Config,
                                         pg_dsn: str) -> None:
    """Both configured pairs open through open_backends and work end to end."""
    data = b"through the config"
    digest = Digest.of(data)
    local = build_config({"storage": {"root": str(tmp_path / "local")}}, env={})
    fleet = build_config({"storage": {"root": str(tmp_path / "scratch"), "backend": "s3", "s3": {
        "endpoint": s3_config.endpoint, "bucket": s3_config.bucket, "prefix": s3_config.prefix,
        "access_key_env": "T_AK", "secret_key_env": "T_SK", "create_bucket": True}},
        "index": {"backend": "postgres", "postgres": {"dsn_env": "T_DSN"}}},
        env={"T_AK": s3_config.access_key or "", "T_SK": s3_config.secret_key or "",
             "T_DSN": pg_dsn})
    for config, kinds in ((local, ("FilesystemObjectStore", "SqliteAsyncIndex")),
                          (fleet, ("S3ObjectStore", "PgIndex"))):
        backends = await open_backends(config)
        try:
            assert (type(backends.objects).__name__, type(backends.index).__name__) == kinds
            await backends.objects.put_bytes(digest, data)
            await backends.index.put_blob(digest, len(data))
            assert await backends.objects.read_bytes(digest) == data
            assert await backends.index.blob_size(digest) == len(data)
            assert (await backends.leases.acquire(digest, "me", "here", 30)).holder == "me"
        finally:
            await backends.close()
