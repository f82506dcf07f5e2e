"""``sigil export`` / ``sigil import`` on the fleet backends (issue 8), with real parts only:
the real docker-registry upstream, SeaweedFS (S3) and PostgreSQL, skopeo.

Connected side: a config on S3 + PostgreSQL exports two key-signed images (one of them a
multi-platform index) from the registry; the fleet's own store is the working store, so the
export warms it, and a second export fetches nothing from the upstream. Far side: ``sigil
import`` into a fresh bucket prefix and a fresh database; ``sigil serve --offline`` on that
config, twice (two replicas on the same backends), serves skopeo the upstream's digests while
nothing connects to the upstream's port. A tampered archive (one byte of the last layer) is
refused and leaves the bucket prefix and the index empty. ``--to-store`` warms a fleet store
that an offline replica then serves. Unreachable backends: exit 2 naming the config key.

All images and both servers are shared by the module (one export, one import); each check is
its own test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from sigil.airgap import importer
from sigil.config import load_config
from sigil.errors import Denied, ManifestUnknown
from sigil.mirror import Mirror
from sigil.oci.digest import Digest
from sigil.progress import LineProgress
from sigil.routing import Route
from sigil.storage.backends import Backends
from sigil.storage.index import Graph
from sigil.storage.pgindex import PgIndex
from sigil.storage.s3 import S3ObjectStore
from sigil.upstream.offline import offline_clients, offline_config
from sigil.verify.engine import Verifier
from sigil.verify.policy import load_policy
from tests.realparts import RealRegistry, RegistryPusher, skopeo_copy
from tests.realparts.fleet import TEST_BUCKET, s3_config_for
from tests.realparts.postgres import RealPostgres
from tests.realparts.seaweed import SeaweedS3
from tests.support.netrecord import ConnectionRecorder
from tests.support.sigilproc import SigilProcess, free_port
from tests.test_airgap import run_sigil
from tests.test_e2e_verify import sig_layer
from tests.test_verify_support import Signer

pytestmark = [pytest.mark.realparts, pytest.mark.timeout(300)]
UPSTREAM = "registry.test"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Backend:
    """One bucket prefix and one database: a fleet's shared store."""

    prefix: str
    dsn: str
    secrets: Path

    def apply(self, config_path: Path, seaweed: SeaweedS3) -> None:
        """Point the sigil config at ``config_path`` to this store (S3 + PostgreSQL); the
        credentials come from files, as a deployment would give them."""
        config: dict[str, Any] = yaml.safe_load(config_path.read_text())
        config["storage"].update({"backend": "s3", "s3": {
            "endpoint": seaweed.endpoint, "bucket": TEST_BUCKET, "prefix": self.prefix,
            "access_key_file": str(self.secrets / "access"),
            "secret_key_file": str(self.secrets / "secret"),
            "create_bucket": True, "part_size": "5MiB"}})
        config["index"] = {"backend": "postgres", "postgres": {"dsn": self.dsn}}
        config_path.write_text(yaml.safe_dump(config))

    async def contents(self, seaweed: SeaweedS3, repos: list[str]) -> Stored:
        """What the bucket prefix and the database hold (tags: of ``repos``)."""
        store = await S3ObjectStore.open(s3_config_for(seaweed, self.prefix))
        index = await PgIndex.open(self.dsn)
        try:
            objects = {str(info.digest) async for info in store.iter_objects()}
            pending = {p.name for p in await store.pending_uploads()}
            tags = {(repo, tag) for repo in repos for tag in await index.list_tags(UPSTREAM, repo)}
            return Stored(objects, pending, await index.graph(), tags)
        finally:
            await index.close()
            await store.close()


@dataclass
class Stored:
    """A fleet store's content: object digests, pending uploads, index graph, tags."""

    objects: set[str]
    pending: set[str]
    graph: Graph
    tags: set[tuple[str, str]]


@dataclass
class Side:
    """One sigil config (a SigilProcess, started or not) on one fleet store."""

    sigil: SigilProcess
    backend: Backend


