"""The SQLite fetch lease of ``--workers N``: acquire, renew, release, expiry, takeover, and
several processes racing for the same digests (exactly one winner each)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sigil.errors import StorageError
from sigil.oci.digest import Digest
from sigil.storage.lease_sqlite import FILE_NAME, SqliteFetchLeases, reset_leases

DIGEST = Digest("a" * 64)


class Clock:
    """A clock the test moves by hand (expiry is judged by the lease table's clock only)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def pair(tmp_path: Path, clock: Clock
               ) -> AsyncIterator[tuple[SqliteFetchLeases, SqliteFetchLeases]]:
    """Two connections to one lease file, as two workers have."""
    first, second = SqliteFetchLeases(tmp_path, clock), SqliteFetchLeases(tmp_path, clock)
    yield first, second
    await first.close()
    await second.close()


async def test_acquire_then_others_see_the_holder(pair, clock) -> None:
    one, two = pair
    got = await one.acquire(DIGEST, "w1", "/staging/1", 10)
    assert (got.holder, got.location, got.expires_at, got.size) == ("w1", "/staging/1",
                                                                     clock.now + 10, None)
    seen = await two.acquire(DIGEST, "w2", "/staging/2", 10)
    assert (seen.holder, seen.location) == ("w1", "/staging/1")
    current = await two.current(DIGEST)
    assert current is not None and current.holder == "w1"
    assert await two.current(Digest("b" * 64)) is None


async def test_renew_extends_and_records_the_size(pair, clock) -> None:
    one, two = pair
    await one.acquire(DIGEST, "w1", "/s/1", 10)
    clock.now += 8
    assert await one.renew(DIGEST, "w1", 10, size=1234)
    clock.now += 8  # 16 s after the acquire: alive only because it was renewed
    current = await two.current(DIGEST)
    assert current is not None and current.size == 1234 and current.expires_at == clock.now + 2
    # A renew without a size keeps the recorded one; another holder cannot renew it.
    assert await one.renew(DIGEST, "w1", 10)
    assert not await two.renew(DIGEST, "w2", 10, size=1)
    current = await two.current(DIGEST)
    assert current is not None and (current.holder, current.size) == ("w1", 1234)


async def test_expiry_then_takeover(pair, clock) -> None:
    one, two = pair
    await one.acquire(DIGEST, "w1", "/s/1", 10)
    clock.now += 10.5
    assert await two.current(DIGEST) is None  # expired: no live lease
    taken = await two.acquire(DIGEST, "w2", "/s/2", 10)
    assert (taken.holder, taken.location) == ("w2", "/s/2")
    # The old holder lost it: its renew fails and its release leaves the new lease alone.
    assert not await one.renew(DIGEST, "w1", 10)
    await one.release(DIGEST, "w1")
    current = await one.current(DIGEST)
    assert current is not None and current.holder == "w2"


async def test_an_expired_lease_is_not_renewed_back_to_life(pair, clock) -> None:
    one, _ = pair
    await one.acquire(DIGEST, "w1", "/s/1", 10)
    clock.now += 11
    assert not await one.renew(DIGEST, "w1", 10)
    assert await one.current(DIGEST) is None


async def test_release_frees_it_for_the_next(pair, clock) -> None:
    one, two = pair
    await one.acquire(DIGEST, "w1", "/s/1", 10)
    await two.release(DIGEST, "w2")  # not the holder: nothing happens
    assert (await two.acquire(DIGEST, "w2", "/s/2", 10)).holder == "w1"
    await one.release(DIGEST, "w1")
    assert await two.current(DIGEST) is None
    assert (await two.acquire(DIGEST, "w2", "/s/2", 10)).holder == "w2"
    # Acquiring again as the holder refreshes the lease (a retry after a failed attempt).
    clock.now += 5
    again = await two.acquire(DIGEST, "w2", "/s/3", 10)
    assert (again.holder, again.location, again.expires_at) == ("w2", "/s/3", clock.now + 10)


async def test_reset_forgets_leases_of_an_earlier_run(tmp_path: Path, clock) -> None:
    leases = SqliteFetchLeases(tmp_path, clock)
    await leases.acquire(DIGEST, "dead", "/s/1", 3600)
    await leases.close()
    reset_leases(tmp_path)
    fresh = SqliteFetchLeases(tmp_path, clock)
    try:
        assert await fresh.current(DIGEST) is None
    finally:
        await fresh.close()


def test_an_unusable_lease_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(StorageError, match=r"lease table .* is unusable"):
        SqliteFetchLeases(tmp_path)


_RACER = """
import asyncio, json, sys, time
from collections.abc import AsyncIterator
from pathlib import Path
from sigil.oci.digest import Digest
from sigil.storage.lease_sqlite import SqliteFetchLeases

root, name, start, count = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])

async def main() -> None:
    leases = SqliteFetchLeases(root)
    while time.time() < start:  # every racer starts at the same moment
        await asyncio.sleep(0.001)
    seen = {}
    for i in range(count):
        lease = await leases.acquire(Digest(f"{i:064x}"), name, f"/staging/{name}", 30)
        seen[i] = lease.holder
    await leases.close()
    print(json.dumps(seen))

asyncio.run(main())
"""


def test_processes_racing_for_the_same_digests_get_one_winner_each(tmp_path: Path) -> None:
    reset_leases(tmp_path)
    racers, digests = 4, 25
    start = time.time() + 2.0  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), f"p{n}",
                               str(start), str(digests)], stdout=subprocess.PIPE, text=True)
             for n in range(racers)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append({int(k): v for k, v in json.loads(out).items()})
    for i in range(digests):
        holders = {seen[i] for seen in results}
        assert len(holders) == 1, f"digest {i}: processes disagree on the holder: {holders}"
        (holder,) = holders
        assert holder in {f"p{n}" for n in range(racers)}
    # Each process believes it won exactly the digests the others see it holding.
    for n, seen in enumerate(results):
        assert {i for i, h in seen.items() if h == f"p{n}"} == {
            i for i in range(digests) if results[0][i] == f"p{n}"}


async def test_a_release_after_close_is_dropped_and_other_calls_fail_clearly(
        tmp_path: Path, clock: Clock) -> None:
    leases = SqliteFetchLeases(tmp_path, clock)
    await leases.acquire(DIGEST, "w1", "/s/1", 10)
    await leases.close()
    await leases.release(DIGEST, "w1")  # shutdown: a release on its way is not an error
    with pytest.raises(StorageError, match="closed"):
        await leases.current(DIGEST)
    with pytest.raises(StorageError, match="closed"):
        await leases.renew(DIGEST, "w1", 10)
