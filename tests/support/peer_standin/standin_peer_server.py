"""TEST-ONLY STAND-IN for ``sigil.server.peer`` (the ``peer`` branch writes the real one;
delete this file at merge). Minimal: the in-flight download of this process, streamed with
the held-back-tail rule of :meth:`sigil.downloads.Download.stream`, behind an HMAC check."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from sigil.downloads import Downloads
from sigil.errors import RegistryError
from sigil.oci.digest import Digest

HEADER = "X-Sigil-Peer-Auth"


def sign(secret: bytes, path: str) -> str:
    """The HMAC-SHA256 of ``path`` (hex)."""
    return hmac.new(secret, path.encode(), hashlib.sha256).hexdigest()


def add_peer_routes(app: web.Application, downloads: Downloads, secret: bytes) -> None:
    """Register ``GET /_sigil/peer/blobs/{digest}``."""

    async def blob(request: web.Request) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get(HEADER, ""),
                                   sign(secret, request.path)):
            raise web.HTTPUnauthorized()
        try:
            digest = Digest.parse(request.match_info["digest"])
        except RegistryError:
            raise web.HTTPBadRequest() from None
        download = downloads.active(digest)
        if download is None:
            raise web.HTTPNotFound()
        try:
            await download.wait_started()
        except RegistryError:
            raise web.HTTPBadGateway() from None
        response = web.StreamResponse()
        if download.size is not None:
            response.content_length = download.size
        await response.prepare(request)
        try:
            async for chunk in download.stream():
                await response.write(chunk)
        except RegistryError:
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    app.router.add_get("/_sigil/peer/blobs/{digest}", blob)
