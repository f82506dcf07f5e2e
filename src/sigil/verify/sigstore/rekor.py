"""Rekor transparency log checks: SETs, inclusion proofs, checkpoints and entry bodies.

* Signed Entry Timestamp (Rekor v1 "inclusion promise"): the log's signature over the RFC 8785
  canonical JSON ``{"body","integratedTime","logID","logIndex"}``.
* Inclusion proof: RFC 6962 audit path from ``SHA-256(0x00 || canonicalizedBody)`` to the
  root hash at the proof's tree-local index, plus a signed checkpoint committing to that root.
* Entry body: the logged entry must record *this* signature, *this* key or certificate and
  *this* digest (CVE-2022-36056 class of bugs), for the kinds hashedrekord 0.0.1/0.0.2,
  dsse 0.0.1/0.0.2 and intoto 0.0.1/0.0.2.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._common import (
    CLOCK_SKEW,
    PublicKey,
    as_int,
    b64decode,
    b64encode,
    fail,
    fmt_time,
    from_unix,
    load_pem_certificates,
    load_pem_public_key,
    now,
    spki_der,
    verify_signature,
)
from .bundle import DSSEEnvelope, TlogEntry
from .checkpoint import Checkpoint
from .merkle import leaf_hash, verify_inclusion
from .trust import TransparencyLog, TrustedRoot

_DIGEST_NAMES = {"sha256": "sha256", "SHA2_256": "sha256", "sha384": "sha384",
                 "SHA2_384": "sha384", "sha512": "sha512", "SHA2_512": "sha512"}


@dataclass(frozen=True)
class ExpectedEntry:
    """What a log entry body must record for the signature being verified.

    Build with :meth:`hashedrekord` (message signatures, cosign ``.sig`` layers) or
    :meth:`dsse` (DSSE envelopes, cosign ``.att`` layers). Give either the signing
    ``certificate`` or the ``public_key`` (keyed signatures).
    """

    signature: bytes
    certificate: x509.Certificate | None = None
    public_key: PublicKey | None = field(default=None, repr=False)
    digest: bytes | None = None               # hashedrekord: digest of the signed artifact
    digest_algorithm: str = "sha256"
    envelope: DSSEEnvelope | None = None      # dsse / intoto kinds
    envelope_bytes: bytes | None = None       # exact envelope JSON (legacy .att layer blob)

    @classmethod
    def hashedrekord(cls, signature: bytes, digest: bytes, *,
                     certificate: x509.Certificate | None = None,
                     public_key: PublicKey | None = None,
                     digest_algorithm: str = "sha256") -> ExpectedEntry:
        """A signature over an artifact whose ``digest`` the entry must record."""
        return cls(signature=signature, certificate=certificate, public_key=public_key,
                   digest=digest, digest_algorithm=_DIGEST_NAMES.get(digest_algorithm, "?"))

    @classmethod
    def dsse(cls, envelope: DSSEEnvelope, *, certificate: x509.Certificate | None = None,
             public_key: PublicKey | None = None,
             envelope_bytes: bytes | None = None) -> ExpectedEntry:
        """A DSSE envelope (its single signature) the entry must record."""
        return cls(signature=envelope.signatures[0].sig, certificate=certificate,
                   public_key=public_key, envelope=envelope, envelope_bytes=envelope_bytes)

    def __post_init__(self) -> None:
        if (self.certificate is None) == (self.public_key is None):
            raise ValueError("ExpectedEntry needs exactly one of certificate and public_key")


@dataclass(frozen=True)
class TlogResult:
    """The outcome of verifying one log entry."""

    log: TransparencyLog
    integrated_time: dt.datetime | None       # set only when a SET vouches for it
    checks: tuple[str, ...]


# -- Signed Entry Timestamp ---------------------------------------------------------------

def set_payload(body_b64: str, integrated_time: int, log_id: bytes, log_index: int) -> bytes:
    """The bytes a Rekor v1 SET signs: RFC 8785 canonical JSON of the four fields."""
    # Keys sorted, no whitespace; the values are base64, hex and integers, which RFC 8785
    # and json.dumps serialize identically.
    return json.dumps({"body": body_b64, "integratedTime": integrated_time,
                       "logID": log_id.hex(), "logIndex": log_index},
                      sort_keys=True, separators=(",", ":")).encode()


def _check_integrated_time(log: TransparencyLog, integrated: int,
                           at: dt.datetime | None) -> dt.datetime:
    t = from_unix(integrated)
    if t > (at or now()) + CLOCK_SKEW:
        fail(f"log integrated time {fmt_time(t)} is in the future", "tlog")
    if not log.valid_for.contains(t):
        fail(f"log {log.description} key not valid at {fmt_time(t)} ({log.valid_for})",
             "tlog")
    return t


def verify_set(log: TransparencyLog, signature: bytes, *, body_b64: str, integrated_time: int,
               log_index: int, at: dt.datetime | None = None) -> dt.datetime:
    """Verify a SET with ``log``'s key; return the integrated time it vouches for."""
    payload = set_payload(body_b64, integrated_time, log.log_id, log_index)
    verify_signature(log.public_key, signature, payload, hash_alg=log.hash_alg,
                     what="Rekor SET", reason="tlog")
    return _check_integrated_time(log, integrated_time, at)


