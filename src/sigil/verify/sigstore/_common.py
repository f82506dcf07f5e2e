"""Small helpers shared by the sigstore verifier modules: strict decoding, times, signatures."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NoReturn, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from sigil.errors import VerificationError

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

# Tolerance for "not in the future" checks on log and TSA times, for clock skew between this
# host and the log/TSA. Kept small: a time in the future beyond it is a forged or broken entry.
CLOCK_SKEW = dt.timedelta(seconds=30)


def fail(message: str, reason: str) -> NoReturn:
    """Raise the one error type verify/ lets out."""
    raise VerificationError(message, reason=reason)


def b64decode(value: Any, what: str) -> bytes:
    """Strict standard base64 (protobuf JSON ``bytes``; URL-safe alphabet also accepted)."""
    if not isinstance(value, str):
        fail(f"{what}: expected a base64 string", "malformed")
    # Go's encoding/base64 (protojson) skips CR and LF; line-wrapped values occur in the wild.
    text = value.replace("\r", "").replace("\n", "")
    if "-" in text or "_" in text:  # proto3 JSON parsers accept the URL-safe alphabet too
        text = text.replace("-", "+").replace("_", "/")
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        fail(f"{what}: invalid base64", "malformed")


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as Go's ``encoding/base64.StdEncoding`` writes it."""
    return base64.b64encode(data).decode("ascii")


