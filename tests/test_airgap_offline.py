"""The whole air-gapped workflow of issue 7 in one round trip, with real parts only.

Connected side: a private docker-registry (started for this module, so it can be stopped)
holds the images of ``tests/test_airgap.py`` (a key-signed single-platform image, a signed
multi-platform index, a DHI-shaped index with attestation referrers, a keyless-signed image
with a sigstore bundle referrer, an unsigned image); ``sigil export`` runs the usual plan.

Far side: ``sigil import`` into a fresh store with its own config and its own copy of the
policy and trust files; then the registry is stopped and a listener that records every
connection takes its port (the far side's config still names that URL). ``sigil serve
--offline`` serves skopeo, containerd ``ctr`` (hosts.toml, ``?ns=``) and podman
(registries.conf) the upstream's digests, with the signature tags and referrers for verifying
again; ``sigil verify --offline`` explains an imported image. Every test checks that nothing
connected to the upstream port.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sigil.oci.digest import Digest
from tests.realparts import RealRegistry, podman_pull, registries_conf_mirror, skopeo_copy
from tests.realparts.images import cosign_tag
from tests.support.e2e import error_code, http_get
from tests.support.netrecord import ConnectionRecorder
from tests.support.sigilproc import SigilProcess
from tests.support.testsigstore import BUNDLE_V03
from tests.test_airgap import (
    UPSTREAM,
    Upstream,
    import_archives,
    local_side,
    make_upstream,
    plan_for,
    run_sigil,
    write_config,
)
from tests.test_verify_support import SIG_ARTIFACT

pytestmark = [pytest.mark.realparts, pytest.mark.timeout(300)]


@dataclass
class Gap:
    """Both sides of the gap, after export, import and the upstream's shutdown."""

    up: Upstream
    exported: dict[str, Any]
    export_code: int
    imported: dict[str, Any]
    import_code: int
    import_output: str
    sigil: SigilProcess        # the far side's sigil, serving --offline
    recorder: ConnectionRecorder

    def url(self, path: str) -> str:
        return f"{self.sigil.url}/v2/{self.up.prefix}/{path}"


@pytest.fixture(scope="module")
def gap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gap]:
    work = tmp_path_factory.mktemp("gap")
    registry = RealRegistry().start()
    recorder: ConnectionRecorder | None = None
    sigil: SigilProcess | None = None
    try:
        (work / "policy").mkdir()
        up = make_upstream(registry, work / "policy")
        # Connected side: export the plan (the unsigned image is denied and left out).
        connected = write_config(work / "connected.yaml", store=work / "unused",
                                 url=registry.url, policy=up.policy_dir / "policy.yaml")
        archive = work / "carry.tar"
        made = run_sigil("export", "--config", str(connected), "--plan",
                         str(plan_for(up, work / "plan.yaml")), "--output", str(archive),
                         "--json")
        # Far side: its own copies of the policy and trust files and a fresh store; its
        # config names the same upstream URL as the connected side (nothing answers there
        # once the registry is gone). SigilProcess rewrites local_side's config in place:
        # the same store and policy, plus a listen address.
        local = local_side(work, up).parent
        sigil = SigilProcess(local, [{"name": UPSTREAM, "url": registry.url, "default": True}],
                             str(local / "policy.yaml"))
        code, imported, output = import_archives(sigil.config_path, archive)
        port = registry.port
        registry.stop()
        recorder = ConnectionRecorder(port)
        sigil.start(args=["--offline"])
        yield Gap(up, json.loads(made.stdout), made.returncode, imported, code, output,
                  sigil, recorder)
    finally:
        if sigil is not None:
            sigil.stop()
        registry.stop()
        if recorder is not None:
            recorder.close()


def test_export_left_the_unsigned_image_out_and_import_loaded_the_rest(gap: Gap) -> None:
    p = f"{UPSTREAM}/{gap.up.prefix}"
    assert gap.export_code == 1   # the denied unsigned image
    assert [d["name"] for d in gap.exported["denied"]] == [f"{p}/unsigned:v1"]
    assert {i["name"] for i in gap.exported["images"]} == {
        f"{p}/single:v1", f"{p}/multi:v1", f"{p}/dhi:dhi", f"{p}/keyless:v1"}
    assert gap.import_code == 0, gap.import_output
    [archive] = gap.imported["archives"]
    assert archive["result"] == "loaded" and not archive["policy_differs"]
    assert [i["result"] for i in archive["images"]] == ["loaded"] * 4
    # Decided by the far side's own policy file, not the one carried in the archive.
    assert gap.imported["policy"]["file"] == str(gap.sigil.workdir / "policy.yaml")
    gap.recorder.assert_untouched()