@dataclass
class World:
    """Everything the module shares."""

    work: Path
    registry: RealRegistry
    seaweed: SeaweedS3
    postgres: RealPostgres
    prefix: str
    single: Any
    multi: Any
    policy: Path
    plan: Path
    recorder: ConnectionRecorder
    databases: list[str]

    @property
    def repos(self) -> list[str]:
        """The repositories of the plan, as the index names them."""
        return [f"{self.prefix}/single", f"{self.prefix}/multi"]

    def backend(self) -> Backend:
        """A fresh bucket prefix and a fresh database."""
        name = f"airfleet_{os.urandom(5).hex()}"
        self.postgres.psql(f"CREATE DATABASE {name}")
        self.databases.append(name)
        return Backend(f"airfleet-{os.urandom(5).hex()}/", self.postgres.dsn(name),
                       self.work / "secrets")

    def side(self, name: str, url: str, backend: Backend | None = None, *,
             policy: Path | None = None) -> Side:
        """A sigil config named ``name`` whose upstream is ``url``, on ``backend`` (default:
        a fresh one), with ``policy`` (default: the module's)."""
        backend = backend or self.backend()
        sigil = SigilProcess(self.work / name, [{"name": UPSTREAM, "url": url,
                                                 "default": True, "retries": 1}],
                             str(policy or self.policy))
        backend.apply(sigil.config_path, self.seaweed)
        return Side(sigil, backend)

    @property
    def dead_url(self) -> str:
        """The far side's upstream: the recorder's port, where nothing may connect."""
        return f"http://127.0.0.1:{self.recorder.port}"


def _policy(prefix: str, single_key: str, multi_key: str) -> dict[str, Any]:
    return {"policies": [
        {"name": name, "images": [f"{UPSTREAM}/{prefix}/{name}"],
         "authorities": [{"name": "release-key", "key": {"path": key}}]}
        for name, key in (("single", single_key), ("multi", multi_key))]}


async def _push(registry: RealRegistry, prefix: str, signer: Signer) -> tuple[Any, Any]:
    async with RegistryPusher(registry.url) as pusher:
        single = await pusher.make_image(f"{prefix}/single", "v1")
        await pusher.push_cosign_signatures(f"{prefix}/single", single.digest,
                                            [sig_layer(signer, single.digest)])
        multi = await pusher.make_multiplatform_image(f"{prefix}/multi", "v1")
        await pusher.push_cosign_signatures(f"{prefix}/multi", multi.index.digest,
                                            [sig_layer(signer, multi.index.digest)])
    return single, multi


@pytest.fixture(scope="module")
def world(real_registry: RealRegistry, seaweed_s3: SeaweedS3, real_postgres: RealPostgres,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("airfleet")
    (work / "secrets").mkdir()
    (work / "secrets" / "access").write_text(seaweed_s3.access_key)
    (work / "secrets" / "secret").write_text(seaweed_s3.secret_key)
    prefix = f"airfleet-{os.urandom(3).hex()}"
    signer = Signer("p256")
    (work / "release.pub").write_text(signer.pem())
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(_policy(prefix, "release.pub", "release.pub")))
    plan = work / "plan.yaml"
    plan.write_text(yaml.safe_dump({"images": [{"ref": f"{UPSTREAM}/{prefix}/single:v1"},
                                               {"ref": f"{UPSTREAM}/{prefix}/multi:v1"}]}))
    single, multi = asyncio.run(_push(real_registry, prefix, signer))
    recorder = ConnectionRecorder(free_port())
    world = World(work, real_registry, seaweed_s3, real_postgres, prefix, single, multi,
                  policy, plan, recorder, [])
    try:
        yield world
    finally:
        recorder.close()
        for name in world.databases:
            if real_postgres.running:
                real_postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Carried:
    """The connected side's export and the far side's import of it."""

    connected: Side
    archive: Path
    exported: dict[str, Any]
    export_code: int
    export_stderr: str
    far: Side
    imported: dict[str, Any]
    import_code: int
    import_output: str


def _import(config: Path, *archives: Path) -> tuple[int, dict[str, Any], str]:
    report = config.parent / f"import-{os.urandom(2).hex()}.json"
    result = run_sigil("import", "--config", str(config), "--report", str(report),
                       *map(str, archives))
    assert report.is_file(), result.stdout + result.stderr
    return result.returncode, json.loads(report.read_text()), result.stdout + result.stderr


@pytest.fixture(scope="module")
def carried(world: World) -> Carried:
    connected = world.side("connected", world.registry.url)
    archive = world.work / "carry.tar"
    made = run_sigil("export", "--config", str(connected.sigil.config_path), "--plan",
                     str(world.plan), "--output", str(archive), "--json")
    far = world.side("far", world.dead_url)
    code, imported, output = _import(far.sigil.config_path, archive)
    return Carried(connected, archive, json.loads(made.stdout or "{}"), made.returncode,
                   made.stderr, far, imported, code, output)


@pytest.fixture(scope="module")
def far_replicas(world: World, carried: Carried) -> Iterator[list[SigilProcess]]:
    """Two ``serve --offline`` replicas on the far side's backends."""
    second = world.side("far2", world.dead_url, carried.far.backend).sigil
    replicas = [carried.far.sigil, second]
    try:
        for replica in replicas:
            replica.start(args=["--offline"])
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def _blob_gets(registry: RealRegistry, mark: int) -> list[str]:
    return [r.path for r in registry.requests(since=mark)
            if r.method == "GET" and "/blobs/" in r.path]


