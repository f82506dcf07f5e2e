"""cosign simple-signing payloads (``application/vnd.dev.cosign.simplesigning.v1+json``).

Format (containers/image "atomic container signature", as cosign writes it)::

    {"critical": {"identity": {"docker-reference": "<ref>"},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "cosign container image signature"},
     "optional": {...}}

The signature covers these exact bytes, so after the signature checks out the payload must
name the digest being served (else a valid signature of another image could be replayed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sigil.errors import DigestInvalid, VerificationError
from sigil.oci.digest import Digest
from sigil.verify._json import load_object

MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_TYPE = "cosign container image signature"
MAX_PAYLOAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SimpleSigning:
    """The fields of a simple-signing payload that a policy can use."""

    digest: Digest
    docker_reference: str | None
    optional: dict[str, Any] = field(default_factory=dict)


def parse_simple_signing(payload: bytes) -> SimpleSigning:
    """Parse a simple-signing payload; raise :class:`VerificationError` when malformed.

    ``critical.type`` must be exactly ``cosign container image signature`` and
    ``critical.image.docker-manifest-digest`` a valid sha256 digest.
    """
    obj = load_object(payload, "simple-signing payload", MAX_PAYLOAD_BYTES)
    critical = obj.get("critical")
    if not isinstance(critical, dict):
        raise VerificationError("simple-signing payload lacks 'critical'", reason="invalid")
    if critical.get("type") != COSIGN_TYPE:
        raise VerificationError(
            f"simple-signing critical.type is {str(critical.get('type'))[:80]!r}, "
            f"expected {COSIGN_TYPE!r}", reason="invalid")
    image = critical.get("image")
    digest_text = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest_text, str):
        raise VerificationError("simple-signing payload lacks docker-manifest-digest",
                                reason="invalid")
    try:
        digest = Digest.parse(digest_text)
    except DigestInvalid as exc:
        raise VerificationError("simple-signing docker-manifest-digest is invalid",
                                reason="invalid") from exc
    identity = critical.get("identity")
    reference = identity.get("docker-reference") if isinstance(identity, dict) else None
    optional = obj.get("optional")
    return SimpleSigning(digest=digest,
                         docker_reference=reference if isinstance(reference, str) else None,
                         optional=optional if isinstance(optional, dict) else {})


def check_simple_signing(payload: SimpleSigning, *, digest: Digest,
                         reference_matches: Any = None,
                         annotations: Mapping[str, str] | None = None) -> None:
    """Check a verified payload against what is served and the policy's constraints.

    ``digest``: the digest sigil computed from the bytes it serves (reason ``digest_mismatch``
    when the payload names another). ``reference_matches``: optional callable
    ``f(docker_reference) -> bool`` (reason ``reference_mismatch``). ``annotations``: required
    ``optional`` entries, compared as strings (reason ``annotation_mismatch``).
    """
    if payload.digest != digest:
        raise VerificationError(f"payload names {payload.digest}, not {digest}",
                                reason="digest_mismatch")
    if reference_matches is not None and (
            payload.docker_reference is None or not reference_matches(payload.docker_reference)):
        raise VerificationError(
            f"payload docker-reference {payload.docker_reference!r} is not allowed",
            reason="reference_mismatch")
    for key, expected in (annotations or {}).items():
        actual = payload.optional.get(key)
        if actual is None or str(actual) != expected:
            raise VerificationError(f"payload annotation {key!r} is {actual!r}, "
                                    f"expected {expected!r}", reason="annotation_mismatch")
