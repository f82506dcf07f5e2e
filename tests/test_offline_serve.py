"""Offline serving end to end (issue 7 part 3), with real parts only.

Connected phase: a private docker-registry holds a keyed-signed image (``.sig``), a multi-platform
index signed with ``.sig``, a DHI-shaped index (tag-schema signature referrer, per-platform
attestation referrers each with its own signature), a BuildKit-shaped index (an in-index
attestation manifest, the index signed with ``.sig``), an image with ``.sig`` and ``.att``, a
keyless-signed image (sigstore bundle referrer, private test sigstore), an unsigned image the
policy denies, a signed image whose blobs are never pulled and a tag nobody pulls. An online
sigil pulls them with skopeo, which fills its store and index.

Disconnected phase: sigil and the registry are stopped, and a listener that records every
connection takes the registry's port. The same sigil (same config and store, ``server.offline``
and a policy with a new fingerprint, so every verdict is decided again from stored artifacts)
serves skopeo, containerd's ``ctr`` (hosts.toml, ``?ns=``) and podman (registries.conf); every
test checks that nothing connected to the upstream port. The SIGHUP test comes last because it
changes the policy of the shared offline sigil.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from sigil.oci.digest import Digest
from tests.realparts import (
    ProcessError,
    Pushed,
    RealRegistry,
    RegistryPusher,
    podman_pull,
    registries_conf_mirror,
    skopeo_copy,
)
from tests.realparts._process import http_status, start_daemon, stop_daemon, wait_until
from tests.realparts.images import (
    OCI_INDEX,
    Layer,
    cosign_tag,
    index_manifest,
    parse_platform,
    tag_schema_tag,
)
from tests.support.e2e import error_code, http_get
from tests.support.netrecord import ConnectionRecorder
from tests.support.sigilproc import SigilProcess, free_port
from tests.support.testsigstore import BUNDLE_V03, TestSigstore
from tests.test_e2e_keyless import keyless_policy, sign_keyless
from tests.test_e2e_verify import UPSTREAM, _dhi_image, att_layer, sig_layer
from tests.test_verify_support import (
    INTOTO,
    SIG_ARTIFACT,
    SLSA_V02,
    Signer,
    statement,
)

pytestmark = [pytest.mark.realparts, pytest.mark.timeout(300)]

SIGNED_REPOS = ("offline/signed", "offline/multi", "offline/unsigned", "offline/lazy")
ATTESTED_REPOS = ("offline/dhi", "offline/att", "offline/buildkit")


def _policy(signer: Signer, key_dir: Path, prefix: str) -> dict[str, Any]:
    """Signed repositories need the key's signature; attested ones also a signed SLSA
    provenance; ``offline/keyless`` a keyless signature under the private sigstore's root
    (``key_dir/trusted_root.json``). ``prefix`` names the policies (a new name is a new
    fingerprint)."""
    key_file = key_dir / f"{prefix}key.pub"
    key_file.write_text(signer.pem())
    authority = [{"name": "release-key", "key": {"path": str(key_file)}}]
    keyless = keyless_policy(key_dir / "trusted_root.json")["policies"][0]
    keyless.update(name=f"{prefix}keyless", images=[f"{UPSTREAM}/offline/keyless"])
    signed = {"name": f"{prefix}signed", "images": [f"{UPSTREAM}/{r}" for r in SIGNED_REPOS],
              "authorities": authority}
    attested = {"name": f"{prefix}attested",
                "images": [f"{UPSTREAM}/{r}" for r in ATTESTED_REPOS],
                "authorities": authority,
                "attestations": [{"name": "provenance", "predicateType": SLSA_V02,
                                  "conditions": [{"key": "predicate.builder.id",
                                                  "operator": "Exists"}]}]}
    return {"policies": [keyless, signed, attested]}


@dataclass
class Site:
    """The populated store, served offline."""

    sigil: SigilProcess
    recorder: ConnectionRecorder
    workdir: Path
    images: dict[str, Any] = field(default_factory=dict)
    sig_manifests: dict[str, Pushed] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.sigil.url}/v2/{path}"


async def _buildkit_image(pusher: RegistryPusher, repo: str, signer: Signer) -> Pushed:
    """An index with one platform image and BuildKit's attestation manifest for it (raw
    in-toto statement, authenticated by the index's ``.sig`` only)."""
    platform = await pusher.make_image(repo, None)
    body = statement(Digest.parse(platform.digest), SLSA_V02)
    att = await pusher.push_artifact(repo, None, [
        Layer(body, INTOTO, {"in-toto.io/predicate-type": SLSA_V02})])
    index = index_manifest([
        platform.descriptor(platform=parse_platform("linux/amd64")),
        att.descriptor(platform={"os": "unknown", "architecture": "unknown"},
                       annotations={"vnd.docker.reference.type": "attestation-manifest",
                                    "vnd.docker.reference.digest": platform.digest})])
    digest = await pusher.push_manifest(repo, "v1", index, OCI_INDEX)
    await pusher.push_cosign_signatures(repo, digest, [sig_layer(signer, digest)])
    return Pushed(digest, index, (*platform.blobs, *att.blobs))