async def test_export_from_the_fleet_store_warms_it_and_reuses_it(world: World,
                                                                  carried: Carried) -> None:
    assert carried.export_code == 0, carried.export_stderr
    assert {i["name"]: i["digest"] for i in carried.exported["images"]} == {
        f"{UPSTREAM}/{world.prefix}/single:v1": world.single.digest,
        f"{UPSTREAM}/{world.prefix}/multi:v1": world.multi.index.digest}
    assert all(i["verified"] for i in carried.exported["images"])
    assert carried.exported["fetched_bytes"] > 0
    # The working store was the fleet's own: its bucket and index now hold the images (the
    # archive's blobs were streamed out of the bucket); only the local scratch dir is gone.
    stored = await carried.connected.backend.contents(world.seaweed, world.repos)
    needed = set(world.single.blobs) | set(world.multi.index.blobs) | {
        world.single.digest, world.multi.index.digest}
    assert needed <= stored.objects and not stored.pending
    assert Digest.parse(world.multi.index.digest) in stored.graph.manifests
    assert not (world.work / "carry.tar.sigil-work").exists()
    with tarfile.open(carried.archive) as tar:
        for blob in world.single.blobs:
            member = tar.extractfile(f"blobs/sha256/{blob[7:]}")
            assert member is not None and _sha(member.read()) == blob
    # Again, to a layout directory: every blob is reused from the fleet's store, none fetched.
    mark = world.registry.log_mark()
    again = world.work / "again-layout"
    config = carried.connected.sigil.config_path
    result = run_sigil("export", "--config", str(config), "--plan", str(world.plan),
                       "--output", str(again), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fetched_bytes"] == 0
    assert _blob_gets(world.registry, mark) == []
    assert json.loads(result.stdout)["held_blobs"] == carried.exported["held_blobs"]
    files = list((again / "blobs" / "sha256").iterdir())
    assert len(files) >= len(needed)
    assert all(_sha(f.read_bytes()) == f"sha256:{f.name}" for f in files)
    # An object corrupted in the bucket is re-hashed on its way out: never archived.
    layer = world.single.blobs[-1]
    store = await S3ObjectStore.open(s3_config_for(world.seaweed,
                                                   carried.connected.backend.prefix))
    try:
        await store.client.put_object(Bucket=TEST_BUCKET, Key=store.key(Digest.parse(layer)),
                                      Body=b"corrupt")
    finally:
        await store.close()
    bad = world.work / "bad.tar"
    result = run_sigil("export", "--config", str(config), "--plan", str(world.plan),
                       "--output", str(bad), "--json")
    assert result.returncode == 1, result.stderr
    [failed] = json.loads(result.stdout)["failed"]
    assert layer in failed["error"] and "sigil fsck" in failed["error"]
    assert not bad.exists() and not bad.with_name("bad.tar.partial").exists()


async def test_import_loads_the_bucket_and_the_database(world: World, carried: Carried) -> None:
    assert carried.import_code == 0, carried.import_output
    [archive] = carried.imported["archives"]
    assert archive["result"] == "loaded", archive
    assert [i["result"] for i in archive["images"]] == ["loaded", "loaded"]
    assert carried.imported["store"].startswith(f"s3://{TEST_BUCKET}/{carried.far.backend.prefix}")
    stored = await carried.far.backend.contents(world.seaweed, world.repos)
    assert set(world.single.blobs) | {world.single.digest} <= stored.objects
    assert not stored.pending
    assert Digest.parse(world.single.digest) in stored.graph.manifests
    assert all(Digest.parse(b) in stored.graph.blobs for b in world.single.blobs)
    assert {(world.repos[0], "v1"), (world.repos[1], "v1")} <= stored.tags
    # Nothing of the archive was staged on local disk: no file is left under the store root.
    assert [p for p in carried.far.sigil.store.rglob("*") if p.is_file()] == []
    # Importing the same archive again changes nothing and still succeeds.
    code, _, output = _import(carried.far.sigil.config_path, carried.archive)
    assert code == 0, output
    again = await carried.far.backend.contents(world.seaweed, world.repos)
    assert (again.objects, again.tags) == (stored.objects, stored.tags)


async def test_a_denied_image_leaves_none_of_its_objects_in_the_bucket(
        world: World, carried: Carried) -> None:
    other = world.work / "other.pub"
    other.write_text(Signer("p256").pem())
    policy = world.work / "partial-policy.yaml"
    policy.write_text(yaml.safe_dump(_policy(world.prefix, str(world.work / "release.pub"),
                                             str(other))))
    side = world.side("partial", world.dead_url, policy=policy)
    code, report, output = _import(side.sigil.config_path, carried.archive)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "partial"
    assert [(i["name"].rsplit("/", 1)[-1], i["result"]) for i in archive["images"]] == [
        ("single:v1", "loaded"), ("multi:v1", "refused")]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert set(world.single.blobs) | {world.single.digest} <= stored.objects
    only_multi = (set(world.multi.index.blobs) | {world.multi.index.digest}) - set(
        world.single.blobs)
    assert not only_multi & stored.objects
    assert stored.tags == {(world.repos[0], "v1"),
                           (world.repos[0], f"sha256-{world.single.digest[7:]}.sig")}
    # Every object left is one the index knows: nothing unindexed, nothing pending.
    indexed = {str(d) for d in stored.graph.manifests} | {str(d) for d in stored.graph.blobs}
    assert stored.objects == indexed and not stored.pending


async def test_two_offline_replicas_serve_the_import_without_the_upstream(
        world: World, carried: Carried, far_replicas: list[SigilProcess], tmp_path: Path) -> None:
    for number, replica in enumerate(far_replicas):
        copy = await skopeo_copy(f"{replica.host}/{world.prefix}/single:v1",
                                 tmp_path / f"single{number}")
        assert copy.digest == world.single.digest
        assert copy.manifest() == world.single.manifest
        for blob in world.single.blobs:
            assert _sha(copy.blob(blob)) == blob
        multi = await skopeo_copy(f"{replica.host}/{world.prefix}/multi:v1",
                                  tmp_path / f"multi{number}")
        assert multi.digest == world.multi.index.digest
        for child in world.multi.children.values():
            assert multi.manifest(child.digest) == child.manifest
    world.recorder.assert_untouched()


async def test_tampered_archive_is_refused_and_leaves_bucket_and_index_empty(
        world: World, carried: Carried) -> None:
    tampered = world.work / "tampered.tar"
    shutil.copy(carried.archive, tampered)
    with tarfile.open(tampered) as tar:
        layers = [m for m in tar.getmembers() if m.isfile() and m.size > 0
                  and f"sha256:{m.name.rsplit('/', 1)[-1]}" in world.multi.index.blobs]
    last = max(layers, key=lambda m: m.offset_data)   # blobs before it are committed first
    with open(tampered, "r+b") as fh:
        fh.seek(last.offset_data + last.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))
    fresh = world.side("tampered", world.dead_url)
    code, report, output = _import(fresh.sigil.config_path, tampered)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert "does not match its digest" in archive["error"] and "nothing was loaded" in \
        archive["error"]
    stored = await fresh.backend.contents(world.seaweed, world.repos)
    assert (stored.objects, stored.pending, stored.tags) == (set(), set(), set())
    assert not stored.graph.manifests and not stored.graph.blobs


