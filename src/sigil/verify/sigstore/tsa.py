"""RFC 3161 timestamp verification (CMS SignedData, RFC 5652), written on the DER reader.

A bundle's ``signedTimestamp`` is a DER ``TimeStampResp`` (RFC 3161 §2.4.2); a bare
``TimeStampToken`` is accepted too. Verification (RFC 3161 §2.4.2, RFC 5652 §5.4, §5.6):

1. status granted (0) or grantedWithMods (1); content type id-signedData;
   encapsulated content type id-ct-TSTInfo;
2. ``messageImprint`` equals the hash of the signature bytes being timestamped;
3. exactly one SignerInfo whose ``sid`` names the signing certificate of a timestamp
   authority *in the trusted root* (certificates embedded in the token are never trusted);
4. signed attributes: content type id-ct-TSTInfo, ``messageDigest`` = hash(eContent),
   and the ESS signing-certificate(-v2) hash, when present, names that same certificate;
5. the signature over the DER ``SET OF`` signed attributes verifies with that certificate;
6. the TSA chain (leaf, intermediates, root from the trusted root) is valid at ``genTime``
   with the timeStamping EKU, and the authority's ``validFor`` covers ``genTime``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from sigil.errors import VerificationError

from . import _der as der
from ._common import CLOCK_SKEW, fail, fmt_time, now, verify_signature
from .trust import CertificateAuthority, TrustedRoot
from .x509chain import build_chain

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_TST_INFO = "1.2.840.113549.1.9.16.1.4"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_CERT = "1.2.840.113549.1.9.16.2.12"
OID_SIGNING_CERT_V2 = "1.2.840.113549.1.9.16.2.47"

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}
# Signature algorithm OID -> hash it implies (None: take the SignerInfo digestAlgorithm).
_SIG_ALGS: dict[str, type[hashes.HashAlgorithm] | None] = {
    "1.2.840.10045.4.3.2": hashes.SHA256,   # ecdsa-with-SHA256
    "1.2.840.10045.4.3.3": hashes.SHA384,
    "1.2.840.10045.4.3.4": hashes.SHA512,
    "1.2.840.10045.2.1": None,              # id-ecPublicKey (some TSAs write this)
    "1.2.840.113549.1.1.1": None,           # rsaEncryption
    "1.2.840.113549.1.1.11": hashes.SHA256,
    "1.2.840.113549.1.1.12": hashes.SHA384,
    "1.2.840.113549.1.1.13": hashes.SHA512,
    "1.2.840.113549.1.1.10": None,          # RSASSA-PSS
    "1.3.101.112": None,                    # Ed25519
}


@dataclass(frozen=True)
class VerifiedTimestamp:
    """A verified RFC 3161 timestamp."""

    time: dt.datetime
    authority: CertificateAuthority


@dataclass(frozen=True)
class _SignerInfo:
    sid_issuer_serial: tuple[bytes, int] | None
    sid_ski: bytes | None
    digest_oid: str
    digest_alg: type[hashes.HashAlgorithm]
    signed_attrs_raw: bytes
    attrs: dict[str, list[der.TLV]]
    sig_hash: type[hashes.HashAlgorithm]
    signature: bytes


@dataclass(frozen=True)
class _Token:
    econtent: bytes
    signer: _SignerInfo
    imprint_alg: type[hashes.HashAlgorithm]
    imprint: bytes
    gen_time: dt.datetime
    embedded: tuple[x509.Certificate, ...] | None   # certificates shipped in the token


def _alg_id(tlv: der.TLV, table: dict[str, type[hashes.HashAlgorithm]]
            ) -> type[hashes.HashAlgorithm]:
    parts = tlv.expect(der.SEQUENCE).children()
    # AlgorithmIdentifier parameters: absent or NULL for the SHA-2 digests.
    if len(parts) > 2 or (len(parts) == 2 and parts[1].raw != b"\x05\x00"):
        raise der.DERError("unexpected digest algorithm parameters")
    oid = der.decode_oid(parts[0])
    if oid not in table:
        raise der.DERError(f"unsupported digest algorithm {oid}")
    return table[oid]


def _parse_token(data: bytes) -> _Token:
    top = der.parse(data).expect(der.SEQUENCE).children()
    if top and top[0].tag == der.SEQUENCE:
        # TimeStampResp: status PKIStatusInfo, timeStampToken.
        status = der.decode_int(top[0].children()[0])
        if status not in (0, 1):
            raise der.DERError(f"timestamp response status {status} (not granted)")
        if len(top) != 2:
            raise der.DERError("timestamp response has no token")
        content_info = top[1].expect(der.SEQUENCE).children()
    else:
        content_info = top
    if len(content_info) != 2 or der.decode_oid(content_info[0]) != OID_SIGNED_DATA:
        raise der.DERError("token is not CMS SignedData")
    explicit = content_info[1].expect(0xA0).children()
    if len(explicit) != 1:
        raise der.DERError("malformed ContentInfo content")
    sd = explicit[0].expect(der.SEQUENCE).children()
    # SignedData: version, digestAlgorithms, encapContentInfo, [0] certs, [1] crls, signerInfos
    if len(sd) < 4:
        raise der.DERError("SignedData too short")
    if der.decode_int(sd[0]) not in (1, 3):
        raise der.DERError("unsupported SignedData version")
    digest_algs = {der.decode_oid(a.expect(der.SEQUENCE).children()[0])
                   for a in sd[1].expect(der.SET).children()}
    encap = sd[2].expect(der.SEQUENCE).children()
    if der.decode_oid(encap[0]) != OID_TST_INFO or len(encap) != 2:
        raise der.DERError("encapsulated content is not TSTInfo")
    econtent_wrapped = encap[1].expect(0xA0).children()
    if len(econtent_wrapped) != 1:
        raise der.DERError("malformed eContent")
    econtent = econtent_wrapped[0].expect(der.OCTET_STRING).content
    rest = sd[3:]
    signer_infos = rest[-1].expect(der.SET).children()
    embedded: list[x509.Certificate] | None = None
    if len(rest) > 2 or (len(rest) == 2 and rest[0].tag != 0xA0):
        # crls [1] is not supported (sigstore TSAs send none): unknown content fails closed.
        raise der.DERError("unexpected SignedData fields (only certificates are supported)")
    if len(rest) == 2:
        # certificates [0] IMPLICIT CertificateSet: only plain X.509 certificates.
        embedded = [_embedded_cert(c) for c in rest[0].children()]
    if len(signer_infos) != 1:
        raise der.DERError("expected exactly one SignerInfo")
    signer = _parse_signer_info(signer_infos[0])
    if signer.digest_oid not in digest_algs:
        raise der.DERError("signer digest algorithm not listed in SignedData")

    tst = der.parse(econtent).expect(der.SEQUENCE).children()
    if len(tst) < 5 or der.decode_int(tst[0]) != 1:
        raise der.DERError("unsupported TSTInfo version")
    imprint = tst[2].expect(der.SEQUENCE).children()
    if len(imprint) != 2:
        raise der.DERError("malformed messageImprint")
    imprint_alg = _alg_id(imprint[0], _DIGESTS)
    hashed = imprint[1].expect(der.OCTET_STRING).content
    gen_time = der.decode_generalized_time(tst[4])
    return _Token(econtent=econtent, signer=signer, imprint_alg=imprint_alg, imprint=hashed,
                  gen_time=gen_time, embedded=tuple(embedded) if embedded else None)


def _embedded_cert(tlv: der.TLV) -> x509.Certificate:
    if tlv.tag != der.SEQUENCE:
        raise der.DERError("only X.509 certificates may be embedded")
    try:
        return x509.load_der_x509_certificate(tlv.raw)
    except Exception as exc:
        raise der.DERError(f"embedded certificate is malformed: {exc}") from exc


def _parse_signer_info(tlv: der.TLV) -> _SignerInfo:
    parts = tlv.expect(der.SEQUENCE).children()
    if len(parts) not in (6, 7) or der.decode_int(parts[0]) not in (1, 3):
        raise der.DERError("malformed SignerInfo")
    if len(parts) == 7 and parts[6].tag != 0xA1:
        raise der.DERError("unexpected SignerInfo field")
    sid = parts[1]
    issuer_serial = ski = None
    if sid.tag == der.SEQUENCE:
        ias = sid.children()
        issuer_serial = (ias[0].expect(der.SEQUENCE).raw, der.decode_int(ias[1]))
    elif sid.tag == 0x80:
        ski = sid.content
    else:
        raise der.DERError("unsupported SignerIdentifier")
    digest_oid = der.decode_oid(parts[2].expect(der.SEQUENCE).children()[0])
    digest_alg = _alg_id(parts[2], _DIGESTS)
    signed_attrs = parts[3]
    if signed_attrs.tag != 0xA0:
        # RFC 3161 §2.4.1 requires the ESS signing-certificate attribute: no signed
        # attributes means a non-conforming token.
        raise der.DERError("SignerInfo has no signed attributes")
    attrs: dict[str, list[der.TLV]] = {}
    for attr in signed_attrs.children():
        a = attr.expect(der.SEQUENCE).children()
        oid = der.decode_oid(a[0])
        if oid in attrs:
            raise der.DERError(f"duplicate signed attribute {oid}")
        attrs[oid] = a[1].expect(der.SET).children()
    sig_alg_oid = der.decode_oid(parts[4].expect(der.SEQUENCE).children()[0])
    if sig_alg_oid not in _SIG_ALGS:
        raise der.DERError(f"unsupported signature algorithm {sig_alg_oid}")
    sig_hash = _SIG_ALGS[sig_alg_oid] or digest_alg
    signature = parts[5].expect(der.OCTET_STRING).content
    # RFC 5652 §5.4: the signature covers the DER of the attributes with an explicit SET tag.
    signed_raw = bytes([der.SET]) + signed_attrs.raw[1:]
    return _SignerInfo(issuer_serial, ski, digest_oid, digest_alg, signed_raw, attrs, sig_hash,
                       signature)


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _names_cert(signer: _SignerInfo, cert: x509.Certificate) -> bool:
    if signer.sid_issuer_serial is not None:
        issuer_der, serial = signer.sid_issuer_serial
        return cert.serial_number == serial and cert.issuer.public_bytes() == issuer_der
    return signer.sid_ski is not None and _ski(cert) == signer.sid_ski


def _check_ess(signer: _SignerInfo, cert: x509.Certificate) -> None:
    """ESS signing-certificate(-v2), when present, must hash the signing certificate."""
    cert_der = cert.public_bytes(Encoding.DER)
    for oid in (OID_SIGNING_CERT_V2, OID_SIGNING_CERT):
        values = signer.attrs.get(oid)
        if not values:
            continue
        # SigningCertificate(V2) ::= SEQUENCE { certs SEQUENCE OF ESSCertID(v2), ... }
        certs = values[0].expect(der.SEQUENCE).children()[0].expect(der.SEQUENCE).children()
        first = certs[0].expect(der.SEQUENCE).children()
        if oid == OID_SIGNING_CERT_V2:
            alg: type[hashes.HashAlgorithm] = hashes.SHA256
            idx = 0
            if first[0].tag == der.SEQUENCE:
                alg = _alg_id(first[0], _DIGESTS)
                idx = 1
            want = hashlib.new(alg().name, cert_der).digest()
        else:
            idx = 0
            # ESSCertID v1 identifies (not authenticates) the certificate by SHA-1.
            want = hashlib.sha1(cert_der, usedforsecurity=False).digest()
        if first[idx].expect(der.OCTET_STRING).content != want:
            raise der.DERError("ESS signing certificate does not name the TSA certificate")


def verify_timestamp(token: bytes, signature: bytes, trusted_root: TrustedRoot, *,
                     at: dt.datetime | None = None) -> VerifiedTimestamp:
    """Verify an RFC 3161 timestamp over ``signature``; return its time and authority.

    Raises ``VerificationError(reason="timestamp")`` on any failure.
    """
    try:
        tok = _parse_token(token)
    except (der.DERError, IndexError) as exc:
        fail(f"RFC 3161 timestamp is malformed: {exc}", "timestamp")
    if hashlib.new(tok.imprint_alg().name, signature).digest() != tok.imprint:
        fail("RFC 3161 timestamp is not over this signature", "timestamp")
    if tok.gen_time > (at or now()) + CLOCK_SKEW:
        fail(f"RFC 3161 timestamp {fmt_time(tok.gen_time)} is in the future", "timestamp")
    signer = tok.signer
    try:
        ct = signer.attrs.get(OID_CONTENT_TYPE)
        md = signer.attrs.get(OID_MESSAGE_DIGEST)
        if not ct or der.decode_oid(ct[0]) != OID_TST_INFO:
            raise der.DERError("signed content-type attribute is not id-ct-TSTInfo")
        if not md or md[0].expect(der.OCTET_STRING).content != hashlib.new(
                signer.digest_alg().name, tok.econtent).digest():
            raise der.DERError("signed message-digest attribute does not match TSTInfo")
    except (der.DERError, IndexError) as exc:
        fail(f"RFC 3161 timestamp signed attributes invalid: {exc}", "timestamp")

    embedded_signer = None
    if tok.embedded is not None:
        # Embedded certificates are never trusted; but when the token ships its signing
        # certificate, it must be exactly the one the trusted root names.
        matching = [c for c in tok.embedded if _names_cert(signer, c)]
        if len(matching) != 1:
            fail("RFC 3161 timestamp embeds certificates but not exactly one signer "
                 "certificate", "timestamp")
        embedded_signer = matching[0]
    errors: list[str] = []
    for tsa in trusted_root.timestamp_authorities:
        leaf = tsa.certificates[0]
        if not _names_cert(signer, leaf):
            continue
        if embedded_signer is not None and embedded_signer != leaf:
            errors.append(f"{tsa.subject}: embedded signer certificate differs")
            continue
        try:
            _check_ess(signer, leaf)
        except (der.DERError, IndexError) as exc:
            errors.append(f"{tsa.subject}: {exc}")
            continue
        try:
            verify_signature(leaf.public_key(), signer.signature,  # type: ignore[arg-type]
                             signer.signed_attrs_raw, hash_alg=signer.sig_hash(),
                             what="RFC 3161 timestamp signature", reason="timestamp")
        except VerificationError as exc:
            errors.append(f"{tsa.subject}: {exc}")
            continue
        if not tsa.valid_for.contains(tok.gen_time):
            errors.append(f"{tsa.subject}: not trusted at {fmt_time(tok.gen_time)} "
                          f"({tsa.valid_for})")
            continue
        try:
            build_chain(leaf, tsa, tok.gen_time, intermediates=tsa.certificates[1:-1], tsa=True)
        except ValueError as exc:
            errors.append(f"{tsa.subject}: chain invalid at {fmt_time(tok.gen_time)}: {exc}")
            continue
        return VerifiedTimestamp(time=tok.gen_time, authority=tsa)
    fail("RFC 3161 timestamp not verified by a trusted timestamp authority"
         + (": " + "; ".join(errors) if errors else " (signer not in the trusted root)"),
         "timestamp")
