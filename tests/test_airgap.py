"""Air-gapped mirrors end to end with real parts: ``sigil export`` from a real docker-registry
upstream (signed with keys and keyless at test time), ``skopeo`` reading the archive, and
``sigil import`` re-verifying offline into a fresh store; then the archive is damaged in every
way the issue lists and each import must refuse with the reason and load nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sigil.oci.digest import Digest
from sigil.storage import BlobStore, Index, fsck
from tests.realparts import RealRegistry, RegistryPusher, skopeo
from tests.support.testsigstore import DEFAULT_ISSUER, TestSigstore
from tests.test_e2e_keyless import WORKFLOW_RE, sign_keyless
from tests.test_e2e_verify import _dhi_image, sig_layer
from tests.test_verify_support import SLSA_V02, Signer

pytestmark = pytest.mark.realparts
UPSTREAM = "registry.test"
DEAD_URL = "http://127.0.0.1:9"   # nothing listens: an import that tried to connect would fail


def run_sigil(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    return subprocess.run([sys.executable, "-m", "sigil", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def write_config(path: Path, *, store: Path, url: str, policy: Path | None) -> Path:
    doc: dict[str, Any] = {"storage": {"root": str(store)},
                           "upstreams": [{"name": UPSTREAM, "url": url, "default": True}],
                           "log": {"level": "warning", "format": "json"}}
    if policy is not None:
        doc["policy"] = str(policy)
    path.write_text(yaml.safe_dump(doc))
    return path


def policy_doc(prefix: str, key: str, root: str) -> dict[str, Any]:
    """Keys for the plain images, key + SLSA attestation for the DHI one, keyless for one."""
    key_auth = {"name": "release-key", "key": {"path": key}}
    return {"policies": [
        {"name": "signed-images", "authorities": [key_auth],
         "images": [f"{UPSTREAM}/{prefix}/single", f"{UPSTREAM}/{prefix}/multi",
                    f"{UPSTREAM}/{prefix}/unsigned"]},
        {"name": "hardened", "images": [f"{UPSTREAM}/{prefix}/dhi"], "authorities": [key_auth],
         "attestations": [{"name": "provenance", "predicateType": SLSA_V02, "conditions": [
             {"key": "predicate.builder.id", "operator": "Equals",
              "value": "https://github.com/docker/buildkit@v1"}]}]},
        {"name": "keyless-releases", "images": [f"{UPSTREAM}/{prefix}/keyless"],
         "authorities": [{"name": "release-identities", "keyless": {
             "trusted_root": root,
             "identities": [{"issuer": DEFAULT_ISSUER,
                             "subjectRegExp": WORKFLOW_RE}]}}]},
    ]}


@dataclass
class Upstream:
    """What was pushed to the real registry for the whole module."""

    registry: RealRegistry
    prefix: str
    single: Any
    multi: Any
    dhi: Any
    keyless: Any
    unsigned: Any
    keyless_sig: Any
    policy_dir: Path
    signer: Any


async def _seed(registry: RealRegistry, prefix: str, signer: Signer,
                sigstore: TestSigstore) -> dict[str, Any]:
    async with RegistryPusher(registry.url) as pusher:
        single = await pusher.make_image(f"{prefix}/single", "v1")
        await pusher.push_cosign_signatures(f"{prefix}/single", single.digest,
                                            [sig_layer(signer, single.digest)])
        multi = await pusher.make_multiplatform_image(f"{prefix}/multi", "v1")
        await pusher.push_cosign_signatures(f"{prefix}/multi", multi.index.digest,
                                            [sig_layer(signer, multi.index.digest)])
        dhi = await _dhi_image(pusher, f"{prefix}/dhi", signer)
        keyless = await pusher.make_image(f"{prefix}/keyless", "v1")
        keyless_sig = await sign_keyless(sigstore, pusher, f"{prefix}/keyless", keyless,
                                         "bundle")
        unsigned = await pusher.make_image(f"{prefix}/unsigned", "v1")
    return {"single": single, "multi": multi, "dhi": dhi, "keyless": keyless,
            "keyless_sig": keyless_sig, "unsigned": unsigned}


def make_upstream(registry: RealRegistry, policy_dir: Path) -> Upstream:
    """Push the images of :func:`_seed` (a fresh prefix) to ``registry`` and write the
    connected side's policy, key and trusted root into ``policy_dir``."""
    prefix = f"airgap-{os.urandom(3).hex()}"
    signer = Signer("p256")
    sigstore = TestSigstore()
    (policy_dir / "release.pub").write_text(signer.pem())
    sigstore.write_trusted_root(policy_dir / "trusted_root.json")
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump(
        policy_doc(prefix, "release.pub", "trusted_root.json")))
    pushed = asyncio.run(_seed(registry, prefix, signer, sigstore))
    return Upstream(registry, prefix, policy_dir=policy_dir, signer=signer, **pushed)


