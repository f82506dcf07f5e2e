"""The one HTTP client to an upstream registry (OCI distribution spec, pull side only).

One :class:`UpstreamClient` per configured upstream owns one ``aiohttp.ClientSession``. Every
request goes through the same path:

1. authentication (:mod:`sigil.upstream.auth`): a known challenge authenticates up front, a
   401 is answered once with a fresh token or the credentials;
2. redirects followed by hand, so that the registry's ``Authorization`` header never reaches
   another origin (blob storage backends: S3, CDNs);
3. retries of connection errors, timeouts, 5xx and 429 with exponential backoff and jitter.
   Only GET and HEAD are sent, so retrying is safe; a blob stream that already handed bytes to
   the caller is never retried behind its back;
4. translation at the boundary (DESIGN section 4.2): no aiohttp or asyncio exception leaves
   this package; callers see :mod:`sigil.errors` classes, raised ``from`` the cause.

Bodies are read with explicit bounds; ``Content-Length`` is a hint, never trusted alone.
A large blob body over plain TCP is read beside aiohttp once its head is parsed
(:class:`_RawBody`: straight from the socket into reused 1 MiB buffers, no parser, no copy),
and its connection is closed afterwards instead of being reused.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import math
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
from yarl import URL

from sigil import __version__, metrics
from sigil.config import UpstreamConfig
from sigil.errors import (
    BlobUnknown,
    ConfigError,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
)
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.oci.manifest import DEFAULT_ACCEPT, MAX_MANIFEST_BYTES, OCI_INDEX
from sigil.oci.reference import validate_name, validate_tag
from sigil.upstream.auth import MAX_TOKEN_RESPONSE_BYTES, Authenticator, resolve_credentials
from sigil.upstream.pool import StrictConnector

log = get_logger("sigil.upstream")

# Request kinds: the ``kind`` label of the upstream metrics (a small, fixed set).
KIND_MANIFEST_HEAD = "manifest_head"
KIND_MANIFEST = "manifest"
KIND_BLOB = "blob"
KIND_TAGS = "tags"
KIND_REFERRERS = "referrers"
KIND_TOKEN = "token"

#: Default read size of :meth:`UpstreamBlob.iter_chunks`.
BLOB_CHUNK = 1024 * 1024
# SO_RCVLOWAT of an upstream socket while a blob body arrives (see _ReadLowWater).
RCVLOWAT = 256 * 1024
# Blob bodies of at least this size (known, identity-encoded, plain TCP) are read by _RawBody;
# smaller ones stay on aiohttp's path and keep their connection alive for the next request.
RAW_BODY_MIN = 256 * 1024
# _RawBody receives into buffers of RAW_PIECE bytes: one read under a low-water mark of that
# size fills one, 4x fewer reads, wake-ups, writes and sends than 256 KiB pieces (2-4 MiB
# measured no better; bench/README.md "Cold path, third pass"). It takes another buffer when
# less than RAW_MIN_SPACE is left, keeps up to RAW_POOL released buffers for reuse, and stops
# reading while more than RAW_QUEUE bytes wait for the consumer.
RAW_PIECE = 1024 * 1024
RAW_MIN_SPACE = 64 * 1024
RAW_POOL = 16
RAW_QUEUE = 4 * RAW_PIECE
#: Tag lists larger than this are refused (Docker Hub pages are far smaller).
MAX_TAGS_BYTES = 16 * 1024 * 1024
# Referrers pages followed per call (each up to MAX_MANIFEST_BYTES).
MAX_REFERRER_PAGES = 8
#: How much of an error body is read to find its OCI error code.
MAX_ERROR_BODY = 64 * 1024

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


# -------------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class ManifestHead:
    """What ``HEAD /v2/<repo>/manifests/<ref>`` told: the upstream's claims, unverified."""

    digest: str | None       # Docker-Content-Digest, as sent (the caller validates it)
    media_type: str          # Content-Type without parameters
    size: int | None         # Content-Length


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """Manifest bytes exactly as the upstream sent them."""

    raw: bytes
    media_type: str          # Content-Type without parameters
    digest: str | None       # Docker-Content-Digest, as sent (unverified for tags)


