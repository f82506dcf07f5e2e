"""Keyless authorities from the policy file, through the sigstore module, on real signatures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_verify_support import ASSETS, BUNDLE, MemorySource, Signer, push_sig_tag, write_policy

from sigil.oci.digest import Digest
from sigil.oci.manifest import OCI_MANIFEST, Manifest
from sigil.verify.authority import IN_TOTO
from sigil.verify.engine import Verifier
from sigil.verify.policy import Policy

LEGACY = json.loads((ASSETS / "legacy-keyless-sig.json").read_text())
LEGACY_DIGEST = Digest.parse(LEGACY["image"]["digest"])
ATTESTATION_DIGEST = Digest.parse(
    "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4")


def subject(digest: Digest) -> Manifest:
    """A stand-in manifest carrying the digest the real signature names (the engine trusts
    the digest the mirror computed; these tests are about signatures, not manifest bytes)."""
    return Manifest(raw=b"{}", digest=digest, media_type=OCI_MANIFEST)


def keyless_policy(tmp_path: Path, *, root: str, issuer: str, subject_rule: dict[str, str],
                   extra_authorities: list[dict[str, Any]] | None = None,
                   keys: dict[str, Signer] | None = None, **extra: Any) -> Policy:
    shutil.copy(ASSETS / root, tmp_path / root)
    return write_policy(tmp_path, {"policies": [{
        "name": "keyless", "images": ["registry.test/**"],
        "authorities": [{"name": "fulcio", "keyless": {
            "trusted_root": root, "identities": [{"issuer": issuer, **subject_rule}]}},
            *(extra_authorities or [])],
        **extra}]}, keys)


def legacy_source() -> MemorySource:
    src = MemorySource()
    layer = LEGACY["layerDescriptor"]
    payload = (ASSETS / "legacy-keyless.payload.json").read_bytes()
    assert Digest.of(payload) == Digest.parse(layer["digest"])
    src.artifact("app", [(layer["mediaType"], payload, layer["annotations"])],
                 tags=(LEGACY_DIGEST.tag_form + ".sig",))
    return src


async def test_real_legacy_keyless_signature_passes(tmp_path: Path) -> None:
    policy = keyless_policy(tmp_path, root="trusted_root_production.json",
                            issuer="https://accounts.google.com",
                            subject_rule={"subjectRegExp": r"cosign@cosign-test-\d+\.iam\..+"})
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", subject(LEGACY_DIGEST),
                                              legacy_source())
    assert verdict.allowed, verdict.message + "\n" + "\n".join(verdict.checks)


async def test_real_legacy_keyless_signature_wrong_identity(tmp_path: Path) -> None:
    policy = keyless_policy(tmp_path, root="trusted_root_production.json",
                            issuer="https://accounts.google.com",
                            subject_rule={"subject": "someone@example.com"})
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", subject(LEGACY_DIGEST),
                                              legacy_source())
    assert not verdict.allowed and verdict.reason == "identity", verdict.message


async def test_real_legacy_keyless_signature_replayed_on_other_digest(tmp_path: Path) -> None:
    policy = keyless_policy(tmp_path, root="trusted_root_production.json",
                            issuer="https://accounts.google.com",
                            subject_rule={"subjectRegExp": ".*"})
    src = legacy_source()
    other = Digest.of(b"another image")
    src.manifests[("app", other.tag_form + ".sig")] = src.manifests[
        ("app", LEGACY_DIGEST.tag_form + ".sig")]
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", subject(other), src)
    assert not verdict.allowed and verdict.reason == "digest_mismatch", verdict.message


async def test_real_cosign_attestation_bundle_as_referrer(tmp_path: Path) -> None:
    """The real cosign v0.3 DSSE bundle (keyless, cody@soyland.com) as an attestation referrer,
    plus a keyed signature made here: both authorities of one policy."""
    signer = Signer()
    policy = keyless_policy(
        tmp_path, root="trusted_root_pgi.json", issuer="https://github.com/login/oauth",
        subject_rule={"subject": "cody@soyland.com"},
        extra_authorities=[{"name": "release-key", "key": {"path": "k.pub"}}],
        keys={"k": signer},
        attestations=[{"name": "custom", "predicateType":
                       "https://cosign.sigstore.dev/attestation/v1",
                       "conditions": [{"key": "predicate.Data", "operator": "Matches",
                                       "value": '.*"foo": "bar".*\\s*'}]}])
    image = subject(ATTESTATION_DIGEST)
    src = MemorySource()
    src.artifact("app", [(BUNDLE, (ASSETS / "oci-attestation.sigstore.json").read_bytes(), None)],
                 subject={"mediaType": OCI_MANIFEST, "digest": str(ATTESTATION_DIGEST),
                          "size": 2}, artifact_type=BUNDLE)
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", image, src)
    assert not verdict.allowed and verdict.reason == "no_signature"  # an attestation only
    push_sig_tag(src, "app", image, signer)
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", image, src)
    assert verdict.allowed, verdict.message + "\n" + "\n".join(verdict.checks)


def test_keyless_authority_verifies_real_bundle(tmp_path: Path) -> None:
    policy = keyless_policy(tmp_path, root="trusted_root_pgi.json",
                            issuer="https://github.com/login/oauth",
                            subject_rule={"subject": "cody@soyland.com"})
    authority = policy.rules[0].authorities[0].authority
    got = authority.verify_bundle((ASSETS / "oci-attestation.sigstore.json").read_bytes())
    assert got.payload_type == IN_TOTO and got.signer.identity == "cody@soyland.com"


def test_keyless_fingerprint_tracks_identities(tmp_path: Path) -> None:
    a = keyless_policy(tmp_path, root="trusted_root_pgi.json", issuer="https://x",
                       subject_rule={"subject": "a@example.com"})
    b = keyless_policy(tmp_path, root="trusted_root_pgi.json", issuer="https://x",
                       subject_rule={"subject": "b@example.com"})
    assert a.fingerprint != b.fingerprint


# --- keyed authorities with a transparency log (Rekor SET annotation) -----------------------------

def fake_rekor(tmp_path: Path) -> tuple[Signer, bytes]:
    """A Rekor log key made here and a trusted_root.json naming it (no real log involved)."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    log = Signer()
    spki = log.key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    log_id = hashlib.sha256(spki).digest()
    root = {"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{"baseUrl": "https://rekor.test", "hashAlgorithm": "SHA2_256",
                       "publicKey": {"rawBytes": base64.b64encode(spki).decode(),
                                     "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                                     "validFor": {"start": "2020-01-01T00:00:00Z"}},
                       "logId": {"keyId": base64.b64encode(log_id).decode()}}]}
    (tmp_path / "rekor-root.json").write_text(json.dumps(root))
    return log, log_id