@pytest.fixture(scope="module")
def upstream(real_registry: RealRegistry, tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    return make_upstream(real_registry, tmp_path_factory.mktemp("policy"))


def plan_for(up: Upstream, path: Path, *, unsigned: bool = True) -> Path:
    p = f"{UPSTREAM}/{up.prefix}"
    images: list[dict[str, Any]] = [
        {"ref": f"{p}/single:v1"},
        {"ref": f"{p}/multi:v1", "platforms": ["linux/amd64"]},
        {"repository": f"{p}/dhi", "tags": ["^dh.$"]},
        {"ref": f"{p}/keyless:v1"},
    ]
    if unsigned:
        images.append({"ref": f"{p}/unsigned:v1"})
    path.write_text(yaml.safe_dump({"images": images}))
    return path


@dataclass
class Exported:
    archive: Path
    config: Path
    result: subprocess.CompletedProcess[str]
    report: dict[str, Any]


@pytest.fixture(scope="module")
def exported(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    work = tmp_path_factory.mktemp("export")
    config = write_config(work / "sigil.yaml", store=work / "unused", url=upstream.registry.url,
                          policy=upstream.policy_dir / "policy.yaml")
    archive = work / "out.tar"
    result = run_sigil("export", "--config", str(config), "--plan",
                       str(plan_for(upstream, work / "plan.yaml")), "--output", str(archive),
                       "--json")
    return Exported(archive, config, result, json.loads(result.stdout))


def local_side(tmp: Path, up: Upstream, *, policy_text: str | None = None) -> Path:
    """The disconnected side: its own copy of the policy and trust files, a fresh store and
    an upstream URL where nothing listens."""
    local = tmp / "local"
    local.mkdir()
    for name in ("release.pub", "trusted_root.json", "policy.yaml"):
        shutil.copy(up.policy_dir / name, local / name)
    if policy_text is not None:
        (local / "policy.yaml").write_text(policy_text)
    return write_config(local / "sigil.yaml", store=local / "store", url=DEAD_URL,
                        policy=local / "policy.yaml")


def import_archives(config: Path, *archives: Path) -> tuple[int, dict[str, Any], str]:
    report = config.parent / f"report-{os.urandom(2).hex()}.json"
    result = run_sigil("import", "--config", str(config), "--report", str(report),
                       *map(str, archives))
    assert report.is_file(), result.stdout + result.stderr
    return result.returncode, json.loads(report.read_text()), result.stdout + result.stderr


def store_of(config: Path) -> tuple[BlobStore, Index]:
    root = Path(yaml.safe_load(config.read_text())["storage"]["root"])
    return BlobStore(root), Index(root / "index.sqlite")


# ------------------------------------------------------------------------------ round trip
async def test_export_leaves_out_unsigned_and_carries_artifacts(upstream, exported) -> None:
    report = exported.report
    assert exported.result.returncode == 1, exported.result.stderr   # the unsigned one
    names = {i["name"]: i for i in report["images"]}
    p = f"{UPSTREAM}/{upstream.prefix}"
    assert set(names) == {f"{p}/single:v1", f"{p}/multi:v1", f"{p}/dhi:dhi",
                          f"{p}/keyless:v1"}
    assert all(i["verified"] and i["decision"] == "allow" for i in names.values())
    assert [d["name"] for d in report["denied"]] == [f"{p}/unsigned:v1"]
    assert report["denied"][0]["reason"] == "no_signature"
    # The keyless bundle referrer and the DHI attestations were carried with their images.
    assert upstream.keyless_sig.digest in names[f"{p}/keyless:v1"]["artifacts"]
    assert len(names[f"{p}/dhi:dhi"]["artifacts"]) >= 6  # sig, tag-schema, att + att sig ...
    index = json.loads(_member(exported.archive, "index.json"))
    refs = {m["annotations"].get("org.opencontainers.image.ref.name"): m["digest"]
            for m in index["manifests"]}
    assert refs[f"{p}/single:v1"] == upstream.single.digest
    assert refs[f"{p}/multi:v1"] == upstream.multi.index.digest
    assert refs[f"{p}/single:sha256-{upstream.single.digest[7:]}.sig"]
    assert f"{p}/unsigned:v1" not in refs
    # Platform filter: only the amd64 child of the multi-platform index is carried.
    blobs = _members(exported.archive)
    assert f"blobs/sha256/{upstream.multi.children['linux/amd64'].digest[7:]}" in blobs
    assert f"blobs/sha256/{upstream.multi.children['linux/arm64'].digest[7:]}" not in blobs
    assert not any(f"blobs/sha256/{b[7:]}" in blobs for b in upstream.unsigned.blobs)
    side = json.loads(exported.archive.with_name("out.tar.manifest.json").read_text())
    assert side["archive"] == report["archive"]
    # The report says which checks passed; the policy and the trust files it names travel.
    single = names[f"{p}/single:v1"]
    assert any("signature ok" in check for check in single["checks"]), single["checks"]
    assert report["policy"]["fingerprint"]
    layers = _metadata_layers(exported.archive)
    carried = {_member(exported.archive, name) for t, name in layers
               if t.endswith(("policy.v1+yaml", "trust.v1"))}
    assert carried == {(upstream.policy_dir / f).read_bytes()
                       for f in ("policy.yaml", "release.pub", "trusted_root.json")}
    in_archive = json.loads(_member(exported.archive, next(
        name for t, name in layers if t.endswith("report.v1+json"))))
    assert [i["digest"] for i in in_archive["images"]] == [i["digest"]
                                                           for i in report["images"]]


async def test_skopeo_reads_the_archive_with_upstream_digests(upstream, exported,
                                                             tmp_path) -> None:
    p = f"{UPSTREAM}/{upstream.prefix}"
    for name, expected, extra in ((f"{p}/single:v1", upstream.single.digest, []),
                                  (f"{p}/keyless:v1", upstream.keyless.digest, []),
                                  (f"{p}/dhi:dhi", upstream.dhi.index.digest, ["--all"])):
        dest = tmp_path / name.rsplit("/", 1)[1].replace(":", "-")
        digest_file = tmp_path / f"{dest.name}.digest"
        await skopeo("copy", "--quiet", "--preserve-digests", *extra, "--digestfile",
                     str(digest_file), f"oci-archive:{exported.archive}:{name}", f"dir:{dest}",
                     timeout=120)
        assert digest_file.read_text().strip() == expected
        if not extra:
            assert (dest / "manifest.json").read_bytes() == (
                upstream.single if "single" in name else upstream.keyless).manifest


async def test_import_reverifies_offline_and_loads(upstream, exported, tmp_path) -> None:
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, exported.archive)
    assert code == 0, output
    [archive] = report["archives"]
    assert archive["result"] == "loaded" and not archive["policy_differs"]
    assert {i["result"] for i in archive["images"]} == {"loaded"}
    assert len(archive["images"]) == 4
    store, index = store_of(config)
    try:
        p = f"{upstream.prefix}"
        tag = index.get_tag(UPSTREAM, f"{p}/single", "v1")
        assert tag is not None and str(tag.digest) == upstream.single.digest
        assert str(index.get_tag(UPSTREAM, f"{p}/multi", "v1").digest) == \
            upstream.multi.index.digest
        sig = index.get_tag(UPSTREAM, f"{p}/single",
                            f"sha256-{upstream.single.digest[7:]}.sig")
        assert sig is not None
        for blob in upstream.single.blobs:
            assert store.has(Digest.parse(blob)) and index.blob_size(Digest.parse(blob))
        # The keyless bundle is a referrer of its subject, as a pull would have recorded.
        assert Digest.parse(upstream.keyless_sig.digest) in index.get_referrers(
            Digest.parse(upstream.keyless.digest))
        assert index.get_manifest(Digest.parse(upstream.dhi.index.digest)) is not None
        assert not index.is_allowed(UPSTREAM, f"{p}/single", Digest.parse(
            upstream.single.digest), "x")
        assert fsck(store, index).ok
        rows = len(index.graph().manifests)
        # Importing the same archive again changes nothing and still succeeds.
        again, second, output = import_archives(config, exported.archive)
        assert again == 0, output
        assert [i["result"] for i in second["archives"][0]["images"]] == ["loaded"] * 4
        assert len(index.graph().manifests) == rows
        # Nothing is left behind in the store root but the store itself and the report.
        assert sorted(e.name for e in store.root.iterdir()
                      if not e.name.startswith("index.sqlite")) == [
            "blobs", "quarantine", "staging"]
    finally:
        index.close()


def _members(archive: Path) -> set[str]:
    import tarfile
    with tarfile.open(archive) as tar:
        return set(tar.getnames())


def _image_members(archive: Path) -> set[str]:
    """Members of a tar archive without sigil's own (per-run) metadata blobs."""
    index = json.loads(_member(archive, "index.json"))
    [ours] = [m for m in index["manifests"] if "dev.sigil.airgap.archive" in m["annotations"]]
    own = f"blobs/sha256/{ours['digest'][7:]}"
    return _members(archive) - {own} - {name for _, name in _metadata_layers(archive)}


def _member(archive: Path, name: str) -> bytes:
    import tarfile
    with tarfile.open(archive) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()


# ----------------------------------------------------------------------- damaged archives
def _offsets(archive: Path) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data in the tar, size)."""
    import tarfile
    with tarfile.open(archive) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _metadata_layers(archive: Path) -> list[tuple[str, str]]:
    """sigil's metadata blobs of a tar archive: (media type, member name)."""
    index = json.loads(_member(archive, "index.json"))
    [ours] = [m for m in index["manifests"] if "dev.sigil.airgap.archive" in m["annotations"]]
    manifest = json.loads(_member(archive, f"blobs/sha256/{ours['digest'][7:]}"))
    return [(layer["mediaType"], f"blobs/sha256/{layer['digest'][7:]}")
            for layer in manifest["layers"]]