class UpstreamBlob:
    """An open upstream blob response; read it once with :meth:`iter_chunks`.

    ``size`` is the announced ``Content-Length`` (None when absent or when the body is
    content-encoded, since then the header counts encoded bytes).
    """

    def __init__(self, client: UpstreamClient, response: aiohttp.ClientResponse,
                 digest: Digest) -> None:
        self._client = client
        self._response = response
        self.digest = digest
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        self.size: int | None = response.content_length if encoding == "identity" else None
        self.received = 0
        # Taken over at once, before the caller awaits anything: the longer aiohttp keeps
        # reading, the more of the body it copies (and its parser may hold bytes back once
        # its buffer is full, which the take-over refuses).
        self._raw = _RawBody.take_over(response, self.size, client._raw_buffers)

    async def iter_chunks(self, chunk: int = BLOB_CHUNK) -> AsyncIterator[bytes | memoryview]:
        """Yield the body in pieces of at most ``chunk`` bytes, as they arrive.

        A piece never changes while the consumer holds it (a raw body's pieces are views of
        buffers that are received into again only once no view of them is left).

        Each piece is what the connection has buffered when the consumer asks (one socket
        read of ~256 KiB, or of RAW_PIECE for a raw body, see :class:`_ReadLowWater`, or
        several joined when aiohttp's consumer fell behind); nothing waits for a piece to
        fill up (in isolation, ``readexactly`` of
        512 KiB pieces took 0.164 s CPU per 256 MiB on the bench VM, this 0.096 s;
        bench/README.md). A transport failure raises :class:`UpstreamError`; it is
        not retried, because the caller may already have used the bytes it got. A body
        shorter than ``size`` raises too, and so does an upstream that sends nothing for the
        read timeout (one watchdog for the whole body, see :class:`_IdleWatchdog`).
        """
        name = self._client.name
        raw = self._raw
        # Where the body comes from: the raw reader, or aiohttp's StreamReader. Both count
        # ``total_bytes`` and take ``set_exception`` (the watchdog's timeout).
        body: _BodySource = raw if raw is not None else self._response.content
        low_water = _ReadLowWater.start(self._response, self.size, body,
                                        RAW_PIECE if raw is not None else RCVLOWAT)
        watchdog = _IdleWatchdog.start(self._response, self._client.config.read_timeout,
                                       body, lambda: self.received,
                                       low_water.relax if low_water is not None else None)
        try:
            while True:
                data = await (raw.read(chunk) if raw is not None
                              else self._response.content.read(chunk))
                if not data:
                    break
                self.received += len(data)
                if low_water is not None:
                    low_water.update()
                yield data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = _reason(exc)
            self._client._count_error(reason)
            log.warning("upstream.stream_failed", upstream=name, digest=str(self.digest),
                        received=self.received, reason=reason)
            raise UpstreamError(f"upstream {name}: blob {self.digest} stream failed after "
                                f"{self.received} bytes ({reason})") from exc
        finally:
            if watchdog is not None:
                watchdog.stop()
            if low_water is not None:
                low_water.stop()
        if self.size is not None and self.received != self.size:
            self._client._count_error("protocol")
            raise UpstreamError(f"upstream {name}: blob {self.digest} ended after "
                                f"{self.received} of {self.size} bytes")


class _BodySource(Protocol):
    """Where a blob body arrives: aiohttp's ``StreamReader`` or a :class:`_RawBody`."""

    total_bytes: int

    def set_exception(self, exc: BaseException) -> None: ...


def _unshared(buffer: bytearray) -> bool:
    """True when no view of ``buffer`` exists any more (so it may be written again).

    CPython refuses to resize a ``bytearray`` while a buffer export (a ``memoryview``, or a
    view of a view: they share one export) is alive, so a shrink by the spare last byte is
    the test; the byte is put back at once (within the allocation: no copy)."""
    try:
        del buffer[-1]
    except BufferError:
        return False
    buffer.append(0)
    return True


class _PiecePool:
    """Receive buffers for :class:`_RawBody` (RAW_PIECE bytes and a spare byte, see
    :func:`_unshared`), reused once nothing refers to them any more.

    A fresh buffer per read cost a page fault per 4 KiB inside ``recv`` (the kernel's copy
    touched new memory; ~10 % of a cold pull's CPU on the bench VM). A buffer is handed out
    again only when no piece of it is alive anywhere: not queued for the consumer, not held by
    the download, a client or a transport's send buffer (Python 3.12+ keeps views there)."""

    def __init__(self) -> None:
        self._buffers: list[bytearray] = []

    def take(self) -> bytearray:
        """A buffer nobody refers to: a released one, else a new one."""
        for at, buffer in enumerate(self._buffers):
            if _unshared(buffer):
                return self._buffers.pop(at)
        return bytearray(RAW_PIECE + 1)

    def give(self, buffer: bytearray) -> None:
        """``buffer`` is no longer received into (its pieces may still be in use)."""
        if len(self._buffers) < RAW_POOL:
            self._buffers.append(buffer)