# -- entry verification (bundles) ---------------------------------------------------------

def verify_tlog_entry(entry: TlogEntry, trusted_root: TrustedRoot, *, bundle_version: str,
                      expected: ExpectedEntry, at: dt.datetime | None = None) -> TlogResult:
    """Verify one bundle log entry: log known, body matches, SET and/or proof+checkpoint.

    protobuf-specs: v0.1 bundles MUST carry an inclusion promise (SET); v0.2+ bundles MUST
    carry an inclusion proof with a checkpoint. Whatever is present is verified.
    """
    log = trusted_root.tlog(entry.log_id)
    if log is None:
        fail(f"log entry from unknown log {entry.log_id.hex()}", "tlog")
    checks: list[str] = []
    check_body(entry.canonicalized_body, expected, kind=entry.kind, version=entry.version)
    checks.append(f"tlog body {entry.kind}/{entry.version} matches signature, key and digest")

    integrated: dt.datetime | None = None
    if entry.signed_entry_timestamp is not None:
        if entry.integrated_time is None:
            fail("inclusion promise without an integrated time", "tlog")
        integrated = verify_set(log, entry.signed_entry_timestamp,
                                body_b64=b64encode(entry.canonicalized_body),
                                integrated_time=entry.integrated_time,
                                log_index=entry.log_index, at=at)
        checks.append(f"rekor SET log {log.description} index {entry.log_index} "
                      f"integrated {fmt_time(integrated)}")
    elif bundle_version == "0.1":
        fail("v0.1 bundle log entry has no inclusion promise", "tlog")

    proof = entry.inclusion_proof
    if proof is None and bundle_version != "0.1":
        fail(f"v{bundle_version} bundle log entry has no inclusion proof", "tlog")
    if proof is not None:
        verify_inclusion(proof.log_index, proof.tree_size, leaf_hash(entry.canonicalized_body),
                         proof.hashes, proof.root_hash)
        if proof.checkpoint is None and bundle_version != "0.1":
            fail(f"v{bundle_version} bundle inclusion proof has no checkpoint", "tlog")
        if proof.checkpoint is not None:
            cp = Checkpoint.parse(proof.checkpoint)
            if cp.root_hash != proof.root_hash or cp.tree_size != proof.tree_size:
                fail("checkpoint does not commit to the inclusion proof's root", "tlog")
            cp.verify(log)
            checks.append(f"inclusion proof at index {proof.log_index} "
                          f"(tree size {proof.tree_size})")
            checks.append(f"checkpoint signed by {cp.origin}")
        # v0.1 proof without a checkpoint: its root is unauthenticated, so it proves nothing
        # and is not reported; the SET above is what v0.1 relies on.
    return TlogResult(log=log, integrated_time=integrated, checks=tuple(checks))


