"""The internal peer endpoint: another replica streams a blob this replica is downloading.

In a fleet exactly one replica holds a cold blob's fetch lease and downloads it from the
upstream. A replica that misses the same blob and does not hold the lease asks the holder with
``GET /_sigil/peer/blobs/{digest}`` and relays what it gets, instead of waiting for the whole
download to land in the shared store (S3 cannot read back the parts of an unfinished multipart
upload). The holder streams its in-flight :class:`~sigil.downloads.Download` exactly as it
streams it to its own clients: :meth:`Download.stream` withholds the last byte until the sha256
of everything received matched the digest, and on a mismatch or a cut upstream the peer
connection is aborted. So no peer ever receives a complete unverified body.

The endpoint serves only what is in flight on this replica: a blob that is already committed
(or not being fetched here) answers 404 ``BLOB_UNKNOWN``, and the caller reads the shared store
or retries the lease. With ``--workers N`` the workers share the peer port (SO_REUSEPORT), so
a request may reach a worker that has no download of the blob while a sibling has it: that
worker then follows the sibling's growing scratch file through the host's lease file
(:meth:`~sigil.downloads.Downloads.follow_sibling`, the ``--workers`` follow path, same tail
rule) and streams it, rather than answering 404. It serves bytes without any policy
decision: the asking replica applies its own gate before it relays anything to a client.

Authentication is one shared secret for the fleet: the caller sends ``X-Sigil-Peer-Time``
(Unix seconds) and ``X-Sigil-Peer-Auth``, the hex HMAC-SHA256 of ``"GET " + path + "\\n" +
time`` under the secret, where ``path`` is the request path as sent (no query). A request
whose time is more than :data:`MAX_SKEW` seconds off this replica's clock is refused, so the
replicas' clocks must be roughly in sync (NTP). Within that window a captured request can be
replayed, for the same content-addressed blob only; keep the peer listener on an internal
network. Neither the secret nor any MAC is ever logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time

from aiohttp import web

from sigil import metrics
from sigil.downloads import Download, Downloads
from sigil.errors import BlobUnknown, RegistryError, Unauthorized, Unavailable, Unsupported
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.server.middleware import ROUTE_KEY, error_response

log = get_logger("sigil.peer")

PEER_BLOBS_PATH = "/_sigil/peer/blobs/"
AUTH_HEADER = "X-Sigil-Peer-Auth"
TIME_HEADER = "X-Sigil-Peer-Time"
# How far (seconds) a request's time may be from this replica's clock, either way.
MAX_SKEW = 300
_TIME = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[0-9a-f]{64}")


def peer_signature(secret: bytes, path: str, timestamp: str) -> str:
    """The hex HMAC-SHA256 a peer request for ``path`` at ``timestamp`` carries."""
    message = f"GET {path}\n{timestamp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def peer_auth_headers(secret: bytes, path: str, now: float | None = None) -> dict[str, str]:
    """The two authentication headers of a peer request for ``path`` (the client's half)."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIME_HEADER: timestamp, AUTH_HEADER: peer_signature(secret, path, timestamp)}


def _refusal(request: web.Request, secret: bytes) -> str | None:
    """Why the request is not authenticated (a short reason for logs and metrics), or None."""
    timestamp = request.headers.get(TIME_HEADER)
    provided = request.headers.get(AUTH_HEADER)
    if timestamp is None or provided is None:
        return "missing"
    if not _TIME.fullmatch(timestamp) or not _MAC.fullmatch(provided):
        return "malformed"
    if abs(int(timestamp) - time.time()) > MAX_SKEW:
        return "stale"
    expected = peer_signature(secret, request.rel_url.raw_path, timestamp)
    if not hmac.compare_digest(expected, provided):
        return "bad_mac"
    return None


def _refuse(result: str, error: RegistryError) -> web.Response:
    metrics.PEER_REQUESTS.labels(result).inc()
    return error_response(error)


def add_peer_routes(app: web.Application, downloads: Downloads, secret: bytes) -> None:
    """Register ``GET /_sigil/peer/blobs/{digest}`` on ``app``, streaming the in-flight
    downloads of ``downloads`` to replicas that prove they know ``secret``.

    Errors are rendered as OCI error JSON by the handler itself, so ``app`` needs no sigil
    middleware (it may have it: the route is then counted as ``peer``). Mount it on the
    internal listener (``server.peer_listen``), not behind the client authentication.
    """
    if not secret:
        # An empty key would let anyone who knows the scheme read in-flight blobs.
        raise ValueError("the peer secret is empty")

    async def peer_blob(request: web.Request) -> web.StreamResponse:
        request[ROUTE_KEY] = "peer"
        reason = _refusal(request, secret)
        if reason is not None:
            log.warning("peer.refused", reason=reason, remote=request.remote)
            return _refuse("unauthorized", Unauthorized("peer authentication failed"))
        try:
            digest = Digest.parse(request.match_info["digest"])
        except RegistryError as exc:
            return _refuse("invalid", exc)
        following: Download | None = None
        download = downloads.get(digest)
        if download is None:
            download = following = await downloads.follow_sibling(digest)
        if download is None:
            return _refuse("not_found", BlobUnknown(f"no download of {digest} in flight on "
                                                    "this replica"))
        try:
            return await _stream(request, digest, download)
        finally:
            if following is not None and following.task is not None:
                # Only this request reads it: stop polling the sibling's file now.
                following.task.cancel()
                await asyncio.gather(following.task, return_exceptions=True)

    async def other_method(request: web.Request) -> web.Response:
        request[ROUTE_KEY] = "peer"
        return _refuse("invalid", Unsupported("the peer endpoint answers GET only"))

    # GET only: the MAC covers the method, and a HEAD would not need the stream.
    app.router.add_get(PEER_BLOBS_PATH + "{digest}", peer_blob, allow_head=False)
    app.router.add_route("*", PEER_BLOBS_PATH + "{digest}", other_method)


async def _stream(request: web.Request, digest: Digest, download: Download
                  ) -> web.StreamResponse:
    """Stream ``download`` to the asking replica with its tail rule (cut on a failure)."""
    try:
        await download.wait_started()
    except RegistryError:
        return _refuse("failed", Unavailable(f"the download of {digest} failed on this "
                                             "replica"))
    if download.error is not None and not download.verified:
        return _refuse("failed", Unavailable(f"the download of {digest} failed on this "
                                             "replica"))
    response = web.StreamResponse(status=200,
                                  headers={"Docker-Content-Digest": str(digest)})
    response.content_type = "application/octet-stream"
    if download.size is not None:
        response.content_length = download.size
    await response.prepare(request)
    sent = 0
    body = download.stream()
    try:
        async for chunk in body:
            await response.write(chunk)
            sent += len(chunk)
            metrics.PEER_BYTES_SENT.inc(len(chunk))
    except RegistryError as exc:
        # The digest did not match or the upstream broke: the status line is out, so the
        # connection is cut and the peer sees a short body, never a complete one.
        metrics.PEER_REQUESTS.labels("cut").inc()
        log.warning("peer.stream_cut", digest=str(digest), sent=sent, error=str(exc))
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        # The asking replica went away; its own clients are its business.
        metrics.PEER_REQUESTS.labels("abandoned").inc()
        return response
    finally:
        # Close the staging file descriptor now, not when the generator is collected.
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
    await response.write_eof()
    metrics.PEER_REQUESTS.labels("streamed").inc()
    return response
