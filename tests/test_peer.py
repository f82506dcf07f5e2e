"""The peer stream (server/peer.py, upstream/peer.py) between real aiohttp servers on loopback.

The holder is a real :class:`Downloads` whose upstream is the in-process fake registry over
HTTP; the test lets the upstream body through chunk by chunk (:class:`GatedUpstream`), so "while
the holder is still downloading" is a state the test controls, not a race.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from sigil import metrics
from sigil.config import UpstreamConfig
from sigil.downloads import READ_CHUNK, BlobSource, Download, Downloads
from sigil.errors import DigestInvalid, Unavailable
from sigil.logs import configure
from sigil.oci.digest import Digest
from sigil.server.peer import (
    AUTH_HEADER,
    MAX_SKEW,
    PEER_BLOBS_PATH,
    TIME_HEADER,
    add_peer_routes,
    peer_auth_headers,
    peer_signature,
)
from sigil.storage import BlobStore
from sigil.upstream.client import UpstreamBlob, UpstreamClient
from sigil.upstream.peer import PeerClient
from tests.support.fakeupstream import FakeUpstream
from tests.support.sigilproc import free_port

SECRET = b"peer-secret-for-tests-0123456789abcdef"
REPO = "library/big"
# Not a multiple of the read chunk: the last upstream chunk is short, as in real blobs.
BLOB_SIZE = 6 * READ_CHUNK + 12345
# What the test readers ask PeerBlob.iter_chunks for (small: progress is visible early).
READ = 64 * 1024


def _committed(digest: Digest, size: int) -> None:
    """The index row callback (the mirror writes the index row here)."""


class _GatedBlob:
    """The upstream's open blob, each chunk passed on only once the gate allows it."""

    def __init__(self, blob: UpstreamBlob, gate: GatedUpstream) -> None:
        self._blob = blob
        self._gate = gate
        self.size: int | None = blob.size if gate.announce_size else None

    async def iter_chunks(self, chunk: int = READ_CHUNK) -> AsyncIterator[bytes]:
        # The upstream client hands the body on in whatever pieces arrived; the gate counts
        # whole chunks of ``chunk`` bytes (the last one may be short), so the steps are exact.
        step, pending = 0, bytearray()

        async def pieces() -> AsyncIterator[bytes]:
            async for piece in self._blob.iter_chunks(chunk):
                pending.extend(piece)
                while len(pending) >= chunk:
                    yield bytes(pending[:chunk])
                    del pending[:chunk]
            if pending:
                yield bytes(pending)

        async for piece in pieces():
            await self._gate.wait(step)
            step += 1
            yield piece
        # The end of the body is one more step: until it is allowed the holder has every
        # byte and has not verified them yet.
        await self._gate.wait(step)


class GatedUpstream:
    """Opens the fake registry's blob over HTTP and lets it through step by step."""

    def __init__(self, client: UpstreamClient, digest: Digest, announce_size: bool) -> None:
        self._client = client
        self._digest = digest
        # False: pass the body on as if the upstream had sent no Content-Length.
        self.announce_size = announce_size
        self._allowed = 0
        self._more = asyncio.Event()
        self.opens = 0

    def allow(self, steps: int) -> None:
        self._allowed += steps
        self._more.set()

    async def wait(self, step: int) -> None:
        while step >= self._allowed:
            self._more.clear()
            await self._more.wait()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[BlobSource]:
        self.opens += 1
        async with self._client.open_blob(REPO, self._digest) as blob:
            yield _GatedBlob(blob, self)


