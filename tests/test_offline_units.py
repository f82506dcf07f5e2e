"""Offline serving in process: the offline upstream stand-in (contract with UpstreamClient),
the ``server.offline`` key and flags, and the mirror over a real store and index offline."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sigil import metrics
from sigil.cli import _parser
from sigil.config import build_config
from sigil.errors import BlobUnknown, ConfigError, ManifestUnknown, NameUnknown
from sigil.oci.digest import Digest
from sigil.server.app import build_app
from sigil.storage import BlobStore, Index
from sigil.upstream import UpstreamClient
from sigil.upstream.client import KIND_BLOB, KIND_MANIFEST, KIND_MANIFEST_HEAD
from sigil.upstream.offline import OfflineUpstreamClient
from sigil.verify.engine import Verifier
from sigil.verify.policy import load_policy
from tests.realparts.images import (
    EMPTY_JSON,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    descriptor,
    image_manifest,
)
from tests.support.sigilproc import free_port
from tests.test_offline_serve import ConnectionRecorder
from tests.test_verify_support import SIG_ARTIFACT

PUBLIC_API = ("start", "close", "head_manifest", "get_manifest", "open_blob", "get_blob_bytes",
              "get_tags", "get_referrers")


@pytest.fixture
def recorder() -> Iterator[ConnectionRecorder]:
    listener = ConnectionRecorder(free_port())
    yield listener
    listener.close()


def _config(root: Path, url: str, **server: Any) -> Any:
    return build_config({"server": server, "storage": {"root": str(root)},
                         "upstreams": [{"name": "registry.test", "url": url, "default": True,
                                        "tag_ttl": "1s"}],
                         "log": {"level": "warning"}}, env={})


# ------------------------------------------------------------------------- the stand-in
def test_offline_client_has_the_upstream_client_interface() -> None:
    for name in PUBLIC_API:
        real = inspect.signature(getattr(UpstreamClient, name))
        stand_in = inspect.signature(getattr(OfflineUpstreamClient, name))
        assert list(real.parameters) == list(stand_in.parameters), name
        assert [p.default for p in real.parameters.values()] == \
            [p.default for p in stand_in.parameters.values()], name
        assert inspect.iscoroutinefunction(getattr(UpstreamClient, name)) == \
            inspect.iscoroutinefunction(getattr(OfflineUpstreamClient, name)), name


async def test_offline_client_answers_not_found_at_once_and_never_connects(
        tmp_path: Path, recorder: ConnectionRecorder) -> None:
    config = _config(tmp_path, f"http://127.0.0.1:{recorder.port}")
    client = OfflineUpstreamClient(config.upstreams[0])
    digest = Digest.of(b"x")

    def misses(kind: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "sigil_offline_misses_total", {"upstream": "registry.test", "kind": kind})
        return value or 0.0

    before = {k: misses(k) for k in (KIND_MANIFEST_HEAD, KIND_MANIFEST, KIND_BLOB)}
    async with client:
        with pytest.raises(ManifestUnknown, match="serves offline"):
            await client.head_manifest("a/b", "v1", "")
        with pytest.raises(ManifestUnknown):
            await client.get_manifest("a/b", str(digest), "")
        with pytest.raises(BlobUnknown):
            async with client.open_blob("a/b", digest):
                pytest.fail("an offline blob opened")
        with pytest.raises(BlobUnknown):
            await client.get_blob_bytes("a/b", digest, 1024)
        with pytest.raises(NameUnknown):
            await client.get_tags("a/b")
        assert await client.get_referrers("a/b", digest) is None
    assert misses(KIND_MANIFEST_HEAD) == before[KIND_MANIFEST_HEAD] + 1
    assert misses(KIND_MANIFEST) == before[KIND_MANIFEST] + 1
    assert misses(KIND_BLOB) == before[KIND_BLOB] + 2
    recorder.assert_untouched()


# ------------------------------------------------------------------- config and flags
def test_server_offline_key_default_env_and_bad_value(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"
    assert _config(tmp_path, url).server.offline is False
    assert _config(tmp_path, url, offline=True).server.offline is True
    by_env = build_config({"upstreams": [{"name": "r.test", "url": url}]},
                          env={"SIGIL_SERVER_OFFLINE": "true"})
    assert by_env.server.offline is True
    with pytest.raises(ConfigError, match=r"server\.offline.*true or false"):
        build_config({"server": {"offline": "sometimes"},
                      "upstreams": [{"name": "r.test", "url": url}]}, source="cfg.yaml", env={})


def test_offline_flags_parse() -> None:
    assert _parser().parse_args(["serve", "--offline"]).offline is True
    assert _parser().parse_args(["serve"]).offline is False
    assert _parser().parse_args(["verify", "--offline", "r.test/a:v1"]).offline is True


def test_verify_offline_without_a_store_is_one_line_exit_2(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text('policies: [{name: open, images: ["**"], static: pass}]\n')
    config = tmp_path / "sigil.yaml"
    config.write_text(json.dumps({"storage": {"root": str(tmp_path / "none")},
                                  "policy": str(policy),
                                  "upstreams": [{"name": "r.test", "url": "http://127.0.0.1:9"}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    done = subprocess.run([sys.executable, "-m", "sigil", "verify", "--config", str(config),
                           "--offline", "r.test/a/b:v1"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("sigil: no sigil store at ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "none").exists()  # nothing created


# ------------------------------------------------------------- the mirror, offline, in process
def _image(tag_note: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(manifest, config, first layer, second layer) of a small OCI image."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "note": tag_note}).encode()
    layers = [os.urandom(64), os.urandom(64)]
    manifest = image_manifest(descriptor(OCI_CONFIG, config),
                              [descriptor(OCI_LAYER_GZIP, layer) for layer in layers])
    return manifest, config, layers[0], layers[1]


def _store_image(store: BlobStore, index: Index, manifest: bytes, blobs: list[bytes],
                 refs: list[bytes]) -> Digest:
    """Store ``manifest`` and ``blobs`` and index them as an import does; ``refs`` are what
    the manifest references (stored or not). Returns the manifest digest."""
    for blob in blobs:
        store.put_bytes(Digest.of(blob), blob)
        index.put_blob(Digest.of(blob), len(blob))
    digest = Digest.of(manifest)
    store.put_bytes(digest, manifest)
    index.put_manifest(digest, OCI_MANIFEST, len(manifest), [Digest.of(r) for r in refs])
    return digest


@pytest.fixture
async def offline_app(tmp_path: Path, recorder: ConnectionRecorder
                      ) -> AsyncIterator[tuple[TestClient[Any, Any], Index, dict[str, Any]]]:
    """An offline sigil (no policy: allow all) over a store filled as an import fills it,
    with tags recorded long ago (far past tag_ttl and max_stale)."""
    root = tmp_path / "store"
    store, index = BlobStore(root), Index(root / "index.sqlite")
    # The second layer is referenced by the manifest (the blob gate allows it once the
    # manifest passed) but was never stored.
    manifest, config, layer, absent_layer = _image("v1")
    digest = _store_image(store, index, manifest, [config, layer], [config, layer, absent_layer])
    for tag in ("v1", "v1.0", "latest"):
        index.put_tag("registry.test", "app/web", tag, digest, OCI_MANIFEST, checked_at=0.0)
    # A signature referrer of the image (stored, linked), and a link to one never stored.
    store.put_bytes(Digest.of(EMPTY_JSON), EMPTY_JSON)
    index.put_blob(Digest.of(EMPTY_JSON), len(EMPTY_JSON))
    referrer = image_manifest(descriptor(OCI_EMPTY, EMPTY_JSON), [],
                              artifact_type=SIG_ARTIFACT,
                              subject=descriptor(OCI_MANIFEST, manifest))
    store.put_bytes(Digest.of(referrer), referrer)
    index.put_manifest(Digest.of(referrer), OCI_MANIFEST, len(referrer), [Digest.of(EMPTY_JSON)])
    index.add_referrer(digest, Digest.of(referrer))
    index.add_referrer(digest, Digest.of(b"a referrer nobody imported"))
    # A tag whose manifest is not in the store (its row survives a miss).
    gone, *_ = _image("gone")
    index.put_tag("registry.test", "app/web", "gone", Digest.of(gone), OCI_MANIFEST, 0.0)
    index.close()
    app = build_app(_config(root, f"http://127.0.0.1:{recorder.port}", offline=True))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    reader = Index(root / "index.sqlite")
    info = {"digest": digest, "manifest": manifest, "layer": Digest.of(layer),
            "absent_layer": Digest.of(absent_layer), "referrer": Digest.of(referrer)}
    yield client, reader, info
    reader.close()
    await client.close()
    recorder.assert_untouched()


async def test_offline_mirror_serves_old_tags_without_counting_them_stale(offline_app) -> None:
    client, index, info = offline_app
    stale_before = metrics.REGISTRY.get_sample_value(
        "sigil_stale_serves_total", {"upstream": "registry.test"}) or 0.0
    for tag in ("v1", "latest"):
        response = await client.get(f"/v2/app/web/manifests/{tag}")
        assert response.status == 200
        assert await response.read() == info["manifest"]
        assert response.headers["Docker-Content-Digest"] == str(info["digest"])
    blob = await client.get(f"/v2/app/web/blobs/{info['layer']}")
    assert blob.status == 200 and Digest.of(await blob.read()) == info["layer"]
    assert (metrics.REGISTRY.get_sample_value("sigil_stale_serves_total",
                                              {"upstream": "registry.test"}) or 0.0) \
        == stale_before
    # An old tag is still as old: serving it offline is not a revalidation.
    row = index.get_tag("registry.test", "app/web", "v1")
    assert row is not None and row.checked_at == 0.0


async def test_offline_mirror_misses_are_not_found_and_keep_stored_tags(offline_app) -> None:
    client, index, info = offline_app
    for path in ("/v2/app/web/manifests/gone", "/v2/app/web/manifests/never",
                 f"/v2/app/web/manifests/{Digest.of(b'nothing')}"):
        response = await client.get(path)
        assert response.status == 404, path
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # The stored tag whose manifest is missing was not "forgotten" by the miss.
    assert index.get_tag("registry.test", "app/web", "gone") is not None
    # A blob the verified manifest does not name: gated. One it names but nobody stored:
    # allowed, absent, BLOB_UNKNOWN at once.
    assert (await client.get("/v2/app/web/manifests/v1")).status == 200
    misses = metrics.REGISTRY.get_sample_value(
        "sigil_offline_misses_total", {"upstream": "registry.test", "kind": "blob"}) or 0.0
    for blob in (info["absent_layer"], Digest.of(b"unrelated")):
        response = await client.get(f"/v2/app/web/blobs/{blob}")
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    # Only the allowed one reached the offline store miss (the other stopped at the gate).
    assert metrics.REGISTRY.get_sample_value(
        "sigil_offline_misses_total", {"upstream": "registry.test", "kind": "blob"}) \
        == misses + 1


async def test_offline_tag_list_is_the_stored_tags_paginated(offline_app) -> None:
    client, _, _ = offline_app
    response = await client.get("/v2/app/web/tags/list")
    assert await response.json() == {"name": "app/web",
                                     "tags": ["gone", "latest", "v1", "v1.0"]}
    page = await client.get("/v2/app/web/tags/list?n=2")
    assert (await page.json())["tags"] == ["gone", "latest"]
    assert page.headers["Link"] == '</v2/app/web/tags/list?n=2&last=latest>; rel="next"'
    last = await client.get("/v2/app/web/tags/list?n=2&last=latest")
    assert (await last.json())["tags"] == ["v1", "v1.0"] and "Link" not in last.headers
    unknown = await client.get("/v2/app/other/tags/list")
    assert unknown.status == 404
    assert (await unknown.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    ready = await client.get("/readyz")
    assert ready.status == 200


async def test_offline_referrers_come_from_the_index_links(offline_app) -> None:
    client, _, info = offline_app
    # Only for a verified subject, as online.
    assert (await client.get(f"/v2/app/web/referrers/{info['digest']}")).status == 403
    assert (await client.get("/v2/app/web/manifests/v1")).status == 200
    response = await client.get(f"/v2/app/web/referrers/{info['digest']}")
    assert response.status == 200
    listed = (await response.json())["manifests"]
    # The stored referrer; the link to a manifest that is not in the store is left out.
    assert [(m["digest"], m["artifactType"]) for m in listed] == [
        (str(info["referrer"]), SIG_ARTIFACT)]
    served = await client.get(f"/v2/app/web/manifests/{info['referrer']}")
    assert served.status == 200 and Digest.of(await served.read()) == info["referrer"]
    # A subject with no links and no tag-schema index: an empty list, not an error.
    other = await client.get(f"/v2/app/web/referrers/{info['referrer']}")
    assert other.status == 200 and (await other.json())["manifests"] == []


async def test_a_verdict_is_not_reused_for_another_repository(
        tmp_path: Path, recorder: ConnectionRecorder) -> None:
    """The verdict cache is per image, not per digest: the same manifest allowed in one
    repository is decided again, and here denied, in another whose policy differs (a digest
    is the same bytes, not the same policy subject). Not specific to offline serving; offline
    only makes a filled store the whole set-up."""
    root = tmp_path / "store"
    store, index = BlobStore(root), Index(root / "index.sqlite")
    manifest, *blobs = _image("shared")
    digest = _store_image(store, index, manifest, blobs, blobs)
    for repo in ("app/open", "app/closed"):
        index.put_tag("registry.test", repo, "v1", digest, OCI_MANIFEST, checked_at=0.0)
    index.close()
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"policies": [
        {"name": "open", "images": ["registry.test/app/open"], "static": "pass"},
        {"name": "closed", "images": ["registry.test/app/closed"], "static": "deny"}]}))
    app = build_app(_config(root, f"http://127.0.0.1:{recorder.port}", offline=True),
                    Verifier(load_policy(policy)))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.get("/v2/app/open/manifests/v1")).status == 200
        for reference in ("v1", str(digest)):
            denied = await client.get(f"/v2/app/closed/manifests/{reference}")
            assert denied.status == 403, reference
            assert (await denied.json())["errors"][0]["code"] == "DENIED"
        gated = await client.get(f"/v2/app/closed/blobs/{Digest.of(blobs[1])}")
        assert gated.status == 404
        # Still allowed where its policy passes it.
        assert (await client.get(f"/v2/app/open/manifests/{digest}")).status == 200
    recorder.assert_untouched()


async def test_offline_a_tag_moved_in_the_index_is_served_after_tag_ttl(
        tmp_path: Path, recorder: ConnectionRecorder) -> None:
    """Offline the index is the source of tags: a tag that an import moves while the server
    runs is seen once the tag's in-memory copy is older than tag_ttl, as an online sigil sees
    a tag moved upstream (the memory table used to keep the first digest until a restart)."""
    root = tmp_path / "store"
    store, index = BlobStore(root), Index(root / "index.sqlite")
    first, *first_blobs = _image("first")
    second, *second_blobs = _image("second")
    old = _store_image(store, index, first, first_blobs, first_blobs)
    new = _store_image(store, index, second, second_blobs, second_blobs)
    index.put_tag("registry.test", "app/web", "v1", old, OCI_MANIFEST, checked_at=0.0)
    config = build_config({"server": {"offline": True}, "storage": {"root": str(root)},
                           "upstreams": [{"name": "registry.test", "default": True,
                                          "url": f"http://127.0.0.1:{recorder.port}",
                                          "tag_ttl": "1ms"}],
                           "log": {"level": "warning"}}, env={})
    async with TestClient(TestServer(build_app(config), host="127.0.0.1")) as client:
        served = await client.get("/v2/app/web/manifests/v1")
        assert served.headers["Docker-Content-Digest"] == str(old)
        # `sigil import` of a newer v1, written to the index by another process.
        index.put_tag("registry.test", "app/web", "v1", new, OCI_MANIFEST, checked_at=0.0)
        await asyncio.sleep(0.01)  # past tag_ttl (1 ms)
        moved = await client.get("/v2/app/web/manifests/v1")
        assert moved.status == 200
        assert moved.headers["Docker-Content-Digest"] == str(new)
        assert await moved.read() == second
        # The tag's row is read, not rewritten: it keeps the age the import gave it.
        row = index.get_tag("registry.test", "app/web", "v1")
        assert row is not None and row.checked_at == 0.0
    index.close()
    recorder.assert_untouched()
