"""A private sigstore made at test time: Fulcio-like CA, CT log, Rekor log, trusted root.

Every key is generated in memory when a :class:`TestSigstore` is built and never written
anywhere except as *public* material in ``trusted_root.json``. The artifacts follow the
public formats byte for byte, so the same code path verifies them as real ones:

* **Fulcio** (sigstore/fulcio ``docs/certificate-specification.md``): a self-signed root
  and an intermediate (P-384, the intermediate with the codeSigning EKU as Fulcio's has) issue
  short-lived P-256 leaves with an empty subject, a critical SAN (URI or email),
  ``digitalSignature`` key usage, the codeSigning EKU, the OIDC issuer in
  ``1.3.6.1.4.1.57264.1.1`` (raw string) and ``1.3.6.1.4.1.57264.1.8`` (DER UTF8String), and an
  embedded SCT.
* **CT** (RFC 6962 §3.1-3.3): the leaf is first issued as a *precertificate* carrying the
  critical poison extension (``1.3.6.1.4.1.11129.2.4.3``). The CT log signs
  ``version || certificate_timestamp || timestamp || precert_entry || SHA-256(issuer SPKI) ||
  TBS`` where TBS is the precertificate's TBSCertificate with the poison removed; the final
  certificate carries the SCT list extension (``1.3.6.1.4.1.11129.2.4.2``) in the poison's
  place, same serial, validity and key. So ``final.tbs_precertificate_bytes`` (the TBS with
  the SCT list removed) equals the bytes the log signed; :meth:`TestSigstore.issue` asserts it.
* **Rekor v1**: ECDSA P-256 log key, ``logID`` = SHA-256 of the DER SubjectPublicKeyInfo.
  The SET signs the RFC 8785 canonical JSON ``{"body","integratedTime","logID","logIndex"}``;
  the log is an RFC 6962 Merkle tree over the canonicalized entry bodies, inclusion proofs
  are audit paths, and the checkpoint is a C2SP signed note ``<origin>\\n<size>\\n<b64 root>\\n``
  signed ``— <host> base64(logID[:4] || ECDSA signature)``, origin ``<host> - <tree id>``.
* **TSA** (RFC 3161, CMS SignedData per RFC 5652): a self-signed P-384 root issues a P-256
  signing certificate with ``digitalSignature`` key usage and the timeStamping EKU, critical
  and alone (RFC 3161 §2.3). A token is a ``TimeStampResp`` (status granted) whose
  ``ContentInfo`` holds SignedData v3 over an ``id-ct-TSTInfo`` eContent (TSTInfo v1, policy,
  ``messageImprint`` SHA-256 of what is timestamped, serial, ``genTime``, accuracy, nonce) and
  one SignerInfo v1 (issuerAndSerialNumber) with the signed attributes content-type,
  message-digest and ESS signing-certificate-v2 (RFC 5035), DER-sorted, signed
  ECDSA-with-SHA256. The signing certificate is embedded, as sigstore's timestamp-authority
  does.
* **Trusted root**: protobuf-specs ``dev.sigstore.trustroot.v1.TrustedRoot`` JSON
  (``certificateAuthorities``, ``tlogs``, ``ctlogs``, ``timestampAuthorities``, ``validFor``).

Then :func:`cosign_bundle` builds what cosign v3 attaches as an OCI 1.1 referrer (a sigstore
bundle v0.3 with a DSSE envelope of an in-toto statement, predicate
``https://sigstore.dev/cosign/sign/v1``, naming the image digest), and
:func:`cosign_sig_annotations` what legacy keyless ``cosign sign`` puts on a ``.sig`` layer.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
OID_CT_POISON = "1.3.6.1.4.1.11129.2.4.3"

DEFAULT_ISSUER = "https://oidc.sigstore.test"
BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
# RFC 3161 / RFC 5652 / RFC 5035 object identifiers.
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_TST_INFO = "1.2.840.113549.1.9.16.1.4"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_CERT_V2 = "1.2.840.113549.1.9.16.2.47"
TSA_POLICY = "1.3.6.1.4.1.57264.2"


# -- encodings ----------------------------------------------------------------------------

def b64(data: bytes) -> str:
    """Standard base64 with padding (protobuf JSON ``bytes``)."""
    return base64.b64encode(data).decode("ascii")


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 canonical JSON for the ASCII-only documents used here (sorted keys, no
    whitespace, integers as integers)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rfc3339(t: dt.datetime) -> str:
    """A protobuf JSON ``Timestamp``."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    """DER SubjectPublicKeyInfo."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element."""
    return bytes([tag]) + _der_length(len(content)) + content