async def _populate(registry: RealRegistry, signer: Signer, sigstore: TestSigstore,
                    sigil: SigilProcess, site_images: dict[str, Any], sigs: dict[str, Pushed],
                    tmp: Path) -> None:
    async with RegistryPusher(registry.url) as pusher:
        keyless = await pusher.make_image("offline/keyless", "v1")
        sigs["keyless"] = await sign_keyless(sigstore, pusher, "offline/keyless", keyless,
                                             "bundle")
        signed = await pusher.make_image("offline/signed", "v1")
        sigs["signed"] = await pusher.push_cosign_signatures(
            "offline/signed", signed.digest, [sig_layer(signer, signed.digest)])
        notpulled = await pusher.make_image("offline/signed", "notpulled")
        await pusher.push_cosign_signatures("offline/signed", notpulled.digest,
                                            [sig_layer(signer, notpulled.digest)])
        multi = await pusher.make_multiplatform_image("offline/multi", "v1")
        await pusher.push_cosign_signatures("offline/multi", multi.index.digest,
                                            [sig_layer(signer, multi.index.digest)])
        dhi = await _dhi_image(pusher, "offline/dhi", signer)
        buildkit = await _buildkit_image(pusher, "offline/buildkit", signer)
        att = await pusher.make_image("offline/att", "v1")
        await pusher.push_cosign_signatures("offline/att", att.digest,
                                            [sig_layer(signer, att.digest)])
        sigs["att"] = await pusher.push_cosign_signatures(
            "offline/att", att.digest, [att_layer(signer, att.digest)], suffix="att")
        unsigned = await pusher.make_image("offline/unsigned", "v1")
        lazy = await pusher.make_image("offline/lazy", "v1")
        await pusher.push_cosign_signatures("offline/lazy", lazy.digest,
                                            [sig_layer(signer, lazy.digest)])
    site_images.update(keyless=keyless, buildkit=buildkit, signed=signed, notpulled=notpulled,
                       multi=multi, dhi=dhi, att=att, unsigned=unsigned, lazy=lazy)
    # Through the online sigil: this is what fills the store and the index.
    for name, repo, tag in (("signed", "offline/signed", "v1"), ("multi", "offline/multi", "v1"),
                            ("dhi", "offline/dhi", "dhi"), ("att", "offline/att", "v1"),
                            ("keyless", "offline/keyless", "v1"),
                            ("buildkit", "offline/buildkit", "v1")):
        await skopeo_copy(f"{sigil.host}/{repo}:{tag}", tmp / f"online-{name}")
    assert http_get(f"{sigil.url}/v2/offline/unsigned/manifests/v1")[0] == 403
    assert http_get(f"{sigil.url}/v2/offline/lazy/manifests/v1")[0] == 200  # no blobs


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Populate through an online sigil, cut the upstream, serve the same store offline."""
    workdir = tmp_path_factory.mktemp("offline")
    signer = Signer("p256")
    sigstore = TestSigstore()
    sigstore.write_trusted_root(workdir / "trusted_root.json")
    registry = RealRegistry().start()
    recorder: ConnectionRecorder | None = None
    sigil = SigilProcess(workdir / "sigil",
                         # Every stored tag is past its TTL by the time it is served offline.
                         [{"name": UPSTREAM, "url": registry.url, "default": True,
                           "tag_ttl": "1ms"}],
                         _policy(signer, workdir, "online-"))
    images: dict[str, Any] = {}
    sigs: dict[str, Pushed] = {}
    try:
        sigil.start()
        asyncio.run(_populate(registry, signer, sigstore, sigil, images, sigs, workdir))
        sigil.stop()
        port = registry.port
        registry.stop()
        recorder = ConnectionRecorder(port)
        # The same config and store, switched offline, under a policy with a new fingerprint.
        (sigil.workdir / "policy.yaml").write_text(
            yaml.safe_dump(_policy(signer, workdir, "offline-")))
        config = yaml.safe_load(sigil.config_path.read_text())
        config["server"]["offline"] = True
        sigil.config_path.write_text(yaml.safe_dump(config))
        sigil.start()
        yield Site(sigil, recorder, workdir, images, sigs)
    finally:
        sigil.stop()
        registry.stop()
        if recorder is not None:
            recorder.close()


# ------------------------------------------------------------------------------------ clients
async def test_skopeo_pulls_offline_with_upstream_digests(site: Site, tmp_path: Path) -> None:
    images = site.images
    for name, repo, tag in (("signed", "offline/signed", "v1"), ("att", "offline/att", "v1"),
                            ("keyless", "offline/keyless", "v1"),
                            ("buildkit", "offline/buildkit", "v1")):
        copy = await skopeo_copy(f"{site.sigil.host}/{repo}:{tag}", tmp_path / name)
        assert copy.digest == images[name].digest
        assert copy.manifest() == images[name].manifest
        for blob in images[name].blobs:
            assert Digest.of(copy.blob(blob)) == Digest.parse(blob)
    for name, repo, tag in (("multi", "offline/multi", "v1"), ("dhi", "offline/dhi", "dhi")):
        copy = await skopeo_copy(f"{site.sigil.host}/{repo}:{tag}", tmp_path / name)
        assert copy.digest == images[name].index.digest
        for child in images[name].children.values():
            assert copy.manifest(child.digest) == child.manifest
    # Every allow was decided again offline (the offline policy has its own fingerprint).
    for policy, decided in (("offline-signed", 2), ("offline-attested", 3),
                            ("offline-keyless", 1)):
        assert site.sigil.metric("sigil_verifications_total",
                                 {"policy": policy, "result": "allowed", "reason": "ok"}
                                 ) >= decided, policy
    site.recorder.assert_untouched()


async def test_ctr_pulls_offline_through_hosts_toml(site: Site, containerd_daemon) -> None:
    multi = site.images["multi"]
    digest = await containerd_daemon.pull(f"{UPSTREAM}/offline/multi:v1",
                                          mirrors={UPSTREAM: site.sigil.url})
    assert digest == multi.index.digest
    assert any(e.get("ns") == UPSTREAM and e.get("status") == 200
               for e in site.sigil.log_events())
    site.recorder.assert_untouched()


async def test_podman_pulls_offline_through_registries_conf(site: Site) -> None:
    conf = registries_conf_mirror(UPSTREAM, f"{site.sigil.host}/{UPSTREAM}")
    image = await podman_pull(f"{UPSTREAM}/offline/signed:v1", conf)
    assert image.digest == site.images["signed"].digest
    site.recorder.assert_untouched()


# ---------------------------------------------------------------------------- what is absent
async def test_what_was_not_imported_is_not_found_at_once(site: Site, tmp_path: Path) -> None:
    # A tag the upstream had but nobody pulled: MANIFEST_UNKNOWN, and no connection attempt.
    status, body = http_get(site.url("offline/signed/manifests/notpulled"))
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    status, body = http_get(site.url(f"offline/signed/manifests/{site.images['notpulled'].digest}"))
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    with pytest.raises(ProcessError) as info:
        await skopeo_copy(f"{site.sigil.host}/offline/signed:notpulled", tmp_path / "x")
    assert "manifest unknown" in str(info.value).lower()
    # Verified offline, but its blobs were never stored: BLOB_UNKNOWN, not a download.
    lazy = site.images["lazy"]
    assert http_get(site.url("offline/lazy/manifests/v1")) == (200, lazy.manifest)
    for blob in lazy.blobs:
        status, body = http_get(site.url(f"offline/lazy/blobs/{blob}"))
        assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    # A repository never seen.
    status, body = http_get(site.url("offline/never/tags/list"))
    assert (status, error_code(body)) == (404, "NAME_UNKNOWN")
    assert site.sigil.metric("sigil_offline_misses_total",
                             {"upstream": UPSTREAM, "kind": "tag"}) >= 1
    assert site.sigil.metric("sigil_offline_misses_total",
                             {"upstream": UPSTREAM, "kind": "blob"}) >= 1
    site.recorder.assert_untouched()


async def test_denied_image_is_denied_again_offline(site: Site) -> None:
    status, body = http_get(site.url("offline/unsigned/manifests/v1"))
    assert (status, error_code(body)) == (403, "DENIED")
    assert "offline-signed" in json.loads(body)["errors"][0]["message"]
    for blob in site.images["unsigned"].blobs:
        assert http_get(site.url(f"offline/unsigned/blobs/{blob}"))[0] == 404
    assert site.sigil.metric("sigil_verifications_total",
                             {"policy": "offline-signed", "result": "denied",
                              "reason": "no_signature"}) >= 1
    site.recorder.assert_untouched()


# ------------------------------------------------- verifying again through the offline mirror
async def test_signature_tags_and_referrers_are_served_offline(site: Site) -> None:
    signed, att, dhi = site.images["signed"], site.images["att"], site.images["dhi"]
    assert http_get(site.url("offline/signed/manifests/v1"))[0] == 200
    status, body = http_get(site.url(f"offline/signed/manifests/{cosign_tag(signed.digest)}"))
    assert (status, body) == (200, site.sig_manifests["signed"].manifest)
    assert http_get(site.url("offline/att/manifests/v1"))[0] == 200
    status, body = http_get(site.url(f"offline/att/manifests/{cosign_tag(att.digest, 'att')}"))
    assert (status, body) == (200, site.sig_manifests["att"].manifest)

    assert http_get(site.url("offline/dhi/manifests/dhi"))[0] == 200
    status, body = http_get(site.url(f"offline/dhi/referrers/{dhi.index.digest}"))
    assert status == 200, body
    assert [m["artifactType"] for m in json.loads(body)["manifests"]] == [SIG_ARTIFACT]
    status, body = http_get(site.url(f"offline/dhi/manifests/{tag_schema_tag(dhi.index.digest)}"))
    assert status == 200, body
    child = dhi.children["linux/amd64"].digest
    url = site.url(f"offline/dhi/referrers/{child}?artifactType={quote(INTOTO)}")
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        listed = json.loads(response.read())["manifests"]
    assert [m["artifactType"] for m in listed] == [INTOTO]
    # Each listed referrer is served by digest, with the bytes its digest names.
    status, body = http_get(site.url(f"offline/dhi/manifests/{listed[0]['digest']}"))
    assert status == 200 and Digest.of(body) == Digest.parse(listed[0]["digest"])
    # The keyless image's sigstore bundle referrer, byte for byte as the upstream had it.
    keyless = site.images["keyless"]
    assert http_get(site.url("offline/keyless/manifests/v1"))[0] == 200
    status, body = http_get(site.url(f"offline/keyless/referrers/{keyless.digest}"))
    bundles = json.loads(body)["manifests"]
    assert [(m["artifactType"], m["digest"]) for m in bundles] == [
        (BUNDLE_V03, site.sig_manifests["keyless"].digest)]
    assert http_get(site.url(f"offline/keyless/manifests/{bundles[0]['digest']}")) == (
        200, site.sig_manifests["keyless"].manifest)
    site.recorder.assert_untouched()


async def test_tag_list_comes_from_the_store(site: Site) -> None:
    signed = site.images["signed"]
    status, body = http_get(site.url("offline/signed/tags/list"))
    assert status == 200
    # What the store holds: the pulled tag and the signature tag discovery read; not the
    # tag nobody pulled.
    assert json.loads(body) == {"name": "offline/signed",
                                "tags": sorted([cosign_tag(signed.digest), "v1"])}
    with urllib.request.urlopen(site.url("offline/signed/tags/list?n=1"), timeout=30) as page:
        first = json.loads(page.read())
        link = page.headers["Link"]
    assert first["tags"] == [cosign_tag(signed.digest)]
    assert f"last={quote(cosign_tag(signed.digest))}" in link and 'rel="next"' in link
    status, body = http_get(site.url(f"offline/signed/tags/list?n=1&last={first['tags'][0]}"))
    assert json.loads(body)["tags"] == ["v1"]
    site.recorder.assert_untouched()


async def test_ready_and_metrics_say_offline(site: Site) -> None:
    assert http_get(f"{site.sigil.url}/readyz")[0] == 200
    assert site.sigil.metric("sigil_offline") == 1
    with urllib.request.urlopen(f"{site.sigil.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = [line for line in text.splitlines()
               if line.startswith(("sigil_upstream_requests_total{",
                                   "sigil_stale_serves_total{"))]
    assert samples == []
    site.recorder.assert_untouched()


# ------------------------------------------------------------------------ sigil verify --offline
def _index_dump(store: Path) -> list[str]:
    db = sqlite3.connect(f"{(store / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return list(db.iterdump())
    finally:
        db.close()


async def test_sigil_verify_offline_explains_from_the_store(site: Site) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}

    def verify(ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigil", "verify", "--config",
                               str(site.sigil.config_path), "--offline", ref, *extra],
                              capture_output=True, text=True, timeout=120, env=env)

    before = _index_dump(site.sigil.store)
    ok = await asyncio.to_thread(verify, f"{UPSTREAM}/offline/dhi:dhi", "--json")
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads(ok.stdout)
    assert verdict["allowed"] and verdict["offline"]
    assert verdict["digest"] == site.images["dhi"].index.digest
    assert verdict["store"] == str(site.sigil.store)
    assert any("referrers" in check for check in verdict["checks"])
    denied = await asyncio.to_thread(verify, f"{UPSTREAM}/offline/unsigned:v1")
    assert denied.returncode == 1, denied.stderr
    assert "DENY" in denied.stdout and "offline-signed" in denied.stdout
    assert "(offline)" in denied.stdout
    missing = await asyncio.to_thread(verify, f"{UPSTREAM}/offline/signed:notpulled")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "is not in the store" in missing.stderr
    assert "Traceback" not in missing.stderr
    # Read-only: the index is exactly as before (the server was idle meanwhile).
    assert _index_dump(site.sigil.store) == before
    site.recorder.assert_untouched()


async def test_serve_offline_flag_on_the_same_store(site: Site) -> None:
    """``sigil serve --offline --workers 2`` on a config without server.offline: same
    behaviour in every worker."""
    config = yaml.safe_load(site.sigil.config_path.read_text())
    config["server"] = {"listen": f"127.0.0.1:{free_port()}"}
    config["log"] = {"level": "info", "format": "json"}
    path = site.workdir / "flag.yaml"
    path.write_text(yaml.safe_dump(config))
    base = f"http://{config['server']['listen']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    proc = start_daemon([sys.executable, "-m", "sigil", "serve", "--config", str(path),
                         "--offline", "--workers", "2"], log_path=site.workdir / "flag.log",
                        env=env)
    try:
        wait_until(lambda: http_status(f"{base}/readyz") == 200, timeout=30,
                   what="sigil serve --offline", proc=proc, log_path=site.workdir / "flag.log")
        assert http_get(f"{base}/v2/offline/signed/manifests/v1") == (
            200, site.images["signed"].manifest)
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            status, body = http_get(f"{base}/v2/offline/signed/manifests/notpulled")
            assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
                assert "sigil_offline 1.0" in response.read().decode()
    finally:
        stop_daemon(proc)
    site.recorder.assert_untouched()


# --------------------------------------------------------------- policy change, offline (last)
async def test_sighup_with_another_key_denies_what_was_served(site: Site) -> None:
    assert http_get(site.url("offline/signed/manifests/v1"))[0] == 200
    assert http_get(site.url("offline/multi/manifests/v1"))[0] == 200
    other = Signer("p256")
    (site.sigil.workdir / "policy.yaml").write_text(
        yaml.safe_dump(_policy(other, site.workdir, "rotated-")))
    assert site.sigil.proc is not None
    site.sigil.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not any(e.get("event") == "policy.reloaded" for e in site.sigil.log_events()):
        assert time.monotonic() < deadline, "no policy.reloaded event"
        await asyncio.sleep(0.05)
    for path in ("offline/signed/manifests/v1", "offline/multi/manifests/v1",
                 f"offline/signed/manifests/{site.images['signed'].digest}"):
        status, body = http_get(site.url(path))
        assert (status, error_code(body)) == (403, "DENIED"), path
        assert "rotated-signed" in json.loads(body)["errors"][0]["message"]
    for blob in site.images["signed"].blobs:
        assert http_get(site.url(f"offline/signed/blobs/{blob}"))[0] == 404
    site.recorder.assert_untouched()
