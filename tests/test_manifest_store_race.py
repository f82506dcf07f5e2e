"""gc deleting a manifest object between the mirror's existence check and its index row.

``Mirror._store_manifest`` asks the store whether the manifest object is there, stores it if
not, then writes the manifest row. A gc pass evicting an old image that contains the same
manifest can delete the object right after the check said "there": the row then claims an
object that is gone (served as a miss at best, reported missing by fsck). Here the real
``has`` of the store is paused at exactly that spot (after it answered) while a real
incremental gc pass evicts the old image, then released; the manifest must be stored, indexed
and fsck clean.

Real parts: SeaweedFS for S3, PostgreSQL, SQLite files (the ``backends`` fixture of
tests/test_gc_race.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from sigil.config import build_config
from sigil.mirror import Mirror
from sigil.oci.digest import Digest
from sigil.storage.contracts import ObjectStore
from sigil.storage.maintenance import check_objects, collect_incremental
from tests import test_gc_race
from tests.test_gc_race import BOUND, Backends

backends = test_gc_race.backends  # the fixture, found by name

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


class PausedHas:
    """An :class:`ObjectStore` whose ``has`` of one digest answers, then announces itself and
    waits for :attr:`release` before returning that answer (the caller's worst moment)."""

    def __init__(self, inner: ObjectStore, target: Digest) -> None:
        self.inner = inner
        self.target = target
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def has(self, digest: Digest) -> bool:
        present = await self.inner.has(digest)
        if digest == self.target and not self.answered.is_set():
            self.answered.set()
            await self.release.wait()
        return present


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


async def test_a_manifest_deleted_between_check_and_row_is_stored_again(
        backends: Backends, tmp_path: Path) -> None:
    b = backends
    layer, config = os.urandom(4096), json.dumps({"nonce": os.urandom(8).hex()}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
    }).encode()
    manifest_d = Digest.of(manifest)
    old_index = json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                            "manifests": [_descriptor(MANIFEST, manifest)]}).encode()
    old_index_d = Digest.of(old_index)
    # An old image (index -> manifest -> config, layer), stored and indexed, unused for long.
    for data in (layer, config, manifest, old_index):
        await b.objects.put_bytes(Digest.of(data), data)
    for data in (layer, config):
        await b.index.put_blob(Digest.of(data), len(data))
    await b.index.put_manifest(manifest_d, MANIFEST, len(manifest),
                               [Digest.of(config), Digest.of(layer)], now=100.0)
    await b.index.put_manifest(old_index_d, INDEX, len(old_index), [manifest_d], now=100.0)

    paused = PausedHas(b.objects, manifest_d)
    config_ = build_config({"storage": {"root": str(tmp_path / "scratch")}})
    mirror = Mirror(config_, paused, b.index, {})  # type: ignore[arg-type]
    # A client pulls the manifest by digest again (a new image sharing it): the mirror checks.
    stored = asyncio.create_task(mirror._store_manifest(manifest_d, manifest, MANIFEST))
    await asyncio.wait_for(paused.answered.wait(), BOUND)
    stats = await asyncio.wait_for(collect_incremental(
        b.objects, b.index, b.leases, "gc-test", max_bytes=1, now=1000.0, grace=0.0), BOUND)
    assert stats.ran and stats.roots_evicted >= 1
    assert not await b.objects.has(manifest_d)  # gc really deleted it after the check
    paused.release.set()
    served = await asyncio.wait_for(stored, BOUND)
    assert served.digest == manifest_d
    assert await b.index.get_manifest(manifest_d) is not None
    assert await b.objects.has(manifest_d), "an index row claims a manifest gc deleted"
    assert await b.objects.read_bytes(manifest_d) == manifest
    report = await check_objects(b.objects, b.index)
    assert report.ok and manifest_d not in report.missing and report.missing == []