def der_utf8(text: str) -> bytes:
    """A DER UTF8String."""
    return der_tlv(0x0C, text.encode("utf-8"))


def der_seq(*items: bytes) -> bytes:
    """A DER SEQUENCE of already encoded elements."""
    return der_tlv(0x30, b"".join(items))


def der_set(*items: bytes) -> bytes:
    """A DER SET OF: elements sorted by their encodings (X.690 §11.6)."""
    return der_tlv(0x31, b"".join(sorted(items)))


def der_int(value: int) -> bytes:
    """A DER INTEGER (minimal two's complement)."""
    return der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def der_oid(dotted: str) -> bytes:
    """A DER OBJECT IDENTIFIER."""
    return der_tlv(0x06, _oid_content(x509.ObjectIdentifier(dotted)))


def der_octets(data: bytes) -> bytes:
    """A DER OCTET STRING."""
    return der_tlv(0x04, data)


def der_generalized_time(t: dt.datetime) -> bytes:
    """A DER GeneralizedTime in UTC, whole seconds (``YYYYMMDDHHMMSSZ``)."""
    return der_tlv(0x18, t.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ").encode())


def der_explicit(number: int, content: bytes) -> bytes:
    """A context-specific constructed tag ``[number]`` around ``content``."""
    return der_tlv(0xA0 | number, content)


def _der_elements(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split concatenated DER elements into ``(tag, content, whole encoding)``."""
    out = []
    pos = 0
    while pos < len(data):
        start, tag, length = pos, data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos:pos + n], "big")
            pos += n
        out.append((tag, data[pos:pos + length], data[start:pos + length]))
        pos += length
    if pos != len(data):
        raise ValueError("truncated DER")
    return out


def tbs_without_extension(tbs: bytes, oid: str) -> bytes:
    """The TBSCertificate DER with the extension ``oid`` removed (RFC 6962 §3.2: the log signs
    the precertificate's TBS without the poison extension)."""
    (tag, content, _), = _der_elements(tbs)
    assert tag == 0x30
    oid_der = x509.ObjectIdentifier(oid)
    want = der_tlv(0x06, _oid_content(oid_der))
    fields = []
    for ftag, fcontent, whole in _der_elements(content):
        if ftag == 0xA3:  # [3] EXPLICIT Extensions
            (stag, exts, _), = _der_elements(fcontent)
            assert stag == 0x30
            kept = [w for _, ext, w in _der_elements(exts) if not ext.startswith(want)]
            whole = der_tlv(0xA3, der_tlv(0x30, b"".join(kept)))
        fields.append(whole)
    return der_tlv(0x30, b"".join(fields))


def _oid_content(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


# -- Merkle tree (RFC 6962 §2.1) ------------------------------------------------------------

def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def audit_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) over leaf hashes, leaf-side first."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return audit_path(m, leaves[:k]) + [merkle_root(leaves[k:])]
    return audit_path(m - k, leaves[k:]) + [merkle_root(leaves[:k])]


# -- logs -----------------------------------------------------------------------------------

def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    alg: hashes.HashAlgorithm = (hashes.SHA384() if isinstance(key.curve, ec.SECP384R1)
                                 else hashes.SHA256())
    return key.sign(data, ec.ECDSA(alg))


class _LogKey:
    """An ECDSA P-256 log key with its sigstore log ID and trusted-root entry."""

    def __init__(self, base_url: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.base_url = base_url
        self.name = urlsplit(base_url).netloc
        self.log_id = hashlib.sha256(spki(self.key.public_key())).digest()

    def sign(self, data: bytes) -> bytes:
        return _sign(self.key, data)

    def trusted_root_entry(self, start: dt.datetime, end: dt.datetime | None = None
                           ) -> dict[str, Any]:
        valid: dict[str, str] = {"start": rfc3339(start)}
        if end is not None:
            valid["end"] = rfc3339(end)
        return {"baseUrl": self.base_url, "hashAlgorithm": "SHA2_256",
                "publicKey": {"rawBytes": b64(spki(self.key.public_key())),
                              "keyDetails": "PKIX_ECDSA_P256_SHA_256", "validFor": valid},
                "logId": {"keyId": b64(self.log_id)}}


class TestCTLog(_LogKey):
    """A certificate transparency log that issues precertificate SCTs (RFC 6962 §3.2)."""

    __test__ = False  # not a pytest test class

    def sct(self, precert_tbs: bytes, issuer_spki: bytes, timestamp_ms: int) -> bytes:
        """A serialized v1 SCT for a precertificate entry."""
        extensions = b""
        signed = (struct.pack(">BBQH", 0, 0, timestamp_ms, 1)      # v1, cert timestamp, precert
                  + hashlib.sha256(issuer_spki).digest()
                  + len(precert_tbs).to_bytes(3, "big") + precert_tbs
                  + struct.pack(">H", len(extensions)) + extensions)
        sig = self.sign(signed)
        return (bytes([0]) + self.log_id + struct.pack(">Q", timestamp_ms)
                + struct.pack(">H", len(extensions)) + extensions
                + bytes([4, 3])                                    # sha256, ecdsa
                + struct.pack(">H", len(sig)) + sig)


@dataclass(frozen=True)
class LogEntry:
    """One entry as a Rekor v1 log returns it, with its SET and inclusion proof."""

    log: TestRekor
    body: bytes
    log_index: int
    integrated_time: int
    signed_entry_timestamp: bytes
    tree_size: int
    root_hash: bytes
    hashes: tuple[bytes, ...]
    checkpoint: str

    def bundle_entry(self, kind: str, version: str = "0.0.1") -> dict[str, Any]:
        """The protobuf-specs ``TransparencyLogEntry`` JSON (v0.3 bundles: SET and proof)."""
        return {
            "logIndex": str(self.log_index),
            "logId": {"keyId": b64(self.log.log_id)},
            "kindVersion": {"kind": kind, "version": version},
            "integratedTime": str(self.integrated_time),
            "inclusionPromise": {"signedEntryTimestamp": b64(self.signed_entry_timestamp)},
            "inclusionProof": {
                "logIndex": str(self.log_index), "rootHash": b64(self.root_hash),
                "treeSize": str(self.tree_size), "hashes": [b64(h) for h in self.hashes],
                "checkpoint": {"envelope": self.checkpoint}},
            "canonicalizedBody": b64(self.body),
        }

    def cosign_bundle_annotation(self) -> str:
        """cosign's ``dev.sigstore.cosign/bundle`` annotation (``RekorBundle``)."""
        return json.dumps({"SignedEntryTimestamp": b64(self.signed_entry_timestamp),
                           "Payload": {"body": b64(self.body),
                                       "integratedTime": self.integrated_time,
                                       "logIndex": self.log_index,
                                       "logID": self.log.log_id.hex()}},
                          separators=(",", ":"))


class TestRekor(_LogKey):
    """A Rekor v1 log: an in-memory Merkle tree of canonicalized bodies, SETs, checkpoints.

    ``signer`` (default: this log's own key) signs SETs and checkpoints; giving another log
    forges entries that claim this log's ID.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.tree_id = int.from_bytes(os.urandom(7), "big")
        self.leaves: list[bytes] = []

    @property
    def origin(self) -> str:
        return f"{self.name} - {self.tree_id}"

    def set_payload(self, body: bytes, integrated_time: int, log_index: int) -> bytes:
        return canonical_json({"body": b64(body), "integratedTime": integrated_time,
                               "logID": self.log_id.hex(), "logIndex": log_index})

    def checkpoint(self, size: int, root: bytes, signer: _LogKey | None = None) -> str:
        note = f"{self.origin}\n{size}\n{b64(root)}\n"
        key = signer or self
        sig = key.sign(note.encode())
        return f"{note}\n\u2014 {self.name} {b64(self.log_id[:4] + sig)}\n"

    def append(self, body: bytes, integrated_time: int, *, filler: int = 3,
               signer: _LogKey | None = None) -> LogEntry:
        """Log ``body`` after ``filler`` other entries (and one after it) and return the
        entry with its SET and an inclusion proof for the tree as it then is."""
        for _ in range(filler):
            self.leaves.append(leaf_hash(canonical_json({"filler": b64(os.urandom(16))})))
        index = len(self.leaves)
        self.leaves.append(leaf_hash(body))
        self.leaves.append(leaf_hash(canonical_json({"filler": b64(os.urandom(16))})))
        size = len(self.leaves)
        root = merkle_root(self.leaves)
        key = signer or self
        return LogEntry(
            log=self, body=body, log_index=index, integrated_time=integrated_time,
            signed_entry_timestamp=key.sign(self.set_payload(body, integrated_time, index)),
            tree_size=size, root_hash=root, hashes=tuple(audit_path(index, self.leaves)),
            checkpoint=self.checkpoint(size, root, signer))


# -- RFC 3161 timestamp authority -----------------------------------------------------------

def _alg_sha256() -> bytes:
    # RFC 5754 §2: the SHA-2 AlgorithmIdentifier parameters are absent.
    return der_seq(der_oid(OID_SHA256))


class TestTSA:
    """An RFC 3161 timestamp authority: a self-signed root and a timeStamping signing certificate.

    :meth:`timestamp` returns a DER ``TimeStampResp`` over ``SHA-256(data)``; ``signer``
    (another TSA) signs the token with its key while naming this TSA's certificate.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "sigstore-test-tsa", *, now: dt.datetime | None = None,
                 uri: str = "https://tsa.sigstore.test") -> None:
        self.now = now or dt.datetime.now(dt.UTC)
        self.start = self.now - dt.timedelta(days=1)
        self.name = name
        self.uri = uri
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = _name(f"{name}-root")
        self.root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
                     .public_key(self.root_key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(self.now - dt.timedelta(days=30))
                     .not_valid_after(self.now + dt.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=False, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.root_key.public_key()), critical=False)
                     .sign(self.root_key, hashes.SHA384()))
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder().subject_name(_name(name))
                     .issuer_name(root_name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(self.now - dt.timedelta(days=7))
                     .not_valid_after(self.now + dt.timedelta(days=365))
                     .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                    critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                         decipher_only=False), critical=True)
                     # RFC 3161 §2.3: exactly one EKU, id-kp-timeStamping, critical.
                     .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]),
                                    critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self.key.public_key()), critical=False)
                     .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                         self.root_key.public_key()), critical=False)
                     .sign(self.root_key, hashes.SHA384()))

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def trusted_root_entry(self) -> dict[str, Any]:
        """The protobuf-specs ``CertificateAuthority`` JSON: signing certificate, then root."""
        der = serialization.Encoding.DER
        return {"subject": {"organization": "sigstore.test", "commonName": self.name},
                "uri": self.uri,
                "certChain": {"certificates": [{"rawBytes": b64(c.public_bytes(der))}
                                               for c in (self.cert, self.root)]},
                "validFor": {"start": rfc3339(self.start)}}

    def tst_info(self, data: bytes, gen_time: dt.datetime) -> bytes:
        """The DER ``TSTInfo`` (RFC 3161 §2.4.2) over ``SHA-256(data)``."""
        return der_seq(
            der_int(1),                                                  # version v1
            der_oid(TSA_POLICY),                                         # policy
            der_seq(_alg_sha256(), der_octets(hashlib.sha256(data).digest())),  # imprint
            der_int(int.from_bytes(os.urandom(16), "big") >> 1),       # serialNumber
            der_generalized_time(gen_time),                              # genTime
            der_seq(der_int(1)),                                         # accuracy: 1 s
            der_int(int.from_bytes(os.urandom(8), "big") >> 1))        # nonce

    def timestamp(self, data: bytes, at: dt.datetime | None = None, *,
                  signer: TestTSA | None = None, embed_certificate: bool = True) -> bytes:
        """A DER ``TimeStampResp`` (status granted) timestamping ``data`` at ``at``."""
        gen_time = at or (self.now - dt.timedelta(seconds=1))
        tst = self.tst_info(data, gen_time)
        # ESSCertIDv2 with the default hash (SHA-256, omitted) and no issuerSerial.
        ess = der_seq(der_seq(der_seq(der_octets(hashlib.sha256(self.cert_der).digest()))))
        attrs = [der_seq(der_oid(OID_CONTENT_TYPE), der_set(der_oid(OID_TST_INFO))),
                 der_seq(der_oid(OID_MESSAGE_DIGEST),
                         der_set(der_octets(hashlib.sha256(tst).digest()))),
                 der_seq(der_oid(OID_SIGNING_CERT_V2), der_set(ess))]
        signed_attrs = der_set(*attrs)
        key = (signer or self).key
        signature = key.sign(signed_attrs, ec.ECDSA(hashes.SHA256()))
        signer_info = der_seq(
            der_int(1),                                                  # issuerAndSerialNumber
            der_seq(self.cert.issuer.public_bytes(), der_int(self.cert.serial_number)),
            _alg_sha256(),
            b"\xa0" + signed_attrs[1:],                                  # [0] IMPLICIT SET
            der_seq(der_oid(OID_ECDSA_SHA256)),
            der_octets(signature))
        signed_data = der_seq(
            der_int(3),                                                  # eContentType != data
            der_set(_alg_sha256()),
            der_seq(der_oid(OID_TST_INFO), der_explicit(0, der_octets(tst))),
            *([der_explicit(0, self.cert_der)] if embed_certificate else []),
            der_set(signer_info))
        token = der_seq(der_oid(OID_SIGNED_DATA), der_explicit(0, signed_data))
        return der_seq(der_seq(der_int(0)), token)                      # PKIStatus granted


