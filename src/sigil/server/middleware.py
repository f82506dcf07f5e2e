"""Middleware: request id, one log event per request, metrics, OCI error rendering."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from sigil import metrics
from sigil.errors import RegistryError
from sigil.logs import get_logger

log = get_logger("sigil.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTE_KEY = web.RequestKey("sigil_route", str)


def error_response(exc: RegistryError) -> web.Response:
    """Render an OCI error body with the error's status and headers."""
    headers = {"Docker-Distribution-Api-Version": "registry/2.0", **exc.headers}
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, translate errors to OCI JSON, count and log every request."""
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex[:16]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    status = 500
    error: str | None = None
    try:
        try:
            response = await handler(request)
        except RegistryError as exc:
            error = exc.code
            response = error_response(exc)
        except web.HTTPException as exc:
            # aiohttp's own (e.g. 404 for an unknown path, 405): keep the OCI shape.
            generic = RegistryError(exc.reason)
            generic.status = exc.status  # type: ignore[misc]
            error = "HTTP"
            response = web.json_response(
                {"errors": [{"code": "UNSUPPORTED" if exc.status == 405 else "NOT_FOUND"
                             if exc.status == 404 else "UNKNOWN", "message": exc.reason}]},
                status=exc.status)
        status = response.status
        if not response.prepared:
            response.headers.setdefault("X-Request-Id", request_id)
        return response
    except Exception:
        error = "INTERNAL"
        log.exception("request.crashed")
        return web.json_response(
            {"errors": [{"code": "UNKNOWN", "message": "internal error",
                         "detail": {"request_id": request_id}}]}, status=500)
    finally:
        elapsed = time.perf_counter() - start
        route = request.get(ROUTE_KEY, "other")
        metrics.REQUESTS.labels(route, request.method, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(route, request.method).observe(elapsed)
        if route not in ("ops",):
            log.info("request", method=request.method, path=request.path, status=status,
                     route=route, ns=request.query.get("ns"), ms=round(elapsed * 1000, 2),
                     error=error)