def _target(upstream: Upstream, exported: Exported, what: str) -> str:
    layers = _metadata_layers(exported.archive)
    types = dict(layers)
    return {
        "layer": f"blobs/sha256/{upstream.single.blobs[-1][7:]}",
        "index": "index.json",
        "oci-layout": "oci-layout",
        "report": types["application/vnd.sigil.airgap.report.v1+json"],
        "policy": types["application/vnd.sigil.airgap.policy.v1+yaml"],
        "trust-root": next(name for t, name in layers if t.endswith("trust.v1")
                           and _member(exported.archive, name).startswith(b"{")),
        "contents": types["application/vnd.sigil.airgap.contents.v1+json"],
        "signature": f"blobs/sha256/{upstream.keyless_sig.blobs[-1][7:]}",
    }[what]


def assert_nothing_loaded(config: Path) -> None:
    root = Path(yaml.safe_load(config.read_text())["storage"]["root"])
    if not root.exists():
        return
    store, index = store_of(config)
    try:
        assert list(store.iter_digests()) == []
        graph = index.graph()
        assert graph.manifests == {} and graph.blobs == {} and graph.referrers == {}
        assert not [e for e in root.iterdir() if e.name.startswith(".airgap-import")]
    finally:
        index.close()


@pytest.mark.parametrize("what", ["layer", "index", "oci-layout", "report", "policy",
                                  "trust-root", "contents", "signature"])