# -- Fulcio ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """A Fulcio-like signing certificate and its (ephemeral) private key."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate
    identity: str
    issuer: str
    chain: tuple[x509.Certificate, ...]          # intermediate, root

    def sign(self, data: bytes) -> bytes:
        return _sign(self.key, data)

    @property
    def pem(self) -> bytes:
        return pem(self.cert)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestSigstore:
    """A Fulcio CA (root + intermediate), a CT log, a Rekor log and an RFC 3161 timestamp
    authority, made now, in memory."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, now: dt.datetime | None = None,
                 rekor_url: str = "https://rekor.sigstore.test",
                 ctlog_url: str = "https://ctfe.sigstore.test/test") -> None:
        self.now = now or dt.datetime.now(dt.UTC)
        self.start = self.now - dt.timedelta(days=1)
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = self._ca_cert(_name("sigstore-test-root"), self.root_key, self.root_key,
                                  _name("sigstore-test-root"), path_length=1)
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = self._ca_cert(_name("sigstore-test-intermediate"),
                                          self.intermediate_key, self.root_key,
                                          self.root.subject, path_length=0,
                                          eku=True)
        self.ctlog = TestCTLog(ctlog_url)
        self.rekor = TestRekor(rekor_url)
        self.tsa = TestTSA(now=self.now)

    def _ca_cert(self, subject: x509.Name, key: ec.EllipticCurvePrivateKey,
                 signer: ec.EllipticCurvePrivateKey, issuer: x509.Name, *, path_length: int,
                 eku: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(self.now - dt.timedelta(days=30))
                   .not_valid_after(self.now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False))
        if signer is not key:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                critical=False)
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(signer, hashes.SHA384())

    # -- trust material ----------------------------------------------------------------------

    def trusted_root(self, *, extra_tlogs: Sequence[_LogKey] = (),
                     tsas: Sequence[TestTSA] | None = None) -> dict[str, Any]:
        """The protobuf-specs TrustedRoot JSON for this instance."""
        der = serialization.Encoding.DER
        return {
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [log.trusted_root_entry(self.start)
                      for log in (self.rekor, *extra_tlogs)],
            "certificateAuthorities": [{
                "subject": {"organization": "sigstore.test",
                            "commonName": "sigstore-test-root"},
                "uri": "https://fulcio.sigstore.test",
                "certChain": {"certificates": [
                    {"rawBytes": b64(c.public_bytes(der))}
                    for c in (self.intermediate, self.root)]},
                "validFor": {"start": rfc3339(self.start)}}],
            "ctlogs": [self.ctlog.trusted_root_entry(self.start)],
            "timestampAuthorities": [t.trusted_root_entry()
                                     for t in ((self.tsa,) if tsas is None else tsas)],
        }

    def write_trusted_root(self, path: Path, **kwargs: Any) -> Path:
        path.write_text(json.dumps(self.trusted_root(**kwargs), indent=2))
        return path

    # -- certificates ------------------------------------------------------------------------

    def issue(self, identity: str, issuer: str = DEFAULT_ISSUER, *,
              not_before: dt.datetime | None = None,
              lifetime: dt.timedelta = dt.timedelta(minutes=10),
              ctlog: TestCTLog | None = None) -> Leaf:
        """A Fulcio-style leaf for ``identity`` (an email if it has ``@`` and no scheme, else a
        URI), valid from ``not_before`` (default: a minute ago) for ``lifetime``."""
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = not_before or (self.now - dt.timedelta(minutes=1))
        san: x509.GeneralName = (x509.RFC822Name(identity)
                                 if "@" in identity and "://" not in identity
                                 else x509.UniformResourceIdentifier(identity))
        base = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self.intermediate.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_before + lifetime)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()), critical=False)
                .add_extension(x509.SubjectAlternativeName([san]), critical=True)
                .add_extension(x509.UnrecognizedExtension(OID_ISSUER_V1, issuer.encode()),
                               critical=False)
                .add_extension(x509.UnrecognizedExtension(OID_ISSUER_V2, der_utf8(issuer)),
                               critical=False))
        # 1. the precertificate: poison extension, signed by the issuing CA.
        precert = base.add_extension(x509.PrecertPoison(), critical=True).sign(
            self.intermediate_key, hashes.SHA384())
        signed_tbs = tbs_without_extension(precert.tbs_certificate_bytes, OID_CT_POISON)
        # 2. the CT log's SCT over that TBS (issuer key hash = the intermediate's SPKI).
        log = ctlog or self.ctlog
        timestamp_ms = int(not_before.timestamp() * 1000) + 1500
        sct = log.sct(signed_tbs, spki(self.intermediate_key.public_key()), timestamp_ms)
        sct_list = struct.pack(">H", len(sct) + 2) + struct.pack(">H", len(sct)) + sct
        # 3. the final certificate: the SCT list where the poison was.
        cert = base.add_extension(x509.UnrecognizedExtension(
            OID_SCT_LIST, der_tlv(0x04, sct_list)), critical=False).sign(
            self.intermediate_key, hashes.SHA384())
        assert cert.serial_number == precert.serial_number
        assert cert.tbs_precertificate_bytes == signed_tbs, "precert TBS handling is broken"
        return Leaf(key=key, cert=cert, identity=identity, issuer=issuer,
                    chain=(self.intermediate, self.root))

    def integrated_time(self, leaf: Leaf, offset: dt.timedelta = dt.timedelta(seconds=30)
                        ) -> int:
        """A log time inside ``leaf``'s validity (``offset`` after it starts)."""
        return int((leaf.cert.not_valid_before_utc + offset).timestamp())


