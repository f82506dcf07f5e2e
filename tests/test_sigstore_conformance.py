"""sigstore-conformance ``bundle-verify`` cases (sigstore/sigstore-conformance @ a73de497).

Every case directory holds ``bundle.sigstore.json`` and optionally ``artifact`` (else
``../a.txt``), ``identity``, ``issuer``, ``key.pub`` (verify with the key instead of keyless)
and ``trusted_root.json`` (else the production root). ``*_fail`` cases must fail, for the
reason their upstream README gives where it maps onto one of sigil's reasons; all others
must pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sigil.errors import ConfigError, VerificationError
from sigil.verify.authority import IN_TOTO, MESSAGE_DIGEST
from sigil.verify.sigstore import (
    IdentityRule,
    KeylessRequirements,
    TrustedRoot,
    load_public_key,
    verify_bundle,
)

ASSETS = Path(__file__).parent / "assets" / "sigstore"
CASES_DIR = ASSETS / "bundle-verify"
PRODUCTION = ASSETS / "trusted_root" / "production.json"
DEFAULT_IDENTITY = ("https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-"
                    "beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main")
DEFAULT_ISSUER = "https://token.actions.githubusercontent.com"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())

# Why each failing case must fail, as sigil reasons (from the upstream READMEs). "config"
# means the trusted root itself is rejected when loaded.
EXPECTED_REASONS: dict[str, set[str]] = {
    "bundle-empty-certificate-chain_fail": {"malformed"},
    "bundle-from-wrong-instance_fail": {"tlog"},          # staging log, production root
    "bundle-invalid-base64-signature_fail": {"malformed"},
    "bundle-malformed-json_fail": {"malformed"},
    "bundle-negative-log-index_fail": {"malformed"},
    "bundle-unknown-version_fail": {"malformed"},
    "bundle-with-root-cert_fail": {"chain"},
    "checkpoint-bad-keyhint_fail": {"tlog"},
    "checkpoint-wrong-roothash_fail": {"tlog"},
    "dsse-invalid-sig_fail": {"signature"},
    "dsse-mismatch-envelope_fail": {"tlog"},               # envelope is not the logged one
    "dsse-mismatch-sig_fail": {"tlog"},                    # signature is not the logged one
    "inclusion-proof-corrupted-hash_fail": {"tlog"},
    "incorrect-public-key_fail": {"tlog"},
    "integrated-time-in-future_fail": {"expired"},         # SET time outside cert validity
    "intoto-expired-certificate_fail": {"expired", "chain"},
    "intoto-log-entry-mismatch_fail": {"tlog"},
    "intoto-missing-inclusion-proof_fail": {"tlog"},
    "intoto-set-outside-signing-cert-validity_fail": {"expired"},
    "intoto-tsa-timestamp-outside-cert-validity_fail": {"expired"},
    "invalid-checkpoint-signature_fail": {"tlog"},
    "invalid-ct-key_fail": {"sct"},
    "invalid-inclusion-proof_fail": {"tlog"},
    "managed-key-no-key_fail": {"no_key"},
    "managed-key-wrong-key_fail": {"malformed", "signature"},   # the key.pub is corrupted
    "message-digest-mismatch_fail": {"digest_mismatch"},
    "rekor2-checkpoint-missing-log-signature_fail": {"tlog"},
    "rekor2-checkpoint-missing-origin_fail": {"tlog"},
    "rekor2-checkpoint-missing-root-hash_fail": {"tlog"},
    "rekor2-checkpoint-missing-size_fail": {"tlog"},
    "rekor2-checkpoint-no-matching-signature_fail": {"tlog"},
    "rekor2-dsse-invalid-sig_fail": {"signature"},
    "rekor2-dsse-mismatch-envelope_fail": {"tlog"},
    "rekor2-dsse-mismatch-sig_fail": {"tlog"},
    "rekor2-no-inclusion-proof_fail": {"tlog"},
    "rekor2-no-timestamp_fail": {"timestamp"},
    "rekor2-timestamp-outside-trust-root-tsa-validity_fail": {"timestamp"},
    "rekor2-timestamp-outside-tsa-cert-validity_fail": {"timestamp"},
    "rekor2-timestamp-payload-mismatch_fail": {"timestamp"},
    "rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail": {"timestamp"},
    "rekor2-timestamp-untrusted-tsa-without-embedded-cert_fail": {"timestamp"},
    "rekor2-timestamp-with-incorrect-time_fail": {"expired"},
    "set-invalid-signature_fail": {"tlog"},
    "signature-mismatch_fail": {"signature"},
    "trust-root-tlog-missing-validity-start_fail": {"config"},
    "wrong-hashedrekord-artifact_fail": {"tlog"},
    "wrong-hashedrekord-cert-and-sig_fail": {"tlog"},
    "wrong-hashedrekord-entry_fail": {"tlog"},
    "wrong-material_fail": {"digest_mismatch"},
}


def _text(path: Path, default: str) -> str:
    return path.read_text().strip() if path.exists() else default


def run_case(name: str, *, by_digest: bool = False):
    """Verify one case the way its directory says; returns the VerifiedPayload."""
    d = CASES_DIR / name
    artifact_path = d / "artifact" if (d / "artifact").exists() else CASES_DIR / "a.txt"
    artifact = artifact_path.read_bytes()
    root = TrustedRoot.load(d / "trusted_root.json" if (d / "trusted_root.json").exists()
                            else PRODUCTION)
    kwargs: dict[str, object] = {}
    if (d / "key.pub").exists():
        kwargs["public_key"] = load_public_key((d / "key.pub").read_bytes())
    else:
        rule = IdentityRule(issuer=_text(d / "issuer", DEFAULT_ISSUER),
                            subject=_text(d / "identity", DEFAULT_IDENTITY))
        kwargs["keyless"] = KeylessRequirements((rule,))
    if by_digest:
        import hashlib
        kwargs["artifact_digest"] = hashlib.sha256(artifact).digest()
    else:
        kwargs["artifact"] = artifact
    return verify_bundle((d / "bundle.sigstore.json").read_bytes(), trusted_root=root, **kwargs)


def test_all_cases_present() -> None:
    """The copied corpus is complete (70 cases at a73de497) and every _fail case is mapped."""
    assert len(CASES) == 70
    failing = {c for c in CASES if c.endswith("_fail")}
    assert failing == set(EXPECTED_REASONS)


@pytest.mark.parametrize("case", CASES)
def test_bundle_verify_case(case: str) -> None:
    if case.endswith("_fail"):
        with pytest.raises((VerificationError, ConfigError)) as info:
            run_case(case)
        reason = info.value.reason if isinstance(info.value, VerificationError) else "config"
        assert reason in EXPECTED_REASONS[case], f"{case}: failed for {reason}: {info.value}"
        return
    result = run_case(case)
    assert result.payload_type in (MESSAGE_DIGEST, IN_TOTO)
    checks = " | ".join(result.signer.checks)
    assert "signature over" in checks
    assert "tlog body" in checks
    if (CASES_DIR / case / "key.pub").exists():
        assert result.signer.kind == "key"
    else:
        assert result.signer.kind == "keyless"
        assert result.signer.identity == _text(CASES_DIR / case / "identity", DEFAULT_IDENTITY)
        assert "fulcio chain to" in checks and "SCT from log" in checks
    if result.payload_type == MESSAGE_DIGEST:
        assert result.message_digest is not None and result.payload is None
    else:
        assert result.payload and result.message_digest is None


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("_fail")])
def test_passing_cases_by_digest(case: str) -> None:
    """The same cases verify when only the artifact's sha256 is known (the mirror's case)."""
    result = run_case(case, by_digest=True)
    assert result.signer.checks


@pytest.mark.parametrize("case", ["happy-path-v0.3", "rekor2-happy-path"])
def test_wrong_identity_fails(case: str) -> None:
    d = CASES_DIR / case
    root = TrustedRoot.load(d / "trusted_root.json" if (d / "trusted_root.json").exists()
                            else PRODUCTION)
    artifact = (CASES_DIR / "a.txt").read_bytes()
    bundle = (d / "bundle.sigstore.json").read_bytes()
    for rule in (IdentityRule(issuer=DEFAULT_ISSUER, subject=DEFAULT_IDENTITY + "x"),
                 IdentityRule(issuer="https://accounts.google.com", subject=DEFAULT_IDENTITY),
                 IdentityRule(issuer=DEFAULT_ISSUER, subject_regexp=r"https://github\.com/acme/.*"),
                 # anchored: a regexp matching only a substring is not enough
                 IdentityRule(issuer=DEFAULT_ISSUER, subject_regexp=r"extremely-dangerous")):
        with pytest.raises(VerificationError) as info:
            verify_bundle(bundle, trusted_root=root, keyless=KeylessRequirements((rule,)),
                          artifact=artifact)
        assert info.value.reason == "identity"
