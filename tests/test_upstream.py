"""Tests of sigil.upstream: the HTTP client to upstream registries.

Most tests run against a small in-process registry on 127.0.0.1 (``FakeRegistry``) that can
require Bearer or Basic auth and inject faults per request path: 429 with Retry-After, 503,
hangs, blobs cut mid-stream, redirects to a second "storage" server, oversized manifests,
404 with NAME_UNKNOWN. Every test asserts how many requests reached the upstream. One test
runs against a real ``docker-registry`` (CNCF distribution 2.8) when it is installed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from sigil import metrics
from sigil.config import Credentials, UpstreamConfig
from sigil.errors import (
    BlobUnknown,
    ConfigError,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
)
from sigil.oci.digest import Digest
from sigil.oci.manifest import DEFAULT_ACCEPT, OCI_INDEX, OCI_MANIFEST
from sigil.upstream import (
    BasicCredentials,
    UpstreamClient,
    load_docker_config,
    parse_next_link,
    parse_ratelimit_remaining,
    parse_retry_after,
    parse_www_authenticate,
)
from sigil.upstream import client as upstream_client
from tests.support.e2e import self_signed_cert

USER, PASSWORD = "alice", "s3cret-pa55"
REPO = "library/nginx"


# ------------------------------------------------------------------------ the fake upstream
@dataclass
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    peer: Any = None  # the client's (host, port): which connection carried the request


def _image(config_blob: bytes, layer: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(Digest.of(config_blob)), "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(Digest.of(layer)), "size": len(layer)}],
    }).encode()


@dataclass
class FakeRegistry:
    """A registry on 127.0.0.1:<port 0>. ``faults[path]`` is a queue consumed one per request
    to that path (after auth): ``("status", code, headers, body)``, ``("hang",)``,
    ``("cut",)``, ``("stall",)`` (half the blob, then silence), ``("trickle", piece, pause)``
    (the blob in ``piece``-byte writes ``pause`` seconds apart), ``("redirect", url)``,
    ``("chunked",)``, ``("overlong", stray[, delay])`` (the blob, then ``stray`` bytes, after
    ``delay`` seconds if given: the client has the whole body by then and pooled the
    connection)."""

    auth: str | None = None              # None | "bearer" | "basic"
    expires_in: int | None = 300
    token_field: str = "token"
    host: str = "127.0.0.1"
    ssl_context: ssl.SSLContext | None = None
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    referrers: dict[str, bytes] | None = None   # None: no referrers API (404)
    referrer_pages: dict[str, list[list[Any]]] = field(default_factory=dict)
    referrer_link_origin: str = ""  # prefix of the referrers Link (another host, in a test)
    faults: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))
    extra_headers: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)
    valid_tokens: dict[str, set[str]] = field(default_factory=dict)
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def add_manifest(self, repo: str, tag: str, raw: bytes, media_type: str = OCI_MANIFEST) -> str:
        digest = str(Digest.of(raw))
        self.manifests[(repo, tag)] = (raw, media_type)
        self.manifests[(repo, digest)] = (raw, media_type)
        return digest

    def add_blob(self, data: bytes) -> str:
        digest = str(Digest.of(data))
        self.blobs[digest] = data
        return digest

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def start(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)
        # handler_cancellation: a handler whose client went away (timeouts) stops at once.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://{self.host}:{port}"
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers -----------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(Seen(request.method, request.path, dict(request.query),
                                        request.headers.get("Authorization")))
        granted: set[str] = set()
        header = request.headers.get("Authorization")
        if header is not None:
            if header != BasicCredentials(USER, PASSWORD).header():
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
            if request.query.get("service") == "fake.test":
                granted = set(request.query.getall("scope", []))
        # Like Docker Hub: anonymous callers get a token, but with no access here.
        token = f"tok-{len(self.token_requests)}"
        self.valid_tokens[token] = granted
        body: dict[str, Any] = {self.token_field: token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    def _challenge(self, repo: str) -> web.Response:
        if self.auth == "bearer":
            value = (f'Bearer realm="{self.url}/token",service="fake.test",'
                     f'scope="repository:{repo}:pull"')
        else:
            value = 'Basic realm="fake registry"'
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]},
                                 status=401, headers={"WWW-Authenticate": value})

    def _authorized(self, request: web.Request, repo: str) -> bool:
        header = request.headers.get("Authorization", "")
        if self.auth == "bearer":
            scopes = self.valid_tokens.get(header.removeprefix("Bearer "), set())
            return header.startswith("Bearer ") and f"repository:{repo}:pull" in scopes
        if self.auth == "basic":
            return header == BasicCredentials(USER, PASSWORD).header()
        return True

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.seen.append(Seen(request.method, request.path, dict(request.query),
                              request.headers.get("Authorization"),
                              request.transport.get_extra_info("peername")))
        tail = request.match_info["tail"]
        for kind in ("manifests", "blobs", "tags", "referrers"):
            repo, sep, rest = tail.rpartition(f"/{kind}/")
            if sep:
                break
        else:
            return web.json_response({}, headers=self.extra_headers)
        if not self._authorized(request, repo):
            return self._challenge(repo)
        queue = self.faults.get(request.path)
        fault = queue.pop(0) if queue else None
        if fault is not None:
            answer = await self._fault(request, fault, kind, repo, rest)
            if answer is not None:
                return answer
        headers = dict(self.extra_headers)
        if kind == "manifests":
            found = self.manifests.get((repo, rest))
            if found is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            raw, media_type = found
            headers.update({"Content-Type": media_type,
                            "Docker-Content-Digest": str(Digest.of(raw))})
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(raw))
                return web.Response(headers=headers)
            return web.Response(body=raw, headers=headers)
        if kind == "blobs":
            data = self.blobs.get(rest)
            if data is None:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
            return web.Response(body=data, content_type="application/octet-stream",
                                headers=headers)
        if kind == "tags":
            if repo not in self.tags:
                return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
            names = sorted(self.tags[repo])
            last = request.query.get("last")
            if last:
                names = [t for t in names if t > last]
            n = int(request.query.get("n", "1000"))
            if len(names) > n:
                names = names[:n]
                headers["Link"] = f'</v2/{repo}/tags/list?last={names[-1]}&n={n}>; rel="next"'
            return web.json_response({"name": repo, "tags": names}, headers=headers)
        if self.referrers is None:
            return web.Response(status=404, text="404 page not found")
        pages = self.referrer_pages.get(rest)
        if pages is not None:  # paginated: ?page=N, Link to the next one
            page = int(request.query.get("page", "0"))
            if page + 1 < len(pages):
                link = f"{self.referrer_link_origin}/v2/{repo}/referrers/{rest}?page={page + 1}"
                headers["Link"] = f'<{link}>; rel="next"'
            return web.json_response({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                      "manifests": pages[page]}, headers=headers,
                                     content_type=OCI_INDEX)
        body = self.referrers.get(rest, json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode())
        return web.Response(body=body, content_type=OCI_INDEX, headers=headers)

    async def _fault(self, request: web.Request, fault: tuple[Any, ...], kind: str, repo: str,
                     rest: str) -> web.StreamResponse | None:
        what = fault[0]
        if what == "status":
            _, status, headers, body = fault
            return web.Response(status=status, headers=headers, body=body)
        if what == "hang":
            # Held until the client gives up (handler cancelled) or the fake stops.
            await asyncio.wait_for(self._release.wait(), 30)
            return web.Response(status=204)
        if what == "redirect":
            return web.Response(status=307, headers={"Location": fault[1]})
        if what == "cut":
            data = self.blobs[rest]
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await response.drain()
            assert request.transport is not None
            request.transport.close()
            return response
        if what == "stall":
            # Half the body, then the connection stays open and silent until the client
            # gives up (handler cancelled) or the fake stops.
            data = self.blobs[rest]
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await asyncio.wait_for(self._release.wait(), 30)
            return response
        if what == "trickle":
            _, piece, pause = fault
            data = self.blobs[rest]
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            for at in range(0, len(data), piece):
                await response.write(data[at:at + piece])
                await asyncio.sleep(pause)
            await response.write_eof()
            return response
        if what == "overlong":
            # The blob, then bytes its Content-Length does not cover: on a reused connection
            # they would be read as the next response.
            _, stray, *delay = fault
            data = self.blobs[rest]
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data)
            if delay:
                await asyncio.sleep(delay[0])
            assert request.transport is not None
            request.transport.write(stray)
            await response.write_eof()
            return response
        if what == "chunked":
            raw, media_type = self.manifests[(repo, rest)]
            response = web.StreamResponse(headers={"Content-Type": media_type})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(raw), 4096):
                await response.write(raw[i:i + 4096])
            await response.write_eof()
            return response
        raise AssertionError(f"unknown fault {fault!r}")


@dataclass
class Storage:
    """A second server standing for a blob storage backend (S3/CDN) on another origin."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, host: str) -> Storage:
        app = web.Application()
        app.router.add_get("/store/{digest}", self._get)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, 0).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _get(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path, dict(request.query),
                              request.headers.get("Authorization")))
        return web.Response(body=self.blobs[request.match_info["digest"]])


