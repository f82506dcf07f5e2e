"""Bounded JSON decoding for signed payloads (one place for the size, depth and shape checks)."""

from __future__ import annotations

from typing import Any

from sigil.errors import ManifestInvalid, VerificationError
from sigil.oci.manifest import load_json


def load_object(raw: bytes | str, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode ``raw`` as a JSON object of at most ``max_bytes`` bytes and bounded nesting;
    raise :class:`VerificationError` (reason ``invalid``) naming ``what`` otherwise."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise VerificationError(f"{what} is too large", reason="invalid")
    try:
        obj = load_json(raw, what=what)
    except ManifestInvalid as exc:
        raise VerificationError(exc.message, reason="invalid") from exc
    if not isinstance(obj, dict):
        raise VerificationError(f"{what} is not a JSON object", reason="invalid")
    return obj
