"""The real-parts harness against the real registry directly (no sigil in between).

If these pass, a failure in an integration test that uses the harness is sigil's, not the
harness's: images pushed here are byte-identical when real clients pull them, containerd sends
``?ns=`` through a ``hosts.toml`` mirror, podman uses a ``registries.conf`` mirror with a path
prefix, and a client whose mirror refuses cannot reach anything else.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.realparts import (
    DEAD_PORT,
    Containerd,
    Layer,
    ProcessError,
    RealRegistry,
    RegistryPusher,
    podman_pull,
    registries_conf_mirror,
    skopeo_copy,
    skopeo_inspect_raw,
)
from tests.realparts.images import (
    COSIGN_SIMPLESIGNING,
    OCI_INDEX,
    Media,
    cosign_tag,
    make_tar_layer,
    random_bytes,
    sha256_digest,
    simple_signing_payload,
    tag_schema_tag,
)

pytestmark = pytest.mark.realparts

BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"


async def _get(url: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


# -- the registry ------------------------------------------------------------------------------


async def test_registry_answers_v2_and_has_no_referrers_api(real_registry: RealRegistry) -> None:
    status, body = await _get(f"{real_registry.url}/v2/")
    assert (status, body) == (200, b"{}")
    assert real_registry.host == f"127.0.0.1:{real_registry.port}"
    status, _ = await _get(f"{real_registry.url}/v2/t/x/referrers/sha256:{'0' * 64}")
    assert status == 404, "distribution 2.8 has no referrers API; tests rely on the tag schema"


def test_registry_stops_by_pid_and_cleans_up() -> None:
    registry = RealRegistry().start()
    directory, pid = registry.directory, registry.pid
    assert (directory / "config.yml").exists()
    registry.stop()
    assert not directory.exists()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_registry_logs_requests_since_a_mark(
    real_registry: RealRegistry,
    registry_pusher: RegistryPusher,
    registry_factory: Callable[..., RealRegistry],
    unique_repo: str,
) -> None:
    assert registry_factory().requests() == [], "readiness probes are not reported"
    image = await registry_pusher.make_image(unique_repo, "v1")
    mark = real_registry.log_mark()
    status, _ = await _get(f"{real_registry.url}/v2/{unique_repo}/blobs/{image.blobs[-1]}")
    assert status == 200
    wanted = f"/v2/{unique_repo}/blobs/{image.blobs[-1]}"
    deadline = time.monotonic() + 5
    while not (seen := [r for r in real_registry.requests(since=mark) if r.path == wanted]):
        assert time.monotonic() < deadline, "access log line never appeared"
        await asyncio.sleep(0.05)
    assert [(r.method, r.status) for r in seen] == [("GET", 200)]


async def test_proxy_mode_registry_pulls_through(
    real_registry: RealRegistry,
    registry_factory: Callable[..., RealRegistry],
    registry_pusher: RegistryPusher,
    unique_repo: str,
) -> None:
    """distribution as a pull-through cache of another RealRegistry (the benchmarks' rival)."""
    image = await registry_pusher.make_image(unique_repo, "v1", [random_bytes(4096)])
    cache = registry_factory(proxy_remote_url=real_registry.url)
    copied = await skopeo_inspect_raw(f"{cache.host}/{unique_repo}:v1")
    assert copied == image.manifest
    upstream_mark = real_registry.log_mark()
    status, body = await _get(f"{cache.url}/v2/{unique_repo}/blobs/{image.blobs[-1]}")
    assert status == 200 and sha256_digest(body) == image.blobs[-1]
    assert any(r.path.endswith(image.blobs[-1]) for r in real_registry.requests(upstream_mark))


# -- pushing and skopeo ------------------------------------------------------------------------


@pytest.mark.parametrize("media", ["oci", "docker"])
async def test_single_platform_image_copies_byte_for_byte(
    registry_pusher: RegistryPusher, real_registry: RealRegistry, unique_repo: str,
    tmp_path: Path, media: Media,
) -> None:
    layers = [make_tar_layer({"etc/hello": b"hi\n"}), random_bytes(100_000, seed=media)]
    image = await registry_pusher.make_image(unique_repo, "v1", layers, media=media)
    digest, manifest, blobs = image
    assert image.media_type.endswith(("oci.image.manifest.v1+json", "manifest.v2+json"))
    assert len(blobs) == 3  # config + 2 layers

    copied = await skopeo_copy(f"{real_registry.host}/{unique_repo}:v1", tmp_path / "out")
    assert copied.digest == digest
    assert copied.manifest() == manifest
    for blob in blobs:
        assert sha256_digest(copied.blob(blob)) == blob
    config = json.loads(copied.blob(blobs[0]))
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["diff_ids"][0] == sha256_digest(gzip.decompress(layers[0]))


@pytest.mark.parametrize("media", ["oci", "docker"])
async def test_multi_platform_image_copies_with_all_children(
    registry_pusher: RegistryPusher, real_registry: RealRegistry, unique_repo: str,
    tmp_path: Path, media: Media,
) -> None:
    multi = await registry_pusher.make_multiplatform_image(unique_repo, "v1", media=media)
    platforms = [(m["platform"]["os"], m["platform"]["architecture"])
                 for m in multi.index.parsed["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    assert multi.index.children == tuple(c.digest for c in multi.children.values())

    # An OCI layout holds OCI media types only; "dir" keeps Docker ones byte for byte.
    copied = await skopeo_copy(f"{real_registry.host}/{unique_repo}:v1", tmp_path / "out",
                               layout="oci" if media == "oci" else "dir")
    assert copied.digest == multi.index.digest
    assert copied.manifest() == multi.index.manifest
    for child in multi.children.values():
        assert copied.manifest(child.digest) == child.manifest
        for blob in child.blobs:
            assert sha256_digest(copied.blob(blob)) == blob
    arm = json.loads(await skopeo_inspect_raw(
        f"{real_registry.host}/{unique_repo}@{multi.children['linux/arm64'].digest}", config=True))
    assert arm["architecture"] == "arm64"


async def test_tag_schema_referrers_and_cosign_tags(
    registry_pusher: RegistryPusher, real_registry: RealRegistry, unique_repo: str
) -> None:
    subject = await registry_pusher.make_image(unique_repo, "v1")
    first, _ = await registry_pusher.push_tag_schema_referrer(
        unique_repo, subject, [Layer(b'{"n":1}', BUNDLE)], artifact_type=BUNDLE)
    second, index = await registry_pusher.push_tag_schema_referrer(
        unique_repo, subject, [Layer(b'{"n":2}', BUNDLE)], artifact_type=BUNDLE,
        annotations={"org.example": "two"})
    assert second.parsed["subject"] == subject.descriptor()
    assert second.parsed["artifactType"] == BUNDLE
    assert second.parsed["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"

    fetched = await registry_pusher.get_manifest(unique_repo, tag_schema_tag(subject.digest))
    assert fetched is not None
    body, media_type, digest = fetched
    assert (media_type, digest, body) == (OCI_INDEX, index.digest, index.manifest)
    entries = json.loads(body)["manifests"]
    assert [e["digest"] for e in entries] == [first.digest, second.digest]
    assert all(e["artifactType"] == BUNDLE for e in entries)
    assert entries[1]["annotations"] == {"org.example": "two"}

    payload = simple_signing_payload(f"{real_registry.host}/{unique_repo}", subject.digest)
    sig = await registry_pusher.push_cosign_signatures(
        unique_repo, subject.digest,
        [Layer(payload, COSIGN_SIMPLESIGNING, {"dev.cosignproject.cosign/signature": "MEUC"})])
    raw = await skopeo_inspect_raw(
        f"{real_registry.host}/{unique_repo}:{cosign_tag(subject.digest)}")
    assert raw == sig.manifest
    layer = json.loads(raw)["layers"][0]
    assert layer["annotations"]["dev.cosignproject.cosign/signature"] == "MEUC"
    assert layer["digest"] == sha256_digest(payload)
    assert sorted(await registry_pusher.list_tags(unique_repo)) == sorted(
        ["v1", tag_schema_tag(subject.digest), cosign_tag(subject.digest)])


async def test_distribution_hides_oci_manifests_from_a_docker_only_accept(
    registry_pusher: RegistryPusher, unique_repo: str
) -> None:
    """Worth knowing upstream-side: 2.8 answers 404 unless Accept names the OCI type."""
    image = await registry_pusher.make_image(unique_repo, "v1")
    docker_only = "application/vnd.docker.distribution.manifest.v2+json"
    assert await registry_pusher.get_manifest(unique_repo, "v1", accept=docker_only) is None
    assert await registry_pusher.get_manifest(unique_repo, image.digest) is not None


def test_make_tar_layer_is_a_stable_real_tar() -> None:
    files = {"a/b/c.txt": b"c", "top": b"top"}
    layer = make_tar_layer(files)
    assert layer == make_tar_layer(dict(reversed(files.items())))
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        names = tar.getnames()
        assert names == ["a", "a/b", "a/b/c.txt", "top"]
        member = tar.extractfile("a/b/c.txt")
        assert member is not None and member.read() == b"c"


# -- containerd --------------------------------------------------------------------------------


@pytest.mark.parametrize("override_path", [False, True], ids=["ns", "override-path"])
async def test_ctr_pulls_through_hosts_toml_mirror(
    containerd_daemon: Containerd,
    real_registry: RealRegistry,
    unique_repo: str,
    override_path: bool,
) -> None:
    # With override_path the mirror URL carries the API path: /v2/<prefix>/<repo>/...
    repo = f"mirror-prefix/{unique_repo}" if override_path else unique_repo
    mirror = f"{real_registry.url}/v2/mirror-prefix" if override_path else real_registry.url
    async with RegistryPusher(real_registry.url) as pusher:
        multi = await pusher.make_multiplatform_image(repo, "v1")
        amd64 = multi.children["linux/amd64"]
        layer = await pusher.get_blob(repo, amd64.blobs[1])
    assert layer is not None
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("hello")
        assert member is not None
        hello = member.read()
    mark = real_registry.log_mark()

    ref = f"registry.sigil.test/{unique_repo}:v1"
    digest = await containerd_daemon.pull(ref, mirrors={"registry.sigil.test": mirror},
                                          override_path=override_path)
    assert digest == multi.index.digest

    seen = real_registry.requests(since=mark)
    assert seen and all(r.target.endswith("?ns=registry.sigil.test") for r in seen)
    assert all(r.path.startswith(f"/v2/{repo}/") for r in seen), "no /v2/ ping, right prefix"
    assert all(r.status == 200 for r in seen)
    assert {r.path.rsplit("/", 1)[1] for r in seen if "/blobs/" in r.path} == set(amd64.blobs)
    unpacked = [(d / "hello").read_bytes() for d in containerd_daemon.snapshot_dirs()
                if (d / "hello").exists()]
    assert hello in unpacked, "containerd really unpacked the amd64 layer"
    await containerd_daemon.remove_image(ref)


async def test_ctr_does_not_fall_back_past_a_dead_mirror(
    containerd_daemon: Containerd, unique_repo: str
) -> None:
    ref = f"docker.io/{unique_repo}:v1"
    started = time.monotonic()
    with pytest.raises(ProcessError, match="connection refused"):
        await containerd_daemon.pull(
            ref, mirrors={"docker.io": f"http://127.0.0.1:{DEAD_PORT}"}, timeout=30)
    assert time.monotonic() - started < 20


# -- podman ------------------------------------------------------------------------------------


async def test_podman_pulls_via_registries_conf_mirror_with_path_prefix(
    real_registry: RealRegistry, unique_repo: str
) -> None:
    async with RegistryPusher(real_registry.url) as pusher:
        multi = await pusher.make_multiplatform_image(f"docker.io/{unique_repo}", "v1")
    mark = real_registry.log_mark()

    conf = registries_conf_mirror("docker.io", f"{real_registry.host}/docker.io")
    pulled = await podman_pull(f"docker.io/{unique_repo}:v1", conf)
    assert pulled.digest == multi.index.digest
    amd64 = multi.children["linux/amd64"]
    assert f"docker.io/{unique_repo}@{amd64.digest}" in pulled.repo_digests
    assert pulled.image_id == amd64.blobs[0].removeprefix("sha256:")  # the config digest

    seen = real_registry.requests(since=mark)
    assert any(r.path == f"/v2/docker.io/{unique_repo}/manifests/v1" for r in seen)
    assert not any("ns=" in r.target for r in seen), "podman sends no ns"


async def test_podman_does_not_fall_back_past_a_dead_mirror(unique_repo: str) -> None:
    conf = registries_conf_mirror("docker.io", f"127.0.0.1:{DEAD_PORT}/docker.io")
    with pytest.raises(ProcessError, match="connection refused"):
        await podman_pull(f"docker.io/{unique_repo}:v1", conf, timeout=30)