# -- legacy cosign bundle annotation ------------------------------------------------------

@dataclass(frozen=True)
class RekorSETResult:
    """A verified cosign ``dev.sigstore.cosign/bundle`` annotation."""

    integrated_time: int
    log_index: int
    log: TransparencyLog
    checks: tuple[str, ...]


def verify_rekor_bundle_annotation(bundle_annotation: str | bytes, *,
                                   trusted_root: TrustedRoot, expected: ExpectedEntry,
                                   at: dt.datetime | None = None) -> RekorSETResult:
    """Verify a cosign Rekor bundle (``{"SignedEntryTimestamp", "Payload": {...}}``)."""
    try:
        doc = json.loads(bundle_annotation)
    except (ValueError, UnicodeDecodeError):
        fail("cosign bundle annotation is not JSON", "malformed")
    if not isinstance(doc, dict) or not isinstance(doc.get("Payload"), dict):
        fail("cosign bundle annotation has no Payload", "malformed")
    payload = doc["Payload"]
    sig = b64decode(doc.get("SignedEntryTimestamp"), "SignedEntryTimestamp")
    body_b64 = payload.get("body")
    if not isinstance(body_b64, str):
        fail("cosign bundle Payload.body is not a string", "malformed")
    body = b64decode(body_b64, "Payload.body")
    integrated = as_int(payload.get("integratedTime"), "Payload.integratedTime", minimum=1)
    log_index = as_int(payload.get("logIndex"), "Payload.logIndex")
    log_id_hex = payload.get("logID")
    try:
        log_id = bytes.fromhex(log_id_hex) if isinstance(log_id_hex, str) else b""
    except ValueError:
        log_id = b""
    log = trusted_root.tlog(log_id)
    if log is None:
        fail(f"SET from unknown log {log_id_hex!r}", "tlog")
    t = verify_set(log, sig, body_b64=body_b64, integrated_time=integrated,
                   log_index=log_index, at=at)
    kind, version = check_body(body, expected)
    return RekorSETResult(integrated_time=integrated, log_index=log_index, log=log, checks=(
        f"rekor SET log {log.description} index {log_index} integrated {fmt_time(t)}",
        f"tlog body {kind}/{version} matches signature, key and digest"))


def verify_rekor_set(bundle_annotation: str | bytes, *, trusted_root: TrustedRoot,
                     expected: ExpectedEntry, at: dt.datetime | None = None) -> int:
    """Verify a cosign Rekor SET annotation and its body; return the integrated time.

    ``expected`` says what the entry must record: build it with
    :meth:`ExpectedEntry.hashedrekord` (``.sig`` layers: signature, sha256 of the payload,
    certificate or ``public_key``) or :meth:`ExpectedEntry.dsse` (``.att`` layers).
    Raises ``VerificationError`` (reasons ``tlog``, ``malformed``) on any mismatch.
    """
    return verify_rekor_bundle_annotation(bundle_annotation, trusted_root=trusted_root,
                                          expected=expected, at=at).integrated_time


# -- body matching ------------------------------------------------------------------------

def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _alg(value: Any) -> str | None:
    return _DIGEST_NAMES.get(value) if isinstance(value, str) else None


def _require(cond: bool, what: str) -> None:
    if not cond:
        fail(f"log entry body does not match: {what}", "tlog")


def _match_pem_verifier(pem_b64: Any, expected: ExpectedEntry, what: str) -> None:
    """A body's base64 PEM verifier (certificate or public key) must be the expected one."""
    pem = b64decode(pem_b64, what)
    if expected.certificate is not None:
        if b"CERTIFICATE" not in pem:
            fail(f"log entry body does not match: {what} is not a certificate", "tlog")
        certs = load_pem_certificates(pem)
        _require(len(certs) == 1 and certs[0] == expected.certificate, f"{what} certificate")
    else:
        assert expected.public_key is not None
        if b"PUBLIC KEY" not in pem:
            fail(f"log entry body does not match: {what} is not a public key", "tlog")
        _require(spki_der(load_pem_public_key(pem)) == spki_der(expected.public_key),
                 f"{what} public key")