def test_one_changed_byte_refuses_everything(upstream, exported, tmp_path, what) -> None:
    name = _target(upstream, exported, what)
    offset, size = _offsets(exported.archive)[name]
    damaged = tmp_path / "damaged.tar"
    shutil.copy(exported.archive, damaged)
    with open(damaged, "r+b") as fh:
        # A character that keeps JSON valid where it lands in a string: the check must not
        # depend on the damage being a syntax error.
        fh.seek(offset + size // 2)
        byte = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(b"x" if byte != b"x" else b"y")
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, damaged)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert "nothing was loaded" in archive["error"]
    expected = {"index": "index.json", "oci-layout": "oci-layout"}.get(what, "digest")
    assert expected in archive["error"], archive["error"]
    assert_nothing_loaded(config)


def _rewrite(src: Path, dst: Path, *, drop: str | None = None,
             replace: dict[str, bytes] | None = None, extra: list[Any] | None = None) -> None:
    """Copy a tar member by member, dropping/replacing some and appending crafted ones."""
    import io
    import tarfile
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            if member.name == drop:
                continue
            data = tin.extractfile(member).read() if member.isfile() else None
            if replace and member.name in replace:
                data = replace[member.name]
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data) if data is not None else None)
        for info, data in extra or []:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.mark.parametrize("case", ["truncated-mid-blob", "truncated-at-member-boundary",
                                  "wrong-layout-version", "missing-blob", "bad-digest",
                                  "empty-file"])
