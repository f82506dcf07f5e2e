"""structlog setup: JSON lines (or console on a TTY), a request id bound per request."""

from __future__ import annotations

import logging
import sys

import structlog

_REDACT = ("authorization", "password", "token", "secret")


def _redact(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Drop any field whose name suggests a credential: secrets are never logged."""
    for key in list(event):
        if any(word in key.lower() for word in _REDACT):
            event[key] = "***"
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once for the process."""
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger carrying ``logger=name``."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]