def _other_loopback_host() -> str:
    """127.0.0.2 when it can be bound (another host name than the registry's), else 127.0.0.1
    (another port: still another origin)."""
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


@pytest.fixture
async def make_fake() -> AsyncIterator[Callable[..., Awaitable[FakeRegistry]]]:
    started: list[FakeRegistry] = []

    async def make(**kwargs: Any) -> FakeRegistry:
        fake = await FakeRegistry(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., UpstreamClient]]:
    """Build clients with fast retries; all closed at teardown."""
    made: list[UpstreamClient] = []

    def make(url: str, *, name: str = "fake.test", retries: int = 2,
             credentials: Credentials | None = None, **kwargs: Any) -> UpstreamClient:
        config = UpstreamConfig(name=name, url=url, retries=retries,
                                credentials=credentials or Credentials(),
                                connect_timeout=kwargs.pop("connect_timeout", 5.0),
                                read_timeout=kwargs.pop("read_timeout", 10.0), **kwargs)
        client = UpstreamClient(config, backoff_base=0.001, backoff_cap=0.01)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


CREDS = Credentials(username=USER, password=PASSWORD)


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _errors(upstream: str, reason: str) -> float:
    return _sample("sigil_upstream_errors_total", upstream=upstream, reason=reason)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed: connecting is refused