def test_broken_archives_are_refused(upstream, exported, tmp_path, case) -> None:
    broken = tmp_path / "broken.tar"
    layer = _target(upstream, exported, "layer")
    if case.startswith("truncated"):
        offsets = _offsets(exported.archive)
        data_at, size = offsets[layer]
        # Mid-blob: inside the layer's data; at a boundary: right before the last member's
        # header, where a tar reader sees a clean end of file.
        cut = data_at + size // 2 if case == "truncated-mid-blob" else \
            max(at for at, _ in offsets.values()) - 512
        broken.write_bytes(exported.archive.read_bytes()[:cut])
        reason = "truncated"
    elif case == "wrong-layout-version":
        _rewrite(exported.archive, broken,
                 replace={"oci-layout": b'{"imageLayoutVersion":"2.0.0"}'})
        reason = "unsupported oci-layout version '2.0.0'"
    elif case == "missing-blob":
        _rewrite(exported.archive, broken, drop=layer)
        reason = f"index names missing blob sha256:{layer.rsplit('/', 1)[1]}"
    elif case == "bad-digest":
        size = _offsets(exported.archive)[layer][1]
        _rewrite(exported.archive, broken, replace={layer: os.urandom(size)})
        reason = f"blob sha256:{layer.rsplit('/', 1)[1]} does not match its digest"
    else:
        broken.write_bytes(b"")
        reason = "truncated or not a tar"
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, broken)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert reason in archive["error"], archive["error"]
    assert_nothing_loaded(config)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink", "device",
                                  "fifo", "stray-file"])
def test_unsafe_tar_members_are_refused_and_nothing_is_written(upstream, exported, tmp_path,
                                                               case) -> None:
    import tarfile
    info = tarfile.TarInfo()
    data: bytes | None = None
    escape = tmp_path / "escaped"
    if case == "dotdot":
        info.name, data = f"blobs/../../../{escape.name}", b"gotcha"
    elif case == "absolute":
        info.name, data = str(escape), b"gotcha"
    elif case == "symlink":
        info.name, info.type, info.linkname = "blobs/sha256/" + "a" * 64, tarfile.SYMTYPE, \
            str(escape)
    elif case == "hardlink":
        info.name, info.type, info.linkname = "blobs/sha256/" + "b" * 64, tarfile.LNKTYPE, \
            "index.json"
    elif case == "device":
        info.name, info.type, info.devmajor, info.devminor = "blobs/sha256/" + "c" * 64, \
            tarfile.CHRTYPE, 1, 3
    elif case == "fifo":
        info.name, info.type = "blobs/sha256/" + "d" * 64, tarfile.FIFOTYPE
    else:
        info.name, data = "sigil/notes.txt", b"not part of a layout"
    if data is not None:
        info.size = len(data)
    evil = tmp_path / "evil.tar"
    # Appended after every good member: the import has staged everything when it meets it,
    # and must still load nothing.
    _rewrite(exported.archive, evil, extra=[(info, data)])
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, evil)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "refused", archive
    assert {"dotdot": "'..'", "absolute": "absolute", "symlink": "symbolic link",
            "hardlink": "hard link", "device": "not a regular file",
            "fifo": "not a regular file", "stray-file": "unexpected member"}[case] \
        in archive["error"]
    assert not escape.exists()
    assert_nothing_loaded(config)


def test_archive_bigger_than_free_space_is_refused_before_writing(upstream, exported,
                                                                  tmp_path, monkeypatch) -> None:
    from sigil.airgap import importer
    from sigil.config import load_config

    config = local_side(tmp_path, upstream)
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(importer.shutil, "disk_usage", tiny)
    report = asyncio.run(importer.Importer(load_config(str(config))).run([exported.archive]))
    [archive] = report["archives"]
    assert archive["result"] == "refused"
    assert "only 1000 free" in archive["error"] and "needs" in archive["error"]
    assert_nothing_loaded(config)


def test_local_policy_wins_and_the_difference_is_reported(upstream, exported,
                                                          tmp_path) -> None:
    text = (upstream.policy_dir / "policy.yaml").read_text()
    stricter = text.replace("acme", "other-org")   # keyless identities no longer match
    assert stricter != text
    config = local_side(tmp_path, upstream, policy_text=stricter)
    code, report, output = import_archives(config, exported.archive)
    assert code == 1, output
    [archive] = report["archives"]
    assert archive["result"] == "partial" and archive["policy_differs"]
    assert any(line.startswith("+") and "other-org" in line for line in archive["policy_diff"])
    assert "differs from the local one" in output
    results = {i["name"].rsplit("/", 1)[1]: i for i in archive["images"]}
    assert results["keyless:v1"]["result"] == "refused"
    assert results["keyless:v1"]["reason"] == "identity"
    assert {results[n]["result"] for n in ("single:v1", "multi:v1", "dhi:dhi")} == {"loaded"}
    store, index = store_of(config)
    try:
        assert index.get_tag(UPSTREAM, f"{upstream.prefix}/keyless", "v1") is None
        assert not store.has(Digest.parse(upstream.keyless.digest))
        assert index.get_tag(UPSTREAM, f"{upstream.prefix}/single", "v1") is not None
    finally:
        index.close()


