"""The policy engine end to end over an in-memory registry: real manifests, real signatures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_verify_support import (
    BUNDLE,
    INTOTO,
    SIG_ARTIFACT,
    SLSA_V02,
    SLSA_V1,
    MemorySource,
    Signer,
    b64,
    canon,
    descriptor_of,
    envelope,
    key_policy,
    provenance,
    push_att_tag,
    push_dhi_attestation,
    push_sig_referrer,
    push_sig_tag,
    sig_layer,
    statement,
    write_policy,
)

from sigil import metrics
from sigil.errors import UpstreamError
from sigil.oci.digest import Digest
from sigil.oci.manifest import Manifest
from sigil.verify.engine import Verdict, Verifier
from sigil.verify.policy import Policy

REPO = "app"
IMAGE = "registry.test/app"
PROVENANCE = [{"name": "provenance", "predicateType": SLSA_V02,
               "conditions": [{"key": "predicate.builder.id", "operator": "Equals",
                               "value": "https://github.com/docker/buildkit@v1"}]}]


async def run(policy: Policy, src: MemorySource, m: Manifest, *, image: str = IMAGE,
              **kw: Any) -> Verdict:
    verdict = await Verifier(policy).evaluate(image, REPO, m, src, **kw)
    json.dumps(verdict.to_json())  # always serializable
    return verdict


def related(verdict: Verdict) -> set[Digest]:
    return {d for _, d in verdict.related}


# --- legacy cosign ---------------------------------------------------------------------------

async def test_legacy_sig_tag_passes(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO, tag="1.0")
    sig = push_sig_tag(src, REPO, image, signer)
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert verdict.allowed and verdict.reason == "ok", verdict.message
    assert verdict.policies[0].passed and 'signed by authority "dhi-key"' in verdict.policies[0].reasons[0]
    assert {sig.digest, *sig.blob_digests()} <= related(verdict)
    assert any("signature ok" in c for c in verdict.checks)
    assert verdict.message == 'allowed by policy "hardened-images"'


async def test_unsigned_is_denied(tmp_path: Path) -> None:
    src = MemorySource()
    image = src.image(REPO)
    verdict = await run(key_policy(tmp_path, Signer()), src, image)
    assert not verdict.allowed and verdict.reason == "no_signature"
    assert verdict.message == ('policy "hardened-images": no valid signature from authority '
                               '"dhi-key" (no signatures found)')
    assert verdict.related == [] and verdict.cacheable


async def test_wrong_key_is_denied(tmp_path: Path) -> None:
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, Signer())
    verdict = await run(key_policy(tmp_path, Signer()), src, image)
    assert not verdict.allowed and verdict.reason == "wrong_key"
    assert verdict.message == ('policy "hardened-images": no valid signature from authority '
                               '"dhi-key" (1 signature checked: wrong key)')


async def test_tampered_signature_is_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    payload, ann = sig_layer(signer, image.digest)[1:]
    raw = bytearray(__import__("base64").b64decode(ann["dev.cosignproject.cosign/signature"]))
    raw[-1] ^= 1
    src.artifact(REPO, [("application/vnd.dev.cosign.simplesigning.v1+json", payload,
                         {"dev.cosignproject.cosign/signature": b64(bytes(raw))})],
                 tags=(image.digest.tag_form + ".sig",))
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert not verdict.allowed and verdict.reason == "wrong_key"


async def test_replayed_signature_of_another_image_is_denied(tmp_path: Path) -> None:
    """A valid signature whose payload names another digest, attached to this image."""
    signer = Signer()
    src = MemorySource()
    image, other = src.image(REPO, "a"), src.image(REPO, "b")
    push_sig_tag(src, REPO, image, signer, payload_digest=other.digest)
    push_sig_referrer(src, REPO, image, Signer())
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert not verdict.allowed and verdict.reason == "digest_mismatch"
    assert verdict.message == (
        'policy "hardened-images": no valid signature from authority "dhi-key" '
        "(2 signatures checked: payload digest mismatch; wrong key)")


async def test_att_tag_passes_and_condition_failure_denies(tmp_path: Path) -> None:
    signer = Signer("p384")
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, signer)
    att = push_att_tag(src, REPO, image, signer, statement(image.digest))
    policy = key_policy(tmp_path, signer, attestations=PROVENANCE)
    verdict = await run(policy, src, image)
    assert verdict.allowed, verdict.message
    assert att.digest in related(verdict)
    assert any('attestation "provenance"' in c and "conditions pass" in c for c in verdict.checks)

    src2 = MemorySource()
    image2 = src2.image(REPO)
    push_sig_tag(src2, REPO, image2, signer)
    push_att_tag(src2, REPO, image2, signer,
                 statement(image2.digest, predicate=provenance("https://evil.example/builder")))
    verdict = await run(policy, src2, image2)
    assert not verdict.allowed and verdict.reason == "condition_failed"
    assert "evil.example" in verdict.message


async def test_attestation_signed_by_another_key_is_missing(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, signer)
    push_att_tag(src, REPO, image, Signer(), statement(image.digest))
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, image)
    assert not verdict.allowed and verdict.reason == "attestation_missing"


async def test_attestation_about_another_image_is_missing(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image, other = src.image(REPO, "a"), src.image(REPO, "b")
    push_sig_tag(src, REPO, image, signer)
    push_att_tag(src, REPO, image, signer, statement(other.digest))
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, image)
    assert not verdict.allowed and verdict.reason == "attestation_missing"
    assert "name another subject" in verdict.message


async def test_annotation_claiming_a_predicate_type_is_not_trusted(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, signer)
    push_att_tag(src, REPO, image, signer,
                 statement(image.digest, predicate_type="https://example.com/not-provenance"),
                 annotations={"predicateType": SLSA_V02, "in-toto.io/predicate-type": SLSA_V02})
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, image)
    assert not verdict.allowed and verdict.reason == "attestation_missing"
    assert "https://example.com/not-provenance" in verdict.message


# --- Docker Hardened Images shape --------------------------------------------------------------

def dhi_image(src: MemorySource, signer: Signer, *, att_signer: Signer | None = None,
              statement_for: Any = None, predicate: Any = None,
              sign_platforms: bool = False) -> tuple[Manifest, list[Manifest], list[Manifest]]:
    """An index of two platform images; the index signed by a simple-signing referrer; each
    platform with a SLSA v0.2 provenance referrer signed by its own signature referrer."""
    platforms = [src.image(REPO, f"linux/{arch}") for arch in ("amd64", "arm64")]
    index = src.index(REPO, [descriptor_of(p, platform={"os": "linux", "architecture": a})
                             for p, a in zip(platforms, ("amd64", "arm64"))], tag="3.13")
    push_sig_referrer(src, REPO, index, signer)
    atts = []
    for p in platforms:
        if sign_platforms:
            push_sig_referrer(src, REPO, p, signer)
        target = statement_for(p) if statement_for else p.digest
        atts.append(push_dhi_attestation(
            src, REPO, p, att_signer or signer,
            statement(target, predicate=predicate or provenance())))
    return index, platforms, atts


@pytest.mark.parametrize("referrers_api", [True, False])
async def test_dhi_index_with_signed_provenance_referrers_passes(
        tmp_path: Path, referrers_api: bool) -> None:
    signer = Signer()
    src = MemorySource(referrers_api=referrers_api)
    index, platforms, atts = dhi_image(src, signer)
    if not referrers_api:
        add_tag_schema(src)
    verdict = await run(key_policy(tmp_path, signer, images="registry.test/**",
                                   attestations=PROVENANCE), src, index)
    assert verdict.allowed, verdict.message
    assert "verified for all 2 images" in " ".join(verdict.policies[0].reasons)
    for att in atts:
        assert att.digest in related(verdict)
        # the attestation's own signature referrer is servable too
        sig_refs = [m for (r, ref), m in src.manifests.items()
                    if m.subject and m.subject.digest == att.digest]
        assert sig_refs and all(s.digest in related(verdict) for s in sig_refs)
    if not referrers_api:
        assert any("tag schema" in c for c in verdict.checks)
    # The children pass through their verified index ...
    child = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platforms[0],
                      parent_verified=True)
    assert child.allowed
    # ... but a platform image requested alone needs its own signature.
    alone = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platforms[0])
    assert not alone.allowed and alone.reason == "no_signature"


async def test_dhi_platform_signed_on_its_own_passes(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    _, platforms, _ = dhi_image(src, signer, sign_platforms=True)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platforms[1])
    assert verdict.allowed, verdict.message


async def test_dhi_attestation_signed_with_wrong_key_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    index, _, _ = dhi_image(src, signer, att_signer=Signer())
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert not verdict.allowed and verdict.reason == "attestation_missing"


async def test_dhi_unsigned_attestation_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    platform = src.image(REPO)
    push_sig_referrer(src, REPO, platform, signer)
    push_dhi_attestation(src, REPO, platform, None, statement(platform.digest))
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platform)
    assert not verdict.allowed and verdict.reason == "attestation_missing"
    assert any("not signed by this policy" in c for c in verdict.checks)


async def test_dhi_attestation_about_another_image_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    other = src.image("elsewhere", "other")
    index, _, _ = dhi_image(src, signer, statement_for=lambda p: other.digest)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert not verdict.allowed and verdict.reason == "attestation_missing"


async def test_dhi_attestation_manifest_subject_must_match_exactly(tmp_path: Path) -> None:
    """The referrer names the digest, but with another size: not this manifest."""
    signer = Signer()
    src = MemorySource()
    platform = src.image(REPO)
    push_sig_referrer(src, REPO, platform, signer)
    bad_subject = descriptor_of(platform, size=len(platform.raw) + 1)
    push_dhi_attestation(src, REPO, platform, signer, statement(platform.digest),
                         subject=bad_subject)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platform)
    assert not verdict.allowed and verdict.reason == "attestation_missing"
    assert any("subject is not" in c for c in verdict.checks)


async def test_dhi_dsse_attestation_layer(tmp_path: Path) -> None:
    """DHI attestation layers may be DSSE envelopes: authenticated by their own signature or
    by the signature on the attestation manifest."""
    signer = Signer()
    for dsse_signer, att_signer in ((signer, None), (Signer(), signer)):
        src = MemorySource()
        platform = src.image(REPO)
        push_sig_referrer(src, REPO, platform, signer)
        push_dhi_attestation(src, REPO, platform, att_signer, statement(platform.digest),
                             dsse_signer=dsse_signer)
        verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, platform)
        assert verdict.allowed, verdict.message


async def test_dhi_provenance_failing_condition_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    index, _, _ = dhi_image(src, signer, predicate=provenance("https://someone-else/builder"))
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert not verdict.allowed and verdict.reason == "condition_failed"


def add_tag_schema(src: MemorySource) -> None:
    """Referrers tag schema (`sha256-<hex>` index) for a registry without the referrers API."""
    by_subject: dict[tuple[str, Digest], list[Manifest]] = {}
    for (repo, ref), m in list(src.manifests.items()):
        if ref == str(m.digest) and m.subject is not None:
            by_subject.setdefault((repo, m.subject.digest), []).append(m)
    for (repo, subject), ms in by_subject.items():
        src.index(repo, [descriptor_of(m, artifactType=m.artifact_type) for m in ms],
                  tag=subject.tag_form)


# --- BuildKit attestations inside the index -----------------------------------------------------

def buildkit_image(src: MemorySource, *, target: Digest | None = None,
                   predicate_type: str = SLSA_V02) -> tuple[Manifest, Manifest]:
    platform = src.image(REPO, "buildkit")
    att = src.artifact(REPO, [(INTOTO, statement(target or platform.digest,
                                                 predicate_type=predicate_type),
                               {"in-toto.io/predicate-type": SLSA_V02})])
    index = src.index(REPO, [
        descriptor_of(platform, platform={"os": "linux", "architecture": "amd64"}),
        descriptor_of(att, platform={"os": "unknown", "architecture": "unknown"},
                      annotations={"vnd.docker.reference.type": "attestation-manifest",
                                   "vnd.docker.reference.digest": str(platform.digest)})])
    return index, platform


async def test_buildkit_attestation_through_signed_index(tmp_path: Path) -> None:
    signer = Signer("ed25519")
    src = MemorySource()
    index, _ = buildkit_image(src)
    push_sig_tag(src, REPO, index, signer)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert verdict.allowed, verdict.message


async def test_buildkit_attestation_of_unsigned_index_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    index, _ = buildkit_image(src)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert not verdict.allowed and verdict.reason == "no_signature"


async def test_buildkit_attestation_naming_another_image_denied(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    index, _ = buildkit_image(src, target=Digest.of(b"elsewhere"))
    push_sig_tag(src, REPO, index, signer)
    verdict = await run(key_policy(tmp_path, signer, attestations=PROVENANCE), src, index)
    assert not verdict.allowed and verdict.reason == "attestation_missing"


# --- cosign v3 bundles --------------------------------------------------------------------------

def bundle_referrer(src: MemorySource, subject: Manifest, signer: Signer, *,
                    target: Digest | None = None, predicate_type: str) -> Manifest:
    env = json.loads(envelope(signer, statement(target or subject.digest,
                                                predicate_type=predicate_type,
                                                predicate={})))
    bundle = canon({"mediaType": BUNDLE, "verificationMaterial": {"publicKey": {"hint": "k"}},
                    "dsseEnvelope": env})
    return src.artifact(REPO, [(BUNDLE, bundle, None)], subject=subject, artifact_type=BUNDLE)


async def test_cosign_v3_bundle_signature(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    ref = bundle_referrer(src, image, signer, predicate_type="https://sigstore.dev/cosign/sign/v1")
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert verdict.allowed, verdict.message
    assert ref.digest in related(verdict)

    src2 = MemorySource()
    image2 = src2.image(REPO)
    bundle_referrer(src2, image2, signer, target=Digest.of(b"x"),
                    predicate_type="https://sigstore.dev/cosign/sign/v1")
    verdict = await run(key_policy(tmp_path, signer), src2, image2)
    assert not verdict.allowed and verdict.reason == "digest_mismatch"


async def test_cosign_v3_bundle_attestation_is_not_a_signature(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    bundle_referrer(src, image, signer, predicate_type=SLSA_V1)
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert not verdict.allowed and verdict.reason == "no_signature"
    verdict = await run(key_policy(tmp_path, signer, attestations=[
        {"name": "slsa", "predicateType": SLSA_V1}]), src, image)
    assert not verdict.allowed  # still unsigned
    push_sig_tag(src, REPO, image, signer)
    verdict = await run(key_policy(tmp_path, signer, attestations=[
        {"name": "slsa", "predicateType": SLSA_V1}]), src, image)
    assert verdict.allowed, verdict.message


# --- policy-level behaviour ---------------------------------------------------------------------

async def test_no_matching_policy_denied(tmp_path: Path) -> None:
    src = MemorySource()
    image = src.image(REPO)
    verdict = await run(key_policy(tmp_path, Signer(), images="other.test/**"), src, image)
    assert not verdict.allowed and verdict.reason == "no_policy"
    assert verdict.policies == [] and "no policy matches" in verdict.message


async def test_static_pass_and_deny(tmp_path: Path) -> None:
    src = MemorySource()
    image = src.image(REPO)
    for static, allowed in (("pass", True), ("deny", False)):
        policy = write_policy(tmp_path, {"policies": [
            {"name": "sandbox", "images": ["registry.test/**"], "static": static}]})
        verdict = await run(policy, src, image)
        assert verdict.allowed is allowed
        assert verdict.reason == ("ok" if allowed else "static_deny")
    assert src.calls == []  # a static policy needs no discovery


async def test_all_matching_policies_must_pass(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, signer)
    policy = write_policy(tmp_path, {"policies": [
        {"name": "signed", "images": ["registry.test/**"],
         "authorities": [{"name": "k", "key": {"path": "k.pub"}}]},
        {"name": "blocked", "images": ["registry.test/app"], "static": "deny"}]},
        {"k": signer})
    verdict = await run(policy, src, image)
    assert not verdict.allowed and verdict.reason == "static_deny"
    assert [p.passed for p in verdict.policies] == [True, False]


async def test_warn_mode_allows_with_reasons(tmp_path: Path) -> None:
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, Signer())
    before = metrics.VERIFICATIONS.labels(policy="hardened-images", result="warned",
                                          reason="wrong_key")._value.get()
    verdict = await run(key_policy(tmp_path, Signer(), mode="warn"), src, image)
    assert verdict.allowed and verdict.reason == "wrong_key"
    assert not verdict.policies[0].passed and verdict.policies[0].mode == "warn"
    assert "wrong key" in verdict.message
    after = metrics.VERIFICATIONS.labels(policy="hardened-images", result="warned",
                                         reason="wrong_key")._value.get()
    assert after == before + 1


async def test_threshold_two_authorities(tmp_path: Path) -> None:
    a, b = Signer(), Signer("rsa")
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, a)
    doc = {"policies": [{"name": "two-person", "images": ["registry.test/**"], "threshold": 2,
                         "authorities": [{"name": "a", "key": {"path": "a.pub"}},
                                         {"name": "b", "key": {"path": "b.pub"}}]}]}
    verdict = await run(write_policy(tmp_path, doc, {"a": a, "b": b}), src, image)
    assert not verdict.allowed
    assert "1 of the required 2 authorities" in verdict.message
    push_sig_referrer(src, REPO, image, b)
    verdict = await run(write_policy(tmp_path, doc, {"a": a, "b": b}), src, image)
    assert verdict.allowed, verdict.message


async def test_docker_reference_and_annotation_constraints(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, signer)  # docker-reference registry.test/app, no optional
    ok = key_policy(tmp_path, signer,
                    authority={"signature": {"dockerReference": "registry.test/**"}})
    assert (await run(ok, src, image)).allowed
    wrong_ref = key_policy(tmp_path, signer,
                           authority={"signature": {"dockerReference": "other.test/**"}})
    verdict = await run(wrong_ref, src, image)
    assert not verdict.allowed and verdict.reason == "reference_mismatch"
    needs_ann = key_policy(tmp_path, signer,
                           authority={"signature": {"annotations": {"env": "prod"}}})
    verdict = await run(needs_ann, src, image)
    assert not verdict.allowed and verdict.reason == "annotation_mismatch"


async def test_signature_repository(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    sig = push_sig_tag(src, "signatures/app", image, signer)
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert not verdict.allowed
    verdict = await run(key_policy(tmp_path, signer, signatureRepository="signatures/app"),
                        src, image)
    assert verdict.allowed, verdict.message
    assert ("signatures/app", sig.digest) in verdict.related


async def test_referrer_with_other_subject_is_ignored(tmp_path: Path) -> None:
    """A referrers list is a hint: an entry whose manifest names another subject is skipped."""
    signer = Signer()
    src = MemorySource(referrers_api=False)
    image, other = src.image(REPO, "a"), src.image(REPO, "b")
    foreign = push_sig_referrer(src, REPO, other, signer)  # a valid signature of `other`
    src.index(REPO, [descriptor_of(foreign, artifactType=SIG_ARTIFACT)],
              tag=image.digest.tag_form)
    verdict = await run(key_policy(tmp_path, signer), src, image)
    assert not verdict.allowed and verdict.reason == "no_signature"
    assert any("does not name" in c for c in verdict.checks)


async def test_upstream_failure_is_not_a_cacheable_deny(tmp_path: Path) -> None:
    class Down(MemorySource):
        async def get_referrers(self, repo: str, digest: Digest) -> Manifest | None:
            raise UpstreamError("connection refused")

    src = Down()
    image = src.image(REPO)
    verdict = await run(key_policy(tmp_path, Signer()), src, image)
    assert not verdict.allowed and verdict.reason == "unavailable" and not verdict.cacheable


async def test_keyless_without_sigstore_support_fails_closed(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    import sigil.verify.policy as policy_module
    from sigil.verify.keys import UnavailableAuthority

    (tmp_path / "root.json").write_text("{}")

    def unavailable(name: str, **kw: Any) -> UnavailableAuthority:
        return UnavailableAuthority(name, "keyless verification is not available (test)")

    monkeypatch.setattr(policy_module, "build_keyless_authority", unavailable)
    policy = write_policy(tmp_path, {"policies": [{
        "name": "keyless", "images": ["registry.test/**"],
        "authorities": [{"name": "gh", "keyless": {
            "trusted_root": "root.json",
            "identities": [{"issuer": "https://token.actions.githubusercontent.com",
                            "subjectRegExp": "^https://github.com/acme/.*$"}]}}]}]})
    src = MemorySource()
    image = src.image(REPO)
    push_sig_tag(src, REPO, image, Signer())
    verdict = await run(policy, src, image)
    assert not verdict.allowed and verdict.reason == "unsupported"


async def test_caps_limit_discovery(tmp_path: Path) -> None:
    signer = Signer()
    src = MemorySource()
    image = src.image(REPO)
    for _ in range(5):
        push_sig_referrer(src, REPO, image, Signer())
    push_sig_referrer(src, REPO, image, signer)
    policy = key_policy(tmp_path, signer)
    tight = Policy(policy.rules, type(policy.limits)(max_artifacts=3), policy.fingerprint)
    verdict = await run(tight, src, image)
    # A cap is configured policy: the deny says discovery stopped there.
    assert not verdict.allowed and "discovery stopped: cap reached" in verdict.message
    assert any("cap reached" in c for c in verdict.checks)
    roomy = Policy(policy.rules, type(policy.limits)(max_artifacts=20), policy.fingerprint)
    assert (await run(roomy, src, image)).allowed
