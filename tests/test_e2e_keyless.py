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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.realparts import (
    Layer,
    ProcessError,
    Pushed,
    RealRegistry,
    RegistryPusher,
    skopeo_copy,
)
from tests.support.sigilproc import SigilProcess
from tests.support.testsigstore import (
    BUNDLE_V03,
    COSIGN_SIGN_PREDICATE,
    DEFAULT_ISSUER,
    SIMPLE_SIGNING,
    TestRekor,
    TestSigstore,
    cosign_bundle,
    cosign_sig_annotations,
    cosign_sign_statement,
    dsse_envelope,
    simple_signing_payload,
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


def keyless_policy(root: Path) -> dict[str, Any]:
    return {"policies": [{
        "name": POLICY, "images": [f"{UPSTREAM}/**"],
        "authorities": [{"name": "release-identities", "keyless": {
            "trusted_root": str(root),
            "identities": [{"issuer": DEFAULT_ISSUER, "subjectRegExp": WORKFLOW_RE},
                           {"issuer": DEFAULT_ISSUER, "subject": BOT}]}}]}]}


@pytest.fixture
def start_sigil(real_registry: RealRegistry, tmp_path: Path
                ) -> Iterator[Callable[..., SigilProcess]]:
    started: list[SigilProcess] = []

    def start(policy: dict[str, Any]) -> SigilProcess:
        up = {"name": UPSTREAM, "url": real_registry.url, "default": True}
        process = SigilProcess(tmp_path / f"sigil{len(started)}", [up], policy)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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
