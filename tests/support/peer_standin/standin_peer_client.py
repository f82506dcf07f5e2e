"""TEST-ONLY STAND-IN for ``sigil.upstream.peer`` (the ``peer`` branch writes the real one;
delete this file at merge): open another replica's in-flight blob as a ``BlobSource``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from sigil.errors import Unavailable
from sigil.oci.digest import Digest


class _Source:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.size: int | None = response.content_length

    async def iter_chunks(self, chunk: int = 512 * 1024) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_chunked(chunk):
                yield data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"peer stream failed: {type(exc).__name__}") from exc


class PeerClient:
    """Signed GETs of ``/_sigil/peer/blobs/<digest>`` on another replica."""

    def __init__(self, secret: bytes, timeout: float) -> None:
        self._secret = secret
        self._timeout = timeout

    @asynccontextmanager
    async def open_blob(self, base_url: str, digest: Digest) -> AsyncIterator[_Source]:
        path = f"/_sigil/peer/blobs/{digest}"
        auth = hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()
        timeout = aiohttp.ClientTimeout(sock_connect=self._timeout, sock_read=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                response = await session.get(base_url + path,
                                             headers={"X-Sigil-Peer-Auth": auth})
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Unavailable(f"peer {base_url} unreachable: {type(exc).__name__}") from exc
            async with response:
                if response.status != 200:
                    raise Unavailable(f"peer {base_url} answered {response.status}")
                yield _Source(response)
