"""The relay rule of :mod:`sigil.downloads` over a real S3 store (SeaweedFS): a replica that
finds another replica's live lease streams that replica's peer stream, uploads nothing, and
releases its last byte only when its own hash matched *and* the object is in the bucket.

The "peer" here is an in-process source that can send wrong bytes or stop before the holder
commits: faults a real peer endpoint (which applies the same tail rule) cannot produce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sigil.config import Config, S3Config, build_config
from sigil.downloads import Downloads, RelayPeers
from sigil.errors import RegistryError, SigilError, Unavailable
from sigil.mirror import Mirror
from sigil.oci.digest import Digest
from sigil.server.app import _single_flight
from sigil.storage.backends import open_backends
from sigil.storage.lease_sqlite import SqliteFetchLeases
from sigil.storage.s3 import S3ObjectStore
from tests.support.sigilproc import free_port

MiB = 1024 * 1024
pytestmark = pytest.mark.realparts


class PeerStream:
    """What the holder's peer endpoint would send: ``data`` in 256 KiB chunks."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data = data
        self.size: int | None = size
        self.opened: list[str] = []

    def open(self, base_url: str, digest: Digest) -> AsyncIterator[PeerStream]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[PeerStream]:
            self.opened.append(base_url)
            yield self

        return opened()

    async def iter_chunks(self, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), 256 * 1024):
            await asyncio.sleep(0)
            yield self.data[at:at + 256 * 1024]


def _never_fetch() -> AsyncIterator[PeerStream]:
    raise AssertionError("a relaying replica must not fetch from the upstream")


async def _collect(stream: AsyncIterator[bytes | memoryview]) -> tuple[bytes, Exception | None]:
    got = bytearray()
    try:
        async for chunk in stream:
            got += chunk
    except RegistryError as exc:
        return bytes(got), exc
    return bytes(got), None


@pytest.fixture
async def relay_setup(s3_config: S3Config, tmp_path: Path
                      ) -> AsyncIterator[tuple[S3ObjectStore, SqliteFetchLeases, Path]]:
    store = await S3ObjectStore.open(s3_config)
    leases = SqliteFetchLeases(tmp_path)
    try:
        yield store, leases, tmp_path
    finally:
        await leases.close()
        await store.close()


async def _relay_download(setup: tuple[S3ObjectStore, SqliteFetchLeases, Path],
                          peer: PeerStream, digest: Digest) -> tuple[bytes, Exception | None]:
    store, leases, root = setup
    # Another replica holds the lease and says where its peer endpoint is.
    lease = await leases.acquire(digest, "other-replica", "http://127.0.0.1:9/peer", 30.0)
    assert lease.holder == "other-replica"
    table = Downloads(store, leases, scratch=root,
                      relay=RelayPeers("http://127.0.0.1:8/me", peer.open))
    download, _ = table.get_or_start(digest, _never_fetch, lambda d, n: None)
    await download.wait_started()
    result = await asyncio.wait_for(_collect(download.stream()), 60)
    assert download.task is not None
    await download.task
    assert peer.opened == ["http://127.0.0.1:9/peer"]
    return result


async def test_wrong_bytes_from_the_peer_never_complete_a_body(relay_setup) -> None:
    data = os.urandom(3 * MiB)
    digest = Digest.of(data)
    wrong = bytes(reversed(data))
    body, error = await _relay_download(relay_setup, PeerStream(wrong, len(data)), digest)
    assert error is not None and error.code == "DIGEST_INVALID"
    assert len(body) < len(data)
    store = relay_setup[0]
    assert not await store.has(digest)  # and nothing was uploaded
    assert await store.pending_uploads() == []


async def test_the_last_byte_waits_for_the_holders_commit(relay_setup) -> None:
    store, leases, _ = relay_setup
    data = os.urandom(2 * MiB + 17)
    digest = Digest.of(data)
    peer = PeerStream(data, len(data))

    async def holder_commits_later() -> None:
        await asyncio.sleep(0.5)
        await store.put_bytes(digest, data)  # the holder's upload completes
        await leases.release(digest, "other-replica")

    holder = asyncio.ensure_future(holder_commits_later())
    body, error = await _relay_download(relay_setup, peer, digest)
    await holder
    assert error is None and body == data


async def test_a_holder_that_stops_before_its_commit_cuts_the_relay(relay_setup) -> None:
    store, leases, _ = relay_setup
    data = os.urandom(1 * MiB)
    digest = Digest.of(data)

    async def holder_gives_up() -> None:
        await asyncio.sleep(0.3)
        await leases.release(digest, "other-replica")  # failed: released, never committed

    holder = asyncio.ensure_future(holder_gives_up())
    body, error = await _relay_download(relay_setup, PeerStream(data, len(data)), digest)
    await holder
    assert error is not None
    assert len(body) == len(data) - 1  # all but the held-back last byte
    assert not await store.has(digest)


