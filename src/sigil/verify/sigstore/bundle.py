"""Sigstore bundle parsing (protobuf-specs ``dev.sigstore.bundle.v1.Bundle``, v0.1 to v0.3).

Parsing is strict and separate from verification: it checks shapes, decodes base64 and
integers, and rejects what the spec forbids (unknown versions, negative indices, empty
certificate chains, a root CA shipped in the chain, v0.3 bundles with a chain). It verifies
nothing; every field here is untrusted until :mod:`sigil.verify.sigstore.verifier` checks it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from sigil.verify.dsse import DsseSignature, Envelope

from ._common import as_int, b64decode, fail, load_der_certificate

# Media type -> bundle version. Both spellings of v0.3 exist in the wild.
BUNDLE_MEDIA_TYPES = {
    "application/vnd.dev.sigstore.bundle+json;version=0.1": "0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2": "0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "0.3",
    "application/vnd.dev.sigstore.bundle.v0.3+json": "0.3",
}

MAX_BUNDLE_BYTES = 8 << 20
MAX_TLOG_ENTRIES = 8
MAX_TIMESTAMPS = 8
MAX_PROOF_HASHES = 64


@dataclass(frozen=True)
class InclusionProof:
    """A Merkle audit path for one entry, with the checkpoint that signs its root."""

    log_index: int            # tree-local index (differs from the entry's global logIndex)
    root_hash: bytes
    tree_size: int
    hashes: tuple[bytes, ...]
    checkpoint: str | None


@dataclass(frozen=True)
class TlogEntry:
    """One ``TransparencyLogEntry``."""

    log_index: int
    log_id: bytes
    kind: str
    version: str
    integrated_time: int | None
    signed_entry_timestamp: bytes | None   # inclusionPromise (Rekor v1 SET)
    inclusion_proof: InclusionProof | None
    canonicalized_body: bytes


# One DSSE envelope type and one PAE for all of sigil (sigil.verify.dsse): a bundle's
# envelope is parsed with sigstore's stricter rules below but is the same object.
DSSEEnvelope = Envelope


@dataclass(frozen=True)
class Bundle:
    """A parsed (unverified) sigstore bundle."""

    media_type: str
    version: str                                  # "0.1" | "0.2" | "0.3"
    certificate: x509.Certificate | None          # the signing (leaf) certificate
    public_key_hint: str | None                   # verificationMaterial.publicKey.hint
    tlog_entries: tuple[TlogEntry, ...]
    rfc3161_timestamps: tuple[bytes, ...]
    message_digest_algorithm: str | None
    message_digest: bytes | None
    message_signature: bytes | None
    dsse: DSSEEnvelope | None

    @property
    def signature(self) -> bytes:
        """The signature bytes the log entry and the timestamps cover."""
        if self.dsse is not None:
            return self.dsse.signatures[0].sig
        assert self.message_signature is not None
        return self.message_signature

    @classmethod
    def from_json(cls, raw: bytes | str) -> Bundle:
        """Parse bundle JSON; raises ``VerificationError(reason="malformed")``."""
        if len(raw) > MAX_BUNDLE_BYTES:
            fail("bundle too large", "malformed")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"bundle is not valid JSON: {exc}", "malformed")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> Bundle:
        """Parse an already decoded bundle JSON object."""
        if not isinstance(doc, dict):
            fail("bundle is not a JSON object", "malformed")
        media_type = doc.get("mediaType")
        version = BUNDLE_MEDIA_TYPES.get(media_type) if isinstance(media_type, str) else None
        if version is None or not isinstance(media_type, str):
            fail(f"unsupported bundle media type {media_type!r}", "malformed")
        vm = _obj(doc, "verificationMaterial")

        certificate, key_hint = _signing_material(vm, version)

        entries_doc = vm.get("tlogEntries", [])
        if not isinstance(entries_doc, list) or len(entries_doc) > MAX_TLOG_ENTRIES:
            fail("tlogEntries must be a short list", "malformed")
        entries = tuple(_tlog_entry(e, i) for i, e in enumerate(entries_doc))

        timestamps: tuple[bytes, ...] = ()
        tvd = vm.get("timestampVerificationData")
        if tvd is not None:
            if not isinstance(tvd, dict):
                fail("timestampVerificationData is not an object", "malformed")
            ts_list = tvd.get("rfc3161Timestamps", [])
            if not isinstance(ts_list, list) or len(ts_list) > MAX_TIMESTAMPS:
                fail("rfc3161Timestamps must be a short list", "malformed")
            timestamps = tuple(
                b64decode(t.get("signedTimestamp") if isinstance(t, dict) else None,
                          f"rfc3161Timestamps[{i}].signedTimestamp")
                for i, t in enumerate(ts_list))
            if len(set(timestamps)) != len(timestamps):
                fail("duplicate RFC 3161 timestamps", "malformed")

        has_msg, has_dsse = "messageSignature" in doc, "dsseEnvelope" in doc
        if has_msg == has_dsse:
            fail("bundle needs exactly one of messageSignature and dsseEnvelope", "malformed")
        alg = digest = msg_sig = None
        dsse = None
        if has_msg:
            ms = _obj(doc, "messageSignature")
            msg_sig = b64decode(ms.get("signature"), "messageSignature.signature")
            if not msg_sig:
                fail("messageSignature.signature is empty", "malformed")
            md = ms.get("messageDigest")
            if md is not None:
                if not isinstance(md, dict) or not isinstance(md.get("algorithm"), str):
                    fail("messageSignature.messageDigest is malformed", "malformed")
                alg = md["algorithm"]
                digest = b64decode(md.get("digest"), "messageSignature.messageDigest.digest")
        else:
            dsse = parse_dsse_envelope(_obj(doc, "dsseEnvelope"))
        return cls(media_type=media_type, version=version, certificate=certificate,
                   public_key_hint=key_hint, tlog_entries=entries,
                   rfc3161_timestamps=timestamps, message_digest_algorithm=alg,
                   message_digest=digest, message_signature=msg_sig, dsse=dsse)


def parse_dsse_envelope(env: Any) -> Envelope:
    """Parse a DSSE envelope object (exactly one signature, as sigstore requires)."""
    if not isinstance(env, dict):
        fail("DSSE envelope is not an object", "malformed")
    payload_type = env.get("payloadType")
    if not isinstance(payload_type, str) or not payload_type:
        fail("DSSE envelope has no payloadType", "malformed")
    payload = b64decode(env.get("payload"), "dsseEnvelope.payload")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1:
        fail("DSSE envelope must carry exactly one signature", "malformed")
    out = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict):
            fail("DSSE signature is not an object", "malformed")
        sig = b64decode(s.get("sig"), f"dsseEnvelope.signatures[{i}].sig")
        if not sig:
            fail("DSSE signature is empty", "malformed")
        keyid = s.get("keyid")
        out.append(DsseSignature(sig=sig, keyid=keyid if isinstance(keyid, str) else None))
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(out))


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        fail(f"{key} missing or not an object", "malformed")
    return value


def _signing_material(vm: dict[str, Any], version: str) -> tuple[x509.Certificate | None,
                                                                  str | None]:
    present = [k for k in ("certificate", "x509CertificateChain", "publicKey") if k in vm]
    if len(present) != 1:
        fail("verificationMaterial needs exactly one of certificate, x509CertificateChain, "
             "publicKey", "malformed")
    kind = present[0]
    if kind == "publicKey":
        pk = vm["publicKey"]
        hint = pk.get("hint") if isinstance(pk, dict) else None
        return None, hint if isinstance(hint, str) else None
    if kind == "certificate":
        if version != "0.3":
            fail("a single certificate is only defined for v0.3 bundles", "malformed")
        cert_doc = vm["certificate"]
        raw = cert_doc.get("rawBytes") if isinstance(cert_doc, dict) else None
        return load_der_certificate(b64decode(raw, "certificate.rawBytes")), None
    # x509CertificateChain (v0.1/v0.2): the first certificate is the signing certificate.
    if version == "0.3":
        fail("v0.3 bundles must carry a single certificate, not a chain", "malformed")
    chain_doc = vm["x509CertificateChain"]
    certs_doc = chain_doc.get("certificates") if isinstance(chain_doc, dict) else None
    if not isinstance(certs_doc, list) or not certs_doc:
        fail("x509CertificateChain is empty", "malformed")
    certs = [load_der_certificate(b64decode(c.get("rawBytes") if isinstance(c, dict) else None,
                                            f"x509CertificateChain[{i}]"))
             for i, c in enumerate(certs_doc)]
    for cert in certs:
        # protobuf-specs client policy: the chain MUST NOT contain a root CA. Intermediates
        # here are only hints and are never used (chains are built from the trusted root).
        if cert.issuer == cert.subject:
            fail("certificate chain contains a self-signed (root) certificate", "chain")
    return certs[0], None


def _tlog_entry(doc: Any, i: int) -> TlogEntry:
    what = f"tlogEntries[{i}]"
    if not isinstance(doc, dict):
        fail(f"{what} is not an object", "malformed")
    kv = doc.get("kindVersion")
    if not isinstance(kv, dict) or not isinstance(kv.get("kind"), str) or not isinstance(
            kv.get("version"), str):
        fail(f"{what}.kindVersion missing", "malformed")
    log_id_doc = doc.get("logId")
    log_id = b64decode(log_id_doc.get("keyId") if isinstance(log_id_doc, dict) else None,
                       f"{what}.logId.keyId")
    integrated = doc.get("integratedTime")
    integrated_time = (as_int(integrated, f"{what}.integratedTime")
                       if integrated not in (None, "0", 0) else None)
    set_bytes = None
    promise = doc.get("inclusionPromise")
    if promise is not None:
        if not isinstance(promise, dict):
            fail(f"{what}.inclusionPromise is not an object", "malformed")
        set_bytes = b64decode(promise.get("signedEntryTimestamp"),
                              f"{what}.inclusionPromise.signedEntryTimestamp")
    proof = None
    proof_doc = doc.get("inclusionProof")
    if proof_doc is not None:
        proof = _inclusion_proof(proof_doc, what)
    body = b64decode(doc.get("canonicalizedBody"), f"{what}.canonicalizedBody")
    if not body:
        fail(f"{what}.canonicalizedBody is empty", "malformed")
    return TlogEntry(log_index=as_int(doc.get("logIndex", "0"), f"{what}.logIndex"),
                     log_id=log_id, kind=kv["kind"], version=kv["version"],
                     integrated_time=integrated_time, signed_entry_timestamp=set_bytes,
                     inclusion_proof=proof, canonicalized_body=body)


def _inclusion_proof(doc: Any, what: str) -> InclusionProof:
    if not isinstance(doc, dict):
        fail(f"{what}.inclusionProof is not an object", "malformed")
    hashes_doc = doc.get("hashes", [])
    if not isinstance(hashes_doc, list) or len(hashes_doc) > MAX_PROOF_HASHES:
        fail(f"{what}.inclusionProof.hashes malformed", "malformed")
    checkpoint = None
    cp = doc.get("checkpoint")
    if cp is not None:
        env = cp.get("envelope") if isinstance(cp, dict) else None
        if not isinstance(env, str):
            fail(f"{what}.inclusionProof.checkpoint.envelope missing", "malformed")
        checkpoint = env
    return InclusionProof(
        log_index=as_int(doc.get("logIndex", "0"), f"{what}.inclusionProof.logIndex"),
        root_hash=b64decode(doc.get("rootHash"), f"{what}.inclusionProof.rootHash"),
        tree_size=as_int(doc.get("treeSize"), f"{what}.inclusionProof.treeSize", minimum=1),
        hashes=tuple(b64decode(h, f"{what}.inclusionProof.hashes") for h in hashes_doc),
        checkpoint=checkpoint)
