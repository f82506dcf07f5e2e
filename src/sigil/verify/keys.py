"""Public keys with a pinned algorithm, and :class:`KeyAuthority` (keyed cosign verification).

Keys are PEM ``PUBLIC KEY`` (PKIX SubjectPublicKeyInfo) or ``RSA PUBLIC KEY`` (PKCS#1). Each
key is used with exactly one algorithm, fixed at load time (from the key type or the policy's
``algorithm``), so a signature can never pick its own algorithm:

========================  =========================================================
``ecdsa-p256-sha256``     ECDSA P-256, SHA-256, ASN.1 DER signature (cosign default)
``ecdsa-p384-sha384``     ECDSA P-384, SHA-384, ASN.1 DER signature
``rsa-pkcs1v15-sha256``   RSA >= 2048 bits, PKCS#1 v1.5 (also ``-sha384``, ``-sha512``)
``rsa-pss-sha256``        RSA >= 2048 bits, PSS, MGF1 with the same hash, any salt length
                          (Go's ``PSSSaltLengthAuto`` on verify; also ``-sha384``, ``-sha512``)
``ed25519``               Ed25519 (RFC 8032, pure)
========================  =========================================================

What a :class:`KeyAuthority` verifies (see :class:`sigil.verify.authority.Authority`):

* legacy ``.sig`` layers: base64 signature in ``dev.cosignproject.cosign/signature`` over the
  exact simple-signing blob bytes;
* ``.att`` / DSSE layers: a DSSE signature over ``PAE(payloadType, payload)``;
* sigstore bundles: through :func:`sigil.verify.sigstore.verify_bundle` with ``public_key=``
  when a ``trusted_root`` is configured (so the transparency log is checked too), else locally
  (DSSE envelope or message signature) when ``tlog`` is not ``required``.
* the Rekor SET annotation ``dev.sigstore.cosign/bundle``: verified through
  :func:`sigil.verify.sigstore.verify_rekor_set` when present (and a ``trusted_root`` is
  configured) or when ``tlog: required``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from sigil.errors import ConfigError, VerificationError
from sigil.verify import dsse
from sigil.verify._json import load_object
from sigil.verify.authority import (
    IN_TOTO,
    MESSAGE_DIGEST,
    SIMPLE_SIGNING,
    SignerInfo,
    VerifiedPayload,
)
from sigil.verify.simplesigning import SIGNATURE_ANNOTATION

REKOR_BUNDLE_ANNOTATION = "dev.sigstore.cosign/bundle"
TLOG_MODES = ("required", "optional", "skip")
MIN_RSA_BITS = 2048
MAX_KEY_FILE_BYTES = 64 * 1024

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
ALGORITHMS = (
    "ecdsa-p256-sha256", "ecdsa-p384-sha384",
    "rsa-pkcs1v15-sha256", "rsa-pkcs1v15-sha384", "rsa-pkcs1v15-sha512",
    "rsa-pss-sha256", "rsa-pss-sha384", "rsa-pss-sha512",
    "ed25519",
)
_CURVE_ALGORITHM = {"secp256r1": "ecdsa-p256-sha256", "secp384r1": "ecdsa-p384-sha384"}


@dataclass(frozen=True)
class PublicKey:
    """A public key and the one algorithm it is used with."""

    key: Any  # ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    algorithm: str
    source: str
    fingerprint: str  # sha256 hex of the DER SubjectPublicKeyInfo

    def _hash(self) -> hashes.HashAlgorithm:
        return _HASHES[self.algorithm.rsplit("-", 1)[1]]()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is valid over ``message`` with the pinned algorithm."""
        try:
            if self.algorithm == "ed25519":
                self.key.verify(signature, message)
            elif self.algorithm.startswith("ecdsa-"):
                self.key.verify(signature, message, ec.ECDSA(self._hash()))
            elif self.algorithm.startswith("rsa-pkcs1v15-"):
                self.key.verify(signature, message, padding.PKCS1v15(), self._hash())
            else:
                h = self._hash()
                self.key.verify(signature, message,
                                padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO), h)
        except (InvalidSignature, ValueError, TypeError):
            # cryptography raises ValueError for malformed DER; any doubt is a failure.
            return False
        return True

    def verify_prehashed(self, signature: bytes, digest: bytes, hash_name: str) -> bool:
        """Verify a signature over a message known only by its digest (bundle
        ``messageSignature``). Ed25519 cannot (pure EdDSA hashes the message itself)."""
        if self.algorithm == "ed25519" or not self.algorithm.endswith("-" + hash_name):
            return False
        h = self._hash()
        if len(digest) != h.digest_size:
            return False
        pre = utils.Prehashed(h)
        try:
            if self.algorithm.startswith("ecdsa-"):
                self.key.verify(signature, digest, ec.ECDSA(pre))
            elif self.algorithm.startswith("rsa-pkcs1v15-"):
                self.key.verify(signature, digest, padding.PKCS1v15(), pre)
            else:
                self.key.verify(signature, digest,
                                padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO), pre)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def load_public_key(pem: bytes, *, algorithm: str | None = None,
                    source: str = "<inline>") -> PublicKey:
    """Load a PEM public key and pin its algorithm.

    ``algorithm`` defaults from the key: P-256 -> ``ecdsa-p256-sha256``, P-384 ->
    ``ecdsa-p384-sha384``, RSA -> ``rsa-pkcs1v15-sha256`` (cosign's), Ed25519 -> ``ed25519``.
    Raises :class:`ConfigError` (``file=source``) for an unreadable key, an unsupported curve,
    a short RSA key or an algorithm that does not fit the key.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError("not a PEM public key (PUBLIC KEY or RSA PUBLIC KEY)",
                          file=source) from exc
    if algorithm is not None and algorithm not in ALGORITHMS:
        known = ", ".join(ALGORITHMS)
        raise ConfigError(f"unknown algorithm {algorithm!r}; expected one of {known}",
                          file=source)
    if isinstance(key, ec.EllipticCurvePublicKey):
        default = _CURVE_ALGORITHM.get(key.curve.name)
        if default is None:
            raise ConfigError(f"unsupported curve {key.curve.name}; use P-256 or P-384",
                              file=source)
        if algorithm not in (None, default):
            raise ConfigError(f"algorithm {algorithm} does not fit a {key.curve.name} key "
                              f"(use {default})", file=source)
        chosen = default
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"RSA key of {key.key_size} bits is too short "
                              f"(minimum {MIN_RSA_BITS})", file=source)
        if algorithm is not None and not algorithm.startswith("rsa-"):
            raise ConfigError(f"algorithm {algorithm} does not fit an RSA key", file=source)
        chosen = algorithm or "rsa-pkcs1v15-sha256"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        if algorithm not in (None, "ed25519"):
            raise ConfigError(f"algorithm {algorithm} does not fit an Ed25519 key", file=source)
        chosen = "ed25519"
    else:
        raise ConfigError(f"unsupported key type {type(key).__name__}", file=source)
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(key=key, algorithm=chosen, source=source,
                     fingerprint=hashlib.sha256(spki).hexdigest())


def load_public_key_file(path: str | Path, *, algorithm: str | None = None) -> PublicKey:
    """Read and load a PEM public key file (see :func:`load_public_key`)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            pem = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read key file: {exc.strerror or exc}", file=str(path)) from exc
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise ConfigError("key file is too large", file=str(path))
    return load_public_key(pem, algorithm=algorithm, source=str(path))


