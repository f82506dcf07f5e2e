"""Verify before serving, end to end: images signed at test time in a real registry, pulled
through sigil (a real process) with skopeo; every bad variant is denied and nothing of it is
served."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from sigil.oci.digest import Digest
from tests.realparts import Layer, ProcessError, RealRegistry, RegistryPusher, skopeo_copy
from tests.support.e2e import http_get, sigil_starter
from tests.support.sigilproc import SigilProcess
from tests.test_verify_support import (
    INTOTO,
    SIG_ARTIFACT,
    SIMPLE,
    SLSA_V02,
    Signer,
    b64,
    provenance,
    simple_signing,
    statement,
)

pytestmark = pytest.mark.realparts
UPSTREAM = "registry.test"


def key_policy_doc(key_file: Path, **extra: Any) -> dict[str, Any]:
    return {"policies": [{"name": "signed-images", "images": [f"{UPSTREAM}/**"],
                          "authorities": [{"name": "release-key",
                                           "key": {"path": str(key_file)}}], **extra}]}


@pytest.fixture
def signer() -> Signer:
    return Signer("p256")


@pytest.fixture
def start_sigil(real_registry: RealRegistry, tmp_path: Path
                ) -> Iterator[Callable[..., SigilProcess]]:
    yield from sigil_starter(real_registry.url, tmp_path, UPSTREAM)


@pytest.fixture
def key_file(tmp_path: Path, signer: Signer) -> Path:
    path = tmp_path / "release.pub"
    path.write_text(signer.pem())
    return path


def sig_layer(signer: Signer, digest: str, *, tamper: bool = False) -> Layer:
    payload = simple_signing(Digest.parse(digest), reference=UPSTREAM)
    signature = signer.sign(payload)
    if tamper:
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    return Layer(payload, SIMPLE, {"dev.cosignproject.cosign/signature": b64(signature)})


get = http_get


async def pull(sigil: SigilProcess, repo: str, ref: str, dest: Path) -> str:
    sep = "@" if ref.startswith("sha256:") else ":"
    return (await skopeo_copy(f"{sigil.host}/{repo}{sep}{ref}", dest)).digest


async def test_signed_image_pulls_unsigned_is_denied_and_blobs_gated(
        start_sigil, key_file, signer, registry_pusher: RegistryPusher, unique_repo,
        tmp_path) -> None:
    signed = await registry_pusher.make_image(unique_repo, "signed")
    await registry_pusher.push_cosign_signatures(unique_repo, signed.digest,
                                                 [sig_layer(signer, signed.digest)])
    unsigned = await registry_pusher.make_image(unique_repo, "unsigned")
    sigil = start_sigil(key_policy_doc(key_file))

    assert await pull(sigil, unique_repo, "signed", tmp_path / "a") == signed.digest
    with pytest.raises(ProcessError) as info:
        await pull(sigil, unique_repo, "unsigned", tmp_path / "b")
    assert "denied" in str(info.value).lower()

    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/unsigned")
    assert status == 403
    error = json.loads(body)["errors"][0]
    assert error["code"] == "DENIED"
    assert 'policy "signed-images"' in error["message"]
    # Nothing of the denied image is served, not even its blobs by digest.
    for blob in unsigned.blobs:
        assert get(f"{sigil.url}/v2/{unique_repo}/blobs/{blob}")[0] == 404
    # The signature of the served image can be fetched again through the mirror.
    sig_tag = "sha256-" + signed.digest[7:] + ".sig"
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/{sig_tag}")[0] == 200
    assert sigil.metric("sigil_verifications_total",
                        {"policy": "signed-images", "result": "denied",
                         "reason": "no_signature"}) >= 1


@pytest.mark.parametrize("variant", ["wrong-key", "tampered", "replayed"])
async def test_bad_signatures_are_denied(start_sigil, key_file, signer, registry_pusher,
                                         unique_repo, tmp_path, variant) -> None:
    image = await registry_pusher.make_image(unique_repo, "v1")
    if variant == "wrong-key":
        layer = sig_layer(Signer("p256"), image.digest)
    elif variant == "tampered":
        layer = sig_layer(signer, image.digest, tamper=True)
    else:  # a valid signature of another image, replayed onto this one's tag
        other = await registry_pusher.make_image(unique_repo, "other")
        layer = sig_layer(signer, other.digest)
    await registry_pusher.push_cosign_signatures(unique_repo, image.digest, [layer])
    sigil = start_sigil(key_policy_doc(key_file))
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")
    assert status == 403, body
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    for blob in image.blobs:
        assert get(f"{sigil.url}/v2/{unique_repo}/blobs/{blob}")[0] == 404


async def _dhi_image(pusher: RegistryPusher, repo: str, signer: Signer,
                     builder: str = "https://github.com/docker/buildkit@v1",
                     claimed_type: str = SLSA_V02, real_type: str = SLSA_V02) -> Any:
    """A DHI-shaped image: a signed index (simple-signing referrer via the tag schema) and a
    signed SLSA provenance attestation referrer per platform, each with its own signature."""
    multi = await pusher.make_multiplatform_image(repo, "dhi")
    await pusher.push_tag_schema_referrer(repo, multi.index,
                                          [sig_layer(signer, multi.index.digest)],
                                          artifact_type=SIG_ARTIFACT)
    for child in multi.children.values():
        body = statement(Digest.parse(child.digest), real_type, provenance(builder))
        att, _ = await pusher.push_tag_schema_referrer(
            repo, child, [Layer(body, INTOTO, {"in-toto.io/predicate-type": claimed_type})],
            artifact_type=INTOTO)
        await pusher.push_tag_schema_referrer(repo, att, [sig_layer(signer, att.digest)],
                                              artifact_type=SIG_ARTIFACT)
    return multi


def dhi_policy(key_file: Path, condition: dict[str, Any]) -> dict[str, Any]:
    return key_policy_doc(key_file, attestations=[
        {"name": "provenance", "predicateType": SLSA_V02, "conditions": [condition]}])


async def test_dhi_shaped_image_pulls_all_platforms(start_sigil, key_file, signer,
                                                    registry_pusher, unique_repo,
                                                    tmp_path) -> None:
    multi = await _dhi_image(registry_pusher, unique_repo, signer)
    sigil = start_sigil(dhi_policy(key_file, {"key": "predicate.builder.id",
                                              "operator": "Equals",
                                              "value": "https://github.com/docker/buildkit@v1"}))
    copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:dhi", tmp_path / "out")
    assert copy.digest == multi.index.digest
    for child in multi.children.values():
        assert copy.manifest(child.digest) == child.manifest
    # Cosign / Kyverno can verify again through the mirror: the referrers are listed.
    status, body = get(f"{sigil.url}/v2/{unique_repo}/referrers/{multi.index.digest}")
    assert status == 200
    assert [m["artifactType"] for m in json.loads(body)["manifests"]] == [SIG_ARTIFACT]
    child = multi.children["linux/amd64"].digest
    url = f"{sigil.url}/v2/{unique_repo}/referrers/{child}"
    with urllib.request.urlopen(f"{url}?artifactType={quote(INTOTO)}", timeout=30) as response:
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        listed = json.loads(response.read())["manifests"]
    assert [m["artifactType"] for m in listed] == [INTOTO]
    status, body = get(f"{url}?artifactType={quote(SIG_ARTIFACT)}")
    assert status == 200 and json.loads(body)["manifests"] == []
    # Referrers of a digest that was never verified are not listed.
    unverified = "sha256:" + "0" * 64
    assert get(f"{sigil.url}/v2/{unique_repo}/referrers/{unverified}")[0] == 403


@pytest.mark.parametrize("variant", ["condition-fails", "predicate-type-lie"])
async def test_dhi_attestation_problems_are_denied(start_sigil, key_file, signer,
                                                   registry_pusher, unique_repo,
                                                   variant) -> None:
    if variant == "condition-fails":
        await _dhi_image(registry_pusher, unique_repo, signer,
                         builder="https://evil.example/builder")
    else:  # the layer annotation claims SLSA, the signed statement says something else
        await _dhi_image(registry_pusher, unique_repo, signer,
                         real_type="https://example.com/not-provenance/v1")
    sigil = start_sigil(dhi_policy(key_file, {"key": "predicate.builder.id",
                                              "operator": "Equals",
                                              "value": "https://github.com/docker/buildkit@v1"}))
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/dhi")
    assert status == 403, body
    assert "provenance" in json.loads(body)["errors"][0]["message"]


async def test_tag_moved_to_unsigned_image_is_denied_after_ttl(
        start_sigil, key_file, signer, registry_pusher, unique_repo) -> None:
    signed = await registry_pusher.make_image(unique_repo, "app")
    await registry_pusher.push_cosign_signatures(unique_repo, signed.digest,
                                                 [sig_layer(signer, signed.digest)])
    sigil = start_sigil(key_policy_doc(key_file), tag_ttl="1s")
    status, _ = get(f"{sigil.url}/v2/{unique_repo}/manifests/app")
    assert status == 200
    moved = await registry_pusher.make_image(unique_repo, "app")  # unsigned, same tag
    assert moved.digest != signed.digest
    await asyncio.sleep(1.2)
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/app")
    assert status == 403, body
    # The signed digest stays servable by digest.
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/{signed.digest}")[0] == 200


async def test_warn_mode_serves_and_counts(start_sigil, key_file, registry_pusher,
                                           unique_repo) -> None:
    await registry_pusher.make_image(unique_repo, "v1")
    sigil = start_sigil(key_policy_doc(key_file, mode="warn"))
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")[0] == 200
    assert sigil.metric("sigil_verifications_total",
                        {"policy": "signed-images", "result": "warned",
                         "reason": "no_signature"}) == 1
    assert any(e.get("event") == "verify.failed" for e in sigil.log_events())


async def test_sighup_reloads_policy_and_keeps_old_on_error(start_sigil, registry_pusher,
                                                            unique_repo) -> None:
    await registry_pusher.make_image(unique_repo, "v1")
    sigil = start_sigil({"policies": [{"name": "closed", "images": ["**"],
                                       "static": "deny"}]})
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")[0] == 403
    policy_path = sigil.workdir / "policy.yaml"

    def hup_and_wait(event: str) -> None:
        assert sigil.proc is not None
        sigil.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(e.get("event") == event for e in sigil.log_events()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {event} in log")

    policy_path.write_text(yaml.safe_dump({"policies": [{"name": "open", "images": ["**"],
                                                         "static": "pass"}]}))
    hup_and_wait("policy.reloaded")
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")[0] == 200
    policy_path.write_text("policies: [{name: broken}]\n")
    hup_and_wait("policy.reload_failed")
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")[0] == 200


async def test_sigil_verify_cli_explains(real_registry, key_file, signer, registry_pusher,
                                         unique_repo, tmp_path) -> None:
    signed = await registry_pusher.make_image(unique_repo, "signed")
    await registry_pusher.push_cosign_signatures(unique_repo, signed.digest,
                                                 [sig_layer(signer, signed.digest)])
    await registry_pusher.make_image(unique_repo, "unsigned")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(key_policy_doc(key_file)))
    config = tmp_path / "sigil.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "unused")}, "policy": str(policy),
        "upstreams": [{"name": UPSTREAM, "url": real_registry.url}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}

    def run(ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigil", "verify", "--config", str(config),
                               f"{UPSTREAM}/{unique_repo}:{ref}", *extra],
                              capture_output=True, text=True, timeout=120, env=env)

    ok = await asyncio.to_thread(run, "signed", "--json")
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads(ok.stdout)
    assert verdict["allowed"] and verdict["digest"] == signed.digest
    assert verdict["checks"]
    denied = await asyncio.to_thread(run, "unsigned")
    assert denied.returncode == 1, denied.stderr
    assert "DENY" in denied.stdout and "signed-images" in denied.stdout
    missing = await asyncio.to_thread(run, "nope")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def att_layer(signer: Signer, subject_digest: str, predicate_type: str = SLSA_V02) -> Layer:
    """A cosign `.att` layer: a DSSE envelope over an in-toto statement."""
    from tests.test_verify_support import envelope

    body = statement(Digest.parse(subject_digest), predicate_type, provenance())
    return Layer(envelope(signer, body), "application/vnd.dsse.envelope.v1+json",
                 {"predicateType": predicate_type})


@pytest.mark.parametrize("variant", ["good", "subject-is-another-image"])
async def test_cosign_att_attestation(start_sigil, key_file, signer, registry_pusher,
                                      unique_repo, tmp_path, variant) -> None:
    image = await registry_pusher.make_image(unique_repo, "v1")
    await registry_pusher.push_cosign_signatures(unique_repo, image.digest,
                                                 [sig_layer(signer, image.digest)])
    about = image.digest
    if variant == "subject-is-another-image":
        about = (await registry_pusher.make_image(unique_repo, "other")).digest
    await registry_pusher.push_cosign_signatures(unique_repo, image.digest,
                                                 [att_layer(signer, about)], suffix="att")
    sigil = start_sigil(dhi_policy(key_file, {"key": "predicate.builder.id",
                                              "operator": "Exists"}))
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")
    if variant == "good":
        assert status == 200, body
        assert await pull(sigil, unique_repo, "v1", tmp_path / "out") == image.digest
    else:
        assert status == 403, body
        assert "provenance" in json.loads(body)["errors"][0]["message"]


async def test_platform_manifest_alone_needs_its_own_signature(start_sigil, key_file, signer,
                                                               registry_pusher,
                                                               unique_repo) -> None:
    """The index is signed, its children are not: a child pulled by digest before its index
    was verified is denied; once the index passed, the child passes through it."""
    multi = await registry_pusher.make_multiplatform_image(unique_repo, "multi")
    await registry_pusher.push_cosign_signatures(unique_repo, multi.index.digest,
                                                 [sig_layer(signer, multi.index.digest)])
    child = multi.children["linux/arm64"]
    sigil = start_sigil(key_policy_doc(key_file))
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/{child.digest}")
    assert status == 403, body
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/multi")[0] == 200
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/{child.digest}")
    assert status == 200 and body == child.manifest
    for blob in child.blobs:
        assert get(f"{sigil.url}/v2/{unique_repo}/blobs/{blob}")[0] == 200


async def test_ctr_pulls_signed_and_is_refused_unsigned(start_sigil, key_file, signer,
                                                        registry_pusher, unique_repo,
                                                        containerd_daemon) -> None:
    """containerd through a hosts.toml mirror (?ns=): a signed multi-platform image pulls and
    unpacks; an unsigned one fails with the mirror's DENIED answer, and containerd cannot fall
    back past the mirror (its own server is a dead port)."""
    signed = await registry_pusher.make_multiplatform_image(unique_repo, "signed")
    await registry_pusher.push_cosign_signatures(unique_repo, signed.index.digest,
                                                 [sig_layer(signer, signed.index.digest)])
    await registry_pusher.make_multiplatform_image(unique_repo, "unsigned")
    sigil = start_sigil(key_policy_doc(key_file))
    mirrors = {UPSTREAM: sigil.url}
    digest = await containerd_daemon.pull(f"{UPSTREAM}/{unique_repo}:signed", mirrors=mirrors)
    assert digest == signed.index.digest
    with pytest.raises(ProcessError) as info:
        await containerd_daemon.pull(f"{UPSTREAM}/{unique_repo}:unsigned", mirrors=mirrors)
    assert "403" in str(info.value) or "denied" in str(info.value).lower()
    assert any(e.get("ns") == UPSTREAM and e.get("status") == 403 for e in sigil.log_events())


async def test_runnable_image_under_a_signature_tag_is_not_served(start_sigil, key_file, signer,
                                                                 registry_pusher,
                                                                 unique_repo) -> None:
    """Signature tags of a verified image are servable, but the tag name is only a hint: a
    runnable image stored under `sha256-<hex>.att` must not leave the mirror unverified."""
    image = await registry_pusher.make_image(unique_repo, "v1")
    await registry_pusher.push_cosign_signatures(unique_repo, image.digest,
                                                 [sig_layer(signer, image.digest)])
    smuggled = await registry_pusher.make_image(unique_repo, "sha256-" + image.digest[7:] + ".att")
    sigil = start_sigil(key_policy_doc(key_file))
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/v1")[0] == 200
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/sha256-{image.digest[7:]}.sig")[0] == 200
    status, body = get(f"{sigil.url}/v2/{unique_repo}/manifests/sha256-{image.digest[7:]}.att")
    assert status == 403, body
    assert "not a signature or attestation artifact" in json.loads(body)["errors"][0]["message"]
    assert get(f"{sigil.url}/v2/{unique_repo}/manifests/{smuggled.digest}")[0] == 403
    for blob in smuggled.blobs:
        assert get(f"{sigil.url}/v2/{unique_repo}/blobs/{blob}")[0] == 404