# -- rekor entry bodies ---------------------------------------------------------------------

def hashedrekord_body(signature: bytes, sha256_digest: bytes, cert_pem: bytes) -> bytes:
    """A hashedrekord 0.0.1 canonicalized body (``cosign sign`` legacy, message signatures)."""
    return canonical_json({"apiVersion": "0.0.1", "kind": "hashedrekord", "spec": {
        "data": {"hash": {"algorithm": "sha256", "value": sha256_digest.hex()}},
        "signature": {"content": b64(signature), "publicKey": {"content": b64(cert_pem)}}}})


def dsse_body(envelope: dict[str, Any], cert_pem: bytes) -> bytes:
    """A dsse 0.0.1 canonicalized body as Rekor v1 stores it for a DSSE envelope."""
    payload = base64.b64decode(envelope["payload"])
    return canonical_json({"apiVersion": "0.0.1", "kind": "dsse", "spec": {
        "envelopeHash": {"algorithm": "sha256",
                         "value": hashlib.sha256(canonical_json(envelope)).hexdigest()},
        "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
        "signatures": [{"signature": sig["sig"], "verifier": b64(cert_pem)}
                       for sig in envelope["signatures"]]}})


def intoto_v002_body(envelope_json: bytes, cert_pem: bytes) -> bytes:
    """An intoto 0.0.2 canonicalized body exactly as Rekor v1 stores it (rekor
    ``pkg/types/intoto/v0.0.2/entry.go`` ``Canonicalize``): the envelope keeps only its
    ``payloadType`` and signatures (``sig`` is the envelope's base64 string base64-encoded
    again, ``publicKey`` the base64 PEM); the payload itself is *not* in the body, only
    ``payloadHash`` (SHA-256 of the decoded payload) and ``hash`` (SHA-256 of the uploaded
    envelope JSON)."""
    env = json.loads(envelope_json)
    payload = base64.b64decode(env["payload"])
    return canonical_json({"apiVersion": "0.0.2", "kind": "intoto", "spec": {"content": {
        "envelope": {"payloadType": env["payloadType"],
                     "signatures": [{"publicKey": b64(cert_pem),
                                     "sig": b64(sig["sig"].encode())}
                                    for sig in env["signatures"]]},
        "hash": {"algorithm": "sha256", "value": hashlib.sha256(envelope_json).hexdigest()},
        "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
    }}})