def _match_v2_verifier(verifier: Any, expected: ExpectedEntry, what: str) -> None:
    """A Rekor v2 ``Verifier`` (x509Certificate or publicKey rawBytes) must be ours."""
    if not isinstance(verifier, dict):
        fail(f"log entry body does not match: {what} missing", "tlog")
    cert_raw = _get(verifier, "x509Certificate", "rawBytes")
    key_raw = _get(verifier, "publicKey", "rawBytes")
    if expected.certificate is not None:
        _require(cert_raw is not None and b64decode(cert_raw, what) ==
                 expected.certificate.public_bytes(serialization.Encoding.DER),
                 f"{what} certificate")
    else:
        assert expected.public_key is not None
        _require(key_raw is not None and b64decode(key_raw, what) ==
                 spki_der(expected.public_key), f"{what} public key")


def _hashedrekord_digest(expected: ExpectedEntry) -> tuple[str, bytes]:
    if expected.envelope is not None:
        # rekor-v2 spec §6.1.4 "hashedrekord over DSSE": the entry records SHA-256(PAE).
        return "sha256", hashlib.sha256(expected.envelope.pae()).digest()
    if expected.digest is None:
        fail("log entry is a hashedrekord but no digest is known", "tlog")
    return expected.digest_algorithm, expected.digest