# --------------------------------------------------------------------------- pure functions
def test_parse_challenge_docker_hub_style() -> None:
    value = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
             'scope="repository:library/nginx:pull,push"')
    [challenge] = parse_www_authenticate(value)
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.docker.io/token",
                                "service": "registry.docker.io",
                                "scope": "repository:library/nginx:pull,push"}


def test_parse_challenge_several_schemes_escapes_and_token68() -> None:
    value = ('Newauth realm="apps", type=1, title="Login to \\"apps\\", ok", '
             'Basic realm="simple", Negotiate abc123==')
    parsed = parse_www_authenticate(value)
    assert [c.scheme for c in parsed] == ["newauth", "basic", "negotiate"]
    assert parsed[0].params == {"realm": "apps", "type": "1", "title": 'Login to "apps", ok'}
    assert parsed[1].params == {"realm": "simple"}
    assert parsed[2].token68 == "abc123=="
    assert parse_www_authenticate("BEARER Realm=https://x/token")[0].params == {
        "realm": "https://x/token"}
    assert parse_www_authenticate("") == []
    # Unterminated quoted string: the broken parameter is dropped, nothing raises.
    assert parse_www_authenticate('Bearer service="y", realm="https://x')[0].params == {
        "service": "y"}


def test_parse_retry_after_ratelimit_and_link() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_ratelimit_remaining("100;w=21600") == 100
    assert parse_ratelimit_remaining("bogus") is None
    assert parse_next_link('</v2/a/tags/list?last=b&n=2>; rel="next"') == \
        "/v2/a/tags/list?last=b&n=2"
    assert parse_next_link('<https://x/y>; rel="prev"') is None


def test_docker_config_lookup(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    hub = base64.b64encode(b"hubuser:hub:pass").decode()
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": hub},
        "registry.example:5000": {"username": "bob", "password": "pw"},
    }}))
    config = UpstreamConfig(name="docker.io", url="https://registry-1.docker.io",
                            credentials=Credentials(docker_config=str(path)))
    from sigil.upstream import resolve_credentials
    found = resolve_credentials(config)
    assert found == BasicCredentials("hubuser", "hub:pass")
    assert "hub:pass" not in repr(found)
    assert load_docker_config(path, ["registry.example:5000"]) == BasicCredentials("bob", "pw")
    assert load_docker_config(path, ["ghcr.io"]) is None
    with pytest.raises(ConfigError, match="cannot read"):
        load_docker_config(tmp_path / "missing.json", ["ghcr.io"])
    path.write_text(json.dumps({"auths": {"ghcr.io": {"auth": "!!!not-base64"}}}))
    with pytest.raises(ConfigError) as info:
        load_docker_config(path, ["ghcr.io"])
    assert "not-base64" not in str(info.value)


