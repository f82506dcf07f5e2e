"""Keyless (Fulcio) signatures end to end: a private sigstore made at test time
(``tests/support/testsigstore.py``), images signed keyless in a real registry, sigil as a real
process with a keyless policy over that trusted root, pulls with skopeo.

Two shapes of keyless signature are checked:

* ``bundle``: cosign v3 — a sigstore bundle v0.3 whose DSSE envelope holds an in-toto
  statement (predicate ``https://sigstore.dev/cosign/sign/v1``) naming the image digest,
  attached as an OCI 1.1 referrer (tag schema: distribution 2.8 has no referrers API);
* ``sig``: legacy cosign — a ``sha256-<hex>.sig`` simple-signing layer with the certificate,
  chain and Rekor SET (``dev.sigstore.cosign/bundle``) annotations.

Both pass and are served byte for byte; every broken variant is denied with ``403 DENIED``
for the right reason and nothing of the image is served.

Then two additions on the same machinery:

* RFC 3161: a bundle whose ``timestampVerificationData`` carries a token of the private TSA
  (listed in the trusted root's ``timestampAuthorities``) besides its Rekor entry passes a
  policy asking for two verified signing times (``timestamps: 2``); with the Rekor entry only,
  with a token of a TSA the trusted root does not list, or with a token over other bytes it is
  denied (``timestamp``);
* legacy keyless ``cosign attest``: a ``sha256-<hex>.att`` image whose DSSE layer holds a SLSA
  provenance v1 statement satisfies a policy ``attestations:`` entry (predicate type plus
  JMESPath conditions); a statement about another image, or from a builder the conditions
  do not allow, is denied.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc3161_client
import yaml

from tests.realparts import (
    Layer,
    ProcessError,
    Pushed,
    RealRegistry,
    RegistryPusher,
    skopeo_copy,
)
from tests.support.e2e import http_get, sigil_starter
from tests.support.sigilproc import SigilProcess
from tests.support.testsigstore import (
    BUNDLE_V03,
    COSIGN_SIGN_PREDICATE,
    DEFAULT_ISSUER,
    DSSE_ENVELOPE,
    SIMPLE_SIGNING,
    SLSA_PROVENANCE_V1,
    TestRekor,
    TestSigstore,
    TestTSA,
    cosign_att_layer,
    cosign_bundle,
    cosign_sig_annotations,
    cosign_sign_statement,
    dsse_envelope,
    simple_signing_payload,
    slsa_provenance_statement,
)

pytestmark = pytest.mark.realparts
UPSTREAM = "registry.test"
POLICY = "keyless-releases"
# The identities the policy allows: a release workflow (URI SAN) and a bot (email SAN).
WORKFLOW = "https://git.test/acme/app/.github/workflows/release.yml@refs/tags/v1.0.0"
WORKFLOW_RE = r"^https://git\.test/acme/[^/]+/\.github/workflows/release\.yml@refs/tags/v.+$"
BOT = "release-bot@acme.test"
KINDS = ("bundle", "sig")
# variant -> (the sigil reason it is denied for, the text of that reason in the message)
BAD_VARIANTS = {
    "wrong-identity": ("identity", "identity mismatch"),
    "wrong-issuer": ("identity", "identity mismatch"),
    "cert-expired-before-log-time": ("certificate", "certificate not trusted"),
    "set-from-another-log": ("tlog", "transparency log check failed"),
    "set-signed-by-unknown-key": ("tlog", "transparency log check failed"),
    "signature-for-another-digest": ("digest_mismatch", "payload digest mismatch"),
    "tlog-body-for-another-signature": ("tlog", "transparency log check failed"),
}


@pytest.fixture
def sigstore() -> TestSigstore:
    return TestSigstore()


@pytest.fixture
def trusted_root(sigstore: TestSigstore, tmp_path: Path) -> Path:
    return sigstore.write_trusted_root(tmp_path / "trusted_root.json")


def keyless_policy(root: Path, *, timestamps: int | None = None,
                   attestations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    authority: dict[str, Any] = {"name": "release-identities", "keyless": {
        "trusted_root": str(root),
        "identities": [{"issuer": DEFAULT_ISSUER, "subjectRegExp": WORKFLOW_RE},
                       {"issuer": DEFAULT_ISSUER, "subject": BOT}]}}
    if timestamps is not None:
        authority["timestamps"] = timestamps
    policy: dict[str, Any] = {"name": POLICY, "images": [f"{UPSTREAM}/**"],
                              "authorities": [authority]}
    if attestations is not None:
        policy["attestations"] = attestations
    return {"policies": [policy]}


@pytest.fixture
def start_sigil(real_registry: RealRegistry, tmp_path: Path
                ) -> Iterator[Callable[..., SigilProcess]]:
    yield from sigil_starter(real_registry.url, tmp_path, UPSTREAM)


get = http_get


async def sign_keyless(sigstore: TestSigstore, pusher: RegistryPusher, repo: str,
                       image: Pushed, kind: str, variant: str = "good") -> Pushed:
    """Sign ``image`` keyless as ``kind`` (broken as ``variant`` says) and push the signature.

    Returns the pushed signature manifest (the bundle referrer or the ``.sig`` image).
    """
    ref = f"{UPSTREAM}/{repo}"
    identity = WORKFLOW if kind == "bundle" else BOT
    issuer = DEFAULT_ISSUER
    not_before = None
    integrated_time = None
    rekor: TestRekor = sigstore.rekor
    forger: TestRekor | None = None
    named = image.digest
    if variant == "wrong-identity":
        identity = (WORKFLOW.replace("/acme/", "/evil/") if kind == "bundle"
                    else "mallory@evil.test")
    elif variant == "wrong-issuer":
        issuer = "https://accounts.evil.test"
    elif variant == "cert-expired-before-log-time":
        # A 10-minute certificate that ended 20 minutes before the log integrated the entry.
        not_before = sigstore.now - dt.timedelta(minutes=30)
        integrated_time = int((sigstore.now - dt.timedelta(seconds=5)).timestamp())
    elif variant == "set-from-another-log":
        rekor = TestRekor("https://rekor.elsewhere.test")     # not in the trusted root
    elif variant == "set-signed-by-unknown-key":
        forger = TestRekor("https://rekor.sigstore.test")     # claims the trusted log's ID
    elif variant == "signature-for-another-digest":
        other = await pusher.make_image(repo, "other")
        named = other.digest
    else:
        assert variant in ("good", "tlog-body-for-another-signature"), variant
    leaf = sigstore.issue(identity, issuer, not_before=not_before)
    if kind == "bundle":
        statement = cosign_sign_statement(ref, named.removeprefix("sha256:"))
        logged = (dsse_envelope(leaf, statement)   # same statement, another signature
                  if variant == "tlog-body-for-another-signature" else None)
        bundle = cosign_bundle(leaf, statement, rekor, integrated_time=integrated_time,
                               signer=forger, logged_envelope=logged)
        artifact, _ = await pusher.push_tag_schema_referrer(
            repo, image, [Layer(bundle, BUNDLE_V03)], artifact_type=BUNDLE_V03,
            annotations={"dev.sigstore.bundle.content": "dsse-envelope",
                         "dev.sigstore.bundle.predicateType": COSIGN_SIGN_PREDICATE})
        return artifact
    payload = simple_signing_payload(ref, named)
    logged_sig = (leaf.sign(payload) if variant == "tlog-body-for-another-signature"
                  else None)
    annotations = cosign_sig_annotations(leaf, payload, rekor, integrated_time=integrated_time,
                                         signer=forger, logged_signature=logged_sig)
    return await pusher.push_cosign_signatures(repo, image.digest,
                                               [Layer(payload, SIMPLE_SIGNING, annotations)])


@pytest.mark.parametrize("kind", KINDS)
async def test_keyless_signed_image_pulls(start_sigil, sigstore, trusted_root, registry_pusher,
                                          unique_repo, tmp_path, kind) -> None:
    image = await registry_pusher.make_image(unique_repo, "v1")
    signature = await sign_keyless(sigstore, registry_pusher, unique_repo, image, kind)
    sigil = start_sigil(keyless_policy(trusted_root))

    copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "by-tag")
    assert copy.digest == image.digest
    assert copy.manifest() == image.manifest
    by_digest = await skopeo_copy(f"{sigil.host}/{unique_repo}@{image.digest}",
                                  tmp_path / "by-digest")
    assert by_digest.digest == image.digest
    # The signature is served through the mirror too, so clients can verify again.
    if kind == "bundle":
        status, body = get(f"{sigil.url}/v2/{unique_repo}/referrers/{image.digest}")
        assert status == 200, body
        listed = json.loads(body)["manifests"]
        assert [(m["digest"], m["artifactType"]) for m in listed] == [
            (signature.digest, BUNDLE_V03)]
    else:
        sig_tag = "sha256-" + image.digest.removeprefix("sha256:") + ".sig"
        status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/{sig_tag}")
        assert (status, body) == (200, signature.manifest)
    assert sigil.metric("sigil_verifications_total",
                        {"policy": POLICY, "result": "allowed", "reason": "ok"}) >= 1


@pytest.mark.parametrize("variant", list(BAD_VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
async def test_keyless_bad_signature_is_denied(start_sigil, sigstore, trusted_root,
                                               registry_pusher, unique_repo, tmp_path, kind,
                                               variant) -> None:
    reason, text = BAD_VARIANTS[variant]
    image = await registry_pusher.make_image(unique_repo, "v1")
    await sign_keyless(sigstore, registry_pusher, unique_repo, image, kind, variant)
    sigil = start_sigil(keyless_policy(trusted_root))

    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")
    assert status == 403, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "DENIED"
    assert f'policy "{POLICY}"' in error["message"]
    assert text in error["message"], error["message"]
    assert sigil.metric("sigil_verifications_total",
                        {"policy": POLICY, "result": "denied", "reason": reason}) >= 1
    # Nothing of it is served: not the manifest by digest, not its blobs, not to skopeo.
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/{image.digest}")[0] == 403
    for blob in image.blobs:
        assert get(f"{sigil.url}/v2/{unique_repo}/blobs/{blob}")[0] == 404
    with pytest.raises(ProcessError) as info:
        await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "out")
    assert "denied" in str(info.value).lower()


async def test_sigil_verify_lists_keyless_checks(real_registry, sigstore, trusted_root,
                                                 registry_pusher, unique_repo,
                                                 tmp_path) -> None:
    images = {}
    for kind in KINDS:
        images[kind] = await registry_pusher.make_image(unique_repo, kind)
        await sign_keyless(sigstore, registry_pusher, unique_repo, images[kind], kind)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(keyless_policy(trusted_root)))
    config = tmp_path / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "unused")}, "policy": str(policy),
        "upstreams": [{"name": UPSTREAM, "url": real_registry.url}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}

    def run(tag: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigil", "verify", "--config", str(config),
                               f"{UPSTREAM}/{unique_repo}:{tag}", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)

    for kind, image in images.items():
        done = await asyncio.to_thread(run, kind)
        assert done.returncode == 0, done.stdout + done.stderr
        verdict = json.loads(done.stdout)
        assert verdict["allowed"] and verdict["digest"] == image.digest
        passed = [c for c in verdict["checks"] if "signature ok" in c]
        assert len(passed) == 1, verdict["checks"]
        check = passed[0]
        identity = WORKFLOW if kind == "bundle" else BOT
        for part in ("fulcio chain to CN=sigstore-test-intermediate", "code-signing EKU",
                     "SCT from log ctfe.sigstore.test/test",
                     "rekor SET log rekor.sigstore.test",
                     "matches signature, key and digest",
                     f"identity {identity} issuer {DEFAULT_ISSUER}"):
            assert part in check, (part, check)
        if kind == "bundle":
            assert "signature over DSSE PAE" in check
            assert "inclusion proof at index" in check
            assert "checkpoint signed by rekor.sigstore.test - " in check
        else:
            assert "signature over simple-signing payload" in check


# -- RFC 3161 timestamps ------------------------------------------------------------------------

# variant -> None (passes) or the (reason, message text) it is denied with, under a policy
# that asks for two verified signing times (Rekor SET + RFC 3161).
TSA_VARIANTS: dict[str, tuple[str, str] | None] = {
    "tlog-and-tsa": None,
    "tlog-only": ("timestamp", "2 required"),
    "tsa-not-in-trusted-root": ("timestamp", "not verified by a trusted timestamp authority"),
    "tsa-over-another-signature": ("timestamp", "not over this signature"),
}


async def assert_denied(sigil: SigilProcess, repo: str, image: Pushed, reason: str,
                        texts: tuple[str, ...], out: Path) -> None:
    """``v1`` of ``repo`` is denied for ``reason`` and nothing of ``image`` is served."""
    status, body = get(f"{sigil.url}/v2/{repo}/manifests/v1")
    assert status == 403, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "DENIED"
    assert f'policy "{POLICY}"' in error["message"]
    for text in texts:
        assert text in error["message"], error["message"]
    assert sigil.metric("sigil_verifications_total",
                        {"policy": POLICY, "result": "denied", "reason": reason}) >= 1
    assert get(f"{sigil.url}/v2/{repo}/manifests/{image.digest}")[0] == 403
    for blob in image.blobs:
        assert get(f"{sigil.url}/v2/{repo}/blobs/{blob}")[0] == 404
    with pytest.raises(ProcessError) as info:
        await skopeo_copy(f"{sigil.host}/{repo}:v1", out)
    assert "denied" in str(info.value).lower()


@pytest.mark.parametrize("variant", list(TSA_VARIANTS))
async def test_keyless_bundle_rfc3161_timestamp(start_sigil, real_registry, sigstore,
                                                trusted_root, registry_pusher, unique_repo,
                                                tmp_path, variant) -> None:
    image = await registry_pusher.make_image(unique_repo, "v1")
    leaf = sigstore.issue(WORKFLOW)
    statement = cosign_sign_statement(f"{UPSTREAM}/{unique_repo}",
                                      image.digest.removeprefix("sha256:"))
    tsa: TestTSA | None = sigstore.tsa
    timestamped = None
    if variant == "tlog-only":
        tsa = None
    elif variant == "tsa-not-in-trusted-root":
        tsa = TestTSA("sigstore-test-tsa")      # same name, its own keys: not in the root
    elif variant == "tsa-over-another-signature":
        timestamped = leaf.sign(statement)       # a real signature, but not the bundle's
    bundle = cosign_bundle(leaf, statement, sigstore.rekor, tsa=tsa, timestamped=timestamped)
    assert ("timestampVerificationData" in json.loads(bundle)["verificationMaterial"]) == (
        tsa is not None)
    await registry_pusher.push_tag_schema_referrer(
        unique_repo, image, [Layer(bundle, BUNDLE_V03)], artifact_type=BUNDLE_V03,
        annotations={"dev.sigstore.bundle.content": "dsse-envelope",
                     "dev.sigstore.bundle.predicateType": COSIGN_SIGN_PREDICATE})
    sigil = start_sigil(keyless_policy(trusted_root, timestamps=2))

    denied = TSA_VARIANTS[variant]
    if denied is None:
        copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "out")
        assert copy.digest == image.digest
        assert copy.manifest() == image.manifest
        assert sigil.metric("sigil_verifications_total",
                            {"policy": POLICY, "result": "allowed", "reason": "ok"}) >= 1
        return
    reason, text = denied
    await assert_denied(sigil, unique_repo, image, reason, ("no trusted signing time",),
                        tmp_path / "out")
    # Why, in detail: the check list of ``sigil verify``.
    done = await asyncio.to_thread(run_sigil_verify, real_registry, tmp_path,
                                   keyless_policy(trusted_root, timestamps=2),
                                   f"{UPSTREAM}/{unique_repo}:v1")
    assert done.returncode != 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert not verdict["allowed"]
    assert any("[release-identities]: timestamp: " in c and text in c
               for c in verdict["checks"]), verdict["checks"]


async def test_sigil_verify_lists_rfc3161_check(real_registry, sigstore, trusted_root,
                                                registry_pusher, unique_repo,
                                                tmp_path) -> None:
    """``sigil verify`` names the TSA and the verified time next to the Rekor SET."""
    image = await registry_pusher.make_image(unique_repo, "v1")
    leaf = sigstore.issue(WORKFLOW)
    statement = cosign_sign_statement(f"{UPSTREAM}/{unique_repo}",
                                      image.digest.removeprefix("sha256:"))
    bundle = cosign_bundle(leaf, statement, sigstore.rekor, tsa=sigstore.tsa)
    await registry_pusher.push_tag_schema_referrer(
        unique_repo, image, [Layer(bundle, BUNDLE_V03)], artifact_type=BUNDLE_V03)
    done = await asyncio.to_thread(run_sigil_verify, real_registry, tmp_path,
                                   keyless_policy(trusted_root, timestamps=2),
                                   f"{UPSTREAM}/{unique_repo}:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["allowed"] and verdict["digest"] == image.digest
    passed = [c for c in verdict["checks"] if "signature ok" in c]
    assert len(passed) == 1, verdict["checks"]
    assert "RFC 3161 timestamp by CN=sigstore-test-tsa,O=sigstore.test at " in passed[0]
    assert "rekor SET log rekor.sigstore.test" in passed[0]


def run_sigil_verify(registry: RealRegistry, tmp_path: Path, policy_doc: dict[str, Any],
                     image: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(policy_doc))
    config = tmp_path / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "unused")}, "policy": str(policy),
        "upstreams": [{"name": UPSTREAM, "url": registry.url}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    return subprocess.run([sys.executable, "-m", "sigil", "verify", "--config", str(config),
                           image, "--json"], capture_output=True, text=True, timeout=120,
                          env=env)


# -- legacy keyless attestations (.att) ---------------------------------------------------------

BUILDER = "https://git.test/acme/app/.github/workflows/release.yml@refs/tags/v1.0.0"
PROVENANCE_REQUIREMENT = {
    "name": "slsa-provenance", "predicateType": SLSA_PROVENANCE_V1,
    "conditions": [
        {"key": "predicate.buildDefinition.buildType", "operator": "Equals",
         "value": "https://actions.github.io/buildtypes/workflow/v1"},
        {"key": "predicate.runDetails.builder.id", "operator": "Matches",
         "value": WORKFLOW_RE},
        {"key": "predicate.buildDefinition.externalParameters.workflow.repository",
         "operator": "In", "value": ["https://git.test/acme/app"]},
    ]}
# Both tlog entry kinds cosign writes for attestations: dsse 0.0.1 (its default) and intoto
# 0.0.2, whose canonicalized body has no envelope payload (rekor pkg/types/intoto/v0.0.2
# Canonicalize keeps payloadType, signatures and the hashes only).
ATT_ENTRY_KINDS = ["dsse", "intoto"]
# variant -> (reason, texts of the denial message)
BAD_ATTESTATIONS = {
    "statement-for-another-digest": ("attestation_missing", (
        'attestation "slsa-provenance"', "missing",
        "1 signed statement(s) of that type name another subject")),
    "builder-not-allowed": ("condition_failed", (
        'attestation "slsa-provenance" fails its conditions',
        "predicate.runDetails.builder.id")),
}


async def attest_keyless(sigstore: TestSigstore, pusher: RegistryPusher, repo: str,
                         image: Pushed, *, entry_kind: str = "dsse",
                         variant: str = "good") -> Pushed:
    """Sign ``image`` (legacy ``.sig``) and attest SLSA provenance for it (``.att``)."""
    await sign_keyless(sigstore, pusher, repo, image, "sig")
    named, builder = image.digest, BUILDER
    if variant == "statement-for-another-digest":
        named = (await pusher.make_image(repo, "other")).digest
    elif variant == "builder-not-allowed":
        builder = BUILDER.replace("/acme/", "/evil/")
    else:
        assert variant == "good", variant
    statement = slsa_provenance_statement(f"{UPSTREAM}/{repo}", named.removeprefix("sha256:"),
                                          builder_id=builder)
    leaf = sigstore.issue(WORKFLOW)
    blob, annotations = cosign_att_layer(leaf, statement, sigstore.rekor,
                                         entry_kind=entry_kind)
    return await pusher.push_cosign_signatures(
        repo, image.digest, [Layer(blob, DSSE_ENVELOPE, annotations)], suffix="att")


@pytest.mark.parametrize("entry_kind", ATT_ENTRY_KINDS)
async def test_keyless_att_layer_satisfies_attestation_policy(
        start_sigil, sigstore, trusted_root, registry_pusher, unique_repo, tmp_path,
        entry_kind) -> None:
    image = await registry_pusher.make_image(unique_repo, "v1")
    att = await attest_keyless(sigstore, registry_pusher, unique_repo, image,
                               entry_kind=entry_kind)
    sigil = start_sigil(keyless_policy(trusted_root, attestations=[PROVENANCE_REQUIREMENT]))

    copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "by-tag")
    assert copy.digest == image.digest
    assert copy.manifest() == image.manifest
    by_digest = await skopeo_copy(f"{sigil.host}/{unique_repo}@{image.digest}",
                                  tmp_path / "by-digest")
    assert by_digest.digest == image.digest
    # The attestation is served through the mirror too, byte for byte.
    att_tag = "sha256-" + image.digest.removeprefix("sha256:") + ".att"
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/{att_tag}") == (200, att.manifest)
    assert sigil.metric("sigil_verifications_total",
                        {"policy": POLICY, "result": "allowed", "reason": "ok"}) >= 1


@pytest.mark.parametrize("variant", list(BAD_ATTESTATIONS))
async def test_keyless_att_layer_bad_attestation_is_denied(
        start_sigil, sigstore, trusted_root, registry_pusher, unique_repo, tmp_path,
        variant) -> None:
    reason, texts = BAD_ATTESTATIONS[variant]
    image = await registry_pusher.make_image(unique_repo, "v1")
    await attest_keyless(sigstore, registry_pusher, unique_repo, image, variant=variant)
    sigil = start_sigil(keyless_policy(trusted_root, attestations=[PROVENANCE_REQUIREMENT]))
    await assert_denied(sigil, unique_repo, image, reason, texts, tmp_path / "out")


def test_test_tsa_tokens_verify_with_rfc3161_client(sigstore) -> None:
    """The private TSA's tokens are RFC 3161 to an independent verifier too (rfc3161-client,
    sigstore-python's): its own token verifies, another TSA's and one over other bytes do
    not."""
    signature = os.urandom(64)
    verifier = rfc3161_client.VerifierBuilder(
        tsa_certificate=sigstore.tsa.cert, roots=[sigstore.tsa.root]).build()
    good = rfc3161_client.decode_timestamp_response(sigstore.tsa.timestamp(signature))
    assert good.status == 0
    assert verifier.verify(good, hashlib.sha256(signature).digest())
    other = rfc3161_client.decode_timestamp_response(TestTSA().timestamp(signature))
    with pytest.raises(rfc3161_client.VerificationError):
        verifier.verify(other, hashlib.sha256(signature).digest())
    with pytest.raises(rfc3161_client.VerificationError):
        verifier.verify(good, hashlib.sha256(b"other bytes").digest())