# ---------------------------------------------------------------- formats, resume, delta
def _export(up: Upstream, tmp: Path, out: Path, plan: Path, *extra: str
            ) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp / "export.yaml", store=tmp / "unused", url=up.registry.url,
                          policy=up.policy_dir / "policy.yaml")
    return run_sigil("export", "--config", str(config), "--plan", str(plan), "--output",
                     str(out), "--json", *extra)


def test_zstd_and_directory_archives_round_trip_and_rerun_is_warm(upstream, tmp_path) -> None:
    plan = plan_for(upstream, tmp_path / "plan.yaml", unsigned=False)
    zst = tmp_path / "out.tar.zst"
    first = _export(upstream, tmp_path, zst, plan, "--keep-work")
    assert first.returncode == 0, first.stderr
    assert zst.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    first_index = _zst_index(zst)
    mark = upstream.registry.log_mark()
    again = _export(upstream, tmp_path, zst, plan, "--keep-work")
    assert again.returncode == 0, again.stderr
    # Idempotent and warm: the same images and entries, and not one blob fetched again.
    assert [(i["name"], i["digest"]) for i in json.loads(again.stdout)["images"]] == \
        [(i["name"], i["digest"]) for i in json.loads(first.stdout)["images"]]
    assert _zst_index(zst) == first_index
    assert [r for r in upstream.registry.requests(since=mark) if "/blobs/" in r.target] == []
    directory = tmp_path / "layout"
    assert _export(upstream, tmp_path, directory, plan).returncode == 0
    assert (directory / "oci-layout").is_file() and (directory / "index.json").is_file()
    assert not (tmp_path / "layout.sigil-work").exists()   # removed after success
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(zst.read_bytes()[: zst.stat().st_size // 2])
    (tmp_path / "cut").mkdir()
    cut_config = local_side(tmp_path / "cut", upstream)
    code, report, output = import_archives(cut_config, cut)
    assert code == 1, output
    assert report["archives"][0]["result"] == "refused"
    assert "truncated" in report["archives"][0]["error"] or \
        "damaged" in report["archives"][0]["error"]
    assert_nothing_loaded(cut_config)
    for n, archive in enumerate((zst, directory)):
        (tmp_path / f"side{n}").mkdir()
        config = local_side(tmp_path / f"side{n}", upstream)
        code, report, output = import_archives(config, archive)
        assert code == 0, output
        assert [a["result"] for a in report["archives"]] == ["loaded"]
        store, index = store_of(config)
        try:
            assert fsck(store, index).ok
            assert index.get_tag(UPSTREAM, f"{upstream.prefix}/dhi", "dhi") is not None
        finally:
            index.close()


def _zst_index(archive: Path) -> list[Any]:
    """index.json entries of a .tar.zst archive, sigil's own entry left out."""
    import tarfile

    import zstandard
    with open(archive, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.name == "index.json":
                index = json.loads(tar.extractfile(member).read())
                return [m for m in index["manifests"]
                        if "dev.sigil.airgap.archive" not in m["annotations"]]
    raise AssertionError("no index.json")


def test_delta_needs_its_base(upstream, tmp_path) -> None:
    p = f"{UPSTREAM}/{upstream.prefix}"
    base_plan = tmp_path / "base.yaml"
    base_plan.write_text(yaml.safe_dump({"images": [{"ref": f"{p}/single:v1"}]}))
    base = tmp_path / "base.tar"
    made = _export(upstream, tmp_path, base, base_plan)
    assert made.returncode == 0, made.stderr
    base_digest = json.loads(made.stdout)["archive"]
    plan = plan_for(upstream, tmp_path / "plan.yaml", unsigned=False)
    delta = tmp_path / "delta.tar"
    made = _export(upstream, tmp_path, delta, plan, "--since",
                   str(tmp_path / "base.tar.manifest.json"))
    assert made.returncode == 0, made.stderr
    members = _members(delta)
    assert not any(f"blobs/sha256/{b[7:]}" in members for b in upstream.single.blobs)
    assert f"blobs/sha256/{upstream.multi.index.digest[7:]}" in members
    index = json.loads(_member(delta, "index.json"))
    assert index["annotations"]["dev.sigil.airgap.base"] == base_digest
    # The same delta from the base archive itself (not its side file).
    again = _export(upstream, tmp_path, tmp_path / "delta2.tar", plan, "--since", str(base))
    assert again.returncode == 0, again.stderr
    assert _image_members(tmp_path / "delta2.tar") == _image_members(delta)

    (tmp_path / "alone").mkdir()
    alone = local_side(tmp_path / "alone", upstream)
    code, report, output = import_archives(alone, delta)
    assert code == 1, output
    assert f"delta of base archive {base_digest}" in report["archives"][0]["error"]
    assert "import the base first" in output
    assert_nothing_loaded(alone)

    (tmp_path / "both").mkdir()
    both = local_side(tmp_path / "both", upstream)
    code, report, output = import_archives(both, base, delta)
    assert code == 0, output
    assert [a["result"] for a in report["archives"]] == ["loaded", "loaded"]
    store, index = store_of(both)
    try:
        assert fsck(store, index).ok
        for repo, tag in (("single", "v1"), ("multi", "v1"), ("keyless", "v1"), ("dhi", "dhi")):
            assert index.get_tag(UPSTREAM, f"{upstream.prefix}/{repo}", tag) is not None
    finally:
        index.close()


def test_allow_unverified_carries_denied_images_and_import_refuses_them(upstream,
                                                                        tmp_path) -> None:
    p = f"{UPSTREAM}/{upstream.prefix}"
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"images": [{"ref": f"{p}/unsigned:v1"},
                                               {"ref": f"{p}/single:v1"}]}))
    out = tmp_path / "out.tar"
    made = _export(upstream, tmp_path, out, plan, "--allow-unverified")
    assert made.returncode == 0, made.stderr
    images = {i["name"]: i for i in json.loads(made.stdout)["images"]}
    assert images[f"{p}/unsigned:v1"]["verified"] is False
    assert images[f"{p}/unsigned:v1"]["reason"] == "no_signature"
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, out)
    assert code == 1, output
    results = {i["name"]: i["result"] for i in report["archives"][0]["images"]}
    assert results == {f"{p}/unsigned:v1": "refused", f"{p}/single:v1": "loaded"}