# -- cosign artifacts -----------------------------------------------------------------------

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def cosign_sign_statement(image: str, digest_hex: str) -> bytes:
    """What cosign v3 ``sign`` signs: an in-toto v1 statement naming the image digest."""
    return json.dumps({"_type": STATEMENT_V1,
                       "subject": [{"name": image, "digest": {"sha256": digest_hex}}],
                       "predicateType": COSIGN_SIGN_PREDICATE, "predicate": {}},
                      separators=(",", ":")).encode()


def dsse_envelope(leaf: Leaf, payload: bytes, payload_type: str = IN_TOTO) -> dict[str, Any]:
    """A DSSE envelope with one signature by ``leaf``."""
    return {"payload": b64(payload), "payloadType": payload_type,
            "signatures": [{"sig": b64(leaf.sign(pae(payload_type, payload))), "keyid": ""}]}


def cosign_bundle(leaf: Leaf, statement: bytes, rekor: TestRekor, *,
                  integrated_time: int | None = None, signer: _LogKey | None = None,
                  logged_envelope: dict[str, Any] | None = None,
                  tsa: TestTSA | None = None, timestamped: bytes | None = None) -> bytes:
    """A sigstore bundle v0.3 (DSSE) as cosign v3 attaches it.

    ``logged_envelope``: log this envelope's entry instead (a tlog body recording another
    signature). ``signer``: sign the SET and checkpoint with another log's key. ``tsa``: add
    ``timestampVerificationData`` with an RFC 3161 timestamp of the DSSE signature bytes (as
    cosign v3 ``--timestamp-server-url`` does), or of ``timestamped`` if given.
    """
    envelope = dsse_envelope(leaf, statement)
    t = integrated_time if integrated_time is not None else int(
        (leaf.cert.not_valid_before_utc + dt.timedelta(seconds=30)).timestamp())
    entry = rekor.append(dsse_body(logged_envelope or envelope, leaf.pem), t, signer=signer)
    material: dict[str, Any] = {"certificate": {"rawBytes": b64(leaf.der)},
                                "tlogEntries": [entry.bundle_entry("dsse")]}
    if tsa is not None:
        signature = base64.b64decode(envelope["signatures"][0]["sig"])
        token = tsa.timestamp(timestamped if timestamped is not None else signature,
                              dt.datetime.fromtimestamp(t + 1, dt.UTC))
        material["timestampVerificationData"] = {
            "rfc3161Timestamps": [{"signedTimestamp": b64(token)}]}
    return json.dumps({
        "mediaType": BUNDLE_V03,
        "verificationMaterial": material,
        "dsseEnvelope": envelope,
    }, separators=(",", ":")).encode()


