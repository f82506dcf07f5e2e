"""Index latency: the calls on the mirror's warm path (get_tag, is_allowed, get_manifest) and a
write (put_tag), through the AsyncIndex contract, SQLite (embedded) vs PostgreSQL (Debian's, on
loopback in a temp dir), same run.

    python3 -m bench.bench_index              # 3000 calls per op, 1 and 16 concurrent callers

Values are calls per second, medians of 3 alternating runs. The mirror keeps tags, manifests and
the allowed set in memory in front of the index, so these bound its cold lookups, not its warm
HEAD rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sigil.oci.digest import Digest
from sigil.storage.contracts import AsyncIndex, SqliteAsyncIndex
from sigil.storage.index import Index
from sigil.storage.pgindex import PgIndex
from tests.realparts.postgres import RealPostgres

DIGESTS = [Digest.of(str(i).encode()) for i in range(256)]


async def rate(calls: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> float:
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - start)


async def seed(index: AsyncIndex) -> None:
    for i, digest in enumerate(DIGESTS):
        await index.put_tag("docker.io", "library/app", f"t{i}", digest, "m", 1.0)
        await index.put_manifest(digest, "m", 100, DIGESTS[:3], now=1.0)
    await index.allow("docker.io", "library/app", DIGESTS, "fp")


def operations(index: AsyncIndex) -> dict[str, Callable[[int], Awaitable[object]]]:
    n = len(DIGESTS)
    return {
        "get_tag": lambda i: index.get_tag("docker.io", "library/app", f"t{i % n}"),
        "is_allowed": lambda i: index.is_allowed("docker.io", "library/app", DIGESTS[i % n],
                                                 "fp"),
        "get_manifest": lambda i: index.get_manifest(DIGESTS[i % n]),
        "put_tag": lambda i: index.put_tag("docker.io", "library/app", f"w{i % n}",
                                           DIGESTS[i % n], "m", float(i)),
    }


async def main(calls: int, runs: int) -> None:
    results: dict[tuple[str, str, int], list[float]] = {}
    with RealPostgres() as server, tempfile.TemporaryDirectory() as tmp:
        server.psql("CREATE DATABASE bench")
        pg = await PgIndex.open(server.dsn("bench"), max_connections=16)
        sqlite = SqliteAsyncIndex(Index(Path(tmp) / "index.sqlite"))
        indexes: dict[str, AsyncIndex] = {"sqlite": sqlite, "postgres": pg}
        for index in indexes.values():
            await seed(index)
        try:
            for run in range(runs):
                order = list(indexes) if run % 2 == 0 else list(reversed(indexes))
                for kind in order:
                    for name, call in operations(indexes[kind]).items():
                        for concurrency in (1, 16):
                            results.setdefault((kind, name, concurrency), []).append(
                                await rate(calls, concurrency, call))
        finally:
            await pg.close()
            await sqlite.close()
    print(f"calls/s, median of {runs} runs of {calls} calls")
    print(f"{'op':14} {'conc':>4} {'sqlite':>10} {'postgres':>10} {'pg/sqlite':>9}")
    for name in operations(sqlite):
        for concurrency in (1, 16):
            lite = statistics.median(results[("sqlite", name, concurrency)])
            post = statistics.median(results[("postgres", name, concurrency)])
            print(f"{name:14} {concurrency:>4} {lite:>10.0f} {post:>10.0f} {post / lite:>9.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.runs))