def as_int(value: Any, what: str, *, minimum: int = 0) -> int:
    """A protobuf JSON int64 (a decimal string or a JSON number), bounded below."""
    if isinstance(value, bool):
        fail(f"{what}: expected an integer", "malformed")
    if isinstance(value, str):
        if not re.fullmatch(r"-?[0-9]+", value):
            fail(f"{what}: expected an integer", "malformed")
        number = int(value)
    elif isinstance(value, int):
        number = value
    else:
        fail(f"{what}: expected an integer", "malformed")
    if number < minimum:
        fail(f"{what}: {number} is below {minimum}", "malformed")
    if number >= 1 << 63:
        fail(f"{what}: out of range", "malformed")
    return number


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def parse_rfc3339(value: Any, what: str) -> dt.datetime:
    """A protobuf JSON ``Timestamp`` (RFC 3339), as an aware UTC datetime."""
    if not isinstance(value, str):
        fail(f"{what}: expected an RFC 3339 time", "malformed")
    m = _RFC3339.fullmatch(value)
    if not m:
        fail(f"{what}: invalid RFC 3339 time {value!r}", "malformed")
    year, mon, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    micro = int(frac[1:7].ljust(6, "0")) if frac else 0
    if zone in ("Z", "z"):
        tz = dt.UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        tz = dt.timezone(sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    try:
        return dt.datetime(year, mon, day, hour, minute, sec, micro, tzinfo=tz).astimezone(
            dt.UTC)
    except ValueError:
        fail(f"{what}: invalid RFC 3339 time {value!r}", "malformed")


def fmt_time(t: dt.datetime) -> str:
    """ISO 8601 UTC for messages and check descriptions."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_unix(seconds: int) -> dt.datetime:
    """Aware UTC datetime from Unix seconds."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, OSError, ValueError):
        fail(f"time {seconds} out of range", "malformed")


def now() -> dt.datetime:
    """The current time (one place, so tests could patch it)."""
    return dt.datetime.now(dt.UTC)


HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA2_256": hashes.SHA256, "SHA2_384": hashes.SHA384, "SHA2_512": hashes.SHA512,
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


def digest(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    """Hash ``data`` with ``algorithm`` (SHA-2 family)."""
    return hashlib.new(algorithm.name, data).digest()


# cryptography raises ValueError, InvalidVersion, DuplicateExtension, UnsupportedAlgorithm...
# for malformed input: any exception while parsing untrusted bytes means "malformed".
_CERT_ERRORS = (Exception,)


def _checked(cert: x509.Certificate) -> x509.Certificate:
    # cryptography parses extensions and the key lazily: force both now so a malformed
    # certificate fails here, as "malformed", and never later in the middle of a check.
    _ = cert.extensions
    cert.public_key()
    return cert


@lru_cache(maxsize=256)
def load_der_certificate(der: bytes) -> x509.Certificate:
    """Parse (and cache) a DER certificate, extensions and key included."""
    try:
        return _checked(x509.load_der_x509_certificate(der))
    except _CERT_ERRORS as exc:
        fail(f"certificate is not valid DER X.509: {exc}", "malformed")


@lru_cache(maxsize=256)
def load_pem_certificates(pem: bytes) -> tuple[x509.Certificate, ...]:
    """Parse (and cache) one or more PEM certificates, extensions and keys included."""
    try:
        return tuple(_checked(c) for c in x509.load_pem_x509_certificates(pem))
    except _CERT_ERRORS as exc:
        fail(f"certificate PEM is invalid: {exc}", "malformed")


def _supported(key: Any) -> PublicKey:
    """``key`` if it is an EC, Ed25519 or RSA public key, else fail ``unsupported``."""
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                      | rsa.RSAPublicKey):
        fail(f"unsupported public key type {type(key).__name__}", "unsupported")
    return key


@lru_cache(maxsize=256)
def load_der_public_key(der: bytes) -> PublicKey:
    """Parse (and cache) a DER SubjectPublicKeyInfo; only EC, Ed25519 and RSA keys."""
    try:
        return _supported(serialization.load_der_public_key(der))
    except (ValueError, UnsupportedAlgorithm):
        fail("public key is not a valid DER SubjectPublicKeyInfo", "malformed")


@lru_cache(maxsize=256)
def load_pem_public_key(pem: bytes) -> PublicKey:
    """Parse (and cache) a PEM public key (``-----BEGIN PUBLIC KEY-----``)."""
    try:
        return _supported(serialization.load_pem_public_key(pem))
    except (ValueError, UnsupportedAlgorithm):
        fail("public key PEM is invalid", "malformed")


def spki_der(key: PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of a public key."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_hash_for(key: PublicKey) -> hashes.HashAlgorithm:
    """The hash sigstore pairs with a key: SHA-256 (P-256, RSA), SHA-384 (P-384), SHA-512."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP384R1):
            return hashes.SHA384()
        if isinstance(key.curve, ec.SECP521R1):
            return hashes.SHA512()
    return hashes.SHA256()


def verify_signature(key: PublicKey, signature: bytes, data: bytes, *,
                     hash_alg: hashes.HashAlgorithm | None = None,
                     prehashed: bool = False, what: str = "signature",
                     reason: str = "signature") -> None:
    """Verify ``signature`` over ``data`` (or over the digest ``data`` when ``prehashed``).

    ECDSA takes a DER signature; RSA is PKCS#1 v1.5, then PSS (MGF1 with the same hash, any
    salt length, like Go's ``PSSSaltLengthAuto``);
    Ed25519 signs the message itself, never a digest.
    """
    alg = hash_alg or key_hash_for(key)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            if prehashed:
                fail(f"{what}: Ed25519 cannot verify a pre-computed digest", "unsupported")
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(Prehashed(alg) if prehashed else alg))
        elif isinstance(key, rsa.RSAPublicKey):
            h: hashes.HashAlgorithm | Prehashed = Prehashed(alg) if prehashed else alg
            try:
                key.verify(signature, data, padding.PKCS1v15(), h)
            except InvalidSignature:
                key.verify(signature, data,
                           padding.PSS(mgf=padding.MGF1(alg), salt_length=padding.PSS.AUTO), h)
        else:  # pragma: no cover - the loaders above reject other key types
            fail(f"{what}: unsupported key type", "unsupported")
    except InvalidSignature:
        fail(f"{what} does not verify", reason)
    except (ValueError, UnsupportedAlgorithm) as exc:
        fail(f"{what}: cannot verify ({exc})", reason)