async def test_skopeo_pulls_offline_with_upstream_digests(gap: Gap, tmp_path: Path) -> None:
    up, host = gap.up, gap.sigil.host
    for repo, image in (("single", up.single), ("keyless", up.keyless)):
        copy = await skopeo_copy(f"{host}/{up.prefix}/{repo}:v1", tmp_path / repo)
        assert copy.digest == image.digest
        assert copy.manifest() == image.manifest
    dhi = await skopeo_copy(f"{host}/{up.prefix}/dhi:dhi", tmp_path / "dhi")
    assert dhi.digest == up.dhi.index.digest
    for child in up.dhi.children.values():
        assert dhi.manifest(child.digest) == child.manifest
    # The plan carried only linux/amd64 of the multi-platform index: the index itself is
    # served byte-exact, that platform is pulled, the other one does not exist here.
    status, body = http_get(gap.url("multi/manifests/v1"))
    assert status == 200 and Digest.of(body) == Digest.parse(up.multi.index.digest)
    amd64, arm64 = up.multi.children["linux/amd64"], up.multi.children["linux/arm64"]
    multi = await skopeo_copy(f"{host}/{up.prefix}/multi:v1", tmp_path / "multi",
                              all_platforms=False)   # the host's platform: linux/amd64
    assert multi.digest == amd64.digest
    assert multi.manifest() == amd64.manifest
    status, body = http_get(gap.url(f"multi/manifests/{arm64.digest}"))
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    # Never exported: not found at once, never a wait for the upstream.
    status, body = http_get(gap.url("unsigned/manifests/v1"))
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    gap.recorder.assert_untouched()


async def test_ctr_pulls_offline_through_hosts_toml(gap: Gap, containerd_daemon) -> None:
    digest = await containerd_daemon.pull(f"{UPSTREAM}/{gap.up.prefix}/multi:v1",
                                          mirrors={UPSTREAM: gap.sigil.url})
    assert digest == gap.up.multi.index.digest
    assert any(e.get("ns") == UPSTREAM and e.get("status") == 200
               for e in gap.sigil.log_events())
    gap.recorder.assert_untouched()


async def test_podman_pulls_offline_through_registries_conf(gap: Gap) -> None:
    conf = registries_conf_mirror(UPSTREAM, f"{gap.sigil.host}/{UPSTREAM}")
    image = await podman_pull(f"{UPSTREAM}/{gap.up.prefix}/single:v1", conf)
    assert image.digest == gap.up.single.digest
    gap.recorder.assert_untouched()


async def test_signature_tag_and_referrers_answer_offline(gap: Gap) -> None:
    up = gap.up
    assert http_get(gap.url("single/manifests/v1"))[0] == 200
    status, body = http_get(gap.url(f"single/manifests/{cosign_tag(up.single.digest)}"))
    assert status == 200, body
    # Its payload is served too (a client verifies the signature again through the mirror):
    # the simple-signing payload naming the image's digest.
    [payload] = json.loads(body)["layers"]
    status, blob = http_get(gap.url(f"single/blobs/{payload['digest']}"))
    assert status == 200 and Digest.of(blob) == Digest.parse(payload["digest"])
    assert json.loads(blob)["critical"]["image"]["docker-manifest-digest"] == up.single.digest
    assert http_get(gap.url("keyless/manifests/v1"))[0] == 200
    status, body = http_get(gap.url(f"keyless/referrers/{up.keyless.digest}"))
    assert status == 200, body
    assert [(m["artifactType"], m["digest"]) for m in json.loads(body)["manifests"]] == [
        (BUNDLE_V03, up.keyless_sig.digest)]
    assert http_get(gap.url(f"keyless/manifests/{up.keyless_sig.digest}")) == (
        200, up.keyless_sig.manifest)
    assert http_get(gap.url("dhi/manifests/dhi"))[0] == 200
    status, body = http_get(gap.url(f"dhi/referrers/{up.dhi.index.digest}"))
    assert status == 200, body
    assert [m["artifactType"] for m in json.loads(body)["manifests"]] == [SIG_ARTIFACT]
    gap.recorder.assert_untouched()


async def test_sigil_verify_offline_explains_an_imported_image(gap: Gap) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}

    def verify(ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigil", "verify", "--config",
                               str(gap.sigil.config_path), "--offline", ref, *extra],
                              capture_output=True, text=True, timeout=120, env=env)

    p = f"{UPSTREAM}/{gap.up.prefix}"
    ok = await asyncio.to_thread(verify, f"{p}/dhi:dhi", "--json")
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads(ok.stdout)
    assert verdict["allowed"] and verdict["offline"]
    assert verdict["digest"] == gap.up.dhi.index.digest
    assert verdict["policy_file"] == str(gap.sigil.workdir / "policy.yaml")
    assert any("provenance" in check for check in verdict["checks"]), verdict["checks"]
    missing = await asyncio.to_thread(verify, f"{p}/unsigned:v1")
    assert missing.returncode == 2
    assert "is not in the store" in missing.stderr and "Traceback" not in missing.stderr
    gap.recorder.assert_untouched()