class _RawBody(asyncio.BufferedProtocol):
    """A blob body read straight from the upstream socket, beside aiohttp.

    Once aiohttp parsed the response head, the connection's transport is switched to this
    protocol for the rest of the body: the event loop ``recv_into``s a buffer of RAW_PIECE
    bytes from :class:`_PiecePool`, and each read is a piece for the consumer, a
    ``memoryview`` of that buffer. aiohttp's way costs, per socket read, a parser call, a copy
    of the body bytes into another ``bytes``, the ``StreamReader``'s bookkeeping and a timer
    re-arm: with it, sigil's CPU per cold 256 MiB pull came down to that of
    ``bench/floor_proxy.py`` (bench/README.md, "Cold path, third pass"). No byte of a buffer
    is written again while any piece of it is alive (the next read goes after it, or into
    another buffer), so a piece stays valid for whoever holds it (the download's last chunk,
    a client's send).

    Only where the framing is simple: plain TCP (with TLS the bytes on the socket are not
    the body), ``Content-Length`` known, no ``Transfer-Encoding``, identity encoding, and the
    body not yet complete. Nothing past ``Content-Length`` is read; the connection is not
    reused afterwards (aiohttp's parser still expects the body), the caller closes it
    (``_finish``), so what an upstream sends after the body never reaches the next response.
    A peer that closes early, or a watchdog timeout (:meth:`set_exception`), fails
    :meth:`read`.
    """

    def __init__(self, transport: asyncio.Transport, remaining: int, received: int,
                 pool: _PiecePool) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = pool
        self._transport = transport
        self._remaining = remaining          # body bytes still to come from the socket
        self.total_bytes = received          # body bytes received (those aiohttp read too)
        self._buffer: bytearray | None = None
        self._filled = 0                     # bytes of _buffer that pieces were made of
        self._pieces: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, response: aiohttp.ClientResponse, size: int | None,
                  pool: _PiecePool) -> _RawBody | None:
        """Switch the response's connection to a raw body reader receiving into ``pool``'s
        buffers, or None where aiohttp keeps reading (see the class docstring)."""
        connection = response.connection
        content = response.content
        if size is None or size < RAW_BODY_MIN or connection is None:
            return None
        protocol, transport = connection.protocol, connection.transport
        if (protocol is None or not isinstance(transport, asyncio.Transport)
                or transport.is_closing() or transport.get_extra_info("socket") is None
                or transport.get_extra_info("sslcontext") is not None
                or "Transfer-Encoding" in response.headers
                or content.is_eof() or content.exception() is not None
                or content.total_bytes >= size
                # Paused for a full buffer, aiohttp's parser may hold body bytes of its own.
                or getattr(protocol, "_reading_paused", True)):
            return None
        # Stops aiohttp's reading and its per-read timer (the watchdog takes over); the
        # bytes it already parsed are the body's first piece.
        protocol.pause_reading()
        body = cls(transport, size - content.total_bytes, content.total_bytes, pool)
        first = content.read_nowait()
        if first:
            body._pieces.append(first)
            body._queued = len(first)
        transport.set_protocol(body)
        transport.resume_reading()
        return body

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._buffer is None or RAW_PIECE - self._filled < RAW_MIN_SPACE:
            if self._buffer is not None:
                self._pool.give(self._buffer)
            self._buffer = self._pool.take()
            self._filled = 0
        # Never past the body: what follows it (nothing, from a correct upstream) stays unread.
        end = min(RAW_PIECE, self._filled + self._remaining)
        return memoryview(self._buffer)[self._filled:end]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._buffer is not None
        piece = memoryview(self._buffer)[self._filled:self._filled + nbytes]
        self._filled += nbytes
        self._remaining -= nbytes
        self.total_bytes += nbytes
        self._pieces.append(piece)
        self._queued += nbytes
        if self._remaining <= 0 or self._queued >= RAW_QUEUE:
            self._pause()  # at the end, get_buffer must not be asked for nothing
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost tells whether the body is whole

    def connection_lost(self, exc: Exception | None) -> None:
        if self._remaining > 0 and self._error is None:
            error = aiohttp.ClientPayloadError(
                f"connection closed after {self.total_bytes} body bytes "
                f"({self._remaining} missing)")
            error.__cause__ = exc
            self._error = error
        if self._buffer is not None:
            self._pool.give(self._buffer)
            self._buffer = None
        self._wake()

    # -- consumer side -----------------------------------------------------------------------
    def set_exception(self, exc: BaseException) -> None:
        """Fail the body (the read watchdog's timeout): the next :meth:`read` raises."""
        self._error = exc
        self._wake()

    async def read(self, limit: int) -> bytes | memoryview:
        """The next piece (at most ``limit`` bytes); empty once the whole body was read."""
        while True:
            if self._error is not None:
                raise self._error
            if self._pieces:
                break
            if self._remaining <= 0:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        piece = self._pieces.popleft()
        if len(piece) > limit:
            rest = memoryview(piece)[limit:]
            piece = memoryview(piece)[:limit]
            self._pieces.appendleft(rest)
        self._queued -= len(piece)
        if self._paused and self._remaining > 0 and self._queued < RAW_QUEUE:
            self._paused = False
            self._transport.resume_reading()
        return piece

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _ReadLowWater:
    """``SO_RCVLOWAT`` on the upstream socket while a blob body of known size arrives.

    Over loopback the event loop was woken for every few KiB the upstream wrote: a cold
    256 MiB pull took ~3800 socket reads, most under 64 KiB, each a wake-up, a parser call
    and a piece for the consumer and every client. With a low-water mark the socket is
    reported readable once RCVLOWAT bytes are there (or the peer closed), so the reads come
    in pieces of ~256 KiB (RAW_PIECE for a :class:`_RawBody`; Linux grows the receive buffer
    to fit a mark since 4.18). The mark never exceeds what is still to come of the body
    (Content-Length minus what was received; with TLS the socket holds at least that many
    encrypted bytes), so the last bytes cannot wait for data that will not arrive; it is set
    back to 1 when the body ends, before the connection can be reused, and whenever the
    read watchdog saw a quiet quarter of the read timeout (:meth:`relax`), so that an
    upstream that trickles slower than RCVLOWAT per read timeout is not taken for a silent
    one (the next piece raises it again). A chunked body (no size) is read without it.
    """

    def __init__(self, sock: Any, size: int, content: _BodySource, high: int) -> None:
        self._sock = sock
        self._size = size
        self._content = content
        self._high = high
        self._mark = 1

    @classmethod
    def start(cls, response: aiohttp.ClientResponse, size: int | None,
              content: _BodySource, high: int = RCVLOWAT) -> _ReadLowWater | None:
        """Set the mark (at most ``high``) on the response's socket; None when the size is
        unknown or the socket cannot take it. ``content`` counts the body bytes received."""
        connection = response.connection
        if size is None or connection is None or connection.transport is None:
            return None
        sock = connection.transport.get_extra_info("socket")
        if sock is None or not hasattr(socket, "SO_RCVLOWAT"):
            return None
        low_water = cls(sock, size, content, high)
        low_water.update()
        return low_water if low_water._mark > 1 else None

    def update(self) -> None:
        """Lower the mark as the end of the body comes near (cheap when it does not)."""
        remaining = self._size - self._content.total_bytes
        if remaining >= self._mark and self._mark == self._high:
            return
        self._set(max(1, min(self._high, remaining)))

    def relax(self) -> None:
        """Let whatever arrived through (no data for a while); update() raises it again."""
        self._set(1)

    def stop(self) -> None:
        """The body ended or failed: the socket is back to its default."""
        self._set(1)

    def _set(self, mark: int) -> None:
        if mark == self._mark:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
        except OSError:  # closed meanwhile: nothing left to tune
            mark = 1
        self._mark = mark


