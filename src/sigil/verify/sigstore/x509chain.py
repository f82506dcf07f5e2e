"""Certificate path validation on ``cryptography.x509.verification`` for Fulcio and TSA chains.

``PolicyBuilder.build_client_verifier`` hard-wires the clientAuth EKU; Fulcio leaves carry
codeSigning and TSA leaves timeStamping, so the EKU rule is replaced through
``extension_policies`` (every other WebPKI default stays: basic constraints, key usage,
path length, signature algorithms, validity at the given time, name chaining).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder
from cryptography.x509.verification import VerificationError as X509VerificationError

from ._common import fail, fmt_time
from .trust import CertificateAuthority


def _eku_validator(required: x509.ObjectIdentifier) -> Any:
    def check(_policy: Any, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        if eku is None or required not in eku:
            raise ValueError(f"extended key usage {required.dotted_string} missing")
    return check


# CA side: WebPKI defaults, but an EKU on intermediates (Fulcio's says codeSigning) is allowed.
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
# Fulcio leaf: code-signing EKU required (Fulcio certificate profile).
_FULCIO_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().require_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator(ExtendedKeyUsageOID.CODE_SIGNING))
# TSA leaf: RFC 3161 §2.3 requires the timeStamping EKU (and only it, critical); TSA
# certificates have no SAN, which the WebPKI end-entity defaults would require.
_TSA_EE_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator(ExtendedKeyUsageOID.TIME_STAMPING))


def build_chain(leaf: x509.Certificate, ca: CertificateAuthority, at: dt.datetime, *,
                intermediates: Sequence[x509.Certificate], tsa: bool = False,
                ) -> list[x509.Certificate]:
    """Validate ``leaf`` up to ``ca``'s root at time ``at``; return leaf..root.

    Raises ``ValueError`` (internal) when no valid path exists; callers turn it into a
    ``VerificationError`` with their own reason. The returned path ends at the first trusted
    certificate reached (the issuing CA certificate of the trusted root).
    """
    # The CA certificates are anchors in ca.store; they must still be within their own
    # validity at ``at`` (an expired intermediate invalidates the path).
    for cert in (ca.certificates[1:] if tsa else ca.certificates):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ValueError(f"CA certificate {cert.subject.rfc4514_string()} not valid at "
                             f"{fmt_time(at)}")
    verifier = (PolicyBuilder().store(ca.store).time(at)
                .extension_policies(ca_policy=_CA_POLICY,
                                    ee_policy=_TSA_EE_POLICY if tsa else _FULCIO_EE_POLICY)
                .build_client_verifier())
    try:
        return list(verifier.verify(leaf, list(intermediates)).chain)
    except (X509VerificationError, ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from exc


def verify_fulcio_chain(leaf: x509.Certificate, cas: Sequence[CertificateAuthority],
                        times: Sequence[dt.datetime]) -> tuple[CertificateAuthority,
                                                               list[x509.Certificate]]:
    """Chain ``leaf`` to a trusted Fulcio CA, valid at *every* verified time.

    For each time, a CA counts only if the trusted root's ``validFor`` covers that time
    (sigstore client spec: the CA must have been trusted when the certificate was used);
    intermediates come from the trusted root only, never from the bundle.
    """
    if not times:
        fail("no verified time to validate the certificate chain at", "timestamp")
    result: tuple[CertificateAuthority, list[x509.Certificate]] | None = None
    for t in times:
        errors = []
        found = None
        for ca in cas:
            if not ca.valid_for.contains(t):
                errors.append(f"{ca.subject}: not trusted at {fmt_time(t)} ({ca.valid_for})")
                continue
            try:
                found = (ca, build_chain(leaf, ca, t, intermediates=ca.certificates[:-1]))
                break
            except ValueError as exc:
                errors.append(f"{ca.subject}: {exc}")
        if found is None:
            detail = "; ".join(errors) or "no certificate authorities in the trusted root"
            reason = "expired" if not (leaf.not_valid_before_utc <= t
                                       <= leaf.not_valid_after_utc) else "chain"
            fail(f"certificate does not chain to a trusted Fulcio CA at {fmt_time(t)}: "
                 f"{detail}", reason)
        result = found
    assert result is not None
    return result
