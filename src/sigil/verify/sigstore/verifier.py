"""Offline verification of sigstore bundles and legacy cosign keyless layers.

The order follows the sigstore client specification ("Verification" section) and
sigstore-python's verifier, all steps mandatory, failing closed:

1. parse the bundle strictly (:mod:`.bundle`);
2. verify the signature: over the message digest (``messageSignature``), over the DSSE PAE
   (``dsseEnvelope``) or over the simple-signing payload (cosign ``.sig`` layers);
3. verify every transparency log entry: the body records this signature, key and digest;
   the SET (Rekor v1) and/or inclusion proof + signed checkpoint (required for v0.2+);
4. verify every RFC 3161 timestamp over the signature;
5. establish the verified times (SET integrated times, TSA times; at least
   ``min_timestamps``), none in the future;
6. keyless: the Fulcio chain to a CA of the trusted root, valid at *each* verified time
   (leaf validity window included), code-signing EKU and digitalSignature key usage; exactly
   one embedded SCT from a CT log of the trusted root; the identity policy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519

from sigil.errors import ConfigError
from sigil.verify.authority import (
    IN_TOTO,
    MESSAGE_DIGEST,
    SIMPLE_SIGNING,
    SignerInfo,
    VerifiedPayload,
)

from ._common import (
    HASHES,
    PublicKey,
    b64decode,
    fail,
    fmt_time,
    load_pem_certificates,
    verify_signature,
)
from .bundle import Bundle, DSSEEnvelope, parse_dsse_envelope
from .ct import verify_embedded_sct
from .policy import KeylessRequirements, check_identity
from .rekor import ExpectedEntry, verify_rekor_bundle_annotation, verify_tlog_entry
from .trust import TransparencyLog, TrustedRoot
from .tsa import verify_timestamp
from .x509chain import verify_fulcio_chain

DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
ANN_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANN_CHAIN = "dev.sigstore.cosign/chain"
ANN_BUNDLE = "dev.sigstore.cosign/bundle"
ANN_RFC3161 = "dev.sigstore.cosign/rfc3161timestamp"

class _Times:
    """Verified times and the check descriptions that produced them."""

    def __init__(self) -> None:
        self.times: list[dt.datetime] = []
        self.tsa_times: list[dt.datetime] = []
        self.checks: list[str] = []
        self.unbound_logs: list[TransparencyLog] = []   # entries with no SET time (Rekor v2)
        self.tlog_entries = 0

    def finish(self, *, min_timestamps: int, tlog_mode: str) -> None:
        if tlog_mode == "required" and self.tlog_entries == 0:
            fail("no verified transparency log entry", "tlog")
        # A log entry without a SET carries no signed time: its log key must have been valid
        # when the TSA says the signature existed.
        for log in self.unbound_logs:
            if not self.tsa_times:
                fail(f"log entry from {log.description} has no signed time; an RFC 3161 "
                     "timestamp is required", "timestamp")
            for t in self.tsa_times:
                if not log.valid_for.contains(t):
                    fail(f"log {log.description} key not valid at {fmt_time(t)} "
                         f"({log.valid_for})", "tlog")
        if len(self.times) < min_timestamps:
            fail(f"{len(self.times)} verified time source(s), {min_timestamps} required",
                 "timestamp")


def _verify_timestamps(tokens: tuple[bytes, ...], signed: bytes, trusted_root: TrustedRoot,
                       times: _Times, at: dt.datetime | None) -> None:
    if tokens and not trusted_root.timestamp_authorities:
        fail("bundle has RFC 3161 timestamps but the trusted root has no timestamp "
             "authority", "timestamp")
    for token in tokens:
        ts = verify_timestamp(token, signed, trusted_root, at=at)
        times.times.append(ts.time)
        times.tsa_times.append(ts.time)
        times.checks.append(f"RFC 3161 timestamp by {ts.authority.subject} at "
                            f"{fmt_time(ts.time)}")


def _verify_keyless_cert(cert: x509.Certificate, trusted_root: TrustedRoot,
                         requirements: KeylessRequirements, times: list[dt.datetime]
                         ) -> tuple[str, str, list[str]]:
    """Chain, validity at each time, usages, SCT and identity; returns (identity, issuer)."""
    checks: list[str] = []
    for t in times:
        # Fulcio certificates live minutes: every verified time must fall inside the window.
        if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
            fail(f"signing certificate not valid at verified time {fmt_time(t)} (valid "
                 f"{fmt_time(cert.not_valid_before_utc)} to "
                 f"{fmt_time(cert.not_valid_after_utc)})", "expired")
    ca, chain = verify_fulcio_chain(cert, trusted_root.certificate_authorities, times)
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        fail("signing certificate has no key usage", "chain")
    if not ku.digital_signature:
        fail("signing certificate key usage lacks digitalSignature", "chain")
    checks.append(f"fulcio chain to {chain[1].subject.rfc4514_string()} (root "
                  f"{ca.root.subject.rfc4514_string()}, {ca.uri or 'trusted root'}) valid at "
                  f"{', '.join(fmt_time(t) for t in times)}, code-signing EKU")
    log = verify_embedded_sct(cert, chain[1], trusted_root)
    checks.append(f"SCT from log {log.description}")
    identity, issuer = check_identity(cert, requirements)
    checks.append(f"identity {identity} issuer {issuer}")
    return identity, issuer, checks


def _signing_key(cert: x509.Certificate | None, public_key: PublicKey | None) -> PublicKey:
    if cert is not None:
        key = cert.public_key()
        return key  # type: ignore[return-value]
    assert public_key is not None
    return public_key


def _in_toto_subject_digests(payload: bytes) -> set[bytes]:
    try:
        statement = json.loads(payload)
        subjects = statement["subject"]
        return {bytes.fromhex(s["digest"]["sha256"]) for s in subjects
                if isinstance(s, dict) and isinstance(s.get("digest"), dict)
                and isinstance(s["digest"].get("sha256"), str)}
    except (ValueError, KeyError, TypeError):
        fail("DSSE payload is not an in-toto statement with subjects", "malformed")


def verify_bundle(bundle: bytes | str, *, trusted_root: TrustedRoot,
                  keyless: KeylessRequirements | None = None, public_key: Any = None,
                  artifact: bytes | None = None, artifact_digest: bytes | None = None,
                  tlog: str = "required", authority: str = "sigstore",
                  at: dt.datetime | None = None) -> VerifiedPayload:
    """Verify a sigstore bundle (v0.1-v0.3) offline and return what was signed.

    Give ``keyless`` (Fulcio certificate bundles) or ``public_key`` (a ``cryptography``
    public key, for keyed "managed key" bundles), not both. With ``artifact`` (bytes) or
    ``artifact_digest`` (its sha256), a message signature must cover that artifact and a
    DSSE in-toto statement must name it as a subject. ``tlog`` applies to keyed bundles
    (keyless bundles use ``keyless.tlog``). ``at`` is "now" for the future-time checks.

    Returns :class:`~sigil.verify.authority.VerifiedPayload`: ``MESSAGE_DIGEST`` with the
    digest, or the DSSE ``payloadType`` with the exact payload. Raises
    :class:`~sigil.errors.VerificationError` (reasons ``malformed``, ``signature``,
    ``digest_mismatch``, ``tlog``, ``timestamp``, ``chain``, ``expired``, ``sct``,
    ``identity``, ``no_key``, ``unsupported``) on any failure.
    """
    if (keyless is None) == (public_key is None):
        raise ConfigError("verify_bundle needs exactly one of keyless and public_key")
    if artifact is not None and artifact_digest is not None:
        raise ConfigError("give artifact or artifact_digest, not both")
    if artifact_digest is not None and len(artifact_digest) != 32:
        fail("artifact_digest must be a 32-byte sha256", "malformed")
    b = Bundle.from_json(bundle)

    cert = b.certificate
    if keyless is not None and cert is None:
        fail("bundle has no signing certificate (keyed bundle, but no key was given)",
             "no_key")
    if public_key is not None and cert is not None:
        fail("bundle is certificate-signed; a public key cannot verify it", "no_key")
    key = _signing_key(cert, public_key)
    checks: list[str] = []

    # Step 2: the signature.
    payload: bytes | None
    if b.dsse is not None:
        env = b.dsse
        verify_signature(key, env.signatures[0].sig, env.pae(), what="DSSE signature")
        checks.append(f"signature over DSSE PAE (payloadType {env.payload_type})")
        want = artifact_digest if artifact is None else hashlib.sha256(artifact).digest()
        if want is not None:
            if env.payload_type != IN_TOTO or want not in _in_toto_subject_digests(env.payload):
                fail("artifact is not a subject of the signed statement", "digest_mismatch")
            checks.append(f"artifact sha256:{want.hex()} is a statement subject")
        expected = ExpectedEntry.dsse(env, certificate=cert, public_key=public_key)
        payload_type, payload, message_digest = env.payload_type, env.payload, None
    else:
        alg_name = b.message_digest_algorithm or "SHA2_256"
        if alg_name not in ("SHA2_256", "SHA2_384", "SHA2_512"):
            fail(f"unsupported message digest algorithm {alg_name}", "unsupported")
        alg: hashes.HashAlgorithm = HASHES[alg_name]()
        if artifact is not None:
            digest = hashlib.new(alg.name, artifact).digest()
        elif artifact_digest is not None:
            if alg_name != "SHA2_256":
                fail(f"bundle digest is {alg_name}; a sha256 artifact digest cannot match it",
                     "digest_mismatch")
            digest = artifact_digest
        elif b.message_digest is not None:
            digest = b.message_digest
        else:
            fail("message signature without a digest and no artifact given", "malformed")
        if b.message_digest is not None and b.message_digest != digest:
            fail("bundle message digest does not match the artifact", "digest_mismatch")
        assert b.message_signature is not None
        if _is_ed25519(key):
            if artifact is None:
                fail("an Ed25519 message signature needs the artifact bytes", "unsupported")
            verify_signature(key, b.message_signature, artifact, what="message signature")
        else:
            verify_signature(key, b.message_signature, digest, hash_alg=alg, prehashed=True,
                             what="message signature")
        checks.append(f"signature over message digest {alg.name}:{digest.hex()}")
        expected = ExpectedEntry.hashedrekord(b.message_signature, digest, certificate=cert,
                                              public_key=public_key, digest_algorithm=alg_name)
        payload_type, payload, message_digest = MESSAGE_DIGEST, None, digest

    # Steps 3-5: log entries and timestamps give the verified times.
    tlog_mode = keyless.tlog if keyless is not None else tlog
    if tlog_mode not in ("required", "optional", "skip"):
        raise ConfigError("tlog must be required, optional or skip")
    times = _Times()
    if tlog_mode != "skip":
        for entry in b.tlog_entries:
            res = verify_tlog_entry(entry, trusted_root, bundle_version=b.version,
                                    expected=expected, at=at)
            times.tlog_entries += 1
            times.checks.extend(res.checks)
            if res.integrated_time is not None:
                times.times.append(res.integrated_time)
            else:
                times.unbound_logs.append(res.log)
    _verify_timestamps(b.rfc3161_timestamps, b.signature, trusted_root, times, at)
    times.finish(min_timestamps=keyless.min_timestamps if keyless else 0, tlog_mode=tlog_mode)
    checks.extend(times.checks)

    identity = issuer = None
    if keyless is not None:
        assert cert is not None
        identity, issuer, cert_checks = _verify_keyless_cert(cert, trusted_root, keyless,
                                                             times.times)
        checks.extend(cert_checks)
    return VerifiedPayload(
        payload_type=payload_type, payload=payload, message_digest=message_digest,
        signer=SignerInfo(authority=authority, kind="keyless" if keyless else "key",
                          identity=identity, issuer=issuer, checks=tuple(checks)))


def _is_ed25519(key: PublicKey) -> bool:
    return isinstance(key, ed25519.Ed25519PublicKey)


def verify_cosign_keyless_layer(*, blob: bytes, media_type: str, annotations: Mapping[str, str],
                                trusted_root: TrustedRoot, keyless: KeylessRequirements,
                                authority: str = "sigstore", at: dt.datetime | None = None
                                ) -> VerifiedPayload:
    """Verify a legacy cosign ``.sig`` or ``.att`` layer signed keyless (Fulcio).

    ``.sig`` (``application/vnd.dev.cosign.simplesigning.v1+json``): ``blob`` is the
    simple-signing payload, the signature is the base64 annotation
    ``dev.cosignproject.cosign/signature``. ``.att`` (``application/vnd.dsse.envelope.v1+json``):
    ``blob`` is the DSSE envelope. The certificate comes from
    ``dev.sigstore.cosign/certificate``; ``dev.sigstore.cosign/chain`` is an untrusted hint
    and is ignored (chains are built from the trusted root only). Time comes from the Rekor
    SET in ``dev.sigstore.cosign/bundle`` and/or ``dev.sigstore.cosign/rfc3161timestamp``
    (cosign timestamps the raw signature for ``.sig`` and the envelope for ``.att``).
    """
    pem = annotations.get(ANN_CERTIFICATE)
    if not pem:
        fail("layer has no signing certificate annotation", "no_key")
    certs = load_pem_certificates(pem.encode())
    if len(certs) != 1:
        fail("certificate annotation must hold exactly one certificate", "malformed")
    cert = certs[0]
    key = _signing_key(cert, None)
    checks: list[str] = []

    envelope: DSSEEnvelope | None = None
    if media_type == SIMPLE_SIGNING:
        sig = b64decode(annotations.get(ANN_SIGNATURE), ANN_SIGNATURE)
        if not sig:
            fail("layer has an empty signature", "signature")
        verify_signature(key, sig, blob, what="simple-signing signature")
        blob_digest = hashlib.sha256(blob).digest()
        checks.append(f"signature over simple-signing payload sha256:{blob_digest.hex()}")
        expected = ExpectedEntry.hashedrekord(sig, blob_digest, certificate=cert)
        ts_signed = sig
        result_type, result_payload = SIMPLE_SIGNING, blob
    elif media_type == DSSE_MEDIA_TYPE:
        try:
            doc = json.loads(blob)
        except (ValueError, UnicodeDecodeError):
            fail("attestation layer is not a JSON DSSE envelope", "malformed")
        envelope = parse_dsse_envelope(doc)
        verify_signature(key, envelope.signatures[0].sig, envelope.pae(),
                         what="DSSE signature")
        checks.append(f"signature over DSSE PAE (payloadType {envelope.payload_type})")
        expected = ExpectedEntry.dsse(envelope, certificate=cert, envelope_bytes=blob)
        ts_signed = blob
        result_type, result_payload = envelope.payload_type, envelope.payload
    else:
        fail(f"unsupported cosign layer media type {media_type!r}", "unsupported")

    times = _Times()
    rekor_bundle = annotations.get(ANN_BUNDLE)
    if keyless.tlog != "skip" and rekor_bundle:
        res = verify_rekor_bundle_annotation(rekor_bundle, trusted_root=trusted_root,
                                             expected=expected, at=at)
        times.tlog_entries += 1
        times.times.append(dt.datetime.fromtimestamp(res.integrated_time, dt.UTC))
        times.checks.extend(res.checks)
    ts_ann = annotations.get(ANN_RFC3161)
    if ts_ann:
        try:
            ts_doc = json.loads(ts_ann)
        except ValueError:
            fail("rfc3161timestamp annotation is not JSON", "malformed")
        token = b64decode(ts_doc.get("SignedRFC3161Timestamp") if isinstance(ts_doc, dict)
                          else None, "SignedRFC3161Timestamp")
        _verify_timestamps((token,), ts_signed, trusted_root, times, at)
    times.finish(min_timestamps=keyless.min_timestamps, tlog_mode=keyless.tlog)
    checks.extend(times.checks)
    identity, issuer, cert_checks = _verify_keyless_cert(cert, trusted_root, keyless,
                                                         times.times)
    checks.extend(cert_checks)
    return VerifiedPayload(
        payload_type=result_type, payload=result_payload, message_digest=None,
        signer=SignerInfo(authority=authority, kind="keyless", identity=identity,
                          issuer=issuer, checks=tuple(checks)))


class KeylessAuthority:
    """A policy authority that accepts Fulcio-certified signatures from given identities.

    Implements :class:`sigil.verify.authority.Authority`.
    """

    def __init__(self, name: str, requirements: KeylessRequirements,
                 trusted_root: TrustedRoot) -> None:
        if not isinstance(requirements, KeylessRequirements):
            raise ConfigError("keyless authority needs KeylessRequirements", key=name)
        self.name = name
        self.requirements = requirements
        self.trusted_root = trusted_root
        self._fingerprint = hashlib.sha256(json.dumps(
            {"kind": "keyless", "trusted_root": trusted_root.fingerprint,
             "requirements": requirements.fingerprint}, sort_keys=True).encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        """Hash of the trusted root bytes and the identity requirements."""
        return self._fingerprint

    def verify_cosign_layer(self, *, blob: bytes, media_type: str,
                            annotations: Mapping[str, str]) -> VerifiedPayload:
        """Verify one legacy cosign ``.sig``/``.att`` layer (see
        :func:`verify_cosign_keyless_layer`)."""
        return verify_cosign_keyless_layer(blob=blob, media_type=media_type,
                                           annotations=annotations,
                                           trusted_root=self.trusted_root,
                                           keyless=self.requirements, authority=self.name)

    def verify_bundle(self, bundle: bytes) -> VerifiedPayload:
        """Verify a sigstore bundle (see :func:`verify_bundle`)."""
        return verify_bundle(bundle, trusted_root=self.trusted_root, keyless=self.requirements,
                             authority=self.name)

    def __repr__(self) -> str:
        return f"KeylessAuthority({self.name!r}, {self.trusted_root!r})"


__all__ = ["ANN_BUNDLE", "ANN_CERTIFICATE", "ANN_CHAIN", "ANN_RFC3161", "ANN_SIGNATURE",
           "DSSE_MEDIA_TYPE", "KeylessAuthority", "verify_bundle",
           "verify_cosign_keyless_layer"]
