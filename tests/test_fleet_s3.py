"""S3 store specifics the contract suite cannot state for both backends: the memory bound of a
streamed upload, and the key layout in the bucket."""

from __future__ import annotations

import os
import tracemalloc

from sigil.config import S3Config
from sigil.oci.digest import Digest
from sigil.storage.s3 import S3ObjectStore

MiB = 1024 * 1024


async def test_streamed_upload_memory_is_bounded_by_parts(s3_config: S3Config) -> None:
    """A 40 MiB blob in 5 MiB parts: Python's peak allocation during the upload is bounded by
    the parts in flight (each held twice while aiohttp sends it: sigil's bytes and the
    transport's copy) plus the one filling, far below the blob's size."""
    store = await S3ObjectStore.open(s3_config)
    block = os.urandom(MiB)
    chunks = [i.to_bytes(4, "big") + block[4:] for i in range(40)]
    digest = Digest.of(b"".join(chunks))
    try:
        tracemalloc.start()
        try:
            session = await store.begin_upload(digest)
            for chunk in chunks:
                await session.write(chunk)
            await session.commit()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        parts = 2 * s3_config.upload_concurrency + 1
        assert peak < parts * s3_config.part_size + 2 * MiB, peak
        assert await store.size(digest) == 40 * MiB
        assert await store.hash_object(digest) == digest
    finally:
        await store.close()


async def test_key_layout(s3_config: S3Config) -> None:
    store = await S3ObjectStore.open(s3_config)
    try:
        data = b"layout"
        digest = Digest.of(data)
        await store.put_bytes(digest, data)
        listed = await store.client.list_objects_v2(Bucket=s3_config.bucket,
                                                    Prefix=s3_config.prefix)
        keys = [item["Key"] for item in listed.get("Contents", [])]
        assert keys == [f"{s3_config.prefix}blobs/sha256/{digest.hex[:2]}/{digest.hex}"]
        assert await store.quarantine(digest)
        listed = await store.client.list_objects_v2(Bucket=s3_config.bucket,
                                                    Prefix=s3_config.prefix)
        assert [item["Key"] for item in listed.get("Contents", [])] == [
            f"{s3_config.prefix}quarantine/{digest.hex}"]
        assert not await store.has(digest)
    finally:
        await store.close()


async def test_cleanup_spares_uploads_with_a_live_lease(s3_config: S3Config, pg_dsn: str) -> None:
    """With ``keep`` = "a live fetch lease exists", cleanup aborts only the dead replica's
    upload, even with no age bound."""
    from sigil.storage.pgindex import PgIndex

    store = await S3ObjectStore.open(s3_config)
    index = await PgIndex.open(pg_dsn)
    try:
        live, dead = Digest.of(b"live"), Digest.of(b"dead")
        sessions = [await store.begin_upload(d) for d in (live, dead)]
        for session in sessions:
            await session.write(bytes(s3_config.part_size))  # a part: the uploads exist
        await index.acquire(live, "replica-a", "http://a", ttl=60)

        async def leased(digest: Digest) -> bool:
            return await index.current(digest) is not None

        assert len(await store.pending_uploads()) == 2
        assert await store.cleanup_abandoned(0, keep=leased) == 1
        remaining = await store.pending_uploads()
        assert [p.name.split(" ")[0] for p in remaining] == [store.key(live)]
        for session in sessions:
            await session.abort()
        assert await store.pending_uploads() == []
    finally:
        await store.close()
        await index.close()