def message_bundle(leaf: Leaf, artifact: bytes, rekor: TestRekor, *,
                   integrated_time: int | None = None, signer: _LogKey | None = None,
                   logged_signature: bytes | None = None) -> bytes:
    """A sigstore bundle v0.3 with a message signature over ``artifact`` (``cosign
    sign-blob --new-bundle-format``) and its hashedrekord 0.0.1 entry.

    ``logged_signature``: the entry records this signature instead of the bundle's.
    """
    signature = leaf.sign(artifact)
    digest = hashlib.sha256(artifact).digest()
    t = integrated_time if integrated_time is not None else int(
        (leaf.cert.not_valid_before_utc + dt.timedelta(seconds=30)).timestamp())
    entry = rekor.append(hashedrekord_body(logged_signature or signature, digest, leaf.pem), t,
                         signer=signer)
    return json.dumps({
        "mediaType": BUNDLE_V03,
        "verificationMaterial": {"certificate": {"rawBytes": b64(leaf.der)},
                                 "tlogEntries": [entry.bundle_entry("hashedrekord")]},
        "messageSignature": {"messageDigest": {"algorithm": "SHA2_256", "digest": b64(digest)},
                             "signature": b64(signature)},
    }, separators=(",", ":")).encode()


def simple_signing_payload(reference: str, digest: str) -> bytes:
    """The cosign simple-signing payload of a legacy ``.sig`` layer."""
    return json.dumps({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}, separators=(",", ":")).encode()


