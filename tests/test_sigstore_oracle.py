"""sigstore-python as an independent oracle for sigil's offline sigstore verifier.

sigstore-python (the reference Python client) runs **fully offline** here: its ``Verifier`` is
built from the case's ``trusted_root.json`` file (``sigstore.models.TrustedRoot.from_file``),
never from TUF, and every socket connection or name lookup during these tests fails the test.

1. Every sigstore-conformance ``bundle-verify`` case (``tests/assets/sigstore/``, loaded as
   ``tests/test_sigstore_conformance.py`` does) that sigstore-python can verify: all keyless
   ones. The three cases with a ``key.pub`` are left out: sigstore-python's ``Verifier`` has
   no managed-key API. On each, sigil and sigstore-python must agree (both pass, or both
   reject), except two documented disagreements where the conformance suite says *pass*,
   sigil passes and sigstore-python rejects. They are pinned in :data:`KNOWN_DISAGREEMENTS`,
   so the day sigstore-python changes its mind the pin fails and must be removed.
   Note that sigstore-python rejects every ``intoto`` log entry outright, so for the
   ``intoto-*_fail`` cases the two agree that they fail but not necessarily why.
2. The private test sigstore of ``tests/support/testsigstore.py`` (used by the keyless
   end-to-end tests): sigstore-python accepts its good bundles and rejects each broken
   variant, exactly as sigil does, which shows those artifacts are made to the spec and not
   to sigil's reading of it.
3. Where sigstore-python is laxer than the sigstore client spec (log times in the future,
   trusted-root ``validFor`` of CAs and log keys), sigil's stricter answer is asserted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from sigstore.errors import Error as SigstoreError
from sigstore.models import Bundle as SPBundle
from sigstore.models import TrustedRoot as SPTrustedRoot
from sigstore.verify import Verifier as SPVerifier
from sigstore.verify import policy as sp_policy

from sigil.errors import ConfigError, VerificationError
from sigil.verify.sigstore import IdentityRule, KeylessRequirements, TrustedRoot, verify_bundle
from tests.support.testsigstore import (
    DEFAULT_ISSUER,
    TestRekor,
    TestSigstore,
    cosign_bundle,
    cosign_sign_statement,
    dsse_envelope,
    message_bundle,
    rfc3339,
    simple_signing_payload,
)
from tests.test_sigstore_conformance import (
    CASES,
    CASES_DIR,
    DEFAULT_IDENTITY,
    PRODUCTION,
    _text,
    run_case,
)
from tests.test_sigstore_conformance import DEFAULT_ISSUER as CONFORMANCE_ISSUER

# case -> what sigstore-python says when it rejects a case the conformance suite passes.
KNOWN_DISAGREEMENTS = {
    # sigstore-python takes a log's integrated time only from dsse/hashedrekord 0.0.1
    # entries, so it cannot verify an intoto 0.0.2 entry at all.
    "intoto-with-custom-trust-root":
        "Integrated time only supported for dsse/hashedrekord 0.0.1 types",
    # protobuf-specs TimeRange ends are inclusive; sigstore-python compares a TSA time with
    # `gen_time < validFor.end` (exclusive), so a token at exactly the end is not counted.
    "trust-root-tsa-validity-end-inclusive": "not enough sources of verified time",
}
ORACLE_CASES = [c for c in CASES if not (CASES_DIR / c / "key.pub").exists()]
# What sigstore-python raises for a rejected bundle or trusted root (pydantic's
# ValidationError, for a malformed one, is a ValueError).
SP_REJECTS = (SigstoreError, ValueError)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network use (a TUF refresh, a Rekor lookup) fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network use during an offline verification: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def sp_verify(bundle: bytes, root_path: Path, artifact: bytes, identity: str,
              issuer: str) -> None:
    """Verify like the sigstore-python CLI (``sigstore verify identity --offline
    --trust-config``): a DSSE bundle must carry an in-toto statement with the artifact's
    sha256 as a subject; a message signature must cover the artifact. Raises on rejection."""
    root = SPTrustedRoot.from_file(str(root_path))
    verifier = SPVerifier(trusted_root=root)
    parsed = SPBundle.from_json(bundle)
    identity_policy = sp_policy.Identity(identity=identity, issuer=issuer)
    if "dsseEnvelope" in json.loads(bundle):
        payload_type, payload = verifier.verify_dsse(parsed, identity_policy)
        if payload_type != "application/vnd.in-toto+json":
            raise SigstoreError(f"unexpected DSSE payload type {payload_type}")
        want = hashlib.sha256(artifact).hexdigest()
        if not any(s.get("digest", {}).get("sha256") == want
                   for s in json.loads(payload).get("subject", [])):
            raise SigstoreError("artifact is not a subject of the statement")
    else:
        verifier.verify_artifact(artifact, parsed, identity_policy)


def sp_case(case: str) -> None:
    d = CASES_DIR / case
    artifact = (d / "artifact" if (d / "artifact").exists() else CASES_DIR / "a.txt")
    root = d / "trusted_root.json" if (d / "trusted_root.json").exists() else PRODUCTION
    sp_verify((d / "bundle.sigstore.json").read_bytes(), root, artifact.read_bytes(),
              _text(d / "identity", DEFAULT_IDENTITY), _text(d / "issuer", CONFORMANCE_ISSUER))


def outcome(fn: Any, *args: Any, errors: tuple[type[BaseException], ...]) -> str | None:
    """None when ``fn`` accepts, else the error text."""
    try:
        fn(*args)
    except errors as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def test_oracle_case_selection() -> None:
    """Every keyless case is compared; only the managed-key cases are left out."""
    left_out = sorted(set(CASES) - set(ORACLE_CASES))
    assert left_out == ["managed-key-and-trusted-root", "managed-key-happy-path",
                        "managed-key-wrong-key_fail"]
    assert set(KNOWN_DISAGREEMENTS) <= set(ORACLE_CASES)
    assert len(ORACLE_CASES) == len(CASES) - 3


@pytest.mark.parametrize("case", [c for c in ORACLE_CASES if c not in KNOWN_DISAGREEMENTS])
def test_sigil_agrees_with_sigstore_python(case: str) -> None:
    sigil = outcome(run_case, case, errors=(VerificationError, ConfigError))
    oracle = outcome(sp_case, case, errors=SP_REJECTS)
    expected_pass = not case.endswith("_fail")
    assert (sigil is None) == expected_pass, f"sigil: {sigil}"
    assert (oracle is None) == expected_pass, f"sigstore-python: {oracle}"


@pytest.mark.parametrize("case", sorted(KNOWN_DISAGREEMENTS))
def test_known_disagreement_is_pinned(case: str) -> None:
    """The conformance suite says pass; sigil passes; sigstore-python rejects, for the known
    reason. If sigstore-python starts accepting the case, move it back to the agreeing set."""
    assert not case.endswith("_fail")
    assert outcome(run_case, case, errors=(VerificationError, ConfigError)) is None
    oracle = outcome(sp_case, case, errors=SP_REJECTS)
    assert oracle is not None, "sigstore-python now accepts it: remove the pin"
    assert KNOWN_DISAGREEMENTS[case] in oracle, oracle


# -- the private test sigstore ------------------------------------------------------------

IDENTITY = "https://git.test/acme/app/.github/workflows/release.yml@refs/tags/v1.0.0"
VARIANTS = ("good", "wrong-identity", "wrong-issuer", "cert-expired-before-log-time",
            "set-from-another-log", "set-signed-by-unknown-key", "signature-for-another-digest",
            "tlog-body-for-another-signature")


def made_bundle(ts: TestSigstore, form: str, variant: str, artifact: bytes) -> bytes:
    """A bundle for ``artifact`` (a DSSE cosign-sign statement naming its sha256, or a message
    signature over it), broken as ``variant`` says."""
    identity, issuer, not_before, when = IDENTITY, DEFAULT_ISSUER, None, None
    rekor: TestRekor = ts.rekor
    forger = None
    signed = artifact
    if variant == "wrong-identity":
        identity = IDENTITY.replace("/acme/", "/evil/")
    elif variant == "wrong-issuer":
        issuer = "https://accounts.evil.test"
    elif variant == "cert-expired-before-log-time":
        not_before = ts.now - dt.timedelta(minutes=30)
        when = int((ts.now - dt.timedelta(seconds=5)).timestamp())
    elif variant == "set-from-another-log":
        rekor = TestRekor("https://rekor.elsewhere.test")
    elif variant == "set-signed-by-unknown-key":
        forger = TestRekor(ts.rekor.base_url)
    elif variant == "signature-for-another-digest":
        signed = artifact + b" (another image)"
    leaf = ts.issue(identity, issuer, not_before=not_before)
    other_sig = variant == "tlog-body-for-another-signature"
    if form == "dsse":
        statement = cosign_sign_statement("registry.test/app",
                                          hashlib.sha256(signed).hexdigest())
        return cosign_bundle(leaf, statement, rekor, integrated_time=when, signer=forger,
                             logged_envelope=dsse_envelope(leaf, statement) if other_sig
                             else None)
    return message_bundle(leaf, signed, rekor, integrated_time=when, signer=forger,
                          logged_signature=leaf.sign(signed) if other_sig else None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["dsse", "message"])
def test_test_sigstore_artifacts_agree(tmp_path: Path, form: str, variant: str) -> None:
    ts = TestSigstore()
    root_path = ts.write_trusted_root(tmp_path / "trusted_root.json")
    artifact = simple_signing_payload("registry.test/app", "sha256:" + "ab" * 32)
    bundle = made_bundle(ts, form, variant, artifact)

    def sigil(b: bytes) -> None:
        rule = IdentityRule(issuer=DEFAULT_ISSUER, subject_regexp=r"https://git\.test/acme/.+")
        verify_bundle(b, trusted_root=TrustedRoot.load(root_path),
                      keyless=KeylessRequirements((rule,)),
                      artifact_digest=hashlib.sha256(artifact).digest())

    sigil_says = outcome(sigil, bundle, errors=(VerificationError,))
    oracle_says = outcome(sp_verify, bundle, root_path, artifact, IDENTITY, DEFAULT_ISSUER,
                          errors=SP_REJECTS)
    if variant == "good":
        assert sigil_says is None and oracle_says is None, (sigil_says, oracle_says)
    else:
        assert sigil_says is not None and oracle_says is not None, (sigil_says, oracle_says)



@pytest.mark.parametrize(("name", "reason"), [
    ("integrated-time-in-the-future", "tlog"),
    ("fulcio-ca-validity-ended", "chain"),
    ("rekor-key-validity-ended", "tlog"),
    ("ct-log-key-validity-ended", "sct"),
])
def test_sigil_is_stricter_than_sigstore_python(tmp_path: Path, name: str, reason: str) -> None:
    """Where sigstore-python (4.5) is lax, sigil follows the sigstore client spec: a log time
    in the future is refused, and a CA, Rekor key or CT log key counts only inside its trusted
    root ``validFor``. (sigstore-python accepts these; only sigil's answer is asserted.)"""
    ts = TestSigstore()
    doc = ts.trusted_root()
    ended = {"start": rfc3339(ts.start), "end": rfc3339(ts.now - dt.timedelta(hours=1))}
    not_before = None
    if name == "integrated-time-in-the-future":
        not_before = ts.now + dt.timedelta(hours=1)
    elif name == "fulcio-ca-validity-ended":
        doc["certificateAuthorities"][0]["validFor"] = ended
    elif name == "rekor-key-validity-ended":
        doc["tlogs"][0]["publicKey"]["validFor"] = ended
    else:
        doc["ctlogs"][0]["publicKey"]["validFor"] = ended
    root_path = tmp_path / "trusted_root.json"
    root_path.write_text(json.dumps(doc))
    artifact = b"an artifact"
    bundle = message_bundle(ts.issue(IDENTITY, not_before=not_before), artifact, ts.rekor)
    rule = IdentityRule(issuer=DEFAULT_ISSUER, subject=IDENTITY)
    with pytest.raises(VerificationError) as info:
        verify_bundle(bundle, trusted_root=TrustedRoot.load(root_path),
                      keyless=KeylessRequirements((rule,)), artifact=artifact)
    assert info.value.reason == reason, info.value
