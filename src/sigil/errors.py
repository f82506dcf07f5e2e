"""One exception tree for sigil.

Every error a client can see is a :class:`RegistryError` subclass that declares its OCI
distribution error ``code`` and HTTP ``status``; one middleware renders them as
``{"errors": [{"code", "message", "detail"}]}`` (the shape distribution's ``errcode`` uses).
Lower layers (upstream/, verify/, storage/) translate library exceptions into these classes at
their boundary (``raise X(...) from exc``) so nothing foreign leaks into the server.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SigilError(Exception):
    """Base of every error sigil raises on purpose."""


class ConfigError(SigilError):
    """A configuration or policy file is unusable; the message names file, key and problem."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class RegistryError(SigilError):
    """An error with an OCI distribution error code and an HTTP status."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "unknown error"

    def __init__(self, message: str | None = None, *, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        """The OCI error body for this error."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class TagInvalid(RegistryError):
    # distribution answers an invalid reference with MANIFEST_INVALID / TAG_INVALID; we use
    # TAG_INVALID for malformed tags so the client sees what was wrong.
    code, status, default_message = "TAG_INVALID", 400, "manifest tag did not match URI"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "provided digest did not match content"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 502, "manifest invalid"


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class SizeInvalid(RegistryError):
    code, status, default_message = "SIZE_INVALID", 400, "provided length did not match content"


class RangeInvalid(RegistryError):
    code, status, default_message = "RANGE_INVALID", 416, "invalid content range"


class PaginationInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class Unauthorized(RegistryError):
    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class Unavailable(RegistryError):
    code, status, default_message = "UNAVAILABLE", 503, "service unavailable"


class UpstreamError(Unavailable):
    """The upstream registry failed (connection, timeout, 5xx, bad data) after retries."""

    code, status, default_message = "UNAVAILABLE", 502, "upstream registry failed"


class VerificationError(SigilError):
    """A signature, attestation or trust check failed. Raised by verify/ on any doubt.

    ``reason`` is a short, bounded enum-like string used as a metric label
    (e.g. ``"wrong_key"``, ``"digest_mismatch"``, ``"no_signature"``).
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        self.reason = reason
        super().__init__(message)


class StorageError(SigilError):
    """The local store is inconsistent or unusable."""
