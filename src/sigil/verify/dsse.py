"""DSSE (Dead Simple Signing Envelope) parsing, PAE and signature checking.

Spec: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md and
envelope.md. A signature covers ``PAE(payloadType, payload)``, never the payload alone, so the
payload type is authenticated too. The envelope's ``keyid`` is an unsigned hint and is never
used for a decision (DESIGN.md "Unsigned hints are never trusted").
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sigil.errors import VerificationError
from sigil.verify._json import load_object

ENVELOPE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
# Envelopes are small (an in-toto statement); a cap stops hostile blobs from costing memory.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
MAX_SIGNATURES = 16


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding, exactly as DSSE protocol.md defines it.

    ``PAE(type, body) = "DSSEv1" + SP + LEN(type) + SP + type + SP + LEN(body) + SP + body``
    where ``LEN`` is the ASCII decimal byte length and ``type`` is UTF-8 encoded.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def b64decode_any(text: object, *, what: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not (DSSE envelope.md allows both).

    Raises :class:`VerificationError` (reason ``invalid``) on anything else.
    """
    if not isinstance(text, str):
        raise VerificationError(f"{what} is not a base64 string", reason="invalid")
    cleaned = text.strip()
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"{what} is not valid base64", reason="invalid") from exc


@dataclass(frozen=True)
class DsseSignature:
    """One envelope signature. ``keyid`` is an unsigned hint, recorded only for messages."""

    sig: bytes
    keyid: str | None = None


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope; ``payload`` is the decoded, still-unverified body."""

    payload_type: str
    payload: bytes
    signatures: tuple[DsseSignature, ...]

    def pae(self) -> bytes:
        """The bytes every signature in this envelope must cover."""
        return pae(self.payload_type, self.payload)


def parse_envelope(raw: bytes | str | dict[str, object]) -> Envelope:
    """Parse a DSSE envelope (JSON bytes, text or an already-decoded object).

    Raises :class:`VerificationError` (reason ``invalid``) when malformed: missing fields,
    bad base64, no signature, too many signatures.
    """
    if isinstance(raw, dict):
        obj: object = raw
    else:
        obj = load_object(raw, "DSSE envelope", MAX_ENVELOPE_BYTES)
    if not isinstance(obj, dict):
        raise VerificationError("DSSE envelope is not a JSON object", reason="invalid")
    payload_type = obj.get("payloadType")
    if not isinstance(payload_type, str) or not payload_type:
        raise VerificationError("DSSE envelope lacks payloadType", reason="invalid")
    payload = b64decode_any(obj.get("payload"), what="DSSE payload")
    sigs = obj.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise VerificationError("DSSE envelope has no signatures", reason="no_signature")
    if len(sigs) > MAX_SIGNATURES:
        raise VerificationError("DSSE envelope has too many signatures", reason="invalid")
    parsed = []
    for entry in sigs:
        if not isinstance(entry, dict):
            raise VerificationError("DSSE signature is not an object", reason="invalid")
        keyid = entry.get("keyid")
        parsed.append(DsseSignature(sig=b64decode_any(entry.get("sig"), what="DSSE signature"),
                                    keyid=keyid if isinstance(keyid, str) else None))
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(parsed))


def looks_like_envelope(obj: object) -> bool:
    """True if a decoded JSON object has the DSSE envelope shape (used to pick a parser only)."""
    return isinstance(obj, dict) and "payloadType" in obj and "signatures" in obj


def verify_envelope(envelope: Envelope,
                    verifiers: Iterable[Callable[[bytes, bytes], bool]]) -> int:
    """Return the index of the first verifier that validates any envelope signature over PAE.

    Each verifier is ``f(signature, message) -> bool``. Every signature is tried against every
    verifier (``keyid`` is a hint and is ignored). Raises :class:`VerificationError` (reason
    ``wrong_key``) when none verifies.
    """
    message = envelope.pae()
    for index, verify in enumerate(verifiers):
        for signature in envelope.signatures:
            if verify(signature.sig, message):
                return index
    raise VerificationError("no DSSE signature verifies with the authority's keys",
                            reason="wrong_key")
