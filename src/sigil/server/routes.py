"""The OCI distribution API routes (pull side) and ops endpoints.

``/v2/<name>/...`` names contain slashes, so one catch-all route parses the path from the right
(``/manifests/<ref>``, ``/blobs/<digest>``, ``/tags/list``, ``/referrers/<digest>``), which also
lets every malformed path get an OCI error instead of a bare 404 page.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sigil import metrics
from sigil.downloads import Download
from sigil.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameInvalid,
    PaginationInvalid,
    RangeInvalid,
    RegistryError,
    Unavailable,
    Unsupported,
)
from sigil.mirror import CachedBlob, Mirror, ServedManifest
from sigil.oci.digest import Digest
from sigil.routing import Route, Router
from sigil.server.middleware import ROUTE_KEY
from sigil.server.state import MIRROR, READY, ROUTER

API_HEADERS = {"Docker-Distribution-Api-Version": "registry/2.0"}
_PATH = re.compile(
    r"^(?P<name>.+?)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|(?P<tags>tags/list))$")
_WRITE_PATH = re.compile(r"^(?P<name>.+?)/blobs/uploads(?:/.*)?$")
# Read size of the copy loop that sends cached blobs (BlobFileResponse).
SEND_CHUNK = 1024 * 1024


def _route(request: web.Request, name: str) -> Route:
    if "%2f" in request.raw_path.split("?", 1)[0].lower():
        raise NameInvalid("encoded slashes are not allowed in repository names")
    router: Router = request.app[ROUTER]
    return router.resolve(name, request.query.get("ns"))


async def base(request: web.Request) -> web.Response:
    """``GET /v2/``: the API version check every client starts with."""
    request[ROUTE_KEY] = "base"
    return web.json_response({}, headers=API_HEADERS)


def _manifest_headers(served: ServedManifest) -> dict[str, str]:
    return {**API_HEADERS, "Content-Type": served.media_type,
            "Docker-Content-Digest": str(served.digest), "ETag": f'"{served.digest}"',
            "Content-Length": str(len(served.raw))}


def _accepts(request: web.Request, media_type: str) -> bool:
    values = request.headers.getall("Accept", [])
    if not values:
        return True
    accepted = {part.split(";")[0].strip() for v in values for part in v.split(",")}
    return bool(accepted & {media_type, "*/*", ""})


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route ``/v2/<name>/...`` requests."""
    path = request.match_info["path"]
    if _WRITE_PATH.match(path) or request.method not in ("GET", "HEAD"):
        request[ROUTE_KEY] = "write"
        raise Unsupported("sigil is a read-only pull-through mirror: push, delete and mount "
                          "are not supported")
    match = _PATH.match(path)
    if match is None:
        request[ROUTE_KEY] = "other"
        raise NameInvalid(f"unrecognised registry API path /v2/{path[:200]}")
    mirror: Mirror = request.app[MIRROR]
    route = _route(request, match["name"])
    if match["tags"]:
        request[ROUTE_KEY] = "tags"
        return await _tags(request, mirror, route)
    kind, ref = match["kind"], match["ref"]
    request[ROUTE_KEY] = kind
    if kind == "manifests":
        return await _manifest(request, mirror, route, ref)
    if kind == "blobs":
        return await _blob(request, mirror, route, Digest.parse(ref))
    return await _referrers(request, mirror, route, Digest.parse(ref))


async def _manifest(request: web.Request, mirror: Mirror, route: Route,
                    reference: str) -> web.Response:
    served = await mirror.manifest(route, reference)
    if not _accepts(request, served.media_type):
        # distribution answers a manifest the client cannot take with MANIFEST_UNKNOWN.
        raise ManifestUnknown(f"manifest is {served.media_type}, which the Accept header "
                              "does not allow")
    headers = _manifest_headers(served)
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    metrics.BYTES_SERVED.labels("cache").inc(len(served.raw))
    response = web.Response(body=served.raw, status=200, headers=headers)
    response.content_type = served.media_type
    return response


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {**API_HEADERS, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes", "Cache-Control": "max-age=31536000"}


async def _blob(request: web.Request, mirror: Mirror, route: Route,
                digest: Digest) -> web.StreamResponse:
    answer = await mirror.blob(route, digest)  # the blob gate
    if isinstance(answer, CachedBlob):
        return await _cached_response(request, mirror, answer)
    download: Download = answer
    await download.wait_started()
    if request.method == "HEAD":
        headers = _blob_headers(digest)
        if download.size is not None:
            headers["Content-Length"] = str(download.size)
        return web.Response(status=200, headers=headers,
                            content_type="application/octet-stream")
    if request.http_range.start is not None or request.http_range.stop is not None:
        # Ranged reads of a cold blob wait for the verified object, then use sendfile.
        await download.finished.wait()
        if download.committed is None and download.stored_remotely:
            return await _cached_response(request, mirror,
                                          CachedBlob(None, digest, download.received))
        if download.committed is None:
            raise download._client_error()
        return _file_response(download.committed, digest)
    response = web.StreamResponse(status=200, headers=_blob_headers(digest))
    response.content_type = "application/octet-stream"
    if download.size is not None:
        response.content_length = download.size
    await response.prepare(request)
    served = metrics.BYTES_SERVED.labels("upstream")  # once, not a label lookup per piece
    return await _send_or_cut(request, response, download.stream(), served.inc)


async def _send_or_cut(request: web.Request, response: web.StreamResponse,
                       pieces: AsyncIterable[bytes | memoryview],
                       count: Callable[[int], None]) -> web.StreamResponse:
    """Write ``pieces`` to the prepared ``response`` and end it; when they fail with a
    RegistryError (the digest did not match, the upstream or the store broke mid-body) the
    client must not get a complete body, and the status line is already sent: the
    connection is cut."""
    try:
        async for chunk in pieces:
            await response.write(chunk)
            count(len(chunk))
    except RegistryError:
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class BlobFileResponse(web.FileResponse):
    """A cached blob: aiohttp's FileResponse (headers, conditional requests, ``Range``),
    with the body copied by ``pread`` + socket write in large chunks instead of sendfile.

    On the loopback of the 2-core VMs sigil is benchmarked on, ``sendfile`` reaches ~0.75x of
    a user-space copy (bench/README.md, rows 0, 0b and 1); a copy of large chunks costs one
    extra memory copy per byte, which is what distribution does too."""

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int,
                        count: int) -> AbstractStreamWriter:
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        fd = fobj.fileno()
        while count > 0:
            data = os.pread(fd, min(SEND_CHUNK, count), offset)
            if not data:  # the file shrank: the client sees a short body
                break
            await writer.write(data)
            offset += len(data)
            count -= len(data)
        return writer