class SlowUpstream:
    """An upstream body that trickles out (a few ms per 256 KiB), counted per open."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size: int | None = len(data)
        self.opens = 0

    def open(self) -> AsyncIterator[SlowUpstream]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[SlowUpstream]:
            self.opens += 1
            yield self

        return opened()

    async def iter_chunks(self, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), 256 * 1024):
            await asyncio.sleep(0.005)
            yield self.data[at:at + 256 * 1024]


async def test_workers_on_one_host_over_s3_follow_the_scratch_file(relay_setup) -> None:
    """``--workers N`` with a remote store and the host's lease file: the follower reads the
    holder's scratch file and gets the tail once the holder's upload is in the bucket."""
    store, leases, root = relay_setup
    sibling_leases = SqliteFetchLeases(root)
    try:
        data = os.urandom(6 * MiB + 5)
        digest = Digest.of(data)
        upstream = SlowUpstream(data)
        first = Downloads(store, leases, scratch=root)
        second = Downloads(store, sibling_leases, scratch=root)
        holder, _ = first.get_or_start(digest, upstream.open, lambda d, n: None)
        await holder.wait_started()
        follower, _ = second.get_or_start(digest, upstream.open, lambda d, n: None)
        await follower.wait_started()
        mine, theirs = await asyncio.wait_for(asyncio.gather(
            _collect(holder.stream()), _collect(follower.stream())), 60)
        assert mine == (data, None) and theirs == (data, None)
        assert upstream.opens == 1
        assert follower.path == holder.path  # it read the holder's scratch file
        assert holder.stored_remotely and follower.stored_remotely
        async with store.open_range(digest) as reader:
            stored = b"".join([chunk async for chunk in reader])
        assert stored == data
        assert not list((root / "staging").iterdir())  # the scratch copies are gone
    finally:
        await sibling_leases.close()


async def test_a_lease_left_at_this_replicas_own_address_is_waited_out_not_relayed(
        relay_setup) -> None:
    """A lease whose location is this replica's own peer address belongs to an earlier
    process here that died (its lease has not expired yet): relaying it would ask this very
    download through our own endpoint. The replica waits for the lease instead and fetches."""
    store, leases, root = relay_setup
    data = os.urandom(1 * MiB + 3)
    digest = Digest.of(data)
    me = "http://127.0.0.1:8"
    await leases.acquire(digest, "this-replica-before-its-restart", me, 30.0)
    peer = PeerStream(data, len(data))
    upstream = SlowUpstream(data)
    table = Downloads(store, leases, scratch=root, relay=RelayPeers(me, peer.open))
    download, _ = table.get_or_start(digest, upstream.open, lambda d, n: None)

    async def the_old_lease_expires() -> None:
        await asyncio.sleep(0.3)
        await leases.release(digest, "this-replica-before-its-restart")

    expiry = asyncio.ensure_future(the_old_lease_expires())
    await asyncio.wait_for(download.wait_started(), 60)
    body, error = await asyncio.wait_for(_collect(download.stream()), 60)
    await expiry
    assert download.task is not None
    await download.task
    assert error is None and body == data
    assert peer.opened == [] and upstream.opens == 1
    assert await store.has(digest)


class WrongBytesUpstream(SlowUpstream):
    """A slow upstream whose body does not match the digest asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(bytes([data[0] ^ 1]) + data[1:])


def _two_workers(store: S3ObjectStore, root: Path) -> tuple[Downloads, Downloads,
                                                             list[SqliteFetchLeases]]:
    """Two workers of one relaying replica: one fleet lease table (its own file here), the
    host's lease file under ``root`` shared, one peer address; each its own connections."""
    fleet_root = root / "fleet"
    fleet_root.mkdir(exist_ok=True)
    tables = [SqliteFetchLeases(fleet_root), SqliteFetchLeases(fleet_root),
              SqliteFetchLeases(root), SqliteFetchLeases(root)]
    me = "http://127.0.0.1:8/me"
    workers = (Downloads(store, tables[0], scratch=root,
                         relay=RelayPeers(me, _never_peer, siblings=tables[2])),
               Downloads(store, tables[1], scratch=root,
                         relay=RelayPeers(me, _never_peer, siblings=tables[3])))
    return workers[0], workers[1], tables


def _never_peer(base_url: str, digest: Digest) -> AsyncIterator[PeerStream]:
    raise AssertionError("the workers of the holding replica never dial a peer")


