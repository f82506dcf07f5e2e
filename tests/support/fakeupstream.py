"""A small in-process upstream registry for faults a real registry cannot produce.

It serves manifests and blobs from dicts and can be told, per digest or tag, to send wrong
bytes, cut the body, answer 429/503, or hang. It counts every request it receives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeUpstream:
    """State and fault switches of the fake registry."""

    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)  # key (digest or tag) -> fault name
    hits: Counter[str] = field(default_factory=Counter)
    blob_delay: float = 0.0

    def add_image(self, repo: str, tag: str, layers: list[bytes],
                  media_type: str = "application/vnd.oci.image.manifest.v1+json"
                  ) -> tuple[str, bytes]:
        """Store an image; returns (manifest digest, manifest bytes)."""
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        self.blobs[sha(config)] = config
        for layer in layers:
            self.blobs[sha(layer)] = layer
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha(layer), "size": len(layer)} for layer in layers],
        }, indent=1).encode()
        digest = sha(manifest)
        self.manifests[(repo, tag)] = (manifest, media_type)
        self.manifests[(repo, digest)] = (manifest, media_type)
        self.tags.setdefault(repo, []).append(tag)
        return digest, manifest

    def add_raw(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        """Store arbitrary manifest bytes under a tag and their digest; returns the digest."""
        self.manifests[(repo, tag)] = (body, media_type)
        self.manifests[(repo, sha(body))] = (body, media_type)
        return sha(body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        return app

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _fault(self, key: str) -> web.Response | None:
        fault = self.faults.get(key)
        if fault == "429":
            return web.json_response({"errors": [{"code": "TOOMANYREQUESTS"}]}, status=429,
                                     headers={"Retry-After": "3600"})
        if fault == "503":
            return web.Response(status=503, text="down")
        if fault == "hang":
            await asyncio.sleep(3600)
        return None

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name, ref = request.match_info["name"], request.match_info["ref"]
        self.hits[f"{request.method} manifest {ref}"] += 1
        if (bad := await self._fault(ref)) is not None:
            return bad
        item = self.manifests.get((name, ref))
        if item is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, media_type = item
        headers = {"Docker-Content-Digest": sha(body), "Content-Type": media_type}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return web.Response(headers=headers)
        return web.Response(body=body, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.hits[f"{request.method} blob {digest}"] += 1
        if (bad := await self._fault(digest)) is not None:
            return bad
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        fault = self.faults.get(digest)
        if fault == "wrong-bytes":
            data = bytes(reversed(data))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        chunk = 256 * 1024
        for start in range(0, len(data), chunk):
            if fault == "cut" and start >= len(data) // 2:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(data[start:start + chunk])
            if self.blob_delay:
                await asyncio.sleep(self.blob_delay)
        await response.write_eof()
        return response

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tags = sorted(self.tags.get(name, []))
        last = request.query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        n = int(request.query.get("n", "0") or 0)
        headers = {}
        if n and len(tags) > n:
            tags = tags[:n]
            headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)