def rekor_annotation(log: Signer, log_id: bytes, signer: Signer, payload: bytes,
                     signature: bytes) -> str:
    """A cosign `dev.sigstore.cosign/bundle` for a hashedrekord entry of a keyed .sig layer."""
    import base64
    import hashlib

    body = {"apiVersion": "0.0.1", "kind": "hashedrekord", "spec": {
        "data": {"hash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}},
        "signature": {"content": base64.b64encode(signature).decode(),
                      "publicKey": {"content": base64.b64encode(signer.pem().encode()).decode()}}}}
    body_b64 = base64.b64encode(json.dumps(body).encode()).decode()
    integrated, index = 1_700_000_000, 42
    signed = json.dumps({"body": body_b64, "integratedTime": integrated,
                         "logID": log_id.hex(), "logIndex": index},
                        sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"SignedEntryTimestamp": base64.b64encode(log.sign(signed)).decode(),
                       "Payload": {"body": body_b64, "integratedTime": integrated,
                                   "logIndex": index, "logID": log_id.hex()}})


@pytest.mark.parametrize("case", ["valid", "missing", "other-signature", "forged-set"])
async def test_keyed_signature_with_tlog_required(tmp_path: Path, case: str) -> None:
    from test_verify_support import SIMPLE, b64, simple_signing

    signer = Signer()
    log, log_id = fake_rekor(tmp_path)
    (tmp_path / "k.pub").write_text(signer.pem())
    policy = write_policy(tmp_path, {"policies": [{
        "name": "logged", "images": ["registry.test/**"],
        "authorities": [{"name": "k", "key": {"path": "k.pub"}, "tlog": "required",
                         "trusted_root": "rekor-root.json"}]}]})
    src = MemorySource()
    image = src.image("app")
    payload = simple_signing(image.digest)
    signature = signer.sign(payload)
    ann = {"dev.cosignproject.cosign/signature": b64(signature)}
    if case == "valid":
        ann["dev.sigstore.cosign/bundle"] = rekor_annotation(log, log_id, signer, payload,
                                                             signature)
    elif case == "other-signature":  # a genuine log entry, for another signature
        ann["dev.sigstore.cosign/bundle"] = rekor_annotation(log, log_id, signer, payload,
                                                             signer.sign(payload + b" "))
    elif case == "forged-set":
        ann["dev.sigstore.cosign/bundle"] = rekor_annotation(Signer(), log_id, signer, payload,
                                                             signature)
    src.artifact("app", [(SIMPLE, payload, ann)], tags=(image.digest.tag_form + ".sig",))
    verdict = await Verifier(policy).evaluate("registry.test/app", "app", image, src)
    if case == "valid":
        assert verdict.allowed, verdict.message + "\n" + "\n".join(verdict.checks)
        assert any("Rekor SET verified" in c for c in verdict.checks)
    else:
        assert not verdict.allowed and verdict.reason == "tlog", verdict.message