async def test_export_to_store_warms_a_fleet_that_serves_offline(world: World,
                                                                tmp_path: Path) -> None:
    warmed = world.side("warmed", world.registry.url)
    result = run_sigil("export", "--config", str(warmed.sigil.config_path), "--plan",
                       str(world.plan), "--to-store", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fetched_bytes"] > 0
    stored = await warmed.backend.contents(world.seaweed, world.repos)
    assert set(world.multi.index.blobs) <= stored.objects
    assert Digest.parse(world.multi.index.digest) in stored.graph.manifests
    # A replica of that fleet, offline: it serves what the export put there.
    replica = world.side("warmed-replica", world.dead_url, warmed.backend).sigil
    await asyncio.to_thread(replica.start, args=["--offline"])
    try:
        copy = await skopeo_copy(f"{replica.host}/{world.prefix}/multi:v1", tmp_path / "m")
        assert copy.digest == world.multi.index.digest
        for blob in world.multi.index.blobs:
            assert _sha(copy.blob(blob)) == blob
    finally:
        await asyncio.to_thread(replica.stop)
    world.recorder.assert_untouched()


def test_unreachable_backends_exit_2_naming_the_config_key(world: World,
                                                          carried: Carried) -> None:
    side = world.side("unreachable", world.dead_url)
    config: dict[str, Any] = yaml.safe_load(side.sigil.config_path.read_text())
    config["storage"]["s3"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    config["storage"]["s3"]["max_attempts"] = 1
    dead_s3 = side.sigil.config_path.with_name("dead-s3.yaml")
    dead_s3.write_text(yaml.safe_dump(config))
    password = os.urandom(8).hex()
    config = yaml.safe_load(side.sigil.config_path.read_text())
    config["index"]["postgres"]["dsn"] = (f"postgresql://sigil:{password}@127.0.0.1:"
                                          f"{free_port()}/nothing")
    dead_pg = side.sigil.config_path.with_name("dead-pg.yaml")
    dead_pg.write_text(yaml.safe_dump(config))
    runs = {
        ("import", "storage.s3.endpoint"): ["import", "--config", str(dead_s3),
                                            str(carried.archive)],
        ("export", "storage.s3.endpoint"): ["export", "--config", str(dead_s3), "--plan",
                                            str(world.plan), "--to-store"],
        ("import", "index.postgres.dsn"): ["import", "--config", str(dead_pg),
                                           str(carried.archive)],
        ("export", "index.postgres.dsn"): ["export", "--config", str(dead_pg), "--plan",
                                           str(world.plan), "--output",
                                           str(side.sigil.workdir / "x.tar")],
    }
    for (command, key), args in runs.items():
        result = run_sigil(*args, timeout=120)
        assert result.returncode == 2, (command, key, result.stdout, result.stderr)
        assert key in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert world.seaweed.secret_key not in result.stderr and password not in result.stderr
    assert not (side.sigil.workdir / "x.tar.sigil-work").exists()   # nothing left behind


async def _import_in_process(monkeypatch: pytest.MonkeyPatch, config: Path, archive: Path,
                             instrument: Callable[[Backends], None]) -> dict[str, Any]:
    """``sigil import`` in this process, on backends ``instrument`` may hook into (to land
    another process's step between two of the import's)."""
    opened = importer.open_backends

    async def open_instrumented(cfg: Any) -> Backends:
        backends = await opened(cfg)
        instrument(backends)
        return backends

    monkeypatch.setattr(importer, "open_backends", open_instrumented)
    quiet = LineProgress(io.StringIO(), "sigil")
    return await importer.Importer(load_config(str(config)), progress=quiet).run([archive])


def _member(archive: Path, digest: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"blobs/sha256/{digest[7:]}")
        assert member is not None
        return member.read()


async def test_a_blob_gc_removes_after_the_import_checked_it_is_never_tagged(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch) -> None:
    side = world.side("gc-race", world.dead_url)
    layer = Digest.parse(world.single.blobs[-1])
    # The far store already holds that layer, unreferenced (an evicted image's, or a killed
    # import's leftover): the import hashes it from the archive and reuses the stored one.
    store = await S3ObjectStore.open(s3_config_for(world.seaweed, side.backend.prefix))
    try:
        await store.put_bytes(layer, _member(carried.archive, str(layer)))
    finally:
        await store.close()
    removed: list[bool] = []

    def instrument(backends: Backends) -> None:
        record_image = backends.index.record_image

        async def gc_first(*args: Any, **kwargs: Any) -> None:
            if not removed:  # a fleet gc pass lands after the check, before the rows
                removed.append(await backends.index.delete_unreferenced(
                    layer, functools.partial(backends.objects.delete, layer)))
            await record_image(*args, **kwargs)

        backends.index.record_image = gc_first  # type: ignore[method-assign]

    report = await _import_in_process(monkeypatch, side.sigil.config_path, carried.archive,
                                      instrument)
    assert removed == [True]
    [archive] = report["archives"]
    assert archive["result"] != "loaded" and not report["ok"]
    assert str(layer) in archive["error"] and "vanished" in archive["error"]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert str(layer) not in stored.objects
    # No tag names the image whose layer is gone (a tag names only complete content), and
    # none of its rows were written (they go in one transaction, after the check).
    assert (world.repos[0], "v1") not in stored.tags
    assert (world.repos[1], "v1") not in stored.tags
    assert Digest.parse(world.single.digest) not in stored.graph.manifests


@pytest.mark.parametrize("fault", ["a refused row", "the connection dies"])
async def test_a_failure_midway_through_an_images_rows_leaves_none_of_them(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """The first image's transaction fails after its objects were checked and with most of
    its rows about to go in: the database refuses its last tag (NOT NULL), or the
    connection holding the transaction is killed on the server. No row of that image is
    visible afterwards (no manifest, blob, edge or tag), and its blobs are rolled back."""
    side = world.side(f"midway-{fault.split()[-1]}", world.dead_url)
    failed: list[Any] = []

    def instrument(backends: Backends) -> None:
        record_image = backends.index.record_image

        async def failing(image: Any, check: Any = None) -> None:
            if failed:
                return await record_image(image, check=check)
            failed.append(image)
            if fault == "a refused row":
                last = dataclasses.replace(image.tags[-1], media_type=None)
                image = dataclasses.replace(image, tags=(*image.tags[:-1], last))
                return await record_image(image, check=check)

            async def kill_the_connection() -> None:
                await check()
                killer = await asyncpg.connect(side.backend.dsn)
                try:
                    killed = await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND state = 'idle in transaction'")
                finally:
                    await killer.close()
                assert killed == 1

            return await record_image(image, check=kill_the_connection)

        backends.index.record_image = failing  # type: ignore[method-assign]

    report = await _import_in_process(monkeypatch, side.sigil.config_path, carried.archive,
                                      instrument)
    [archive] = report["archives"]
    assert failed and archive["result"] == "refused" and not report["ok"]
    assert "unavailable" in archive["error"]
    [image] = failed
    assert image.tags and len(image.manifests) >= 2  # a whole image's rows were refused
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert stored.graph.manifests == {} and stored.graph.blobs == {}
    assert stored.graph.refs == {} and stored.graph.referrers == {} and stored.tags == set()
    # Its blobs were rolled back; a manifest it published stays, unindexed, for the orphan
    # sweep (deleting one could race a replica's pull-through of it: _StagedManifests).
    assert not {str(d) for d, _ in image.blobs} & stored.objects
    manifests = (await importer.read_metadata(carried.archive)).contents["manifests"]
    assert stored.objects <= set(manifests), stored.objects - set(manifests)


async def test_a_replica_serving_during_the_load_never_sees_a_partial_image(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each image's rows, and inside their transaction (its check, with the rows'
    locks held), another replica (its own connections) pulls both images by tag and by
    digest: each is either absent or served verified, never denied (a deny would be cached
    fleet-wide) and never incomplete."""
    side = world.side("watched", world.dead_url)
    config = offline_config(load_config(str(side.sigil.config_path)))
    upstream = config.upstreams[0]
    store = await S3ObjectStore.open(s3_config_for(world.seaweed, side.backend.prefix))
    index = await PgIndex.open(side.backend.dsn)
    seen: list[tuple[str, str]] = []

    async def pull_everything() -> None:
        mirror = Mirror(config, store, index, offline_clients(config),
                        Verifier(load_policy(str(world.policy))))
        for repo, digest in ((world.repos[0], world.single.digest),
                             (world.repos[1], world.multi.index.digest)):
            for reference in ("v1", digest):
                route = Route(upstream, repo, f"{upstream.name}/{repo}")
                try:
                    served = await mirror.manifest(route, reference)
                except ManifestUnknown:
                    seen.append((reference, "absent"))
                    continue
                except Denied as exc:
                    seen.append((reference, f"denied: {exc}"))
                    continue
                assert str(served.digest) == digest
                seen.append((reference, "served"))

    def instrument(backends: Backends) -> None:
        record_image = backends.index.record_image

        async def watched(image: Any, check: Any = None) -> None:
            async def pull_mid_transaction() -> None:
                await check()
                await pull_everything()

            await pull_everything()
            await record_image(image, check=pull_mid_transaction)

        backends.index.record_image = watched  # type: ignore[method-assign]

    try:
        report = await _import_in_process(monkeypatch, side.sigil.config_path,
                                          carried.archive, instrument)
        assert report["ok"], report
        await pull_everything()
    finally:
        await index.close()
        await store.close()
    assert [s for s in seen if s[1] not in ("absent", "served")] == []
    assert seen[-4:] == [("v1", "served"), (world.single.digest, "served"),
                         ("v1", "served"), (world.multi.index.digest, "served")]


async def test_a_refused_import_never_removes_a_manifest_a_replica_is_storing(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """A replica pulls every manifest of the archive through (the real
    ``Mirror._store_manifest``: is the object there? store it if not; record the row) while
    a refused import rolls back: the import's rollback runs between the replica's look at
    the bucket and its row. Every manifest the replica recorded must still be stored."""
    meta = await importer.read_metadata(carried.archive)
    manifests: dict[str, str] = meta.contents["manifests"]
    tampered = tmp_path / "tampered.tar"
    shutil.copy(carried.archive, tampered)
    with tarfile.open(tampered) as tar:
        held = [m for m in tar.getmembers() if m.isfile() and m.size > 0
                and f"sha256:{m.name.rsplit('/', 1)[-1]}" in meta.contents["held"]]
    last = max(held, key=lambda m: m.offset_data)   # everything before it is committed first
    with open(tampered, "r+b") as fh:
        fh.seek(last.offset_data + last.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))
    side = world.side("replica-race", world.dead_url)
    config = offline_config(load_config(str(side.sigil.config_path)))
    store = await S3ObjectStore.open(s3_config_for(world.seaweed, side.backend.prefix))
    index = await PgIndex.open(side.backend.dsn)
    at_row = asyncio.Semaphore(0)
    rolled_back = asyncio.Event()
    record = index.put_manifest

    async def record_after_rollback(*args: Any, **kwargs: Any) -> None:
        at_row.release()           # the replica looked at the bucket (and stored if absent)
        await rolled_back.wait()
        await record(*args, **kwargs)

    index.put_manifest = record_after_rollback  # type: ignore[method-assign]
    mirror = Mirror(config, store, index, offline_clients(config))
    replica: list[asyncio.Task[Any]] = []

    def instrument(backends: Backends) -> None:
        delete_unreferenced = backends.index.delete_unreferenced

        async def replica_first(*args: Any, **kwargs: Any) -> bool:
            if not replica:   # the rollback begins: the replica is pulling the same content
                replica.append(asyncio.ensure_future(asyncio.gather(*(
                    mirror._store_manifest(Digest.parse(d), _member(carried.archive, d), t)
                    for d, t in manifests.items()))))
                for _ in manifests:
                    await at_row.acquire()
            return await delete_unreferenced(*args, **kwargs)

        backends.index.delete_unreferenced = replica_first  # type: ignore[method-assign]

    try:
        report = await _import_in_process(monkeypatch, side.sigil.config_path, tampered,
                                          instrument)
        rolled_back.set()
        assert replica, "the import rolled nothing back"
        await replica[0]
        [archive] = report["archives"]
        assert archive["result"] == "refused" and "does not match its digest" in \
            archive["error"]
        rows = (await index.graph()).manifests
        assert {str(d) for d in rows} == set(manifests)
        missing = [d for d in manifests if not await store.has(Digest.parse(d))]
        assert missing == [], "indexed by the replica, deleted by the import's rollback"
    finally:
        await index.close()
        await store.close()
    # The import's own objects are gone again: what is left is what the replica stored.
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert stored.objects == set(manifests) and not stored.pending


def _forge(src: Path, dst: Path, extra: dict[str, bytes],
           edit: Callable[[dict[str, Any]], None]) -> None:
    """``src`` with ``extra`` blobs added and its contents document changed by ``edit``,
    re-digested all the way up (the archive manifest, index.json) as an attacker can."""
    from sigil.airgap.layout import canonical_json

    with tarfile.open(src) as tar:
        files = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tar.getmembers() if m.isfile()}
    index = json.loads(files["index.json"])
    ours = next(m for m in index["manifests"] if "dev.sigil.airgap.archive" in m["annotations"])
    manifest = json.loads(files.pop(f"blobs/sha256/{ours['digest'][7:]}"))
    contents = json.loads(files.pop(f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"))
    edit(contents)
    new_contents = canonical_json(contents)
    manifest["layers"][0].update(digest=str(Digest.of(new_contents)), size=len(new_contents))
    new_manifest = canonical_json(manifest)
    ours.update(digest=str(Digest.of(new_manifest)), size=len(new_manifest))
    files["index.json"] = canonical_json(index)
    files[f"blobs/sha256/{Digest.of(new_manifest).hex}"] = new_manifest
    files[f"blobs/sha256/{Digest.of(new_contents).hex}"] = new_contents
    files.update(extra)
    order = ["oci-layout", "index.json", f"blobs/sha256/{Digest.of(new_manifest).hex}",
             f"blobs/sha256/{Digest.of(new_contents).hex}"]
    with tarfile.open(dst, "w") as tar:
        for name in order + sorted(set(files) - set(order)):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))


async def test_an_oversized_manifest_is_refused_before_it_is_written(
        world: World, carried: Carried, tmp_path: Path) -> None:
    big = os.urandom(4 * 1024 * 1024 + 1)   # one byte over MAX_MANIFEST_BYTES
    digest = _sha(big)

    def list_as_manifest(contents: dict[str, Any]) -> None:
        contents["held"].append(digest)
        contents["sizes"][digest] = len(big)
        contents["manifests"][digest] = "application/vnd.oci.image.manifest.v1+json"

    forged = tmp_path / "big-manifest.tar"
    _forge(carried.archive, forged, {f"blobs/sha256/{digest[7:]}": big}, list_as_manifest)
    side = world.side("big-manifest", world.dead_url)
    code, report, output = _import(side.sigil.config_path, forged)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert f"manifest {digest} is {len(big)} bytes (at most {len(big) - 1})" in \
        archive["error"]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert (stored.objects, stored.pending, stored.tags) == (set(), set(), set())


async def test_too_little_local_space_for_the_staged_manifests_is_refused(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a bucket only the manifests (and the private index) land on local disk; that
    still needs room, and is refused before anything is written when it is missing."""
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(importer.shutil, "disk_usage", tiny)
    side = world.side("no-room", world.dead_url)
    report = await _import_in_process(monkeypatch, side.sigil.config_path, carried.archive,
                                      lambda backends: None)
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert "only 1000 free" in archive["error"] and "needs" in archive["error"]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert (stored.objects, stored.pending, stored.tags) == (set(), set(), set())


async def _far_side_holding_the_manifest(world: World, carried: Carried,
                                         name: str) -> tuple[Side, Digest]:
    """A fresh far side whose bucket already holds the single image's manifest, unindexed
    (what a killed import leaves): the import will reuse it."""
    side = world.side(name, world.dead_url)
    manifest = Digest.parse(world.single.digest)
    store = await S3ObjectStore.open(s3_config_for(world.seaweed, side.backend.prefix))
    try:
        await store.put_bytes(manifest, _member(carried.archive, world.single.digest))
    finally:
        await store.close()
    return side, manifest


async def test_a_reused_object_removed_before_it_is_read_refuses_the_archive(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch) -> None:
    """The far bucket already holds the image's manifest, unindexed (a killed import's
    leftover): the import reuses it. A gc removing it just before the import reads it makes
    a clear refusal in the report, not an exception out of ``sigil import``."""
    side, manifest = await _far_side_holding_the_manifest(world, carried, "gone-before-read")
    removed: list[bool] = []

    def instrument(backends: Backends) -> None:
        read_bytes = backends.objects.read_bytes

        async def gc_first(digest: Digest) -> bytes:
            if digest == manifest and not removed:
                removed.append(await backends.objects.delete(digest))
            return await read_bytes(digest)

        backends.objects.read_bytes = gc_first  # type: ignore[method-assign]

    report = await _import_in_process(monkeypatch, side.sigil.config_path, carried.archive,
                                      instrument)
    assert removed == [True]
    [archive] = report["archives"]
    assert archive["result"] == "refused" and not report["ok"]
    assert str(manifest) in archive["error"] and "vanished" in archive["error"]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert stored.tags == set() and not stored.graph.manifests


async def test_export_indexes_an_unindexed_stored_object_only_if_it_hashes_right(
        world: World) -> None:
    """An object in the bucket that the index does not know (what a killed import or
    download left, or anything written there behind sigil's back) is not taken on trust:
    ``export --to-store`` re-hashes it, and fetches it again when it does not match."""
    side = world.side("relic", world.registry.url)
    layer = Digest.parse(world.single.blobs[-1])
    store = await S3ObjectStore.open(s3_config_for(world.seaweed, side.backend.prefix))
    try:
        await store.client.put_object(Bucket=TEST_BUCKET, Key=store.key(layer),
                                      Body=b"not the layer")
        result = run_sigil("export", "--config", str(side.sigil.config_path), "--plan",
                           str(world.plan), "--to-store", "--json")
        assert result.returncode == 0, result.stderr
        stored = await side.backend.contents(world.seaweed, world.repos)
        assert layer in stored.graph.blobs
        assert await store.hash_object(layer) == layer   # what the index lists is right
    finally:
        await store.close()


async def test_a_reused_manifest_changed_after_verification_is_never_indexed(
        world: World, carried: Carried, monkeypatch: pytest.MonkeyPatch) -> None:
    """The far bucket already holds the image's manifest (the import reuses it). If its
    object changes between the offline verification and the rows, the row is not written
    from the changed bytes: the archive is refused in the report."""
    side, manifest = await _far_side_holding_the_manifest(world, carried, "changed-manifest")
    changed: list[bool] = []

    load = importer.Importer._load

    async def change_first(self: Any, image: Any, meta: Any, windex: Any, work: Any,
                           target: Any, *args: Any) -> int:
        if not changed:   # step 3 begins (verified): the stored manifest is overwritten
            assert isinstance(target, S3ObjectStore)
            await target.client.put_object(Bucket=TEST_BUCKET, Key=target.key(manifest),
                                           Body=b'{"schemaVersion": 2, "layers": []}')
            changed.append(True)
        return await load(self, image, meta, windex, work, target, *args)

    monkeypatch.setattr(importer.Importer, "_load", change_first)
    report = await _import_in_process(monkeypatch, side.sigil.config_path, carried.archive,
                                      lambda backends: None)
    assert changed == [True]
    [archive] = report["archives"]
    assert archive["result"] == "refused" and not report["ok"]
    assert f"{manifest} changed in the store" in archive["error"]
    stored = await side.backend.contents(world.seaweed, world.repos)
    assert manifest not in stored.graph.manifests
    assert (world.repos[0], "v1") not in stored.tags