class _IdleWatchdog:
    """The read timeout of one blob body: fails it once the upstream sent nothing for
    ``timeout`` seconds while nothing it sent was waiting for the consumer.

    aiohttp enforces ``sock_read`` by cancelling and re-creating a timer on every socket read
    (thousands per large blob; ~4 % of the loop in a cold pull's profile). For a blob body the
    connection's per-read timer is switched off and this one check runs every quarter of the
    timeout instead, so silence is detected after ``timeout`` to ``1.25 * timeout``. Bytes
    buffered but not yet consumed count as progress (as aiohttp stops its timer while reading
    is paused): a slow consumer is not the upstream's fault.
    """

    def __init__(self, content: _BodySource, timeout: float,
                 consumed: Callable[[], int], on_quiet: Callable[[], None] | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_quiet = on_quiet
        self._content = content
        self._timeout = timeout
        self._consumed = consumed
        self._seen = self._content.total_bytes
        self._last_progress = self._loop.time()
        self._period = timeout / 4
        self._handle = self._loop.call_later(self._period, self._check)

    @classmethod
    def start(cls, response: aiohttp.ClientResponse, timeout: float | None,
              content: _BodySource, consumed: Callable[[], int],
              on_quiet: Callable[[], None] | None = None) -> _IdleWatchdog | None:
        """Take the read timeout over from the connection; None when there is none to
        enforce (no timeout configured, or the body is already complete). ``content`` is
        where the body arrives; ``on_quiet`` runs at every check that saw no progress."""
        connection = response.connection
        if not timeout or connection is None or connection.protocol is None:
            return None
        # The timer armed by the last read before this stays until the next read cancels it
        # (it would only fire on the same silence this watchdog detects).
        connection.protocol.read_timeout = None  # this response only: reset per request
        return cls(content, timeout, consumed, on_quiet)

    def _check(self) -> None:
        now = self._loop.time()
        total = self._content.total_bytes
        if total != self._seen or total > self._consumed():
            self._seen = total
            self._last_progress = now
        elif now - self._last_progress >= self._timeout:
            self._content.set_exception(aiohttp.SocketTimeoutError(
                "Timeout on reading data from socket"))
            return
        elif self._on_quiet is not None:
            self._on_quiet()
        self._handle = self._loop.call_later(self._period, self._check)

    def stop(self) -> None:
        """The body ended (or failed): no more checks."""
        self._handle.cancel()


@dataclass(slots=True)
class _Result:
    response: aiohttp.ClientResponse
    body: bytes | None = None    # read (bounded) for 2xx when a read limit was given
    overflow: bool = False       # the body exceeded the read limit


class _ProtocolError(Exception):
    """The upstream answered something malformed (internal; becomes UpstreamError)."""


# --------------------------------------------------------------------------------- helpers
def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date, RFC 9110
    section 10.2.3); None when absent or unreadable. A date in the past means 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_ratelimit_remaining(value: str | None) -> int | None:
    """The count in Docker Hub's ``ratelimit-remaining: 100;w=21600``; None if unreadable."""
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*?\brel="?next"?', re.IGNORECASE)


