"""Middleware: request id, client authentication (server/auth.py), one log event per
request, metrics, OCI error rendering."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from sigil import metrics
from sigil.errors import RegistryError
from sigil.logs import HotLogger, get_logger, new_request_id
from sigil.server.auth import AUTH

log = get_logger("sigil.http")
_request_log = HotLogger("sigil.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTE_KEY = web.RequestKey("sigil_route", str)
# Labelled metric children, looked up once per label set (``labels()`` validates and locks on
# every call). The method comes from the client, so the caches are bounded.
_CHILDREN_MAX = 512
_counted: dict[tuple[str, str, int], Any] = {}
_timed: dict[tuple[str, str], Any] = {}


def _count(route: str, method: str, status: int, elapsed: float) -> None:
    counter = _counted.get((route, method, status))
    if counter is None:
        counter = metrics.REQUESTS.labels(route, method, str(status))
        if len(_counted) < _CHILDREN_MAX:
            _counted[(route, method, status)] = counter
    counter.inc()
    timer = _timed.get((route, method))
    if timer is None:
        timer = metrics.REQUEST_SECONDS.labels(route, method)
        if len(_timed) < _CHILDREN_MAX:
            _timed[(route, method)] = timer
    timer.observe(elapsed)


def error_response(exc: RegistryError) -> web.Response:
    """Render an OCI error body with the error's status and headers."""
    headers = {"Docker-Distribution-Api-Version": "registry/2.0", **exc.headers}
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, translate errors to OCI JSON, count and log every request."""
    request_id = request.headers.get("X-Request-Id", "")[:64] or new_request_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    status = 500
    error: str | None = None
    try:
        try:
            client_auth = request.app.get(AUTH)
            if client_auth is not None and client_auth.protects(request.path):
                try:
                    await client_auth.check(request)
                except RegistryError:
                    request[ROUTE_KEY] = "auth"  # refused before any route handler ran
                    raise
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
        _count(route, request.method, status, elapsed)
        if route != "ops":
            _request_log.get().info(
                "request", method=request.method, path=request.path, status=status,
                route=route, ns=request.query.get("ns"), ms=round(elapsed * 1000, 2),
                error=error)