async def test_the_workers_of_a_relaying_replica_fetch_once_and_the_peer_side_follows(
        relay_setup) -> None:
    """``server.workers: 2`` in a fleet: the first worker takes the host lease, then the
    fleet lease, and fetches; the second worker's clients follow its scratch file, and so
    does the second worker's peer endpoint (a peer request landing on it, not on the holder:
    one SO_REUSEPORT port), all with the tail until the object is in the bucket."""
    store, _, root = relay_setup
    first, second, tables = _two_workers(store, root)
    try:
        data = os.urandom(6 * MiB + 3)
        digest = Digest.of(data)
        upstream = SlowUpstream(data)
        assert await second.follow_sibling(digest) is None  # nothing in flight yet
        holder, _ = first.get_or_start(digest, upstream.open, lambda d, n: None)
        await holder.wait_started()
        assert await first.follow_sibling(digest) is None  # its own download, not a sibling's
        client, _ = second.get_or_start(digest, upstream.open, lambda d, n: None)
        peer_side = await second.follow_sibling(digest)
        assert peer_side is not None and peer_side.task is not None
        await peer_side.wait_started()
        assert peer_side.size == len(data)  # announced in the host lease: a Content-Length
        results = await asyncio.wait_for(asyncio.gather(
            _collect(holder.stream()), _collect(client.stream()),
            _collect(peer_side.stream())), 60)
        assert results == [(data, None)] * 3
        assert upstream.opens == 1
        assert client.path == holder.path == peer_side.path  # the holder's scratch file
        await asyncio.wait_for(peer_side.task, 30)
        assert peer_side.stored_remotely and peer_side.verified
        assert await tables[0].current(digest) is None  # both leases released
        assert await tables[2].current(digest) is None
        assert await store.has(digest)
    finally:
        for table in tables:
            await table.close()


async def test_wrong_bytes_at_the_holding_worker_never_complete_the_peer_sides_body(
        relay_setup) -> None:
    """The holder's upstream sends wrong bytes: its sibling's peer endpoint (following the
    holder's scratch file) gets at most all but the last byte, then the error; nothing is
    in the bucket."""
    store, _, root = relay_setup
    first, second, tables = _two_workers(store, root)
    try:
        data = os.urandom(3 * MiB + 1)
        digest = Digest.of(data)
        holder, _ = first.get_or_start(digest, WrongBytesUpstream(data).open,
                                       lambda d, n: None)
        await holder.wait_started()
        peer_side = await second.follow_sibling(digest)
        assert peer_side is not None
        got, error = await asyncio.wait_for(_collect(peer_side.stream()), 60)
        assert error is not None and len(got) < len(data)
        assert not await store.has(digest)
    finally:
        for table in tables:
            await table.close()


def _peer_config(s3_config: S3Config, root: Path, port: int) -> Config:
    config = build_config({"storage": {"root": str(root)},
                           "server": {"peer_listen": f"127.0.0.1:{port}",
                                      "peer_secret_env": "TEST_PEER_SECRET"}},
                          env={"TEST_PEER_SECRET": "fleet-secret"})
    return dataclasses.replace(config, storage=dataclasses.replace(
        config.storage, backend="s3", s3=s3_config))


async def test_the_peer_site_closes_the_peer_client_and_names_a_busy_port(
        s3_config: S3Config, tmp_path: Path) -> None:
    port = free_port()
    config = _peer_config(s3_config, tmp_path, port)
    backends = await open_backends(config)
    try:
        leases, relay, start_peer = await _single_flight(config, backends)
        assert relay is not None and start_peer is not None
        mirror = Mirror(config, backends.objects, backends.index, {}, leases=leases,
                        relay=relay)
        runner = await start_peer(mirror)
        digest = Digest.of(b"nothing in flight")
        with pytest.raises(Unavailable, match="answered 404"):  # the client's pool is open
            async with relay.open_peer(f"http://127.0.0.1:{port}", digest):
                pass
        # A peer port another program holds: refused, with the key named.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            _, _, again = await _single_flight(_peer_config(s3_config, tmp_path, busy),
                                               backends)
            assert again is not None
            with pytest.raises(SigilError, match=f"server.peer_listen: cannot listen on "
                                                 f"127.0.0.1:{busy}"):
                await again(mirror)
        await runner.cleanup()
        # The peer client went with the site (its connection pool is not left open).
        with pytest.raises(Unavailable, match="closed"):
            async with relay.open_peer(f"http://127.0.0.1:{port}", digest):
                pass
    finally:
        await backends.close()


async def test_a_peer_address_other_replicas_would_refuse_fails_the_start(
        s3_config: S3Config, tmp_path: Path) -> None:
    config = _peer_config(s3_config, tmp_path, free_port())
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, peer_advertise=("peer host/x?", 5001)))
    backends = await open_backends(config)
    try:
        with pytest.raises(SigilError, match=r"server\.peer_advertise"):
            await _single_flight(config, backends)
        # A name with an underscore (compose service names) is a valid location.
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, peer_advertise=("sigil_replica_1", 5001)))
        _, relay, _ = await _single_flight(config, backends)
        assert relay is not None and relay.location == "http://sigil_replica_1:5001"
    finally:
        await backends.close()