def cosign_sig_annotations(leaf: Leaf, payload: bytes, rekor: TestRekor, *,
                           integrated_time: int | None = None, signer: _LogKey | None = None,
                           logged_signature: bytes | None = None) -> dict[str, str]:
    """The annotations keyless ``cosign sign`` (legacy format) puts on a ``.sig`` layer.

    ``logged_signature``: the Rekor entry records this signature instead of the layer's.
    """
    signature = leaf.sign(payload)
    t = integrated_time if integrated_time is not None else int(
        (leaf.cert.not_valid_before_utc + dt.timedelta(seconds=30)).timestamp())
    body = hashedrekord_body(logged_signature or signature, hashlib.sha256(payload).digest(),
                             leaf.pem)
    entry = rekor.append(body, t, signer=signer)
    return {
        "dev.cosignproject.cosign/signature": b64(signature),
        "dev.sigstore.cosign/certificate": leaf.pem.decode(),
        "dev.sigstore.cosign/chain": b"".join(pem(c) for c in leaf.chain).decode(),
        "dev.sigstore.cosign/bundle": entry.cosign_bundle_annotation(),
    }


def slsa_provenance_statement(image: str, digest_hex: str, *, builder_id: str,
                              repository: str = "https://git.test/acme/app") -> bytes:
    """An in-toto v1 statement with a SLSA provenance v1 predicate naming the image digest
    (the shape GitHub's and slsa-github-generator's container provenance has)."""
    return json.dumps({
        "_type": STATEMENT_V1,
        "subject": [{"name": image, "digest": {"sha256": digest_hex}}],
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": "https://actions.github.io/buildtypes/workflow/v1",
                "externalParameters": {"workflow": {
                    "ref": "refs/tags/v1.0.0", "repository": repository,
                    "path": ".github/workflows/release.yml"}},
                "internalParameters": {"github": {"event_name": "push"}},
                "resolvedDependencies": [{"uri": f"git+{repository}@refs/tags/v1.0.0",
                                          "digest": {"gitCommit": "0" * 40}}]},
            "runDetails": {"builder": {"id": builder_id},
                           "metadata": {"invocationId": f"{repository}/actions/runs/1/1"}}},
    }, separators=(",", ":")).encode()


