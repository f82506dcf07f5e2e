"""Keyless identity policy: who may have signed (Fulcio certificate SAN and OIDC issuer).

Fulcio certificate profile (sigstore/fulcio ``docs/oid-info.md``):

* the identity is the Subject Alternative Name: a URI (workflow / SPIFFE), an email, or an
  ``OtherName`` of type ``1.3.6.1.4.1.57264.1.7`` (a UTF8String username);
* the OIDC issuer is extension ``1.3.6.1.4.1.57264.1.8`` (DER UTF8String) or, in older
  certificates, ``1.3.6.1.4.1.57264.1.1`` (the raw string);
* GitHub workflow claims are ``.1.2`` trigger, ``.1.3`` sha, ``.1.4`` name, ``.1.5``
  repository, ``.1.6`` ref (raw strings), with DER successors ``.1.20`` (trigger),
  ``.1.13`` (source repository digest) and ``.1.14`` (source repository ref).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509

from sigil.errors import ConfigError

from . import _der as der
from ._common import fail

OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
OID_OTHERNAME_SAN = "1.3.6.1.4.1.57264.1.7"

# github_workflow key -> (legacy raw-string OID, DER UTF8String successor OID or None)
GITHUB_WORKFLOW_CLAIMS: dict[str, tuple[str, str | None]] = {
    "trigger": ("1.3.6.1.4.1.57264.1.2", "1.3.6.1.4.1.57264.1.20"),
    "sha": ("1.3.6.1.4.1.57264.1.3", "1.3.6.1.4.1.57264.1.13"),
    "name": ("1.3.6.1.4.1.57264.1.4", None),
    "repository": ("1.3.6.1.4.1.57264.1.5", None),
    "ref": ("1.3.6.1.4.1.57264.1.6", "1.3.6.1.4.1.57264.1.14"),
}
_FULCIO_OID = re.compile(r"1\.3\.6\.1\.4\.1\.57264\.1\.[0-9]+")
TLOG_MODES = ("required", "optional", "skip")


def _compile(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: invalid regular expression: {exc}", key=what) from exc


@dataclass(frozen=True)
class IdentityRule:
    """One accepted signer: an OIDC issuer and a certificate identity (SAN).

    Each of issuer and subject is given exactly once, either exactly or as a regular
    expression. Regular expressions are anchored: they must match the whole value
    (``re.fullmatch``), so ``^``/``$`` are optional.
    """

    issuer: str | None = None
    issuer_regexp: str | None = None
    subject: str | None = None
    subject_regexp: str | None = None
    _issuer_re: re.Pattern[str] | None = field(default=None, init=False, repr=False,
                                               compare=False)
    _subject_re: re.Pattern[str] | None = field(default=None, init=False, repr=False,
                                                compare=False)

    def __post_init__(self) -> None:
        if (self.issuer is None) == (self.issuer_regexp is None):
            raise ConfigError("an identity needs exactly one of issuer and issuerRegExp",
                              key="identities")
        if (self.subject is None) == (self.subject_regexp is None):
            raise ConfigError("an identity needs exactly one of subject and subjectRegExp",
                              key="identities")
        for value in (self.issuer, self.subject, self.issuer_regexp, self.subject_regexp):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError("identity fields must be non-empty strings",
                                  key="identities")
        object.__setattr__(self, "_issuer_re", _compile(self.issuer_regexp, "issuerRegExp"))
        object.__setattr__(self, "_subject_re", _compile(self.subject_regexp, "subjectRegExp"))

    def matches(self, sans: tuple[str, ...], issuer: str) -> str | None:
        """The first SAN this rule accepts for ``issuer``, or None."""
        if self.issuer is not None:
            if issuer != self.issuer:
                return None
        elif self._issuer_re is None or not self._issuer_re.fullmatch(issuer):
            return None
        for san in sans:
            if self.subject is not None:
                if san == self.subject:
                    return san
            elif self._subject_re is not None and self._subject_re.fullmatch(san):
                return san
        return None

    def as_dict(self) -> dict[str, str]:
        """The rule as plain data (for fingerprints and messages)."""
        return {k: v for k, v in (("issuer", self.issuer), ("issuerRegExp", self.issuer_regexp),
                                  ("subject", self.subject),
                                  ("subjectRegExp", self.subject_regexp)) if v is not None}


@dataclass(frozen=True)
class KeylessRequirements:
    """What a keyless signature must satisfy beyond cryptographic validity.

    * ``identities``: any one rule matching is enough; an empty tuple is a config error;
    * ``github_workflow``: optional exact claims (keys ``trigger``, ``sha``, ``name``,
      ``repository``, ``ref``, or a Fulcio extension OID ``1.3.6.1.4.1.57264.1.N``);
    * ``tlog``: ``required`` (at least one verified Rekor entry), ``optional`` (entries
      present are verified) or ``skip`` (entries ignored; time must come from RFC 3161);
    * ``min_timestamps``: how many verified times (SETs + RFC 3161) are needed, at least 1.
    """

    identities: tuple[IdentityRule, ...]
    github_workflow: Mapping[str, str] | None = None
    tlog: str = "required"
    min_timestamps: int = 1

    def __post_init__(self) -> None:
        identities = tuple(self.identities)
        if not identities:
            raise ConfigError("a keyless authority needs at least one identity",
                              key="identities")
        if not all(isinstance(i, IdentityRule) for i in identities):
            raise ConfigError("identities must be IdentityRule objects", key="identities")
        object.__setattr__(self, "identities", identities)
        if self.tlog not in TLOG_MODES:
            raise ConfigError(f"tlog must be one of {', '.join(TLOG_MODES)}", key="tlog")
        if not isinstance(self.min_timestamps, int) or self.min_timestamps < 1:
            raise ConfigError("min_timestamps must be at least 1", key="min_timestamps")
        if self.github_workflow is not None:
            claims = dict(self.github_workflow)
            for key, value in claims.items():
                if key not in GITHUB_WORKFLOW_CLAIMS and not _FULCIO_OID.fullmatch(key):
                    raise ConfigError(f"unknown GitHub workflow claim {key!r}",
                                      key="github_workflow")
                if not isinstance(value, str):
                    raise ConfigError(f"GitHub workflow claim {key!r} must be a string",
                                      key="github_workflow")
            object.__setattr__(self, "github_workflow", claims)

    @property
    def fingerprint(self) -> str:
        """A stable hash of the requirements."""
        doc = {"identities": [i.as_dict() for i in self.identities],
               "github_workflow": dict(sorted((self.github_workflow or {}).items())),
               "tlog": self.tlog, "min_timestamps": self.min_timestamps}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _ext_value(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _der_utf8(raw: bytes, what: str) -> str:
    try:
        return der.decode_string(der.parse(raw))
    except der.DERError:
        fail(f"certificate {what} extension is not a DER string", "identity")


def _raw_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"certificate {what} extension is not UTF-8", "identity")


def certificate_issuer(cert: x509.Certificate) -> str:
    """The OIDC issuer recorded by Fulcio (``.1.8``, falling back to ``.1.1``)."""
    raw = _ext_value(cert, OID_ISSUER_V2)
    if raw is not None:
        return _der_utf8(raw, "OIDC issuer")
    raw = _ext_value(cert, OID_ISSUER_V1)
    if raw is not None:
        return _raw_utf8(raw, "OIDC issuer")
    fail("certificate has no OIDC issuer extension", "identity")


def certificate_identities(cert: x509.Certificate) -> tuple[str, ...]:
    """Every identity SAN: URIs, emails and Fulcio ``OtherName`` usernames."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        fail("certificate has no Subject Alternative Name", "identity")
    except ValueError as exc:
        fail(f"certificate SAN is malformed: {exc}", "identity")
    out: list[str] = []
    out += san.get_values_for_type(x509.UniformResourceIdentifier)
    out += san.get_values_for_type(x509.RFC822Name)
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id.dotted_string == OID_OTHERNAME_SAN:
            out.append(_der_utf8(other.value, "OtherName SAN"))
    if not out:
        fail("certificate has no supported identity SAN", "identity")
    return tuple(out)