async def _cached_response(request: web.Request, mirror: Mirror,
                           blob: CachedBlob) -> web.StreamResponse:
    """A stored blob that passed the gate: a local file (sendfile-like copy), else a 307 to
    a presigned URL (``storage.s3.redirect``, GET only: a presigned URL is valid for one
    method), else streamed from the object store."""
    if blob.path is not None:
        return _file_response(blob.path, blob.digest)
    settings = mirror.config.storage.s3
    if request.method == "GET" and settings is not None and settings.redirect:
        url = await mirror.store.presign_url(blob.digest, settings.redirect_expiry)
        if url is not None:
            return web.Response(status=307, headers={**_blob_headers(blob.digest),
                                                     "Location": url})
    return await _object_response(request, mirror, blob)


def _byte_range(request: web.Request, total: int) -> tuple[int, int] | None:
    """The requested ``Range`` as (offset, length), None for the whole object;
    RangeInvalid (416) when it is malformed or outside the object."""
    try:
        wanted = request.http_range
    except ValueError as exc:
        raise RangeInvalid("malformed Range header") from exc
    start, stop = wanted.start, wanted.stop
    if start is None and stop is None:
        return None
    if start is not None and start < 0:  # a suffix: the last -start bytes
        start, stop = max(0, total + start), total
    start = start or 0
    stop = total if stop is None else min(stop, total)
    if start >= total or start >= stop:
        raise RangeInvalid(f"range starts at {start}, outside a blob of {total} bytes",
                           detail={"size": total})
    return start, stop - start


async def _object_response(request: web.Request, mirror: Mirror,
                           blob: CachedBlob) -> web.StreamResponse:
    """Stream a remote object (``Range`` gives 206); a store failure mid-body cuts the
    connection, as the download path does."""
    total = blob.size if blob.size is not None else await mirror.store.size(blob.digest)
    if total is None:
        raise BlobUnknown(detail={"digest": str(blob.digest)})
    headers = _blob_headers(blob.digest)
    wanted = _byte_range(request, total)
    offset, length = wanted if wanted is not None else (0, total)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{total}"
    if request.method == "HEAD":
        headers["Content-Length"] = str(length)
        return web.Response(status=status, headers=headers,
                            content_type="application/octet-stream")
    async with mirror.store.open_range(blob.digest, offset, length) as reader:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "application/octet-stream"
        response.content_length = length
        await response.prepare(request)
        return await _send_or_cut(request, response, reader,
                                  metrics.BYTES_SERVED.labels("cache").inc)


def _file_response(path: object, digest: Digest) -> web.FileResponse:
    response = BlobFileResponse(path, headers=_blob_headers(digest))  # type: ignore[arg-type]
    response.content_type = "application/octet-stream"
    return response


async def _tags(request: web.Request, mirror: Mirror, route: Route) -> web.Response:
    n_text = request.query.get("n")
    n: int | None = None
    if n_text is not None:
        if not n_text.isdigit() or not 0 < int(n_text) <= 10000:
            raise PaginationInvalid("n must be an integer from 1 to 10000")
        n = int(n_text)
    last = request.query.get("last")
    body, next_last = await mirror.tags(route, n, last)
    headers = dict(API_HEADERS)
    if next_last is not None:
        query = f"n={n}&last={quote(next_last)}" if n else f"last={quote(next_last)}"
        if "ns" in request.query:
            query += f"&ns={quote(request.query['ns'])}"
        headers["Link"] = f'</v2/{route.client_name}/tags/list?{query}>; rel="next"'
    return web.json_response(body, headers=headers)


async def _referrers(request: web.Request, mirror: Mirror, route: Route,
                     digest: Digest) -> web.Response:
    artifact_type = request.query.get("artifactType")
    body = await mirror.referrers(route, digest, artifact_type)
    headers = dict(API_HEADERS)
    if artifact_type:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.json_response(body, headers=headers, content_type=body["mediaType"])


# ----------------------------------------------------------------------- ops
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    request[ROUTE_KEY] = "ops"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store and index are open and the server is not shutting down."""
    request[ROUTE_KEY] = "ops"
    if not request.app[READY].is_set():
        raise Unavailable("not ready")
    mirror: Mirror = request.app[MIRROR]
    await asyncio.to_thread(Path(mirror.config.storage.root).exists)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    request[ROUTE_KEY] = "ops"
    body = generate_latest(metrics.REGISTRY)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    """Register every route on ``app``."""
    app.router.add_get("/v2/", base)
    app.router.add_get("/v2", base)
    app.router.add_route("*", "/v2/{path:.+}", dispatch)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
