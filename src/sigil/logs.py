"""structlog setup: JSON lines (or console on a TTY), a request id bound per request."""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import Any

import structlog

_REDACT = ("authorization", "password", "token", "secret")
# Field name -> whether it is redacted. Log field names come from the code, so this stays
# small; it is bounded anyway.
_SECRET_KEYS: dict[str, bool] = {}
_SECRET_KEYS_MAX = 4096
# Bumped by every configure(), so that cached loggers (HotLogger) pick up a new set-up.
_generation = 0


def _is_secret(key: str) -> bool:
    secret = _SECRET_KEYS.get(key)
    if secret is None:
        secret = any(word in key.lower() for word in _REDACT)
        if len(_SECRET_KEYS) < _SECRET_KEYS_MAX:
            _SECRET_KEYS[key] = secret
    return secret


def _redact(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Drop any field whose name suggests a credential: secrets are never logged."""
    for key in event:  # values are replaced in place; the keys do not change
        if _is_secret(key):
            event[key] = "***"
    return event


class LineLogger:
    """Writes each event as ``message + newline`` in a single write(2).

    ``--workers`` processes share one stderr: with print(), a line and its newline are separate
    writes and two workers' lines interleave into invalid JSON. One write per line keeps lines
    whole (appends and pipe writes under PIPE_BUF are atomic)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        data = memoryview((message + "\n").encode("utf-8", "replace"))
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _line_logger_factory() -> Any:
    """A :class:`LineLogger` on stderr's descriptor; print-based when stderr has none (a test
    harness that swapped it for an in-memory stream)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return structlog.PrintLoggerFactory(file=sys.stderr)
    return lambda *_: LineLogger(fd)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once for the process."""
    global _generation
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=_line_logger_factory(),
        cache_logger_on_first_use=False,
    )
    _generation += 1


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger carrying ``logger=name``."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]


class HotLogger:
    """A logger for a hot path (one event per request): the bound logger is built once per
    :func:`configure` instead of on every call, as structlog's lazy proxy does when
    ``cache_logger_on_first_use`` is off (which keeps the other loggers re-configurable)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def get(self) -> Any:
        """The bound logger for the current configuration."""
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return self._bound


_rid_prefix = os.urandom(4).hex()
_rid_counter = itertools.count()


def _new_rid_prefix() -> None:
    global _rid_prefix, _rid_counter
    _rid_prefix = os.urandom(4).hex()
    _rid_counter = itertools.count()


os.register_at_fork(after_in_child=_new_rid_prefix)  # each --workers process its own prefix


def new_request_id() -> str:
    """A 16-hex-digit request id: a random per-process prefix and a counter (no syscall per
    request, unlike ``uuid4``)."""
    return f"{_rid_prefix}{next(_rid_counter) & 0xFFFFFFFF:08x}"