def sigstore_name(name: str) -> Any:
    """Import ``name`` from :mod:`sigil.verify.sigstore` lazily (that module is optional here).

    Raises :class:`VerificationError` (reason ``unsupported``) when it is not available, so a
    missing implementation fails closed.
    """
    import importlib

    for module_name in _SIGSTORE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        value = getattr(module, name, None)
        if value is not None:
            return value
    raise VerificationError(f"sigstore verification is not available ({name} missing)",
                            reason="unsupported")


# The package's public names first, then the submodules that define them today.
_SIGSTORE_MODULES = ("sigil.verify.sigstore", "sigil.verify.sigstore.rekor",
                     "sigil.verify.sigstore.bundle", "sigil.verify.sigstore.trust")


def load_trusted_root(data: bytes, source: str) -> Any:
    """Build the sigstore module's ``TrustedRoot`` from ``trusted_root.json`` bytes."""
    trusted_root_cls = sigstore_name("TrustedRoot")
    make = getattr(trusted_root_cls, "from_json", None)
    if make is not None:
        return make(data, source=source)
    loader = getattr(trusted_root_cls, "from_file", None) or getattr(trusted_root_cls, "load", None)
    if loader is not None:
        return loader(source)
    raise VerificationError("sigstore TrustedRoot has no known constructor", reason="unsupported")


