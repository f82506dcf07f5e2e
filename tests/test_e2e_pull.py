"""End to end: real upstream registry (distribution), sigil as a process, real clients."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realparts import (
    Containerd,
    RealRegistry,
    RegistryPusher,
    podman_pull,
    shipped_client_config,
    skopeo_copy,
)
from tests.support.sigilproc import SigilProcess

pytestmark = pytest.mark.realparts


@pytest.fixture
def sigil(real_registry: RealRegistry, tmp_path: Path) -> Iterator[SigilProcess]:
    """sigil with two upstream names over the one real registry: the default `docker.io`
    (docker registry-mirrors style) and `registry.test` (ns / path-prefix routing)."""
    upstreams = [
        {"name": "docker.io", "url": real_registry.url, "default": True, "aliases": ["hub"]},
        {"name": "registry.test", "url": real_registry.url},
    ]
    with SigilProcess(tmp_path / "sigil", upstreams) as process:
        yield process


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_skopeo_single_platform_digest_equal(sigil, registry_pusher: RegistryPusher,
                                                   unique_repo, tmp_path, real_registry) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v1", media="docker")
    copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "out")
    assert copy.digest == pushed.digest
    assert copy.manifest() == pushed.manifest
    for blob in pushed.blobs:
        assert _sha(copy.blob(blob)) == blob
    # Second pull: everything from the cache, no blob GET reaches the upstream.
    mark = real_registry.log_mark()
    again = await skopeo_copy(f"{sigil.host}/{unique_repo}:v1", tmp_path / "again")
    assert again.digest == pushed.digest
    upstream_blob_gets = [r for r in real_registry.requests(since=mark)
                          if "/blobs/" in r.path and r.method == "GET"]
    assert upstream_blob_gets == []


@pytest.mark.parametrize("media", ["oci", "docker"])
async def test_skopeo_multi_platform_all(sigil, registry_pusher, unique_repo, tmp_path,
                                         media) -> None:
    multi = await registry_pusher.make_multiplatform_image(unique_repo, "multi", media=media)
    copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:multi", tmp_path / "out",
                             layout="oci" if media == "oci" else "dir")
    assert copy.digest == multi.index.digest
    assert copy.manifest(multi.index.digest) == multi.index.manifest
    for child in multi.children.values():
        assert copy.manifest(child.digest) == child.manifest


async def test_skopeo_through_path_prefix(sigil, registry_pusher, unique_repo, tmp_path) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v2")
    copy = await skopeo_copy(f"{sigil.host}/registry.test/{unique_repo}:v2", tmp_path / "out")
    assert copy.digest == pushed.digest


async def test_concurrent_skopeo_clients_one_upstream_fetch(sigil, registry_pusher, unique_repo,
                                                            tmp_path, real_registry) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "big",
                                              [hashlib.sha256(b"x").digest() * 30_000])
    mark = real_registry.log_mark()
    copies = await asyncio.gather(*(
        skopeo_copy(f"{sigil.host}/{unique_repo}:big", tmp_path / f"out{i}") for i in range(4)))
    assert {c.digest for c in copies} == {pushed.digest}
    layer = pushed.blobs[-1]
    gets = [r for r in real_registry.requests(since=mark)
            if r.method == "GET" and r.path.endswith(layer)]
    assert len(gets) == 1


async def test_ctr_pull_through_hosts_toml(sigil, registry_pusher, unique_repo,
                                           containerd_daemon: Containerd) -> None:
    pushed = await registry_pusher.make_multiplatform_image(unique_repo, "c1")
    ref = f"registry.test/{unique_repo}:c1"
    # The shipped deploy/clients/containerd/hosts.toml (sigil as `server`), in registry.test/.
    hosts_dir = containerd_daemon.shipped_hosts_dir(["registry.test"], sigil.host)
    digest = await containerd_daemon.pull(ref, hosts_dir=hosts_dir)
    assert digest == pushed.index.digest
    # containerd routed with ?ns=registry.test: the mirror saw it.
    assert any(event.get("ns") == "registry.test" and event.get("status") == 200
               for event in sigil.log_events())


async def test_podman_pull_through_registries_conf(sigil, registry_pusher, unique_repo) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "p1")
    # The shipped deploy/clients/containers/registries.conf: docker.io -> sigil/docker.io.
    conf = shipped_client_config("containers/registries.conf", sigil.host)
    image = await podman_pull(f"docker.io/{unique_repo}:p1", conf)
    assert image.digest == pushed.digest
    assert any(event.get("path", "").startswith(f"/v2/docker.io/{unique_repo}/manifests/")
               and event.get("status") == 200 for event in sigil.log_events())


async def test_missing_image_is_manifest_unknown(sigil, tmp_path) -> None:
    # An unprefixed name goes to the default upstream, which does not have it.
    with pytest.raises(Exception) as info:
        await skopeo_copy(f"{sigil.host}/nowhere.example/x/y:z", tmp_path / "out")
    assert "manifest unknown" in str(info.value)