def _claim(cert: x509.Certificate, key: str) -> str | None:
    if key in GITHUB_WORKFLOW_CLAIMS:
        legacy, modern = GITHUB_WORKFLOW_CLAIMS[key]
        raw = _ext_value(cert, legacy)
        if raw is not None:
            return _raw_utf8(raw, key)
        if modern is not None and (raw := _ext_value(cert, modern)) is not None:
            return _der_utf8(raw, key)
        return None
    raw = _ext_value(cert, key)
    if raw is None:
        return None
    # .1.1 to .1.6 hold raw strings; .1.8 onwards hold DER UTF8Strings.
    if int(key.rsplit(".", 1)[1]) <= 6:
        return _raw_utf8(raw, key)
    return _der_utf8(raw, key)


def check_identity(cert: x509.Certificate, requirements: KeylessRequirements
                   ) -> tuple[str, str]:
    """Apply the identity policy; return the matching ``(identity, issuer)``."""
    issuer = certificate_issuer(cert)
    sans = certificate_identities(cert)
    for rule in requirements.identities:
        matched = rule.matches(sans, issuer)
        if matched is not None:
            break
    else:
        fail(f"certificate identity {', '.join(sans)} (issuer {issuer}) matches no allowed "
             "identity", "identity")
    for key, want in (requirements.github_workflow or {}).items():
        got = _claim(cert, key)
        if got != want:
            fail(f"certificate claim {key} is {got!r}, expected {want!r}", "identity")
    return matched, issuer