def _translate(exc: Exception, what: str) -> VerificationError:
    """Map an exception from the sigstore module to a VerificationError (fail closed)."""
    if isinstance(exc, VerificationError):
        return exc
    if isinstance(exc, TypeError):
        return VerificationError(f"{what}: sigstore module API mismatch ({exc})",
                                 reason="unsupported")
    return VerificationError(f"{what}: {exc}", reason="invalid")


class KeyAuthority:
    """An authority made of one or more public keys (:class:`~sigil.verify.authority.Authority`).

    ``tlog``: ``required`` (a Rekor SET / bundle tlog entry must verify; needs
    ``trusted_root``), ``optional`` (verified when present and a ``trusted_root`` is
    configured), ``skip`` (never looked at).
    """

    def __init__(self, name: str, keys: tuple[PublicKey, ...], *, tlog: str = "optional",
                 trusted_root: bytes | None = None, trusted_root_source: str = "") -> None:
        if not keys:
            raise ConfigError("a key authority needs at least one key", key=name)
        if tlog not in TLOG_MODES:
            raise ConfigError(f"tlog must be one of {', '.join(TLOG_MODES)}", key=name)
        if tlog == "required" and trusted_root is None:
            raise ConfigError("tlog: required needs a trusted_root (the Rekor keys)", key=name)
        self.name = name
        self.keys = keys
        self.tlog = tlog
        self._trusted_root_bytes = trusted_root
        self._trusted_root_source = trusted_root_source
        self._trusted_root: Any = None
        material = {
            "kind": "key", "name": name, "tlog": tlog,
            "keys": [[k.fingerprint, k.algorithm] for k in keys],
            "trusted_root": hashlib.sha256(trusted_root).hexdigest() if trusted_root else None,
        }
        self._fingerprint = hashlib.sha256(
            json.dumps(material, sort_keys=True).encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        """sha256 over the key fingerprints, algorithms, tlog mode and trusted root."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"KeyAuthority({self.name!r}, keys={[k.fingerprint[:12] for k in self.keys]})"

    def preload(self) -> None:
        """Parse the trusted root now (at policy load) so a broken file is a config error.

        Raises :class:`ConfigError`; a missing sigstore module is left for verification time
        (where it fails closed)."""
        if self._trusted_root_bytes is None:
            return
        try:
            self._trusted_root = load_trusted_root(self._trusted_root_bytes,
                                                   self._trusted_root_source)
        except VerificationError as exc:
            if exc.reason != "unsupported":
                raise ConfigError(str(exc), file=self._trusted_root_source) from exc

    def _root(self) -> Any:
        if self._trusted_root is None:
            assert self._trusted_root_bytes is not None
            try:
                self._trusted_root = load_trusted_root(self._trusted_root_bytes,
                                                       self._trusted_root_source)
            except Exception as exc:  # translate at the boundary
                raise _translate(exc, "trusted root") from exc
        return self._trusted_root

    def _signer(self, key: PublicKey, checks: list[str]) -> SignerInfo:
        return SignerInfo(authority=self.name, kind="key", identity=f"sha256:{key.fingerprint}",
                          checks=(f"signature verified with key {key.source} ({key.algorithm})",
                                  *checks))

    def _check_tlog(self, annotations: Mapping[str, str], *, signature: bytes, payload: bytes,
                    key: PublicKey, dsse_layer: bool = False) -> list[str]:
        """The Rekor SET rule for legacy layers; returns the checks that were made.

        ``.sig`` layers are logged as ``hashedrekord`` (signature, sha256 of the payload,
        key); ``.att`` layers as ``dsse``/``intoto`` entries of the envelope."""
        entry = annotations.get(REKOR_BUNDLE_ANNOTATION)
        if self.tlog == "skip":
            return ["tlog: skipped by policy"]
        if entry is None:
            if self.tlog == "required":
                raise VerificationError("no Rekor entry (dev.sigstore.cosign/bundle) and "
                                        "tlog is required", reason="tlog")
            return ["tlog: no Rekor entry (optional)"]
        if self._trusted_root_bytes is None:
            return ["tlog: Rekor SET present, not checked (no trusted_root configured)"]
        verify_rekor_set = sigstore_name("verify_rekor_set")
        expected_entry = sigstore_name("ExpectedEntry")
        try:
            if dsse_layer:
                parse_envelope = sigstore_name("parse_dsse_envelope")
                expected = expected_entry.dsse(parse_envelope(json.loads(payload)),
                                               public_key=key.key, envelope_bytes=payload)
            else:
                expected = expected_entry.hashedrekord(signature,
                                                       hashlib.sha256(payload).digest(),
                                                       public_key=key.key)
            integrated = verify_rekor_set(entry, trusted_root=self._root(), expected=expected)
        except Exception as exc:
            raise _translate(exc, "Rekor SET") from exc
        return [f"tlog: Rekor SET verified (integrated time {integrated})"]

    def verify_cosign_layer(self, *, blob: bytes, media_type: str,
                            annotations: Mapping[str, str]) -> VerifiedPayload:
        """Verify a legacy ``.sig`` (simple-signing) or ``.att`` (DSSE) layer with these keys."""
        if media_type == SIMPLE_SIGNING:
            encoded = annotations.get(SIGNATURE_ANNOTATION)
            if not encoded:
                raise VerificationError("layer has no dev.cosignproject.cosign/signature",
                                        reason="no_signature")
            signature = dsse.b64decode_any(encoded, what="cosign signature")
            for key in self.keys:
                if key.verify(signature, blob):
                    checks = self._check_tlog(annotations, signature=signature, payload=blob,
                                              key=key)
                    return VerifiedPayload(SIMPLE_SIGNING, blob, None, self._signer(key, checks))
            raise VerificationError("signature does not verify with the authority's key(s)",
                                    reason="wrong_key")
        if media_type in (dsse.ENVELOPE_MEDIA_TYPE, IN_TOTO):
            envelope = dsse.parse_envelope(blob)
            index = dsse.verify_envelope(envelope, [k.verify for k in self.keys])
            key = self.keys[index]
            # cosign .att layers: the SET covers the envelope; signature = the first verifying.
            sig = next(s.sig for s in envelope.signatures if key.verify(s.sig, envelope.pae()))
            checks = self._check_tlog(annotations, signature=sig, payload=blob, key=key,
                                      dsse_layer=True)
            return VerifiedPayload(envelope.payload_type, envelope.payload, None,
                                   self._signer(key, ["DSSE PAE signature", *checks]))
        raise VerificationError(f"unsupported cosign layer media type {media_type[:100]!r}",
                                reason="unsupported")

    def verify_bundle(self, bundle: bytes) -> VerifiedPayload:
        """Verify a keyed sigstore bundle (v0.1-v0.3).

        With a ``trusted_root``: through the sigstore module (tlog and timestamps checked
        there). Without one (``tlog`` optional or skip): the DSSE envelope or the message
        signature is checked locally with these keys, and the tlog is not.
        """
        if self._trusted_root_bytes is not None:
            verify_bundle = sigstore_name("verify_bundle")
            last: VerificationError | None = None
            for key in self.keys:
                try:
                    result = verify_bundle(bundle, trusted_root=self._root(), public_key=key.key,
                                           tlog=self.tlog, authority=self.name)
                except Exception as exc:
                    last = _translate(exc, "sigstore bundle")
                    if last.reason == "unsupported":
                        raise last from exc
                    continue
                if not isinstance(result, VerifiedPayload):
                    raise VerificationError("sigstore module returned no VerifiedPayload",
                                            reason="unsupported")
                return VerifiedPayload(result.payload_type, result.payload,
                                       result.message_digest,
                                       self._signer(key, ["sigstore bundle verified",
                                                          *result.signer.checks]))
            assert last is not None
            raise last
        if self.tlog == "required":  # unreachable: refused at construction
            raise VerificationError("tlog required without trusted_root", reason="tlog")
        return self._verify_bundle_locally(bundle)

    def _verify_bundle_locally(self, bundle: bytes) -> VerifiedPayload:
        obj = load_object(bundle, "sigstore bundle")
        note = "tlog: not checked (no trusted_root configured)" if self.tlog != "skip" \
            else "tlog: skipped by policy"
        if "dsseEnvelope" in obj:
            envelope = dsse.parse_envelope(obj["dsseEnvelope"])
            if len(envelope.signatures) != 1:
                # sigstore bundles carry exactly one DSSE signature (bundle spec).
                raise VerificationError("bundle DSSE envelope must have one signature",
                                        reason="invalid")
            index = dsse.verify_envelope(envelope, [k.verify for k in self.keys])
            return VerifiedPayload(envelope.payload_type, envelope.payload, None,
                                   self._signer(self.keys[index], ["bundle DSSE signature", note]))
        message = obj.get("messageSignature")
        if isinstance(message, dict):
            md = message.get("messageDigest")
            if not isinstance(md, dict) or md.get("algorithm") not in ("SHA2_256", "SHA2_384",
                                                                         "SHA2_512"):
                raise VerificationError("bundle messageDigest is missing or unsupported",
                                        reason="unsupported")
            hash_name = {"SHA2_256": "sha256", "SHA2_384": "sha384",
                         "SHA2_512": "sha512"}[md["algorithm"]]
            digest = dsse.b64decode_any(md.get("digest"), what="bundle message digest")
            signature = dsse.b64decode_any(message.get("signature"), what="bundle signature")
            for key in self.keys:
                if key.verify_prehashed(signature, digest, hash_name):
                    if hash_name != "sha256":
                        raise VerificationError("only sha256 message digests name OCI content",
                                                reason="unsupported")
                    return VerifiedPayload(MESSAGE_DIGEST, None, digest,
                                           self._signer(key, ["bundle message signature", note]))
            raise VerificationError("bundle signature does not verify with the authority's "
                                    "key(s)", reason="wrong_key")
        raise VerificationError("bundle has neither dsseEnvelope nor messageSignature",
                                reason="invalid")


class UnavailableAuthority:
    """An authority whose implementation is missing (sigstore module absent): always fails.

    Used so a policy still loads, but nothing it guards is allowed (fail closed).
    """

    def __init__(self, name: str, why: str, material: bytes = b"") -> None:
        self.name = name
        self.why = why
        self._fingerprint = hashlib.sha256(b"unavailable\0" + name.encode() + b"\0" +
                                           material).hexdigest()

    @property
    def fingerprint(self) -> str:
        """A hash of the authority's configuration (the implementation is missing)."""
        return self._fingerprint

    def verify_cosign_layer(self, *, blob: bytes, media_type: str,
                            annotations: Mapping[str, str]) -> VerifiedPayload:
        """Always raises (reason ``unsupported``)."""
        raise VerificationError(self.why, reason="unsupported")

    def verify_bundle(self, bundle: bytes) -> VerifiedPayload:
        """Always raises (reason ``unsupported``)."""
        raise VerificationError(self.why, reason="unsupported")
