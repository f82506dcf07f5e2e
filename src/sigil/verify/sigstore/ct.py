"""Embedded SCT verification (RFC 6962 §3.2) for Fulcio certificates.

Fulcio embeds one precertificate SCT. Its signature covers::

    sct_version(1) || signature_type(1)=0 || timestamp(8) || entry_type(2)=1 ||
    issuer_key_hash(32) || len(3) || TBSCertificate-without-SCT-extension || len(2) || ext

where ``issuer_key_hash`` is SHA-256 of the issuing CA's SubjectPublicKeyInfo.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import struct

from cryptography import x509
from cryptography.x509.certificate_transparency import LogEntryType, Version

from ._common import fail, fmt_time, spki_der, verify_signature
from .trust import TransparencyLog, TrustedRoot


def _sct_millis(sct: x509.certificate_transparency.SignedCertificateTimestamp) -> int:
    ts = sct.timestamp  # naive UTC in cryptography
    return calendar.timegm(ts.utctimetuple()) * 1000 + ts.microsecond // 1000


def verify_embedded_sct(leaf: x509.Certificate, issuer: x509.Certificate,
                        trusted_root: TrustedRoot) -> TransparencyLog:
    """Verify the single embedded SCT against a CT log of the trusted root; return the log."""
    try:
        ext = leaf.extensions.get_extension_for_class(
            x509.PrecertificateSignedCertificateTimestamps)
    except x509.ExtensionNotFound:
        fail("certificate has no embedded SCT", "sct")
    except ValueError as exc:
        fail(f"certificate SCT extension is malformed: {exc}", "sct")
    scts = list(ext.value)
    if len(scts) != 1:
        fail(f"expected exactly one embedded SCT, found {len(scts)}", "sct")
    sct = scts[0]
    if sct.version != Version.v1 or sct.entry_type != LogEntryType.PRE_CERTIFICATE:
        fail("embedded SCT is not a v1 precertificate SCT", "sct")
    log = trusted_root.ctlog(sct.log_id)
    if log is None:
        fail(f"SCT from unknown CT log {sct.log_id.hex()}", "sct")
    millis = _sct_millis(sct)
    when = dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
    if not log.valid_for.contains(when):
        fail(f"CT log {log.description} key not valid at SCT time {fmt_time(when)}", "sct")
    tbs = leaf.tbs_precertificate_bytes
    extensions = sct.extension_bytes
    if len(tbs) >= 1 << 24 or len(extensions) >= 1 << 16:
        fail("SCT input too large", "sct")
    signed = (struct.pack(">BBQH", 0, 0, millis, 1)
              + hashlib.sha256(spki_der(issuer.public_key())).digest()  # type: ignore[arg-type]
              + len(tbs).to_bytes(3, "big") + tbs
              + len(extensions).to_bytes(2, "big") + extensions)
    verify_signature(log.public_key, sct.signature, signed,
                     hash_alg=sct.signature_hash_algorithm or log.hash_alg,
                     what=f"SCT from CT log {log.description}", reason="sct")
    return log
