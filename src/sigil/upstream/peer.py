"""The client half of the peer stream: read a blob from the replica that is downloading it.

A replica that misses a cold blob whose fetch lease another replica holds opens the holder's
``GET /_sigil/peer/blobs/{digest}`` (server/peer.py) with :meth:`PeerClient.open_blob` and uses
the answer as its :class:`~sigil.downloads.BlobSource`, in place of the upstream response.

The holder never sends its last byte before its own sha256 matched, and cuts the connection
on a mismatch; that protects this hop only. The caller must still treat the peer like any
upstream: hash what it relays itself and hold its own last byte back until its own hash
matched the digest (a :class:`~sigil.downloads.Download` fed by this source does exactly
that), so that neither a broken nor a lying peer can give a client a complete unverified body.

Every failure is :class:`~sigil.errors.Unavailable`: the peer unreachable, no byte for
``timeout`` seconds (a holder that died or stalls), an answer other than 200 (401: the secrets
differ or the clocks are more than five minutes apart; 404: nothing of that digest in flight
there, so the caller looks in the shared store or retries the lease; 5xx), a body cut short of
its ``Content-Length``. No aiohttp exception leaves this module, and the authentication
headers are never logged.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from sigil import __version__, metrics
from sigil.errors import Unavailable
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.server.peer import PEER_BLOBS_PATH, peer_auth_headers
from sigil.upstream.client import BLOB_CHUNK

log = get_logger("sigil.peer")

# A peer location as the lease table holds it: ``http://host:port`` and nothing else (the
# form server/app.py advertises). The row comes from a shared database: anything with a path,
# query, user info or another scheme is refused before a request (and its MAC) leaves.
_LOCATION = re.compile(r"http://(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5}")


def valid_peer_location(location: str) -> bool:
    """Is ``location`` a peer address this client will request (``http://host:port``)?"""
    return _LOCATION.fullmatch(location) is not None


def _failure(reason: str, message: str) -> Unavailable:
    metrics.PEER_CLIENT_FAILURES.labels(reason).inc()
    log.warning("peer.fetch_failed", reason=reason, error=message)
    return Unavailable(message)


def _reason(exc: BaseException) -> str:
    """A bounded metric label for a transport failure."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    return "cut"


class PeerBlob:
    """An open peer response (a :class:`~sigil.downloads.BlobSource`); read it once."""

    def __init__(self, response: aiohttp.ClientResponse, digest: Digest, peer: str) -> None:
        self._response = response
        self._peer = peer
        self.digest = digest
        self.size: int | None = response.content_length
        self.received = 0

    async def iter_chunks(self, chunk: int = BLOB_CHUNK) -> AsyncIterator[bytes]:
        """Yield the body in pieces of ``chunk`` bytes (the last one may be shorter). Raises
        :class:`Unavailable` when the stream breaks, stalls for the client's timeout, or ends
        short of ``size``."""
        content = self._response.content
        try:
            while True:
                try:
                    data = await content.readexactly(chunk)
                except asyncio.IncompleteReadError as end:
                    if end.partial:
                        self.received += len(end.partial)
                        yield end.partial
                    break
                self.received += len(data)
                yield data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _failure(_reason(exc), f"peer {self._peer}: blob {self.digest} stream failed "
                           f"after {self.received} bytes ({_reason(exc)})") from exc
        if self.size is not None and self.received != self.size:
            raise _failure("short", f"peer {self._peer}: blob {self.digest} ended after "
                           f"{self.received} of {self.size} bytes")


class PeerClient:
    """Reads in-flight blobs from other replicas; one HTTP session (connection pool) for all
    of them. ``secret`` is the fleet's shared peer secret; ``timeout`` bounds the connect and
    every wait for the next byte (headers included), not the whole transfer."""

    def __init__(self, secret: bytes, timeout: float = 30.0) -> None:
        if not secret:
            raise ValueError("the peer secret is empty")
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout,
                                              sock_connect=timeout, sock_read=timeout)
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise Unavailable("the peer client is closed")
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout,
                # Identity: Content-Length must count the bytes the digest covers.
                headers={"User-Agent": f"sigil/{__version__}", "Accept-Encoding": "identity"},
                # Peers are addressed directly, never through a proxy from the environment.
                trust_env=False,
                # As for the upstream: let a chunk build up before the socket is paused.
                read_bufsize=BLOB_CHUNK)
        return self._http

    @asynccontextmanager
    async def open_blob(self, base_url: str, digest: Digest) -> AsyncIterator[PeerBlob]:
        """Open ``digest`` on the peer at ``base_url`` (exactly ``http://host:port``, as
        read from a lease row; anything else is refused without a request):
        ``async with client.open_blob(url, digest) as blob``. Raises :class:`Unavailable`
        on open and from :meth:`PeerBlob.iter_chunks`."""
        session = self._session()
        if not valid_peer_location(base_url):
            # Never echo the value: it came from a database row, not from this replica.
            raise _failure("protocol", f"blob {digest}: the lease names an invalid peer "
                           "location (not http://host:port)")
        try:
            url = URL(base_url + PEER_BLOBS_PATH + str(digest))
            peer = f"{url.host}:{url.port}"
        except ValueError as exc:
            raise _failure("protocol", "invalid peer URL") from exc
        headers = peer_auth_headers(self._secret, url.raw_path)
        try:
            response = await session.get(url, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _failure(_reason(exc), f"peer {peer}: cannot open blob {digest} "
                           f"({_reason(exc)})") from exc
        try:
            if response.status != 200:
                reason = {401: "refused", 404: "unknown"}.get(response.status, "status")
                raise _failure(reason, f"peer {peer}: blob {digest} answered "
                               f"{response.status}")
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if (response.headers.get("Docker-Content-Digest") != str(digest)
                    or encoding != "identity"):
                raise _failure("protocol", f"peer {peer}: blob {digest} answered with another "
                               "digest or an encoded body")
            yield PeerBlob(response, digest, peer)
        finally:
            # Closes the connection if the body was not read to the end.
            response.release()

    async def close(self) -> None:
        """Close the session. Idempotent; the client is then unusable."""
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