def test_to_store_warms_the_configured_store(upstream, tmp_path) -> None:
    plan = plan_for(upstream, tmp_path / "plan.yaml", unsigned=False)
    config = write_config(tmp_path / "sigil.yaml", store=tmp_path / "store",
                          url=upstream.registry.url, policy=upstream.policy_dir / "policy.yaml")
    result = run_sigil("export", "--config", str(config), "--plan", str(plan), "--to-store",
                       "--json")
    assert result.returncode == 0, result.stderr
    store, index = store_of(config)
    try:
        for blob in upstream.single.blobs + upstream.keyless.blobs:
            assert store.has(Digest.parse(blob))
        assert str(index.get_tag(UPSTREAM, f"{upstream.prefix}/single", "v1").digest) == \
            upstream.single.digest
        assert fsck(store, index).ok
    finally:
        index.close()
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*sigil-work"))


def test_forged_contents_cannot_load_unverified_content(upstream, exported, tmp_path) -> None:
    """A contents document that lists, under a verified image, a manifest that does not hang
    off it (and a tag for it) loads only the verified image; the rest is ignored."""
    import io
    import tarfile

    from sigil.airgap.layout import canonical_json
    with tarfile.open(exported.archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    index = json.loads(files["index.json"])
    ours = next(m for m in index["manifests"] if "dev.sigil.airgap.archive" in m["annotations"])
    manifest = json.loads(files.pop(f"blobs/sha256/{ours['digest'][7:]}"))
    contents_name = f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"
    contents = json.loads(files.pop(contents_name))
    single = next(i for i in contents["images"] if i["name"].endswith("/single:v1"))
    stolen = upstream.keyless.digest
    contents["images"] = [single]
    single["manifests"].append(stolen)
    single["blobs"].extend(upstream.keyless.blobs)
    single["tags"].append([single["repo"], "evil", stolen,
                           "application/vnd.oci.image.manifest.v1+json"])
    new_contents = canonical_json(contents)
    manifest["layers"][0].update(digest=str(Digest.of(new_contents)), size=len(new_contents))
    new_manifest = canonical_json(manifest)
    ours.update(digest=str(Digest.of(new_manifest)), size=len(new_manifest))
    files["index.json"] = canonical_json(index)
    files[f"blobs/sha256/{Digest.of(new_manifest).hex}"] = new_manifest
    files[f"blobs/sha256/{Digest.of(new_contents).hex}"] = new_contents
    order = ["oci-layout", "index.json", f"blobs/sha256/{Digest.of(new_manifest).hex}",
             f"blobs/sha256/{Digest.of(new_contents).hex}"]
    forged = tmp_path / "forged.tar"
    with tarfile.open(forged, "w") as tar:
        for name in order + sorted(set(files) - set(order)):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, forged)
    assert code == 0, output
    [image] = report["archives"][0]["images"]
    assert image["result"] == "loaded" and image["ignored"] >= 1
    store, index_db = store_of(config)
    try:
        assert index_db.get_tag(UPSTREAM, single["repo"], "v1") is not None
        assert index_db.get_tag(UPSTREAM, single["repo"], "evil") is None
        assert index_db.get_manifest(Digest.parse(stolen)) is None
        assert not store.has(Digest.parse(stolen))
    finally:
        index_db.close()