# ---------------------------------------------------------------------------- basic calls
async def test_head_get_manifest_and_ratelimit_gauge(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.extra_headers["RateLimit-Remaining"] = "97;w=21600"
    raw = _image(b"{}", b"layer")
    digest = fake.add_manifest(REPO, "latest", raw)
    client = clients(fake.url, name="hub-rl.test")

    head = await client.head_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert (head.digest, head.media_type, head.size) == (digest, OCI_MANIFEST, len(raw))
    fetched = await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert (fetched.raw, fetched.media_type, fetched.digest) == (raw, OCI_MANIFEST, digest)
    by_digest = await client.get_manifest(REPO, digest, DEFAULT_ACCEPT)
    assert by_digest.raw == raw
    assert [s.method for s in fake.seen] == ["HEAD", "GET", "GET"]
    assert fake.seen[0].authorization is None
    assert _sample("sigil_upstream_ratelimit_remaining", upstream="hub-rl.test") == 97
    assert _sample("sigil_upstream_requests_total", upstream="hub-rl.test",
                   kind="manifest_head", status="200") == 1


async def test_manifest_by_digest_must_match_its_bytes(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    other = str(Digest.of(b"something else"))
    fake.manifests[(REPO, other)] = (_image(b"{}", b"x"), OCI_MANIFEST)
    client = clients(fake.url)
    with pytest.raises(DigestInvalid):
        await client.get_manifest(REPO, other, DEFAULT_ACCEPT)
    assert len(fake.seen) == 1


async def test_invalid_names_never_reach_the_upstream(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    client = clients(fake.url)
    with pytest.raises(NameInvalid):
        await client.get_manifest("../etc", "latest", DEFAULT_ACCEPT)
    with pytest.raises(DigestInvalid):
        await client.get_blob_bytes(REPO, "sha256:../../x", 10)
    assert fake.seen == []


async def test_not_found_errors_by_call_kind(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    path = f"/v2/{REPO}/manifests/gone"
    fake.faults[path].append(("status", 404, {"Content-Type": "application/json"},
                              b'{"errors":[{"code":"NAME_UNKNOWN","message":"no repo"}]}'))
    client = clients(fake.url)
    with pytest.raises(NameUnknown) as name_unknown:
        await client.get_manifest(REPO, "gone", DEFAULT_ACCEPT)
    assert name_unknown.value.code == "NAME_UNKNOWN" and "fake.test" in str(name_unknown.value)
    with pytest.raises(ManifestUnknown) as manifest_unknown:
        await client.get_manifest(REPO, "gone", DEFAULT_ACCEPT)
    assert manifest_unknown.value.code == "MANIFEST_UNKNOWN"
    with pytest.raises(ManifestUnknown):
        await client.head_manifest(REPO, "gone", DEFAULT_ACCEPT)
    with pytest.raises(BlobUnknown):
        async with client.open_blob(REPO, Digest.of(b"nope")):
            pass
    with pytest.raises(NameUnknown):
        await client.get_tags("library/absent")
    assert len(fake.seen) == 5  # 404s are answers, not retried


async def test_forbidden_is_denied(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(("status", 403, {}, b""))
    with pytest.raises(Denied):
        await clients(fake.url).get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert len(fake.seen) == 1


async def test_tags_pagination_and_referrers(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.tags[REPO] = ["a", "b", "c"]
    client = clients(fake.url)
    body, next_link = await client.get_tags(REPO, 2, None)
    assert json.loads(body)["tags"] == ["a", "b"]
    assert next_link == f"/v2/{REPO}/tags/list?last=b&n=2"
    body, next_link = await client.get_tags(REPO, 2, "b")
    assert json.loads(body)["tags"] == ["c"] and next_link is None
    assert fake.seen[1].query == {"n": "2", "last": "b"}

    subject = Digest.of(b"subject")
    assert await client.get_referrers(REPO, subject, None) is None  # no API: 404 -> None
    fake.referrers = {str(subject): b'{"schemaVersion":2,"manifests":[]}'}
    assert await client.get_referrers(REPO, subject, "application/x-sig") == \
        b'{"schemaVersion":2,"manifests":[]}'
    assert fake.seen[-1].query == {"artifactType": "application/x-sig"}
    assert len(fake.seen) == 4

    # Paginated referrers are followed and merged; a Link to another host is not followed.
    entries = [[{"digest": f"sha256:{i:064x}"}] for i in range(3)]
    fake.referrer_pages = {str(subject): entries}
    merged = json.loads(await client.get_referrers(REPO, subject, None) or b"")
    assert [m["digest"] for m in merged["manifests"]] == [e[0]["digest"] for e in entries]
    assert len(fake.seen) == 7
    fake.referrer_link_origin = "http://127.0.0.9:1"
    one = json.loads(await client.get_referrers(REPO, subject, None) or b"")
    assert [m["digest"] for m in one["manifests"]] == [entries[0][0]["digest"]]
    assert len(fake.seen) == 8


# ------------------------------------------------------------------------------------- auth
async def test_bearer_token_fetched_once_for_many_calls(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer")
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    client = clients(fake.url, credentials=CREDS)
    for _ in range(5):
        assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    # One anonymous request learns the challenge; every later call sends the cached token.
    assert len(fake.seen) == 6
    assert fake.seen[0].authorization is None
    assert {s.authorization for s in fake.seen[1:]} == {"Bearer tok-1"}
    [token_request] = fake.token_requests
    assert token_request.query == {"service": "fake.test", "scope": f"repository:{REPO}:pull"}
    assert token_request.authorization == BasicCredentials(USER, PASSWORD).header()

    # Another repository is another scope: one more token, fetched up front (no 401).
    fake.add_manifest("acme/app", "v1", raw)
    await client.get_manifest("acme/app", "v1", DEFAULT_ACCEPT)
    assert len(fake.token_requests) == 2 and len(fake.seen) == 7


async def test_concurrent_calls_share_one_token_request(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer", token_field="access_token")
    digest = fake.add_blob(b"payload")
    client = clients(fake.url, credentials=CREDS)
    results = await asyncio.gather(*(client.get_blob_bytes(REPO, digest, 100)
                                     for _ in range(8)))
    assert results == [b"payload"] * 8
    assert len(fake.token_requests) == 1
    assert len(fake.seen) == 16  # 8 anonymous 401s, 8 retries with the one token


async def test_expired_token_is_refreshed(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer", expires_in=None)  # default lifetime: 60 s
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    client = clients(fake.url, credentials=CREDS)
    now = [1000.0]
    client.auth.clock = lambda: now[0]
    await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    now[0] += 40  # within 60 s minus the margin: cached
    await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert len(fake.token_requests) == 1
    now[0] += 15  # past 60 s minus the margin (12 s): refreshed before use
    await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert len(fake.token_requests) == 2
    assert fake.seen[-1].authorization == "Bearer tok-2"
    assert len(fake.seen) == 4


async def test_revoked_token_is_replaced_once(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer")
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    client = clients(fake.url, credentials=CREDS)
    await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    fake.valid_tokens.clear()  # the upstream forgets every token
    await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert len(fake.token_requests) == 2
    assert [s.authorization for s in fake.seen] == [None, "Bearer tok-1", "Bearer tok-1",
                                                    "Bearer tok-2"]


async def test_bearer_wrong_or_missing_credentials(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer")
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    wrong = clients(fake.url, credentials=Credentials(username=USER, password="wrong"))
    with pytest.raises(Unauthorized) as info:
        await wrong.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert "wrong" not in str(info.value) and info.value.status == 401
    assert (len(fake.seen), len(fake.token_requests)) == (1, 1)

    anonymous = clients(fake.url)
    with pytest.raises(Unauthorized):
        await anonymous.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    # 401, anonymous token (no access), 401 again: final, no loop.
    assert (len(fake.seen), len(fake.token_requests)) == (3, 2)
    assert fake.token_requests[1].authorization is None


async def test_basic_auth_sent_up_front_after_first_challenge(make_fake: Any,
                                                               clients: Any) -> None:
    fake = await make_fake(auth="basic")
    digest = fake.add_blob(b"blob")
    client = clients(fake.url, credentials=CREDS)
    for _ in range(3):
        assert await client.get_blob_bytes(REPO, digest, 10) == b"blob"
    assert len(fake.seen) == 4 and fake.token_requests == []
    assert fake.seen[-1].authorization == BasicCredentials(USER, PASSWORD).header()

    wrong = clients(fake.url, credentials=Credentials(username=USER, password="nope"))
    with pytest.raises(Unauthorized):
        await wrong.get_blob_bytes(REPO, digest, 10)
    assert len(fake.seen) == 6  # anonymous 401, then the refused credentials, once


async def test_credentials_and_tokens_never_logged(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer")
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(("status", 503, {}, b""))
    client = clients(fake.url, credentials=CREDS)
    with capture_logs() as logs:
        await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    text = json.dumps(logs, default=str)
    assert any(entry["event"] == "upstream.retry" for entry in logs)
    for secret in (PASSWORD, "tok-1", BasicCredentials(USER, PASSWORD).header()[6:]):
        assert secret not in text


# ---------------------------------------------------------------------------------- retries
async def test_503_then_success(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(("status", 503, {}, b"busy"))
    client = clients(fake.url, name="retry503.test")
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    assert len(fake.seen) == 2
    assert _errors("retry503.test", "status_5xx") == 1


async def test_5xx_exhausts_retries(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.faults[f"/v2/{REPO}/manifests/latest"] += [("status", 502, {}, b"")] * 5
    client = clients(fake.url, retries=2)
    with pytest.raises(UpstreamError) as info:
        await client.head_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert "fake.test" in str(info.value) and info.value.status == 502
    assert len(fake.seen) == 3


async def test_429_retry_after_then_success(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    digest = fake.add_blob(b"data")
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("status", 429, {"Retry-After": "0"}, b""))
    client = clients(fake.url, name="retry429.test")
    assert await client.get_blob_bytes(REPO, digest, 100) == b"data"
    assert len(fake.seen) == 2
    assert _errors("retry429.test", "status_429") == 1


async def test_429_long_retry_after_fails_at_once(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(
        ("status", 429, {"Retry-After": "3600"}, b""))
    client = clients(fake.url)
    with pytest.raises(TooManyRequests) as info:
        await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert info.value.headers == {"Retry-After": "3600"} and info.value.status == 429
    assert len(fake.seen) == 1


async def test_429_quota_spent_fails_at_once(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(
        ("status", 429, {"RateLimit-Remaining": "0;w=21600"}, b""))
    with pytest.raises(TooManyRequests) as info:
        await clients(fake.url).get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert info.value.headers == {}
    assert len(fake.seen) == 1


async def test_429_exhausts_retries(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.faults[f"/v2/{REPO}/tags/list"] += [("status", 429, {"Retry-After": "0"}, b"")] * 5
    with pytest.raises(TooManyRequests) as info:
        await clients(fake.url, retries=1).get_tags(REPO)
    assert info.value.headers == {"Retry-After": "0"}
    assert len(fake.seen) == 2


async def test_hanging_upstream_times_out(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    fake.add_manifest(REPO, "latest", _image(b"{}", b"l"))
    fake.faults[f"/v2/{REPO}/manifests/latest"] += [("hang",), ("hang",)]
    client = clients(fake.url, name="hang.test", retries=1, read_timeout=0.2)
    with pytest.raises(UpstreamError) as info:
        await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert "timeout" in str(info.value)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert len(fake.seen) == 2
    assert _errors("hang.test", "timeout") == 2


async def test_hang_then_success(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(("hang",))
    client = clients(fake.url, retries=1, read_timeout=0.2)
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    assert len(fake.seen) == 2


async def test_connection_refused(clients: Any) -> None:
    client = clients(f"http://127.0.0.1:{_dead_port()}", name="refused.test", retries=2)
    with pytest.raises(UpstreamError) as info:
        await client.get_tags(REPO)
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert _errors("refused.test", "connect") == 3
    assert _sample("sigil_upstream_requests_total", upstream="refused.test", kind="tags",
                   status="error") == 3


# ------------------------------------------------------------------------------------ blobs
async def test_blob_stream(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = fake.add_blob(data)
    client = clients(fake.url)
    async with client.open_blob(REPO, digest) as blob:
        assert blob.size == len(data)
        chunks = [c async for c in blob.iter_chunks(64 * 1024)]
    assert b"".join(chunks) == data and all(len(c) <= 64 * 1024 for c in chunks)
    assert len(fake.seen) == 1


async def test_blob_cut_mid_stream_raises_without_retry(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    data = b"x" * (512 * 1024)
    digest = fake.add_blob(data)
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("cut",))
    client = clients(fake.url, name="cut.test")
    received = bytearray()
    with pytest.raises(UpstreamError) as info:
        async with client.open_blob(REPO, digest) as blob:
            async for chunk in blob.iter_chunks(16 * 1024):
                received += chunk
    assert 0 < len(received) < len(data)
    assert "stream failed" in str(info.value)
    assert len(fake.seen) == 1
    assert _errors("cut.test", "connect") == 1


async def test_blob_body_silent_for_read_timeout_fails(make_fake: Any, clients: Any) -> None:
    # The per-read timer is replaced by one watchdog for the whole body: an upstream that
    # goes silent mid-body still fails the stream after the read timeout, as a timeout.
    fake = await make_fake()
    data = os.urandom(1024 * 1024)
    digest = fake.add_blob(data)
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("stall",))
    client = clients(fake.url, name="stall.test", read_timeout=0.3)
    received = bytearray()
    with pytest.raises(UpstreamError) as info:
        async with asyncio.timeout(20):  # a broken watchdog fails here instead of hanging
            async with client.open_blob(REPO, digest) as blob:
                async for chunk in blob.iter_chunks(64 * 1024):
                    received += chunk
    assert len(received) == len(data) // 2
    assert "stream failed" in str(info.value) and "timeout" in str(info.value)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert _errors("stall.test", "timeout") == 1


async def test_blob_slow_consumer_is_not_a_silent_upstream(make_fake: Any,
                                                           clients: Any) -> None:
    # Bytes the upstream sent that wait for the consumer are progress: a consumer that
    # pauses longer than the read timeout between pieces still gets the whole body.
    fake = await make_fake()
    data = os.urandom(4 * 1024 * 1024)
    digest = fake.add_blob(data)
    client = clients(fake.url, name="slow.test", read_timeout=0.2)
    received = bytearray()
    async with client.open_blob(REPO, digest) as blob:
        async for chunk in blob.iter_chunks(256 * 1024):
            received += chunk
            if len(received) <= 512 * 1024:
                await asyncio.sleep(0.5)
    assert bytes(received) == data
    assert _errors("slow.test", "timeout") == 0


async def test_blob_trickling_upstream_is_not_silent(make_fake: Any, clients: Any) -> None:
    # The socket's low-water mark (256 KiB) would hold a trickle of 8 KiB every 20 ms back
    # for longer than the read timeout; the watchdog lowers it on a quiet check, so an
    # upstream that keeps sending is not taken for a silent one.
    fake = await make_fake()
    data = os.urandom(300 * 1024)
    digest = fake.add_blob(data)
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("trickle", 8 * 1024, 0.02))
    client = clients(fake.url, name="trickle.test", read_timeout=0.3)
    async with asyncio.timeout(20):
        async with client.open_blob(REPO, digest) as blob:
            received = b"".join([c async for c in blob.iter_chunks()])
    assert received == data
    assert _errors("trickle.test", "timeout") == 0


async def test_read_timeout_is_reset_for_the_next_request(make_fake: Any,
                                                          clients: Any) -> None:
    # The watchdog switches off the connection's own read timer, and the socket gets a
    # low-water mark, for one blob body only: a small response on the reused connection
    # arrives at once (no retries to hide a stall), and a hanging one times out again.
    fake = await make_fake()
    data = os.urandom(1024 * 1024)
    digest = fake.add_blob(data)
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    client = clients(fake.url, name="reuse.test", retries=0, read_timeout=0.3)
    async with client.open_blob(REPO, digest) as blob:
        assert b"".join([c async for c in blob.iter_chunks()]) == data
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    fake.faults[f"/v2/{REPO}/manifests/latest"].append(("hang",))
    with pytest.raises(UpstreamError, match="timeout"):
        async with asyncio.timeout(20):
            await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)
    assert _errors("reuse.test", "timeout") == 1


def _forged_manifest_response() -> bytes:
    """A whole HTTP response an upstream might send after a body, unasked."""
    forged = b"forged manifest"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + OCI_MANIFEST.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(forged) + forged)


async def test_bytes_after_a_large_blob_never_reach_the_next_response(make_fake: Any,
                                                                     clients: Any) -> None:
    # A large blob body is read beside aiohttp, up to Content-Length and no further, and its
    # connection is closed afterwards: what an upstream sends after the body (here a whole
    # forged response) cannot become the answer to the next request.
    fake = await make_fake()
    data = os.urandom(1024 * 1024)
    digest = fake.add_blob(data)
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    stray = _forged_manifest_response()
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("overlong", stray))
    client = clients(fake.url, retries=0)
    async with client.open_blob(REPO, digest) as blob:
        pieces = [c async for c in blob.iter_chunks()]
    assert b"".join(pieces) == data
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["same-read", "while-pooled"])
async def test_bytes_after_a_small_body_never_reach_the_next_response(
        make_fake: Any, clients: Any, delay: float) -> None:
    # A small blob goes through aiohttp on a keep-alive connection. Bytes the upstream sends
    # past its Content-Length, with the body or later while the connection sits in the pool,
    # would be parsed as the next response: the connection is closed instead of reused, and
    # the next request gets the upstream's real answer.
    fake = await make_fake()
    data = os.urandom(4096)
    digest = fake.add_blob(data)
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    stray = _forged_manifest_response()
    fake.faults[f"/v2/{REPO}/blobs/{digest}"].append(("overlong", stray, delay))
    client = clients(fake.url, retries=0)
    assert await client.get_blob_bytes(REPO, digest, 1 << 20) == data
    await asyncio.sleep(delay + 0.2)  # the stray bytes have arrived (or were sent with the body)
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    # The blob's connection was dropped, and the next one, which behaved, is reused.
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw
    blob_at, first_at, second_at = (seen.peer for seen in fake.seen[-3:])
    assert first_at != blob_at and second_at == first_at


async def test_raw_blob_pieces_stay_intact_while_held(make_fake: Any, clients: Any) -> None:
    # A large body's pieces are views of receive buffers that are reused: a buffer is
    # received into again only once no view of it is left, so the pieces a consumer keeps
    # (a client's send in progress) still hold their bytes after the rest went by.
    fake = await make_fake()
    data = os.urandom(12 * 1024 * 1024)
    digest = fake.add_blob(data)
    client = clients(fake.url)
    kept: list[tuple[int, bytes | memoryview]] = []
    offset = 0
    async with client.open_blob(REPO, digest) as blob:
        async for index, piece in _enumerate(blob.iter_chunks()):
            if index % 3 == 0:
                kept.append((offset, piece))
            offset += len(piece)
    assert offset == len(data) and len(kept) > 2
    assert all(bytes(piece) == data[at:at + len(piece)] for at, piece in kept)


async def _enumerate(pieces: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    index = 0
    async for piece in pieces:
        yield index, piece
        index += 1


def test_receive_buffers_are_reused_only_without_views() -> None:
    pool = upstream_client._PiecePool()
    first = pool.take()
    view = memoryview(first)[10:20]
    pool.give(first)
    second = pool.take()
    assert second is not first  # a view of it is alive
    pool.give(second)
    del view
    assert pool.take() is first  # the first released buffer, no longer viewed
    assert len(first) == upstream_client.RAW_PIECE + 1  # the probe left it as it was


async def test_tls_blob_stream_and_the_next_request(make_fake: Any, clients: Any,
                                                    tmp_path: Path) -> None:
    # Over TLS the body stays on aiohttp's path (the socket carries records, not the body):
    # a large blob arrives whole, and the connection serves the next request.
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = await make_fake(ssl_context=context)
    data = os.urandom(2 * 1024 * 1024)
    digest = fake.add_blob(data)
    raw = _image(b"{}", b"l")
    fake.add_manifest(REPO, "latest", raw)
    client = clients(fake.url, ca_bundle=str(cert), retries=0)
    async with client.open_blob(REPO, digest) as blob:
        assert blob.size == len(data)
        assert b"".join([c async for c in blob.iter_chunks()]) == data
    assert (await client.get_manifest(REPO, "latest", DEFAULT_ACCEPT)).raw == raw


async def test_blob_redirect_drops_authorization(make_fake: Any, clients: Any) -> None:
    fake = await make_fake(auth="bearer")
    storage = await Storage().start(_other_loopback_host())
    try:
        data = b"layer bytes" * 1000
        digest = str(Digest.of(data))
        storage.blobs[digest] = data
        path = f"/v2/{REPO}/blobs/{digest}"
        fake.faults[path] += [("redirect", f"{storage.url}/store/{digest}?X-Amz-Signature=a%2Fb")] * 2
        client = clients(fake.url, credentials=CREDS)
        async with client.open_blob(REPO, digest) as blob:
            assert b"".join([c async for c in blob.iter_chunks()]) == data
        assert await client.get_blob_bytes(REPO, digest, len(data)) == data
        assert [s.authorization for s in fake.requests_to(path)] == [None, "Bearer tok-1",
                                                                     "Bearer tok-1"]
        assert len(storage.seen) == 2
        assert all(s.authorization is None for s in storage.seen)
        assert storage.seen[0].query == {"X-Amz-Signature": "a/b"}
    finally:
        await storage.stop()


async def test_redirect_loop_is_an_upstream_error(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    digest = fake.add_blob(b"b")
    path = f"/v2/{REPO}/blobs/{digest}"
    fake.faults[path] += [("redirect", path)] * 10
    with pytest.raises(UpstreamError, match="redirects"):
        await clients(fake.url).get_blob_bytes(REPO, digest, 10)
    assert len(fake.seen) == 6  # the request and 5 redirects followed


async def test_blob_bytes_checks_digest_and_size(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    good = fake.add_blob(b"0123456789")
    liar = str(Digest.of(b"claimed"))
    fake.blobs[liar] = b"other bytes"
    client = clients(fake.url)
    assert await client.get_blob_bytes(REPO, good, 10) == b"0123456789"
    with pytest.raises(ManifestInvalid, match="exceeds 9 bytes"):
        await client.get_blob_bytes(REPO, good, 9)
    with pytest.raises(DigestInvalid):
        await client.get_blob_bytes(REPO, liar, 100)
    assert len(fake.seen) == 3


async def test_oversized_manifest(make_fake: Any, clients: Any) -> None:
    fake = await make_fake()
    raw = json.dumps({"schemaVersion": 2, "pad": "x" * 100_000}).encode()
    fake.add_manifest(REPO, "big", raw)
    path = f"/v2/{REPO}/manifests/big"
    client = clients(fake.url)
    with pytest.raises(ManifestInvalid, match="exceeds"):  # refused on Content-Length
        await client.get_manifest(REPO, "big", DEFAULT_ACCEPT, max_bytes=64 * 1024)
    fake.faults[path].append(("chunked",))  # no Content-Length: refused while reading
    with pytest.raises(ManifestInvalid, match="exceeds"):
        await client.get_manifest(REPO, "big", DEFAULT_ACCEPT, max_bytes=64 * 1024)
    # Exactly at the limit is fine.
    assert (await client.get_manifest(REPO, "big", DEFAULT_ACCEPT, max_bytes=len(raw))).raw == raw
    assert len(fake.seen) == 3


async def test_no_foreign_exception_leaves(make_fake: Any, clients: Any) -> None:
    """Every failure mode seen above surfaces as a RegistryError subclass."""
    fake = await make_fake()
    fake.faults[f"/v2/{REPO}/manifests/x"].append(("redirect", "ftp://elsewhere/x"))
    fake.faults[f"/v2/{REPO}/manifests/y"].append(("status", 418, {}, b""))
    client = clients(fake.url)
    for ref in ("x", "y"):
        with pytest.raises(RegistryError) as info:
            await client.get_manifest(REPO, ref, DEFAULT_ACCEPT)
        assert isinstance(info.value, UpstreamError)
    await client.close()
    with pytest.raises(UpstreamError, match="closed"):
        await client.get_tags(REPO)


# -------------------------------------------------------------------------------------- TLS
async def test_tls_ca_bundle_and_verification(make_fake: Any, clients: Any,
                                              tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = await make_fake(ssl_context=context)
    fake.tags[REPO] = ["v1"]
    assert json.loads((await clients(fake.url, ca_bundle=str(cert)).get_tags(REPO))[0])[
        "tags"] == ["v1"]
    assert (await clients(fake.url, tls_verify=False).get_tags(REPO))[1] is None
    with pytest.raises(UpstreamError) as info:
        await clients(fake.url, retries=3).get_tags(REPO)  # unknown CA: not retried
    assert isinstance(info.value.__cause__, aiohttp.ClientSSLError)
    assert len(fake.seen) == 2
    with pytest.raises(ConfigError):
        clients(fake.url, ca_bundle=str(key.with_name("absent.pem")))


# ------------------------------------------------------------------------- real registry
@pytest.mark.realparts
async def test_against_real_docker_registry(real_registry: Any, unique_repo: str,
                                            clients: Any) -> None:
    """Push through distribution's own upload API, read back through the client."""
    repo = unique_repo
    layer = hashlib.sha256(b"seed").digest() * 1000
    config_blob = b'{"architecture":"amd64","os":"linux"}'
    base = real_registry.url
    async with aiohttp.ClientSession() as http:
        for blob in (layer, config_blob):
            async with http.post(f"{base}/v2/{repo}/blobs/uploads/") as response:
                assert response.status == 202
                location = response.headers["Location"]
            upload = URL(location) if "://" in location else URL(base + location)
            upload = upload.update_query(digest=str(Digest.of(blob)))
            async with http.put(upload, data=blob,
                                headers={"Content-Type": "application/octet-stream"}) as response:
                assert response.status == 201, await response.text()
        raw = _image(config_blob, layer)
        async with http.put(f"{base}/v2/{repo}/manifests/v1", data=raw,
                            headers={"Content-Type": OCI_MANIFEST}) as response:
            assert response.status == 201, await response.text()

    client = clients(base, name="real.test")
    digest = Digest.of(layer)
    async with client.open_blob(repo, digest) as blob:
        assert blob.size == len(layer)
        assert b"".join([c async for c in blob.iter_chunks(4096)]) == layer
    assert await client.get_blob_bytes(repo, Digest.of(config_blob), 1024) == config_blob

    head = await client.head_manifest(repo, "v1", DEFAULT_ACCEPT)
    assert head.digest == str(Digest.of(raw)) and head.media_type == OCI_MANIFEST
    assert head.size == len(raw)
    fetched = await client.get_manifest(repo, str(Digest.of(raw)), DEFAULT_ACCEPT)
    assert fetched.raw == raw and fetched.digest == str(Digest.of(raw))
    body, next_link = await client.get_tags(repo)
    assert json.loads(body)["tags"] == ["v1"] and next_link is None
    # distribution 2.8 has no referrers API: None, so callers use the tag schema.
    assert await client.get_referrers(repo, Digest.of(raw)) is None

    with pytest.raises(ManifestUnknown):
        await client.get_manifest(repo, "v2", DEFAULT_ACCEPT)
    with pytest.raises(BlobUnknown):
        await client.get_blob_bytes(repo, Digest.of(b"absent"), 10)
    with pytest.raises(NameUnknown) as info:
        await client.get_tags(f"{repo}-absent")
    assert info.value.code == "NAME_UNKNOWN"
    assert _errors("real.test", "connect") == _errors("real.test", "status_5xx") == 0


async def test_a_pooled_connection_with_undelivered_bytes_is_not_reused() -> None:
    # Bytes already in the kernel's receive queue, not yet handed to the protocol by the
    # event loop, also disqualify a pooled connection (a peek, on plain TCP).
    from sigil.upstream import pool

    listener = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: pool._CountingHandler(loop=loop), *listener.getsockname())
    server_side, _ = listener.accept()
    try:
        protocol.released_at = protocol.bytes_in  # as the connector does on release
        assert not pool._spoke_out_of_turn(protocol)
        server_side.sendall(b"HTTP/1.1 200 OK\r\n")  # no await: the loop has not read it
        assert protocol.bytes_in == protocol.released_at
        assert pool._spoke_out_of_turn(protocol)
        await asyncio.sleep(0.05)  # now delivered: counted
        assert protocol.bytes_in > protocol.released_at and pool._spoke_out_of_turn(protocol)
    finally:
        transport.close()
        server_side.close()
        listener.close()