@dataclass
class Holder:
    """The replica that downloads: its fake upstream, store, Downloads and peer server."""

    fake: FakeUpstream
    upstream: UpstreamClient
    store: BlobStore
    downloads: Downloads
    url: str

    def add_blob(self, size: int = BLOB_SIZE) -> tuple[bytes, Digest]:
        data = os.urandom(size)
        digest = Digest.of(data)
        self.fake.blobs[str(digest)] = data
        return data, digest

    async def start(self, digest: Digest, announce_size: bool = True
                    ) -> tuple[Download, GatedUpstream]:
        """Start the download of ``digest`` and let its first chunk in."""
        gate = GatedUpstream(self.upstream, digest, announce_size)
        download, started = self.downloads.get_or_start(digest, gate.open, _committed)
        assert started
        gate.allow(1)
        await _until(lambda: download.received > 0, "the holder's first chunk")
        return download, gate

    def signed(self, path: str, secret: bytes = SECRET, now: float | None = None
               ) -> dict[str, str]:
        return peer_auth_headers(secret, path, now)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Holder]:
    fake = FakeUpstream()
    upstream_server = TestServer(fake.app(), host="127.0.0.1")
    await upstream_server.start_server()
    upstream = UpstreamClient(UpstreamConfig(
        name="docker.io", url=str(upstream_server.make_url("")).rstrip("/"), retries=0,
        connect_timeout=5.0, read_timeout=10.0))
    store = BlobStore(tmp_path / "holder")
    downloads = Downloads(store)
    app = web.Application()
    add_peer_routes(app, downloads, SECRET)
    peer_server = TestServer(app, host="127.0.0.1")
    await peer_server.start_server()
    yield Holder(fake, upstream, store, downloads,
                 str(peer_server.make_url("")).rstrip("/"))
    await downloads.drain(5)
    await peer_server.close()
    await upstream.close()
    await upstream_server.close()


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., PeerClient]]:
    made: list[PeerClient] = []

    def make(secret: bytes = SECRET, timeout: float = 10.0) -> PeerClient:
        client = PeerClient(secret, timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def _relay(client: PeerClient, url: str, digest: Digest, into: bytearray,
                 sizes: list[int | None] | None = None) -> None:
    """Read the peer stream into ``into`` (the follower's side, minus its own hashing)."""
    async with client.open_blob(url, digest) as blob:
        if sizes is not None:
            sizes.append(blob.size)
        async for piece in blob.iter_chunks(READ):
            into += piece


def _count(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("sigil_peer_requests_total",
                                             {"result": result}) or 0.0


def _bytes_sent() -> float:
    return metrics.REGISTRY.get_sample_value("sigil_peer_bytes_sent_total") or 0.0


async def test_three_peers_stream_the_blob_while_the_holder_downloads_it(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    data, digest = holder.add_blob()
    streamed, sent = _count("streamed"), _bytes_sent()
    download, gate = await holder.start(digest)
    assert holder.downloads.get(digest) is download
    client = peers()
    bodies = [bytearray() for _ in range(3)]
    sizes: list[int | None] = []
    readers = [asyncio.ensure_future(_relay(client, holder.url, digest, body, sizes))
               for body in bodies]
    # Every reader has its first bytes before the holder has the second upstream chunk.
    await _until(lambda: all(len(body) >= READ for body in bodies), "every peer's first bytes")
    assert download.received == READ_CHUNK and not download.finished.is_set()
    gate.allow(100)
    await asyncio.wait_for(asyncio.gather(*readers), 30)
    for body in bodies:
        assert bytes(body) == data
        assert Digest.of(bytes(body)) == digest
    assert sizes == [len(data)] * 3  # Content-Length, known before the body was complete
    assert holder.fake.hits[f"GET blob {digest}"] == 1  # one upstream fetch for all of them
    # The handlers count after their last write: the readers may have finished first.
    await _until(lambda: _count("streamed") - streamed == 3, "three streams counted")
    assert _bytes_sent() - sent == 3 * len(data)
    await asyncio.wait_for(download.finished.wait(), 20)
    assert holder.store.has(digest)


async def _raw_read_with_the_tail_held(holder: Holder, download: Download,
                                       gate: GatedUpstream, data: bytes
                                       ) -> aiohttp.ClientResponse:
    """Read the peer stream with a raw client (readany returns whatever reached the socket)
    while the holder has every byte but not the end of its upstream body; check that the
    last byte stays withheld; then let the body end and check the whole. Returns the
    response for its headers."""
    path = PEER_BLOBS_PATH + str(download.digest)
    got = bytearray()
    async with aiohttp.ClientSession() as session:
        async with session.get(holder.url + path, headers=holder.signed(path)) as response:
            assert response.status == 200
            gate.allow(-(-len(data) // READ_CHUNK) - 1)  # every chunk, not the end
            await _until(lambda: download.received == len(data), "the holder's last chunk")

            async def all_but_the_last_byte() -> None:
                while len(got) < len(data) - 1:
                    got.extend(await response.content.readany())

            await asyncio.wait_for(all_but_the_last_byte(), 20)
            # The holder has all the bytes, unverified: the last one is still withheld.
            await asyncio.sleep(0.3)
            assert not download.verified
            assert len(got) == len(data) - 1
            assert response.content.total_bytes == len(data) - 1  # nothing more arrived
            gate.allow(1)
            got.extend(await asyncio.wait_for(response.content.read(), 20))
    assert bytes(got) == data
    return response


async def test_a_peer_gets_at_most_size_minus_one_bytes_until_the_holder_verified(
        holder: Holder) -> None:
    data, digest = holder.add_blob()
    download, gate = await holder.start(digest)
    response = await _raw_read_with_the_tail_held(holder, download, gate, data)
    assert response.headers["Docker-Content-Digest"] == str(digest)
    assert response.content_length == len(data)


async def test_a_blob_of_unknown_size_is_streamed_chunked_with_its_tail_held(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    data, digest = holder.add_blob()
    download, gate = await holder.start(digest, announce_size=False)
    response = await _raw_read_with_the_tail_held(holder, download, gate, data)
    assert "Content-Length" not in response.headers
    assert response.headers.get("Transfer-Encoding") == "chunked"
    # Through PeerClient the size is unknown too, and the body is whole.
    sizes: list[int | None] = []
    download, gate = await holder.start(holder.add_blob()[1], announce_size=False)
    other = bytearray()
    reader = asyncio.ensure_future(_relay(peers(), holder.url, download.digest, other, sizes))
    gate.allow(100)
    await asyncio.wait_for(reader, 20)
    assert sizes == [None] and Digest.of(bytes(other)) == download.digest


async def test_only_get_is_served(holder: Holder) -> None:
    _, digest = holder.add_blob()
    _, gate = await holder.start(digest)
    path = PEER_BLOBS_PATH + str(digest)
    async with aiohttp.ClientSession() as session:
        async with session.head(holder.url + path, headers=holder.signed(path)) as response:
            assert response.status == 405
        async with session.post(holder.url + path, headers=holder.signed(path)) as response:
            assert response.status == 405
            assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"
    gate.allow(100)


async def test_wrong_bytes_upstream_cut_the_peer_stream_short(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    data, digest = holder.add_blob()
    holder.fake.faults[str(digest)] = "wrong-bytes"
    cut = _count("cut")
    download, gate = await holder.start(digest)
    got = bytearray()
    reader = asyncio.ensure_future(_relay(peers(), holder.url, digest, got))
    await _until(lambda: len(got) >= READ, "the peer's first bytes")
    gate.allow(-(-len(data) // READ_CHUNK) - 1)  # every byte, not yet the end of the body
    await _until(lambda: download.received == len(data), "the holder's last chunk")
    await _until(lambda: len(got) >= len(data) - READ, "the peer to catch up")
    gate.allow(1)  # the end: the holder hashes, finds a mismatch, cuts the stream
    with pytest.raises(Unavailable, match="stream failed"):
        await asyncio.wait_for(reader, 20)
    assert len(got) <= len(data) - 1  # never the complete body
    await asyncio.wait_for(download.finished.wait(), 20)
    assert isinstance(download.error, DigestInvalid)
    assert not holder.store.has(digest)
    assert _count("cut") - cut == 1


def test_the_mac_is_hmac_sha256_of_method_path_and_time() -> None:
    path = PEER_BLOBS_PATH + "sha256:" + "ab" * 32
    expected = hmac.new(SECRET, f"GET {path}\n1700000000".encode(), hashlib.sha256)
    assert peer_signature(SECRET, path, "1700000000") == expected.hexdigest()
    assert peer_auth_headers(SECRET, path, 1700000000.7) == {
        TIME_HEADER: "1700000000", AUTH_HEADER: expected.hexdigest()}


def _tamper_time(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, TIME_HEADER: str(int(headers[TIME_HEADER]) + 1)}


@pytest.mark.parametrize("forge", [
    pytest.param(lambda path: {}, id="no-headers"),
    pytest.param(lambda path: {TIME_HEADER: str(int(time.time()))}, id="no-mac"),
    pytest.param(lambda path: {AUTH_HEADER: peer_auth_headers(SECRET, path)[AUTH_HEADER]},
                 id="no-time"),
    pytest.param(lambda path: peer_auth_headers(b"another-fleets-secret", path),
                 id="wrong-secret"),
    pytest.param(lambda path: peer_auth_headers(SECRET, path, time.time() - MAX_SKEW - 60),
                 id="stale"),
    pytest.param(lambda path: peer_auth_headers(SECRET, path, time.time() + MAX_SKEW + 60),
                 id="from-the-future"),
    pytest.param(lambda path: peer_auth_headers(SECRET, PEER_BLOBS_PATH + "sha256:" + "0" * 64),
                 id="mac-of-another-path"),
    pytest.param(lambda path: _tamper_time(peer_auth_headers(SECRET, path)),
                 id="time-changed-after-signing"),
    pytest.param(lambda path: {**peer_auth_headers(SECRET, path), TIME_HEADER: "soon"},
                 id="malformed-time"),
    pytest.param(lambda path: {**peer_auth_headers(SECRET, path), AUTH_HEADER: "zz" * 32},
                 id="malformed-mac"),
])
async def test_a_request_without_a_valid_mac_is_refused(
        holder: Holder, forge: Callable[[str], dict[str, str]]) -> None:
    _, digest = holder.add_blob()
    _, gate = await holder.start(digest)  # in flight: a 401 is not a 404 in disguise
    path = PEER_BLOBS_PATH + str(digest)
    refused = _count("unauthorized")
    async with aiohttp.ClientSession() as session:
        async with session.get(holder.url + path, headers=forge(path)) as response:
            assert response.status == 401
            body = await response.json()
    assert body["errors"][0]["code"] == "UNAUTHORIZED"
    assert _count("unauthorized") - refused == 1
    gate.allow(100)


async def test_the_client_raises_unavailable_on_a_wrong_secret(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    _, digest = holder.add_blob()
    _, gate = await holder.start(digest)
    with pytest.raises(Unavailable, match="answered 401"):
        await _relay(peers(secret=b"not-the-fleet-secret"), holder.url, digest, bytearray())
    gate.allow(100)


async def test_a_digest_not_in_flight_is_404_and_unavailable(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    data, digest = holder.add_blob()
    path = PEER_BLOBS_PATH + str(digest)
    async with aiohttp.ClientSession() as session:
        async with session.get(holder.url + path, headers=holder.signed(path)) as response:
            assert response.status == 404
            assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    with pytest.raises(Unavailable, match="answered 404"):
        await _relay(peers(), holder.url, digest, bytearray())
    # Once committed the download leaves the table: the caller reads the store instead.
    download, gate = await holder.start(digest)
    gate.allow(100)
    await asyncio.wait_for(download.finished.wait(), 20)
    await _until(lambda: holder.downloads.get(digest) is None, "the table to drop it")
    with pytest.raises(Unavailable, match="answered 404"):
        await _relay(peers(), holder.url, digest, bytearray())
    assert holder.store.path(digest).read_bytes() == data


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64,
                                 "latest"])
async def test_a_malformed_digest_is_400_digest_invalid(holder: Holder, bad: str) -> None:
    path = PEER_BLOBS_PATH + bad
    async with aiohttp.ClientSession() as session:
        async with session.get(holder.url + path, headers=holder.signed(path)) as response:
            assert response.status == 400
            assert (await response.json())["errors"][0]["code"] == "DIGEST_INVALID"


async def test_a_stalled_holder_fails_the_peer_within_its_timeout(
        holder: Holder, peers: Callable[..., PeerClient]) -> None:
    _, digest = holder.add_blob()
    _, gate = await holder.start(digest)
    got = bytearray()
    reader = asyncio.ensure_future(_relay(peers(timeout=1.0), holder.url, digest, got))
    # The holder has sent its first chunk and gets nothing more from its upstream.
    with pytest.raises(Unavailable, match="timeout"):
        await asyncio.wait_for(reader, 20)
    assert len(got) == READ_CHUNK
    gate.allow(100)


async def _client_read(download: Download, into: bytearray) -> None:
    """A client of the follower replica reading the follower's download."""
    await download.wait_started()
    async for piece in download.stream():
        into += piece


async def test_two_hops_keep_the_tail_until_both_replicas_verified(
        holder: Holder, peers: Callable[..., PeerClient], tmp_path: Path) -> None:
    data, digest = holder.add_blob()
    download, gate = await holder.start(digest)
    client = peers()
    # The follower replica: its own Downloads over its own store, fed by the peer stream.
    follower_store = BlobStore(tmp_path / "follower")
    follower = Downloads(follower_store)
    relayed, _ = follower.get_or_start(digest, lambda: client.open_blob(holder.url, digest),
                                       _committed)
    got = bytearray()
    reader = asyncio.ensure_future(_client_read(relayed, got))
    gate.allow(-(-len(data) // READ_CHUNK) - 1)  # every byte, not the end of the body
    await _until(lambda: download.received == len(data), "the holder's last chunk")
    # The follower reads whole chunks: it has them all but the short last one, which the
    # holder cannot complete (its last byte is held back).
    whole = (len(data) - 1) // READ_CHUNK * READ_CHUNK
    await _until(lambda: relayed.received == whole, "the follower's whole chunks")
    await asyncio.sleep(0.3)  # nothing more moves until the holder verified
    assert relayed.received == whole and len(got) <= whole
    assert not relayed.verified and not follower_store.has(digest)
    gate.allow(1)
    await asyncio.wait_for(reader, 20)
    assert bytes(got) == data
    await asyncio.wait_for(relayed.finished.wait(), 20)
    assert follower_store.path(digest).read_bytes() == data
    # The holder commits after it released the tail: wait for it before looking.
    await asyncio.wait_for(download.finished.wait(), 20)
    assert download.committed is not None and holder.fake.hits[f"GET blob {digest}"] == 1


async def test_a_lying_peer_is_caught_by_the_followers_own_hash(
        tmp_path: Path, peers: Callable[..., PeerClient]) -> None:
    data = os.urandom(3 * READ_CHUNK)
    digest = Digest.of(data)
    forged = bytes(reversed(data))  # the right length and digest header, the wrong bytes

    async def lying(request: web.Request) -> web.Response:
        return web.Response(body=forged, headers={"Docker-Content-Digest": str(digest)})

    server = await _fault_server(lying)
    try:
        url = str(server.make_url("")).rstrip("/")
        client = peers()
        follower_store = BlobStore(tmp_path / "follower")
        relayed, _ = Downloads(follower_store).get_or_start(
            digest, lambda: client.open_blob(url, digest), _committed)
        got = bytearray()
        with pytest.raises(DigestInvalid):
            await asyncio.wait_for(_client_read(relayed, got), 20)
        assert len(got) <= len(data) - 1 and not follower_store.has(digest)
    finally:
        await server.close()


# A holder replica in its own process, to be SIGKILLed mid-stream: its own fake upstream
# serving a slow blob, its Downloads fetching it, the peer endpoint on a free port.
_HOLDER_PROCESS = textwrap.dedent("""
    import asyncio, os, sys
    from aiohttp import web
    from sigil.config import UpstreamConfig
    from sigil.downloads import Downloads
    from sigil.oci.digest import Digest
    from sigil.server.peer import add_peer_routes
    from sigil.storage import BlobStore
    from sigil.upstream.client import UpstreamClient
    from tests.support.fakeupstream import FakeUpstream

    async def main() -> None:
        data = os.urandom(8 * 1024 * 1024)
        digest = Digest.of(data)
        fake = FakeUpstream(blobs={str(digest): data}, blob_delay=0.2)
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream_port = runner.addresses[0][1]
        upstream = UpstreamClient(UpstreamConfig(
            name="docker.io", url=f"http://127.0.0.1:{upstream_port}", retries=0))
        downloads = Downloads(BlobStore(sys.argv[1]))
        downloads.get_or_start(digest, lambda: upstream.open_blob("library/big", digest),
                               lambda d, s: None)
        app = web.Application()
        add_peer_routes(app, downloads, sys.argv[2].encode())
        peer_runner = web.AppRunner(app)
        await peer_runner.setup()
        await web.TCPSite(peer_runner, "127.0.0.1", 0).start()
        print(peer_runner.addresses[0][1], digest, flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
""")


async def test_a_holder_killed_mid_stream_fails_the_peer(
        tmp_path: Path, peers: Callable[..., PeerClient]) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER_PROCESS, str(tmp_path / "holder"), SECRET.decode(),
        stdout=asyncio.subprocess.PIPE, cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)})
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        port, digest_text = line.decode().split()
        digest = Digest.parse(digest_text)
        got = bytearray()
        reader = asyncio.ensure_future(
            _relay(peers(timeout=10.0), f"http://127.0.0.1:{port}", digest, got))
        await _until(lambda: len(got) > 0, "the peer's first bytes")
        process.send_signal(signal.SIGKILL)
        with pytest.raises(Unavailable, match="stream failed"):
            await asyncio.wait_for(reader, 20)
        assert 0 < len(got) < 8 * 1024 * 1024
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    assert process.returncode != 0  # it died (asyncio may report a reaped child as 255)


async def _fault_server(handler: Callable[[web.Request], Any]) -> TestServer:
    app = web.Application()
    app.router.add_get(PEER_BLOBS_PATH + "{digest}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_a_peer_answering_5xx_or_another_digest_is_unavailable(
        peers: Callable[..., PeerClient]) -> None:
    digest = Digest.of(b"x")

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    async def lying(request: web.Request) -> web.Response:
        return web.Response(body=b"y", headers={"Docker-Content-Digest": str(Digest.of(b"y"))})

    async def short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Docker-Content-Digest": str(digest)})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return response

    for handler, message in ((busy, "answered 503"), (lying, "another digest"),
                             (short, "stream failed|ended after")):
        server = await _fault_server(handler)
        try:
            with pytest.raises(Unavailable, match=message):
                await _relay(peers(), str(server.make_url("")).rstrip("/"), digest,
                             bytearray())
        finally:
            await server.close()


def test_an_empty_secret_is_refused_on_both_sides(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        PeerClient(b"")
    with pytest.raises(ValueError, match="empty"):
        add_peer_routes(web.Application(), Downloads(BlobStore(tmp_path)), b"")


async def test_an_unreachable_peer_is_unavailable(peers: Callable[..., PeerClient]) -> None:
    with pytest.raises(Unavailable, match="cannot open"):
        await _relay(peers(timeout=5.0), f"http://127.0.0.1:{free_port()}", Digest.of(b"x"),
                     bytearray())


async def test_neither_the_secret_nor_a_mac_is_logged(
        holder: Holder, peers: Callable[..., PeerClient],
        capfd: pytest.CaptureFixture[str]) -> None:
    saved = structlog.get_config()
    configure(level="debug", fmt="json")
    try:
        await _log_a_refusal_and_a_cut_stream(holder, peers)
    finally:
        output = "".join(capfd.readouterr())
        structlog.configure(**saved)
    assert "peer.refused" in output and "peer.fetch_failed" in output  # logging was captured
    assert "peer.stream_cut" in output
    for needle in (SECRET.decode(), SECRET.hex(), WRONG_SECRET.decode(), AUTH_HEADER):
        assert needle not in output
    assert not re.search(r"[0-9a-f]{64}", re.sub(r"sha256:[0-9a-f]{64}", "", output))


WRONG_SECRET = b"a-wrong-secret-for-this-fleet"


async def _log_a_refusal_and_a_cut_stream(holder: Holder,
                                          peers: Callable[..., PeerClient]) -> None:
    """A refused request (raw and through PeerClient) and a stream cut on a mismatch."""
    _, digest = holder.add_blob()
    holder.fake.faults[str(digest)] = "wrong-bytes"
    _, gate = await holder.start(digest)
    path = PEER_BLOBS_PATH + str(digest)
    async with aiohttp.ClientSession() as session:
        headers = peer_auth_headers(WRONG_SECRET, path)
        async with session.get(holder.url + path, headers=headers) as response:
            assert response.status == 401
    with pytest.raises(Unavailable):
        await _relay(peers(secret=WRONG_SECRET), holder.url, digest, bytearray())
    got = bytearray()
    reader = asyncio.ensure_future(_relay(peers(), holder.url, digest, got))
    await _until(lambda: len(got) > 0, "the peer's first bytes")
    gate.allow(100)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(reader, 20)


@pytest.mark.parametrize("location", [
    "{url}/elsewhere?", "{url}/", "http://user:pw@{hostport}", "https://{hostport}",
    "{url}#", "/var/lib/sigil/staging/" + "0" * 32, "http://{hostport}/x/../",
])
async def test_a_lease_location_other_than_http_host_port_is_never_requested(
        peers: Callable[..., PeerClient], location: str) -> None:
    # The location comes from a row of the shared lease table: a replica must not send a
    # signed request to any other URL than a peer endpoint's, whoever wrote the row.
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        target = location.format(url=url, hostport=url.removeprefix("http://"))
        digest = Digest.of(b"anything")
        with pytest.raises(Unavailable, match="invalid peer location"):
            await _relay(peers(), target, digest, bytearray())
        assert seen == []
    finally:
        await server.close()