def check_body(body: bytes, expected: ExpectedEntry, *, kind: str | None = None,
               version: str | None = None) -> tuple[str, str]:
    """Check that a canonicalized entry body records exactly what was verified.

    ``kind``/``version`` (from the bundle's ``kindVersion``) must agree with the body.
    Returns the body's ``(kind, apiVersion)``; raises ``VerificationError(reason="tlog")``.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        fail("log entry body is not JSON", "tlog")
    body_kind, body_version = _get(doc, "kind"), _get(doc, "apiVersion")
    if not isinstance(body_kind, str) or not isinstance(body_version, str):
        fail("log entry body has no kind/apiVersion", "tlog")
    if (kind is not None and kind != body_kind) or (version is not None
                                                    and version != body_version):
        fail(f"bundle kindVersion {kind}/{version} does not match body "
             f"{body_kind}/{body_version}", "tlog")
    spec = _get(doc, "spec")
    key = (body_kind, body_version)
    if key == ("hashedrekord", "0.0.1"):
        alg, want = _hashedrekord_digest(expected)
        _require(_alg(_get(spec, "data", "hash", "algorithm")) == alg,
                 "digest algorithm")
        _require(_get(spec, "data", "hash", "value") == want.hex(), "artifact digest")
        _require(b64decode(_get(spec, "signature", "content"), "signature.content")
                 == expected.signature, "signature")
        _match_pem_verifier(_get(spec, "signature", "publicKey", "content"), expected,
                            "signature.publicKey")
    elif key == ("hashedrekord", "0.0.2"):
        v2 = _get(spec, "hashedRekordV002")
        alg, want = _hashedrekord_digest(expected)
        _require(_alg(_get(v2, "data", "algorithm")) == alg, "digest algorithm")
        _require(b64decode(_get(v2, "data", "digest"), "data.digest") == want,
                 "artifact digest")
        _require(b64decode(_get(v2, "signature", "content"), "signature.content")
                 == expected.signature, "signature")
        _match_v2_verifier(_get(v2, "signature", "verifier"), expected, "signature.verifier")
    elif key == ("dsse", "0.0.1"):
        env = _need_envelope(expected, key)
        _require(_get(spec, "payloadHash", "algorithm") == "sha256" and
                 _get(spec, "payloadHash", "value") == hashlib.sha256(env.payload).hexdigest(),
                 "payload hash")
        sigs = _get(spec, "signatures")
        _require(isinstance(sigs, list) and len(sigs) == len(env.signatures) == 1,
                 "signature count")
        _require(b64decode(_get(sigs[0], "signature"), "signatures[0].signature")
                 == env.signatures[0].sig, "signature")
        _match_pem_verifier(_get(sigs[0], "verifier"), expected, "signatures[0].verifier")
    elif key == ("dsse", "0.0.2"):
        env = _need_envelope(expected, key)
        v2 = _get(spec, "dsseV002")
        _require(_alg(_get(v2, "payloadHash", "algorithm")) == "sha256" and
                 b64decode(_get(v2, "payloadHash", "digest"), "payloadHash.digest")
                 == hashlib.sha256(env.payload).digest(), "payload hash")
        sigs = _get(v2, "signatures")
        _require(isinstance(sigs, list) and len(sigs) == len(env.signatures) == 1,
                 "signature count")
        _require(b64decode(_get(sigs[0], "content"), "signatures[0].content")
                 == env.signatures[0].sig, "signature")
        _match_v2_verifier(_get(sigs[0], "verifier"), expected, "signatures[0].verifier")
    elif key == ("intoto", "0.0.2"):
        env = _need_envelope(expected, key)
        content = _get(spec, "content")
        _require(_get(content, "payloadHash", "algorithm") == "sha256" and
                 _get(content, "payloadHash", "value") ==
                 hashlib.sha256(env.payload).hexdigest(), "payload hash")
        logged = _get(content, "envelope")
        _require(_get(logged, "payloadType") == env.payload_type, "payload type")
        # Rekor's canonical intoto 0.0.2 entry drops the payload (payloadHash above binds
        # it); when an entry carries it, it must match. Its base64 strings are base64-encoded
        # once more.
        if _get(logged, "payload") is not None:
            _require(_b64_field_is(_get(logged, "payload"), env.payload, "envelope.payload"),
                     "payload")
        sigs = _get(logged, "signatures")
        _require(isinstance(sigs, list) and len(sigs) == len(env.signatures) == 1,
                 "signature count")
        _require(_b64_field_is(_get(sigs[0], "sig"), env.signatures[0].sig,
                               "envelope.signatures[0].sig"), "signature")
        _match_pem_verifier(_get(sigs[0], "publicKey"), expected,
                            "envelope.signatures[0].publicKey")
    elif key == ("intoto", "0.0.1"):
        env = _need_envelope(expected, key)
        # 0.0.1 records only hashes: the envelope hash is what binds the signature, so the
        # exact envelope bytes must be known (cosign .att layers).
        if expected.envelope_bytes is None:
            fail("intoto 0.0.1 entry needs the exact envelope bytes", "tlog")
        _require(_get(spec, "content", "hash", "algorithm") == "sha256" and
                 _get(spec, "content", "hash", "value") ==
                 hashlib.sha256(expected.envelope_bytes).hexdigest(), "envelope hash")
        _require(_get(spec, "content", "payloadHash", "algorithm") in (None, "sha256") and
                 _get(spec, "content", "payloadHash", "value") in (
                     None, hashlib.sha256(env.payload).hexdigest()), "payload hash")
        _match_pem_verifier(_get(spec, "publicKey"), expected, "publicKey")
    else:
        fail(f"unsupported log entry kind {body_kind}/{body_version}", "tlog")
    return body_kind, body_version


def _need_envelope(expected: ExpectedEntry, key: tuple[str, str]) -> DSSEEnvelope:
    if expected.envelope is None:
        fail(f"log entry kind {key[0]}/{key[1]} records a DSSE envelope, "
             "but a message signature is being verified", "tlog")
    return expected.envelope


def _b64_field_is(value: Any, target: bytes, what: str) -> bool:
    """True if the field is base64(target) or base64(base64(target))."""
    once = b64decode(value, what)
    if once == target:
        return True
    try:
        return base64.b64decode(once, validate=True) == target
    except (binascii.Error, ValueError):
        return False
