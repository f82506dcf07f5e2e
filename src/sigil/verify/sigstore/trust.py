"""Sigstore trust material: the protobuf-specs ``TrustedRoot`` JSON, parsed once and cached.

Spec: sigstore/protobuf-specs ``dev.sigstore.trustroot.v1.TrustedRoot`` (media types
``application/vnd.dev.sigstore.trustedroot+json;version=0.1`` and
``application/vnd.dev.sigstore.trustedroot.v0.2+json``). It lists

* ``tlogs``: Rekor logs. Rekor v1 signs with ECDSA and its ``logId`` is SHA-256 of the DER
  public key; Rekor v2 signs checkpoints with Ed25519 and its ``logId`` is the C2SP signed-note
  key ID ``SHA-256(name || 0x0A || 0x01 || key)`` where ``name`` is the host of ``baseUrl``.
  ``checkpointKeyId`` (v0.2) overrides the key ID used as the checkpoint key hint;
* ``ctlogs``: certificate transparency logs that sign Fulcio SCTs;
* ``certificateAuthorities``: Fulcio chains (intermediates first, root last);
* ``timestampAuthorities``: RFC 3161 TSA chains (signing certificate first, root last).

Every key and CA has a ``validFor`` range; ``start`` is required (a range without one is
rejected, never read as unbounded) and both ends are inclusive.

Loading is fail-closed: any malformed entry makes the whole root unusable
(:class:`sigil.errors.ConfigError`). A "managed key" (a ``key.pub`` the user holds) is not
part of the root; it is passed to the verifier as ``public_key`` (see
:func:`load_public_key`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.verification import Store

from sigil.errors import ConfigError, VerificationError

from ._common import (
    PublicKey,
    b64decode,
    fmt_time,
    load_der_certificate,
    load_der_public_key,
    load_pem_public_key,
    parse_rfc3339,
)

TRUSTED_ROOT_MEDIA_TYPES = frozenset({
    "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
    "application/vnd.dev.sigstore.trustedroot.v0.1+json",
    "application/vnd.dev.sigstore.trustedroot+json;version=0.2",
    "application/vnd.dev.sigstore.trustedroot.v0.2+json",
})

# keyDetails (protobuf-specs PublicKeyDetails) -> (key class, curve or None, signature hash).
_KEY_DETAILS: dict[str, tuple[type, type | None, type[hashes.HashAlgorithm] | None]] = {
    "PKIX_ECDSA_P256_SHA_256": (ec.EllipticCurvePublicKey, ec.SECP256R1, hashes.SHA256),
    "PKIX_ECDSA_P384_SHA_384": (ec.EllipticCurvePublicKey, ec.SECP384R1, hashes.SHA384),
    "PKIX_ECDSA_P521_SHA_512": (ec.EllipticCurvePublicKey, ec.SECP521R1, hashes.SHA512),
    "ECDSA_P256_SHA_256": (ec.EllipticCurvePublicKey, ec.SECP256R1, hashes.SHA256),
    "PKIX_ED25519": (ed25519.Ed25519PublicKey, None, None),
    "PKCS1_RSA_PKCS1V5": (rsa.RSAPublicKey, None, hashes.SHA256),
    "PKIX_RSA_PKCS1V5": (rsa.RSAPublicKey, None, hashes.SHA256),
    "PKIX_RSA_PKCS1V15_2048_SHA256": (rsa.RSAPublicKey, None, hashes.SHA256),
    "PKIX_RSA_PKCS1V15_3072_SHA256": (rsa.RSAPublicKey, None, hashes.SHA256),
    "PKIX_RSA_PKCS1V15_4096_SHA256": (rsa.RSAPublicKey, None, hashes.SHA256),
}


@dataclass(frozen=True)
class TimeRange:
    """A closed validity interval; ``end`` None means open-ended."""

    start: dt.datetime
    end: dt.datetime | None = None

    def contains(self, t: dt.datetime) -> bool:
        """True when ``start <= t <= end`` (protobuf-specs ``TimeRange`` is inclusive)."""
        return self.start <= t and (self.end is None or t <= self.end)

    def __str__(self) -> str:
        return f"[{fmt_time(self.start)}, {fmt_time(self.end) if self.end else '...'}]"


@dataclass(frozen=True)
class TransparencyLog:
    """A Rekor log or a CT log from the trusted root."""

    base_url: str
    name: str                 # host[:port] of base_url: the signed-note key name
    log_id: bytes             # logId.keyId
    checkpoint_key_id: bytes  # checkpointKeyId.keyId, else log_id
    public_key: PublicKey = field(repr=False)
    key_details: str
    hash_alg: hashes.HashAlgorithm | None = field(repr=False)  # None for Ed25519
    valid_for: TimeRange

    @property
    def description(self) -> str:
        """``<host/path> (<first 8 hex of the log ID>)`` for messages and check lists."""
        parts = urlsplit(self.base_url)
        where = (parts.netloc + parts.path.rstrip("/")) or self.base_url
        return f"{where} ({self.log_id[:4].hex()})"


@dataclass(frozen=True)
class CertificateAuthority:
    """A Fulcio CA or a timestamp authority: a certificate chain with a validity range."""

    subject: str              # RFC 4514 subject of the first certificate in the chain
    uri: str
    certificates: tuple[x509.Certificate, ...] = field(repr=False)  # leaf-most first, root last
    valid_for: TimeRange
    store: Store = field(repr=False, compare=False)

    @property
    def root(self) -> x509.Certificate:
        """The self-signed trust anchor at the end of the chain."""
        return self.certificates[-1]


class TrustedRoot:
    """A parsed, immutable sigstore trusted root. Build with :meth:`load` or :meth:`from_json`."""

    media_type: str
    tlogs: tuple[TransparencyLog, ...]
    ctlogs: tuple[TransparencyLog, ...]
    certificate_authorities: tuple[CertificateAuthority, ...]
    timestamp_authorities: tuple[CertificateAuthority, ...]
    source: str | None

    _cache: ClassVar[OrderedDict[bytes, TrustedRoot]] = OrderedDict()
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()
    _CACHE_SIZE: ClassVar[int] = 16

    def __init__(self, raw: bytes, *, source: str | None = None) -> None:
        """Parse ``raw`` JSON; prefer :meth:`from_json`, which caches."""
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self.source = source
        where = source or "trusted_root"
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid JSON: {exc}", file=where) from exc
        try:
            self._parse(doc)
        except VerificationError as exc:
            raise ConfigError(str(exc), file=where) from exc

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_json(cls, raw: bytes | str, *, source: str | None = None) -> TrustedRoot:
        """Parse trusted-root JSON; identical bytes return the same cached object."""
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        key = hashlib.sha256(data).digest()
        with cls._cache_lock:
            hit = cls._cache.get(key)
            if hit is not None:
                cls._cache.move_to_end(key)
                return hit
        root = cls(data, source=source)
        with cls._cache_lock:
            cls._cache[key] = root
            while len(cls._cache) > cls._CACHE_SIZE:
                cls._cache.popitem(last=False)
        return root

    @classmethod
    def load(cls, path: str | Path) -> TrustedRoot:
        """Read and parse a ``trusted_root.json`` file (cached by content)."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read trusted root: {exc}", file=str(path)) from exc
        return cls.from_json(raw, source=str(path))

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the exact file bytes."""
        return f"sha256:{self._sha256}"

    def __repr__(self) -> str:
        return (f"TrustedRoot({self.source or self.fingerprint}, tlogs={len(self.tlogs)}, "
                f"ctlogs={len(self.ctlogs)}, cas={len(self.certificate_authorities)}, "
                f"tsas={len(self.timestamp_authorities)})")

    # -- lookups -------------------------------------------------------------------------

    def tlog(self, log_id: bytes) -> TransparencyLog | None:
        """The Rekor log whose ``logId`` is ``log_id``."""
        return self._tlog_by_id.get(log_id)

    def ctlog(self, log_id: bytes) -> TransparencyLog | None:
        """The CT log whose ``logId`` is ``log_id``."""
        return self._ctlog_by_id.get(log_id)

    # -- parsing -------------------------------------------------------------------------

    def _parse(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise VerificationError("trusted root is not a JSON object", reason="malformed")
        media_type = doc.get("mediaType")
        if media_type not in TRUSTED_ROOT_MEDIA_TYPES:
            raise VerificationError(f"unsupported trusted root media type {media_type!r}",
                                    reason="malformed")
        self.media_type = media_type
        self.tlogs = tuple(_parse_log(e, f"tlogs[{i}]") for i, e in
                           enumerate(_list(doc, "tlogs")))
        self.ctlogs = tuple(_parse_log(e, f"ctlogs[{i}]") for i, e in
                            enumerate(_list(doc, "ctlogs")))
        self.certificate_authorities = tuple(
            _parse_ca(e, f"certificateAuthorities[{i}]") for i, e in
            enumerate(_list(doc, "certificateAuthorities")))
        self.timestamp_authorities = tuple(
            _parse_ca(e, f"timestampAuthorities[{i}]", tsa=True) for i, e in
            enumerate(_list(doc, "timestampAuthorities")))
        self._tlog_by_id = _index(self.tlogs, "tlogs")
        self._ctlog_by_id = _index(self.ctlogs, "ctlogs")


def _index(logs: tuple[TransparencyLog, ...], what: str) -> dict[bytes, TransparencyLog]:
    out: dict[bytes, TransparencyLog] = {}
    for log in logs:
        if log.log_id in out:
            raise VerificationError(f"{what}: duplicate logId {log.log_id.hex()}",
                                    reason="malformed")
        out[log.log_id] = log
    return out


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise VerificationError(f"{key} is not a list", reason="malformed")
    return value


def _obj(doc: Any, key: str, what: str) -> dict[str, Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, dict):
        raise VerificationError(f"{what}.{key} missing or not an object", reason="malformed")
    return value


def _time_range(doc: dict[str, Any], what: str) -> TimeRange:
    # protobuf-specs TimeRange: ``start`` is required, ``end`` optional; both inclusive.
    valid_for = _obj(doc, "validFor", what)
    if "start" not in valid_for or valid_for["start"] is None:
        raise VerificationError(f"{what}.validFor has no start", reason="malformed")
    start = parse_rfc3339(valid_for["start"], f"{what}.validFor.start")
    end_raw = valid_for.get("end")
    end = parse_rfc3339(end_raw, f"{what}.validFor.end") if end_raw is not None else None
    if end is not None and end < start:
        raise VerificationError(f"{what}.validFor ends before it starts", reason="malformed")
    return TimeRange(start, end)


def _parse_log(doc: Any, what: str) -> TransparencyLog:
    if not isinstance(doc, dict):
        raise VerificationError(f"{what} is not an object", reason="malformed")
    base_url = doc.get("baseUrl")
    if not isinstance(base_url, str) or not base_url:
        raise VerificationError(f"{what}.baseUrl missing", reason="malformed")
    name = urlsplit(base_url).netloc or base_url
    pk = _obj(doc, "publicKey", what)
    details = pk.get("keyDetails")
    if details not in _KEY_DETAILS:
        raise VerificationError(f"{what}: unsupported keyDetails {details!r}",
                                reason="malformed")
    key = load_der_public_key(b64decode(pk.get("rawBytes"), f"{what}.publicKey.rawBytes"))
    key_cls, curve, hash_cls = _KEY_DETAILS[details]
    if not isinstance(key, key_cls) or (
            curve is not None and not isinstance(getattr(key, "curve", None), curve)):
        raise VerificationError(f"{what}: key does not match keyDetails {details}",
                                reason="malformed")
    log_id = b64decode(_obj(doc, "logId", what).get("keyId"), f"{what}.logId.keyId")
    if len(log_id) != 32:
        raise VerificationError(f"{what}.logId is not 32 bytes", reason="malformed")
    ckid_doc = doc.get("checkpointKeyId")
    ckid = (b64decode(ckid_doc.get("keyId"), f"{what}.checkpointKeyId.keyId")
            if isinstance(ckid_doc, dict) and ckid_doc.get("keyId") else log_id)
    if len(ckid) < 4:
        raise VerificationError(f"{what}.checkpointKeyId too short", reason="malformed")
    return TransparencyLog(base_url=base_url, name=name, log_id=log_id, checkpoint_key_id=ckid,
                           public_key=key, key_details=details,
                           hash_alg=hash_cls() if hash_cls else None,
                           valid_for=_time_range(pk, f"{what}.publicKey"))


def _parse_ca(doc: Any, what: str, *, tsa: bool = False) -> CertificateAuthority:
    if not isinstance(doc, dict):
        raise VerificationError(f"{what} is not an object", reason="malformed")
    chain_doc = _obj(doc, "certChain", what).get("certificates")
    if not isinstance(chain_doc, list) or not chain_doc:
        raise VerificationError(f"{what}.certChain is empty", reason="malformed")
    certs = tuple(
        load_der_certificate(b64decode(c.get("rawBytes") if isinstance(c, dict) else None,
                                       f"{what}.certChain[{i}]"))
        for i, c in enumerate(chain_doc))
    if tsa and len(certs) < 2:
        # A TSA chain needs its signing certificate and a separate root.
        raise VerificationError(f"{what}.certChain needs a leaf and a root", reason="malformed")
    root = certs[-1]
    if root.issuer != root.subject:
        raise VerificationError(f"{what}: last certificate is not self-signed",
                                reason="malformed")
    # Named after the certificate that issues leaves (Fulcio) or signs tokens (TSA).
    subject = certs[0].subject.rfc4514_string() or root.subject.rfc4514_string()
    uri_doc = doc.get("uri")
    uri = uri_doc if isinstance(uri_doc, str) else ""
    # Every certificate of a trusted-root chain is trust material, so all of them are
    # anchors (as in sigstore-python): path building stops at the first one and does not
    # re-verify the intermediate's signature by the root on every call. The validity of the
    # whole listed chain at the verification time is checked separately (x509chain).
    anchors = list(certs[1:]) if tsa else list(certs)
    return CertificateAuthority(subject=subject, uri=uri, certificates=certs,
                                valid_for=_time_range(doc, what), store=Store(anchors))


def load_public_key(pem_or_der: bytes) -> PublicKey:
    """Load a managed ("keyed") verification key: PEM ``PUBLIC KEY`` or DER SPKI."""
    data = bytes(pem_or_der)
    if data.lstrip().startswith(b"-----BEGIN"):
        return load_pem_public_key(data)
    return load_der_public_key(data)