async def test_imported_store_serves_with_no_upstream(upstream, exported, tmp_path) -> None:
    """What import wrote is what a pull writes: a plain `sigil serve` over the imported store,
    whose upstream is a dead port, serves the images (verdicts recomputed from the stored
    signatures, within tag_ttl) and nothing that was not imported."""
    from tests.realparts import skopeo_copy
    from tests.support.e2e import http_get
    from tests.support.sigilproc import SigilProcess

    config = local_side(tmp_path, upstream)
    code, _, output = import_archives(config, exported.archive)
    assert code == 0, output
    store_root = yaml.safe_load(config.read_text())["storage"]["root"]
    sigil = SigilProcess(tmp_path / "serve", [{"name": UPSTREAM, "url": DEAD_URL,
                                               "default": True, "retries": 0}],
                         str(config.parent / "policy.yaml"),
                         extra={"storage": {"root": store_root}}).start()
    try:
        p = upstream.prefix
        for repo, image in (("single", upstream.single), ("keyless", upstream.keyless)):
            copy = await skopeo_copy(f"{sigil.host}/{p}/{repo}:v1", tmp_path / repo)
            assert copy.digest == image.digest
            assert copy.manifest() == image.manifest
        dhi = await skopeo_copy(f"{sigil.host}/{p}/dhi:dhi", tmp_path / "dhi")
        assert dhi.digest == upstream.dhi.index.digest
        sig_tag = f"sha256-{upstream.single.digest[7:]}.sig"
        assert http_get(f"{sigil.url}/v2/{p}/single/manifests/{sig_tag}")[0] == 200
        # Never imported: an error at once (502 here, the upstream is a dead port; the
        # offline mode answers MANIFEST_UNKNOWN), never a hang and never content.
        status, _ = http_get(f"{sigil.url}/v2/{p}/unsigned/manifests/v1")
        assert status in (404, 502, 503)
    finally:
        sigil.stop()


async def test_buildkit_attestation_manifests_follow_their_platform(upstream, tmp_path) -> None:
    """An index with BuildKit in-index attestation manifests: with a platform filter, the
    attestation of a kept child is carried, the other's is not (and the import passes)."""
    from tests.realparts import Layer
    from tests.realparts.images import index_manifest
    from tests.test_verify_support import INTOTO, provenance, statement

    repo = f"{upstream.prefix}/single"   # the key policy covers this repository
    async with RegistryPusher(upstream.registry.url) as pusher:
        amd = await pusher.make_image(repo, None, platform="linux/amd64")
        arm = await pusher.make_image(repo, None, platform="linux/arm64")
        entries = [amd.descriptor(platform={"os": "linux", "architecture": "amd64"}),
                   arm.descriptor(platform={"os": "linux", "architecture": "arm64"})]
        atts = {}
        for child in (amd, arm):
            body = statement(Digest.parse(child.digest), SLSA_V02, provenance("b"))
            att = await pusher.push_artifact(repo, None, [Layer(body, INTOTO)])
            atts[child.digest] = att
            entries.append(att.descriptor(
                platform={"os": "unknown", "architecture": "unknown"},
                annotations={"vnd.docker.reference.type": "attestation-manifest",
                             "vnd.docker.reference.digest": child.digest}))
        raw = index_manifest(entries)
        index_digest = await pusher.push_manifest(repo, "buildkit", raw,
                                                  "application/vnd.oci.image.index.v1+json")
        await pusher.push_cosign_signatures(repo, index_digest,
                                            [sig_layer(upstream.signer, index_digest)])
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"images": [{"ref": f"{UPSTREAM}/{repo}:buildkit",
                                                "platforms": ["linux/amd64"]}]}))
    out = tmp_path / "out.tar"
    made = _export(upstream, tmp_path, out, plan)
    assert made.returncode == 0, made.stderr
    members = _members(out)
    assert f"blobs/sha256/{atts[amd.digest].digest[7:]}" in members
    assert f"blobs/sha256/{atts[arm.digest].digest[7:]}" not in members
    assert f"blobs/sha256/{arm.digest[7:]}" not in members
    config = local_side(tmp_path, upstream)
    code, report, output = import_archives(config, out)
    assert code == 0, output
    assert [i["result"] for i in report["archives"][0]["images"]] == ["loaded"]
