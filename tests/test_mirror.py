"""The mirror's serve path against an in-process upstream that can inject faults."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError
from aiohttp.test_utils import TestClient, TestServer

from sigil import metrics
from sigil.config import build_config
from sigil.server.app import build_app
from sigil.server.state import MIRROR
from sigil.storage.gc import fsck
from tests.support.fakeupstream import FakeUpstream, sha

OCI_ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
              ", application/vnd.docker.distribution.manifest.v2+json")


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, TestServer]]:
    fake = FakeUpstream()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, server
    await server.close()


MirrorFactory = Callable[..., "asyncio.Future[TestClient[Any, Any]]"]


@pytest.fixture
async def make_mirror(tmp_path, upstream) -> AsyncIterator[Any]:
    clients: list[TestClient[Any, Any]] = []
    _, server = upstream

    async def make(**upstream_overrides: Any) -> TestClient[Any, Any]:
        up = {"name": "docker.io", "url": str(server.make_url("")).rstrip("/"),
              "default": True, "aliases": ["hub"], "retries": 0, "read_timeout": "2s",
              "connect_timeout": "2s"}
        up.update(upstream_overrides)
        config = build_config({"storage": {"root": str(tmp_path / "store")},
                               "upstreams": [up, {"name": "other.example",
                                                  "url": "http://127.0.0.1:9"}],
                               "log": {"level": "warning"}}, env={})
        client = TestClient(TestServer(build_app(config), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_base_endpoint(make_mirror) -> None:
    client = await make_mirror()
    response = await client.get("/v2/")
    assert response.status == 200
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


async def test_manifest_by_tag_byte_exact_and_head_matches_get(make_mirror, upstream) -> None:
    fake, _ = upstream
    digest, raw = fake.add_image("library/app", "v1", [b"layer-one"])
    client = await make_mirror()
    get = await client.get("/v2/app/manifests/v1", headers={"Accept": OCI_ACCEPT})
    assert get.status == 200, await get.text()
    assert await get.read() == raw
    head = await client.head("/v2/app/manifests/v1", headers={"Accept": OCI_ACCEPT})
    for header in ("Docker-Content-Digest", "Content-Type", "Content-Length", "ETag"):
        assert head.headers[header] == get.headers[header]
    assert get.headers["Docker-Content-Digest"] == digest
    assert int(get.headers["Content-Length"]) == len(raw)


async def test_digest_reference_needs_no_upstream_once_cached(make_mirror, upstream) -> None:
    fake, _ = upstream
    digest, raw = fake.add_image("library/app", "v1", [b"x"])
    client = await make_mirror()
    assert (await client.get(f"/v2/app/manifests/{digest}")).status == 200
    fake.faults[digest] = "503"
    again = await client.get(f"/v2/app/manifests/{digest}")
    assert again.status == 200
    assert await again.read() == raw
    assert fake.hits[f"GET manifest {digest}"] == 1


async def test_routing_ns_alias_and_default(make_mirror, upstream) -> None:
    fake, _ = upstream
    fake.add_image("library/app", "v1", [b"x"])
    fake.add_image("acme/tool", "v2", [b"y"])
    client = await make_mirror()
    assert (await client.get("/v2/library/app/manifests/v1?ns=docker.io")).status == 200
    assert (await client.get("/v2/hub/acme/tool/manifests/v2")).status == 200
    assert (await client.get("/v2/docker.io/library/app/manifests/v1")).status == 200
    unknown = await client.get("/v2/library/app/manifests/v1?ns=nowhere.example")
    assert unknown.status == 404
    assert (await unknown.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_blob_gate_and_range(make_mirror, upstream) -> None:
    fake, _ = upstream
    layer = os.urandom(300_000)
    fake.add_image("library/app", "v1", [layer])
    stray = os.urandom(1000)
    fake.blobs[sha(stray)] = stray
    client = await make_mirror()
    # Not referenced by a verified manifest yet: the mirror does not act as an open proxy.
    gated = await client.get(f"/v2/app/blobs/{sha(layer)}")
    assert gated.status == 404
    assert (await gated.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    await client.get("/v2/app/manifests/v1")
    objects, stored = metrics.STORE_OBJECTS._value.get(), metrics.STORE_BYTES._value.get()
    cold = await client.get(f"/v2/app/blobs/{sha(layer)}")
    assert cold.status == 200 and await cold.read() == layer
    # The last byte leaves once the digest matched; the commit (fsync, rename, index row)
    # follows it, so wait for the download to leave the table before looking at the store.
    downloads = client.server.app[MIRROR].downloads
    for _ in range(500):
        if not len(downloads):
            break
        await asyncio.sleep(0.01)
    assert metrics.STORE_OBJECTS._value.get() == objects + 1
    assert metrics.STORE_BYTES._value.get() == stored + len(layer)
    warm = await client.get(f"/v2/app/blobs/{sha(layer)}", headers={"Range": "bytes=10-19"})
    assert warm.status == 206
    assert await warm.read() == layer[10:20]
    head = await client.head(f"/v2/app/blobs/{sha(layer)}")
    assert int(head.headers["Content-Length"]) == len(layer)
    assert head.headers["Docker-Content-Digest"] == sha(layer)
    assert (await client.get(f"/v2/app/blobs/{sha(stray)}")).status == 404
    # Another repository did not verify a manifest referencing the layer.
    assert (await client.get(f"/v2/other/blobs/{sha(layer)}")).status == 404


async def test_single_flight_twenty_clients_one_upstream_get(make_mirror, upstream) -> None:
    fake, _ = upstream
    layer = os.urandom(4 * 1024 * 1024)
    fake.add_image("library/app", "v1", [layer])
    fake.blob_delay = 0.005  # keep the download in flight while clients join
    client = await make_mirror()
    await client.get("/v2/app/manifests/v1")
    before = metrics.COALESCED_WAITERS._value.get()

    async def pull() -> bytes:
        response = await client.get(f"/v2/app/blobs/{sha(layer)}")
        assert response.status == 200
        return await response.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(body == layer for body in bodies)
    assert fake.hits[f"GET blob {sha(layer)}"] == 1
    assert metrics.COALESCED_WAITERS._value.get() - before == 19


async def test_download_survives_client_disconnect(make_mirror, upstream) -> None:
    fake, _ = upstream
    layer = os.urandom(2 * 1024 * 1024)
    fake.add_image("library/app", "v1", [layer])
    fake.blob_delay = 0.01
    client = await make_mirror()
    await client.get("/v2/app/manifests/v1")
    response = await client.get(f"/v2/app/blobs/{sha(layer)}")
    await response.content.read(1000)
    response.close()  # the client goes away mid-body
    mirror = client.server.app[MIRROR]
    for _ in range(200):
        if mirror.store.blobs.has(_digest(sha(layer))):
            break
        await asyncio.sleep(0.05)
    assert mirror.store.blobs.path(_digest(sha(layer))).read_bytes() == layer
    assert fake.hits[f"GET blob {sha(layer)}"] == 1


def _digest(text: str) -> Any:
    from sigil.oci.digest import Digest
    return Digest.parse(text)


@pytest.mark.parametrize("fault", ["wrong-bytes", "cut"])
async def test_bad_blob_is_never_served_complete_nor_cached(make_mirror, upstream, fault) -> None:
    fake, _ = upstream
    layer = os.urandom(1024 * 1024)
    fake.add_image("library/app", "v1", [layer])
    fake.faults[sha(layer)] = fault
    client = await make_mirror()
    await client.get("/v2/app/manifests/v1")
    received = b""
    failed = False
    try:
        response = await client.get(f"/v2/app/blobs/{sha(layer)}")
        if response.status != 200:
            failed = True
        else:
            received = await response.read()
    except (ClientPayloadError, ServerDisconnectedError):
        failed = True
    assert failed or len(received) < len(layer)
    assert received != layer
    mirror = client.server.app[MIRROR]
    assert not mirror.store.blobs.has(_digest(sha(layer)))
    report = fsck(mirror.store.blobs, mirror.index.sync)
    assert report.ok
    # The server keeps serving.
    assert (await client.get("/v2/")).status == 200


@pytest.mark.parametrize(("fault", "code", "status"), [
    ("429", "TOOMANYREQUESTS", 429), ("503", "UNAVAILABLE", None), ("hang", "UNAVAILABLE", None)])
async def test_upstream_faults_become_oci_errors(make_mirror, upstream, fault, code,
                                                 status) -> None:
    fake, _ = upstream
    fake.add_image("library/app", "v1", [b"x"])
    fake.faults["v1"] = fault
    client = await make_mirror(read_timeout="1s")
    response = await client.get("/v2/app/manifests/v1")
    body = await response.json()
    assert body["errors"][0]["code"] == code
    if status is not None:
        assert response.status == status
    else:
        assert response.status in (502, 503, 504)


async def test_stale_tag_served_when_upstream_down(make_mirror, upstream) -> None:
    fake, _ = upstream
    _, raw = fake.add_image("library/app", "v1", [b"x"])
    client = await make_mirror(tag_ttl="0s", max_stale="1h")
    assert (await client.get("/v2/app/manifests/v1")).status == 200
    fake.faults["v1"] = "503"
    before = metrics.STALE_SERVES.labels("docker.io")._value.get()
    stale = await client.get("/v2/app/manifests/v1")
    assert stale.status == 200 and await stale.read() == raw
    assert metrics.STALE_SERVES.labels("docker.io")._value.get() == before + 1


async def test_tag_moved_upstream_is_seen_after_ttl(make_mirror, upstream) -> None:
    fake, _ = upstream
    first, _ = fake.add_image("library/app", "v1", [b"one"])
    client = await make_mirror(tag_ttl="0s")
    one = await client.get("/v2/app/manifests/v1")
    assert one.headers["Docker-Content-Digest"] == first
    second, raw = fake.add_image("library/app", "v1", [b"two"])
    two = await client.get("/v2/app/manifests/v1")
    assert two.headers["Docker-Content-Digest"] == second
    assert await two.read() == raw


async def test_tag_within_ttl_is_not_revalidated(make_mirror, upstream) -> None:
    fake, _ = upstream
    fake.add_image("library/app", "v1", [b"one"])
    client = await make_mirror(tag_ttl="1h")
    for _ in range(5):
        assert (await client.head("/v2/app/manifests/v1")).status == 200
    assert fake.hits["HEAD manifest v1"] == 1


async def test_malformed_and_oversized_manifests_are_refused(make_mirror, upstream) -> None:
    fake, _ = upstream
    fake.add_raw("library/app", "bad", b"{not json", "application/vnd.oci.image.manifest.v1+json")
    big = b'{"schemaVersion": 2, "layers": [], "pad": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    fake.add_raw("library/app", "big", big, "application/vnd.oci.image.manifest.v1+json")
    client = await make_mirror()
    for tag in ("bad", "big"):
        response = await client.get(f"/v2/app/manifests/{tag}")
        assert response.status >= 400
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    mirror = client.server.app[MIRROR]
    assert mirror.index.sync.get_tag("docker.io", "library/app", "bad") is None
    assert not mirror.store.blobs.has(_digest(sha(b"{not json")))


@pytest.mark.parametrize(("path", "code"), [
    ("/v2/../etc/manifests/latest", "NAME_INVALID"),
    ("/v2/a%2Fb/manifests/latest", "NAME_INVALID"),
    ("/v2/" + "a" * 300 + "/manifests/latest", "NAME_INVALID"),
    ("/v2/UPPER/manifests/latest", "NAME_INVALID"),
    ("/v2/app/manifests/bad!tag", "TAG_INVALID"),
    ("/v2/app/manifests/md5:0123", "DIGEST_INVALID"),
    ("/v2/app/blobs/sha512:" + "a" * 128, "DIGEST_INVALID"),
    ("/v2/app/blobs/sha256:xyz", "DIGEST_INVALID"),
])
async def test_bad_input_gets_oci_errors(make_mirror, path, code) -> None:
    client = await make_mirror()
    # A raw request: HTTP client libraries would normalise "..", which is what we test.
    status, body = await _raw_get(client.server.port, path)
    assert 400 <= status < 500
    assert json.loads(body)["errors"][0]["code"] == code


async def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/app/blobs/uploads/"),
    ("PUT", "/v2/app/manifests/v1"),
    ("DELETE", "/v2/app/manifests/v1"),
    ("POST", "/v2/app/blobs/uploads/?mount=sha256:" + "a" * 64 + "&from=other"),
])
async def test_writes_are_unsupported(make_mirror, method, path) -> None:
    client = await make_mirror()
    response = await client.request(method, path)
    assert response.status == 405
    assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_tags_list_pagination(make_mirror, upstream) -> None:
    fake, _ = upstream
    for tag in ("a", "b", "c"):
        fake.add_image("library/app", tag, [tag.encode()])
    client = await make_mirror()
    first = await client.get("/v2/app/tags/list?n=2")
    assert (await first.json()) == {"name": "app", "tags": ["a", "b"]}
    assert first.headers["Link"] == '</v2/app/tags/list?n=2&last=b>; rel="next"'
    second = await client.get("/v2/app/tags/list?n=2&last=b")
    assert (await second.json())["tags"] == ["c"]
    assert "Link" not in second.headers
    bad = await client.get("/v2/app/tags/list?n=-1")
    assert (await bad.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


async def test_ops_endpoints(make_mirror, upstream) -> None:
    fake, _ = upstream
    fake.add_image("library/app", "v1", [b"x"])
    client = await make_mirror()
    await client.get("/v2/app/manifests/v1")
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'sigil_http_requests_total{method="GET",route="manifests",status="200"}' in text
    assert "sigil_upstream_requests_total" in text


async def test_memory_tables_stay_bounded_and_refill_from_the_index(make_mirror, upstream,
                                                                   monkeypatch) -> None:
    import sigil.mirror

    monkeypatch.setattr(sigil.mirror, "MEMORY_TABLE_ENTRIES", 3)
    fake, _ = upstream
    layers = {tag: os.urandom(1000) for tag in ("a", "b", "c", "d")}
    for tag, layer in layers.items():
        fake.add_image("library/app", tag, [layer])
    client = await make_mirror()
    for tag in layers:
        assert (await client.get(f"/v2/app/manifests/{tag}")).status == 200
    mirror = client.server.app[MIRROR]
    assert len(mirror._allowed) <= 3 and len(mirror._tags) <= 3
    # What was dropped from memory is still allowed: the index answers.
    for layer in layers.values():
        response = await client.get(f"/v2/app/blobs/{sha(layer)}")
        assert response.status == 200 and await response.read() == layer
