"""Content digests (OCI image-spec "descriptor" digests).

Only ``sha256`` is accepted: it is what every registry serves and what the store is keyed on.
A :class:`Digest` is always validated, so file paths built from it are safe.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sigil.errors import DigestInvalid

_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
# OCI image-spec grammar: algorithm ":" encoded
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated ``sha256:<64 lowercase hex>`` digest."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate; raise :class:`DigestInvalid` for anything but sha256."""
        if not isinstance(text, str) or len(text) > 256 or not _GRAMMAR.fullmatch(text):
            raise DigestInvalid(f"invalid digest {text[:80]!r}" if isinstance(text, str)
                                else "invalid digest")
        algorithm, _, encoded = text.partition(":")
        if algorithm != "sha256":
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if not _SHA256_HEX.fullmatch(encoded):
            raise DigestInvalid(f"invalid sha256 digest {text[:80]!r}")
        return cls(encoded)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The sha256 digest of ``data``."""
        return cls(hashlib.sha256(data).hexdigest())

    @staticmethod
    def is_digest(text: str) -> bool:
        """True if ``text`` looks like a digest (has the ``alg:enc`` shape), valid or not."""
        return ":" in text

    @property
    def algorithm(self) -> str:
        return "sha256"

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def tag_form(self) -> str:
        """``sha256-<hex>``: the cosign tag / referrers tag-schema spelling."""
        return f"sha256-{self.hex}"