def parse_next_link(value: str | None) -> str | None:
    """The target of ``rel="next"`` in a ``Link`` header (tag list pagination), as sent."""
    if not value:
        return None
    match = _LINK_NEXT.search(value)
    return match.group(1) if match else None


def _merge_referrer_pages(pages: list[bytes], upstream: str) -> bytes:
    """One referrers index from several pages (their ``manifests`` lists, in order)."""
    manifests: list[Any] = []
    for page in pages:
        try:
            obj = json.loads(page)
        except ValueError as exc:
            raise ManifestInvalid(f"upstream {upstream}: malformed referrers page") from exc
        items = obj.get("manifests") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise ManifestInvalid(f"upstream {upstream}: malformed referrers page")
        manifests.extend(items)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": manifests}).encode()


def _reason(exc: BaseException) -> str:
    """The ``reason`` metric label for a transport exception."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    # A payload error is nearly always the connection closing mid-body.
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                        ConnectionError)):
        return "connect"
    return "protocol"


def _retryable(exc: BaseException) -> bool:
    # A certificate problem will not fix itself in a second; everything else transient may.
    if isinstance(exc, aiohttp.ClientSSLError):
        return False
    return _reason(exc) in ("timeout", "connect")


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return (url.scheme, url.host, url.port)


def _finish(response: aiohttp.ClientResponse) -> None:
    """Give the connection back if the body was fully read, else drop it (unread bytes would
    corrupt the next response on a reused connection)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Read at most ``limit`` bytes; the flag says the body was longer. One byte past the
    limit is read to tell "exactly limit" from "more", whatever Content-Length claims."""
    if response.content_length is not None and response.content_length > limit:
        return b"", True
    buf = bytearray()
    while len(buf) <= limit:
        data = await response.content.read(limit + 1 - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf[:limit]), len(buf) > limit


def _as_digest(digest: Digest | str) -> Digest:
    return digest if isinstance(digest, Digest) else Digest.parse(digest)


def _reference(reference: str) -> str:
    """Validate a tag or digest so that it is safe in a URL path."""
    if Digest.is_digest(reference):
        return str(Digest.parse(reference))
    return validate_tag(reference)


def _ssl_setting(config: UpstreamConfig) -> ssl.SSLContext | bool:
    if not config.tls_verify:
        return False
    if config.ca_bundle:
        # The bundle is added to the system roots (like docker's certs.d), so a private
        # registry that redirects blobs to a public CDN still works.
        context = ssl.create_default_context()
        try:
            context.load_verify_locations(cafile=config.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA bundle {config.ca_bundle}: {exc}",
                              key=f"upstreams[{config.name}].ca_bundle") from exc
        return context
    return True


# ---------------------------------------------------------------------------------- client
class UpstreamClient:
    """HTTP client for one upstream registry (see the module docstring).

    Use ``async with UpstreamClient(config) as client`` or call :meth:`start` / :meth:`close`.
    The session is otherwise created on first use. ``backoff_base`` and ``backoff_cap`` shape
    the retry delays; a 429 whose ``Retry-After`` exceeds ``retry_after_cap`` seconds fails at
    once instead of holding the caller.
    """

    def __init__(self, config: UpstreamConfig, *, backoff_base: float = 0.2,
                 backoff_cap: float = 5.0, retry_after_cap: float = 10.0,
                 max_redirects: int = 5) -> None:
        self.config = config
        self.name = config.name
        self._base = config.url.rstrip("/")
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._retry_after_cap = retry_after_cap
        self._max_redirects = max_redirects
        self._ssl = _ssl_setting(config)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                              sock_read=config.read_timeout)
        self._http: aiohttp.ClientSession | None = None
        # Receive buffers of raw blob bodies (_RawBody), used on the session's loop only.
        self._raw_buffers = _PiecePool()
        self._closed = False
        self.auth = Authenticator(config.name, self._base, resolve_credentials(config),
                                  self._fetch_token)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the HTTP session now (it is otherwise created on first use)."""
        self._session()

    async def close(self) -> None:
        """Close the session and cancel token fetches. Idempotent; the client is then unusable."""
        self._closed = True
        await self.auth.close()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UpstreamError(f"upstream {self.name}: client is closed")
        if self._http is None:
            # Never reuses a connection that received bytes while idle (upstream/pool.py).
            connector = StrictConnector(ssl=self._ssl)
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout,
                # Identity: a content-encoded body would make Content-Length count other
                # bytes than the ones the digest covers.
                headers={"User-Agent": f"sigil/{__version__}", "Accept-Encoding": "identity"},
                # Proxies come from sigil's config, never from stray environment variables.
                trust_env=False,
                # Let a blob body build up to BLOB_CHUNK before the socket is paused: with the
                # default 64 KiB the reader pauses and resumes the socket several times per
                # chunk, and cold pulls ran at half speed in about a third of the runs.
                read_bufsize=BLOB_CHUNK)
        return self._http

    # -- public API ---------------------------------------------------------------------------
    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead:
        """``HEAD`` a manifest (Docker Hub does not count HEAD as a pull).

        Raises ManifestUnknown (404), Unauthorized, Denied, TooManyRequests, UpstreamError.
        """
        repo, reference = validate_name(repo), _reference(reference)
        result = await self._request(KIND_MANIFEST_HEAD, "HEAD",
                                     f"/v2/{repo}/manifests/{reference}", repo,
                                     subject=f"{repo}:{reference}",
                                     headers={"Accept": accept or DEFAULT_ACCEPT})
        response = result.response
        _finish(response)
        return ManifestHead(digest=response.headers.get("Docker-Content-Digest"),
                            media_type=response.content_type,
                            size=response.content_length)

    async def get_manifest(self, repo: str, reference: str, accept: str,
                           max_bytes: int = MAX_MANIFEST_BYTES) -> FetchedManifest:
        """``GET`` a manifest's bytes, at most ``max_bytes`` (ManifestInvalid beyond).

        When ``reference`` is a digest the bytes must hash to it (DigestInvalid otherwise).
        Raises ManifestUnknown / NameUnknown (404), Unauthorized, Denied, TooManyRequests,
        UpstreamError.
        """
        repo, reference = validate_name(repo), _reference(reference)
        result = await self._request(KIND_MANIFEST, "GET", f"/v2/{repo}/manifests/{reference}",
                                     repo, subject=f"{repo}:{reference}",
                                     headers={"Accept": accept or DEFAULT_ACCEPT},
                                     read_limit=max_bytes)
        if result.overflow:
            self._count_error("protocol")
            raise ManifestInvalid(f"upstream {self.name}: manifest {repo}:{reference} exceeds "
                                  f"{max_bytes} bytes")
        raw = result.body or b""
        if Digest.is_digest(reference) and str(Digest.of(raw)) != reference:
            self._count_error("protocol")
            raise DigestInvalid(f"upstream {self.name}: manifest bytes do not match {reference}")
        return FetchedManifest(raw=raw, media_type=result.response.content_type,
                               digest=result.response.headers.get("Docker-Content-Digest"))

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest | str) -> AsyncIterator[UpstreamBlob]:
        """Open a blob for streaming: ``async with client.open_blob(repo, d) as blob``.

        Redirects to storage backends are followed without the registry's credentials. The
        caller checks the digest of what it reads (sigil hashes while staging). Raises
        BlobUnknown (404), Unauthorized, Denied, TooManyRequests, UpstreamError on open, and
        UpstreamError from :meth:`UpstreamBlob.iter_chunks`.
        """
        repo, parsed = validate_name(repo), _as_digest(digest)
        result = await self._request(KIND_BLOB, "GET", f"/v2/{repo}/blobs/{parsed}", repo,
                                     subject=f"{repo}@{parsed}")
        try:
            yield UpstreamBlob(self, result.response, parsed)
        finally:
            _finish(result.response)

    async def get_blob_bytes(self, repo: str, digest: Digest | str, max_bytes: int) -> bytes:
        """A small blob (signature payload, attestation envelope) in memory, sha256-checked.

        Raises ManifestInvalid when it exceeds ``max_bytes`` (the same error the mirror uses
        for an oversized cached blob), DigestInvalid when the bytes do not hash to ``digest``,
        and the errors of :meth:`open_blob`.
        """
        repo, parsed = validate_name(repo), _as_digest(digest)
        result = await self._request(KIND_BLOB, "GET", f"/v2/{repo}/blobs/{parsed}", repo,
                                     subject=f"{repo}@{parsed}", read_limit=max_bytes)
        if result.overflow:
            self._count_error("protocol")
            raise ManifestInvalid(f"upstream {self.name}: blob {parsed} exceeds {max_bytes} "
                                  "bytes")
        data = result.body or b""
        if Digest.of(data) != parsed:
            self._count_error("protocol")
            raise DigestInvalid(f"upstream {self.name}: blob bytes do not match {parsed}")
        return data

    async def get_tags(self, repo: str, n: int | None = None,
                       last: str | None = None) -> tuple[bytes, str | None]:
        """``GET /v2/<repo>/tags/list``: the body as sent and the ``rel="next"`` link, if any.

        Raises NameUnknown (404), Unauthorized, Denied, TooManyRequests, UpstreamError.
        """
        repo = validate_name(repo)
        query: dict[str, str] = {}
        if n is not None:
            query["n"] = str(int(n))
        if last is not None:
            query["last"] = last
        result = await self._request(KIND_TAGS, "GET", f"/v2/{repo}/tags/list", repo,
                                     subject=repo, query=query, read_limit=MAX_TAGS_BYTES)
        if result.overflow:
            self._count_error("protocol")
            raise UpstreamError(f"upstream {self.name}: tag list exceeds {MAX_TAGS_BYTES} bytes")
        return result.body or b"", parse_next_link(result.response.headers.get("Link"))

    async def get_referrers(self, repo: str, digest: Digest | str,
                            artifact_type: str | None = None) -> bytes | None:
        """The OCI 1.1 referrers index of ``digest``, or None when the upstream answers 404:
        it has no referrers API, and the caller falls back to the ``sha256-<hex>`` tag schema
        (distribution-spec "Listing Referrers"). Pages (``Link: rel="next"``) are followed on
        the same registry, up to MAX_REFERRER_PAGES, and merged into one index."""
        repo, parsed = validate_name(repo), _as_digest(digest)
        path = f"/v2/{repo}/referrers/{parsed}"
        query: dict[str, str] | None = {"artifactType": artifact_type} if artifact_type else None
        pages: list[bytes] = []
        for _ in range(MAX_REFERRER_PAGES):
            result = await self._request(KIND_REFERRERS, "GET", path, repo,
                                         subject=f"{repo}@{parsed}", query=query,
                                         headers={"Accept": OCI_INDEX},
                                         read_limit=MAX_MANIFEST_BYTES, allow=(404,))
            if result.response.status == 404:
                _finish(result.response)
                if not pages:
                    return None
                break
            if result.overflow:
                self._count_error("protocol")
                raise ManifestInvalid(f"upstream {self.name}: referrers index exceeds "
                                      f"{MAX_MANIFEST_BYTES} bytes")
            pages.append(result.body or b"")
            following = parse_next_link(result.response.headers.get("Link"))
            if following is None:
                break
            target = URL(following)
            # Only the same registry's referrers path: a Link is not allowed to send us
            # (and the registry's credentials) anywhere else.
            if target.is_absolute() and target.origin() != URL(self._base).origin():
                break
            if target.path != path and not target.path.endswith(path):
                break
            query = dict(target.query)
        if len(pages) == 1:
            return pages[0]
        return _merge_referrer_pages(pages, self.name)

    # -- request machinery --------------------------------------------------------------------
    async def _request(self, kind: str, method: str, path: str, repo: str, *, subject: str,
                       headers: dict[str, str] | None = None,
                       query: dict[str, str] | None = None, read_limit: int | None = None,
                       allow: Collection[int] = ()) -> _Result:
        """One registry call with authentication; returns a 2xx (or ``allow``ed) result and
        raises the translated error otherwise. An open response is the caller's to finish."""
        url = URL(self._base + path)
        if query:
            url = url.with_query(query)
        authorization = await self.auth.authorization(repo)
        reauthenticated = False
        while True:
            sent = dict(headers or {})
            if authorization:
                sent["Authorization"] = authorization
            result = await self._exchange(kind, method, url, sent, read_limit=read_limit)
            response = result.response
            status = response.status
            if 200 <= status < 300 or status in allow:
                return result
            if status == 401 and not reauthenticated:
                challenges = response.headers.getall("WWW-Authenticate", [])
                if method != "HEAD":
                    await self._error_code(response)  # read the small body: keep the connection
                _finish(response)
                # One fresh authentication per call: a second 401 is final.
                reauthenticated = True
                retry_with = await self.auth.on_unauthorized(challenges, repo, authorization)
                if retry_with is None:
                    raise self._status_error(kind, 401, None, repo, subject)
                authorization = retry_with
                continue
            code = None
            try:
                if method != "HEAD":
                    code = await self._error_code(response)
            finally:
                _finish(response)
            raise self._status_error(kind, status, code, repo, subject)

    async def _exchange(self, kind: str, method: str, url: URL, headers: dict[str, str], *,
                        read_limit: int | None = None) -> _Result:
        """Send with retries (transport errors, timeouts, 5xx, 429). Returns the first other
        response; with ``read_limit`` a 2xx body is read (bounded) and the response finished."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                response = await self._send(kind, method, url, headers)
                if read_limit is not None and 200 <= response.status < 300:
                    try:
                        body, overflow = await _read_bounded(response, read_limit)
                    finally:
                        _finish(response)
                    return _Result(response, body, overflow)
            except _ProtocolError as exc:
                self._count_error("protocol")
                raise UpstreamError(f"upstream {self.name}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                reason = _reason(exc)
                self._count_error(reason)
                if last or not _retryable(exc):
                    log.warning("upstream.failed", upstream=self.name, kind=kind, reason=reason,
                                error=type(exc).__name__, attempts=attempt + 1)
                    raise UpstreamError(f"upstream {self.name}: {kind} request failed "
                                        f"({reason}: {type(exc).__name__})") from exc
                await self._backoff(kind, attempt, reason)
                continue
            status = response.status
            if status >= 500:
                _finish(response)
                self._count_error("status_5xx")
                if last:
                    log.warning("upstream.failed", upstream=self.name, kind=kind,
                                reason="status_5xx", status=status, attempts=attempt + 1)
                    raise UpstreamError(f"upstream {self.name} answered {status} to a {kind} "
                                        f"request ({attempts} attempts)")
                await self._backoff(kind, attempt, "status_5xx", status=status)
                continue
            if status == 429:
                delay = parse_retry_after(response.headers.get("Retry-After"))
                remaining = parse_ratelimit_remaining(response.headers.get("RateLimit-Remaining"))
                _finish(response)
                self._count_error("status_429")
                # Fail at once rather than hold the client when the upstream asks for a long
                # wait, or says the quota is spent (Docker Hub: remaining 0 until the window
                # ends); the client gets Retry-After and can decide.
                if last or remaining == 0 or (delay is not None
                                              and delay > self._retry_after_cap):
                    log.warning("upstream.rate_limited", upstream=self.name, kind=kind,
                                retry_after=delay, remaining=remaining)
                    extra = {"Retry-After": str(math.ceil(delay))} if delay is not None else {}
                    raise TooManyRequests(f"upstream {self.name} is rate limiting {kind} "
                                          "requests", headers=extra)
                await self._backoff(kind, attempt, "status_429", status=status, delay=delay)
                continue
            return _Result(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(self, kind: str, method: str, url: URL,
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        """One request, following redirects by hand. Authorization is dropped as soon as a
        redirect leaves the original origin (pre-signed S3 URLs reject it, and it is the
        registry's secret)."""
        session = self._session()
        origin = _origin(url)
        current = url
        for _hop in range(self._max_redirects + 1):
            started = time.monotonic()
            try:
                response = await session.request(method, current, headers=headers,
                                                 allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError, OSError):
                metrics.UPSTREAM_REQUESTS.labels(self.name, kind, "error").inc()
                raise
            metrics.UPSTREAM_SECONDS.labels(self.name, kind).observe(time.monotonic() - started)
            metrics.UPSTREAM_REQUESTS.labels(self.name, kind, str(response.status)).inc()
            remaining = parse_ratelimit_remaining(response.headers.get("RateLimit-Remaining"))
            if remaining is not None:
                metrics.RATELIMIT_REMAINING.labels(self.name).set(remaining)
            if response.status not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            status = response.status
            _finish(response)
            if not location:
                raise _ProtocolError(f"redirect {status} without a Location header")
            try:
                # encoded=True keeps pre-signed URLs byte for byte (re-encoding breaks them).
                target = current.join(URL(location, encoded=True))
            except ValueError as exc:
                raise _ProtocolError("redirect to an invalid URL") from exc
            if target.scheme not in ("http", "https") or not target.host:
                raise _ProtocolError("redirect to a non-http(s) URL")
            if _origin(target) != origin and any(k.lower() == "authorization" for k in headers):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            # The host only: a pre-signed query string is a credential.
            log.debug("upstream.redirect", upstream=self.name, kind=kind, status=status,
                      host=target.host)
            current = target
        raise _ProtocolError(f"more than {self._max_redirects} redirects")

    async def _fetch_token(self, url: URL, headers: dict[str, str]) -> tuple[int, bytes]:
        """GET a token realm with retries; the Authenticator interprets the answer."""
        result = await self._exchange(KIND_TOKEN, "GET", url, headers,
                                      read_limit=MAX_TOKEN_RESPONSE_BYTES)
        if result.body is None:
            _finish(result.response)
            return result.response.status, b""
        if result.overflow:
            self._count_error("protocol")
            raise UpstreamError(f"upstream {self.name}: token response exceeds "
                                f"{MAX_TOKEN_RESPONSE_BYTES} bytes")
        return result.response.status, result.body

    async def _backoff(self, kind: str, attempt: int, reason: str, *, status: int | None = None,
                       delay: float | None = None) -> None:
        if delay is None:
            # Exponential with jitter, so that many waiting clients do not retry in lockstep.
            delay = min(self._backoff_cap, self._backoff_base * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)  # jitter, not cryptography
        log.info("upstream.retry", upstream=self.name, kind=kind, attempt=attempt + 1,
                 reason=reason, status=status, delay=round(delay, 3))
        await asyncio.sleep(delay)

    async def _error_code(self, response: aiohttp.ClientResponse) -> str | None:
        """The first OCI error code of an error body, if it has one (best effort)."""
        try:
            body, _ = await _read_bounded(response, MAX_ERROR_BODY)
            errors = json.loads(body).get("errors")
            code = errors[0].get("code") if isinstance(errors, list) and errors else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError):
            return None
        return code if isinstance(code, str) else None

    def _status_error(self, kind: str, status: int, code: str | None, repo: str,
                      subject: str) -> RegistryError:
        name = self.name
        if status == 404:
            # The upstream's NAME_UNKNOWN is kept: "no such repository" differs from "no such
            # manifest in it" for a client.
            if code == "NAME_UNKNOWN" or kind in (KIND_TAGS, KIND_REFERRERS):
                return NameUnknown(f"repository {repo} is not known to upstream {name}")
            if kind == KIND_BLOB:
                return BlobUnknown(f"blob {subject} is not known to upstream {name}")
            return ManifestUnknown(f"manifest {subject} is not known to upstream {name}")
        if status == 401:
            how = ("refused the configured credentials" if self.auth.credentials
                   else "requires credentials")
            return Unauthorized(f"upstream {name} {how} for {subject}")
        if status == 403:
            return Denied(f"upstream {name} denied access to {subject}")
        self._count_error("protocol")
        return UpstreamError(f"upstream {name} answered {status} to a {kind} request")

    def _count_error(self, reason: str) -> None:
        metrics.UPSTREAM_ERRORS.labels(self.name, reason).inc()