def cosign_att_layer(leaf: Leaf, statement: bytes, rekor: TestRekor, *,
                     entry_kind: str = "intoto", integrated_time: int | None = None,
                     predicate_type: str = SLSA_PROVENANCE_V1) -> tuple[bytes, dict[str, str]]:
    """The blob and annotations legacy keyless ``cosign attest`` pushes as one ``.att`` layer
    (media type ``application/vnd.dsse.envelope.v1+json``).

    The blob is the DSSE envelope JSON as cosign marshals it (Go field order ``payloadType``,
    ``payload``, ``signatures``) and uploads to Rekor; the Rekor entry is ``intoto`` 0.0.2
    (cosign's ``--rekor-entry-type intoto``) or ``dsse`` 0.0.1 (``--rekor-entry-type dsse``).
    The annotations: an empty ``dev.cosignproject.cosign/signature`` (the signature is in the
    envelope), the certificate, the chain, the Rekor bundle and the ``predicateType`` hint.
    """
    payload_type = IN_TOTO
    sig = leaf.sign(pae(payload_type, statement))
    envelope = {"payloadType": payload_type, "payload": b64(statement),
                "signatures": [{"keyid": "", "sig": b64(sig)}]}
    blob = json.dumps(envelope, separators=(",", ":")).encode()
    if entry_kind == "intoto":
        body = intoto_v002_body(blob, leaf.pem)
    elif entry_kind == "dsse":
        body = dsse_body(envelope, leaf.pem)
    else:
        raise ValueError(f"unknown entry kind {entry_kind!r}")
    t = integrated_time if integrated_time is not None else int(
        (leaf.cert.not_valid_before_utc + dt.timedelta(seconds=30)).timestamp())
    entry = rekor.append(body, t)
    return blob, {
        "dev.cosignproject.cosign/signature": "",
        "dev.sigstore.cosign/certificate": leaf.pem.decode(),
        "dev.sigstore.cosign/chain": b"".join(pem(c) for c in leaf.chain).decode(),
        "dev.sigstore.cosign/bundle": entry.cosign_bundle_annotation(),
        "predicateType": predicate_type,
    }
