"""Air-gap faults a real registry cannot produce on demand (an in-process upstream cuts a blob
mid-body, answers 503), and plan files with mistakes. The round trip with real parts is in
tests/test_airgap.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from sigil.airgap.export import Exporter
from sigil.airgap.importer import Importer
from sigil.airgap.plan import load_plan
from sigil.config import build_config
from sigil.errors import ConfigError
from sigil.progress import LineProgress
from tests.support.fakeupstream import FakeUpstream, sha


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    yield upstream, str(server.make_url("")).rstrip("/")
    await server.close()


def config_for(url: str, root: Path) -> Any:
    return build_config({"storage": {"root": str(root)},
                         "upstreams": [{"name": "docker.io", "url": url, "default": True,
                                        "retries": 0, "read_timeout": "2s",
                                        "connect_timeout": "2s"}],
                         "log": {"level": "warning"}}, env={})


def write_plan(path: Path, images: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"images": images}))
    return path


async def test_upstream_failing_mid_export_then_resumed(fake, tmp_path) -> None:
    upstream, url = fake
    first_layer, second_layer = os.urandom(600_000), os.urandom(900_000)
    upstream.add_image("library/one", "v1", [first_layer])
    upstream.add_image("library/two", "v1", [second_layer])
    upstream.faults[sha(second_layer)] = "cut"       # the body stops half way
    config = config_for(url, tmp_path / "unused")
    plan = load_plan(write_plan(tmp_path / "plan.yaml", [{"ref": "docker.io/library/one:v1"},
                                                         {"ref": "docker.io/library/two:v1"}]),
                     config)
    out = tmp_path / "out.tar"
    quiet = LineProgress(io.StringIO(), "sigil")

    result = await Exporter(config, plan, out, progress=quiet).run()
    assert result.exit_code == 1 and result.output is None
    assert [i["name"] for i in result.report["interrupted"]] == ["docker.io/library/two:v1"]
    assert not out.exists() and not out.with_name("out.tar.partial").exists()
    work = tmp_path / "out.tar.sigil-work"
    assert (work / "blobs" / "sha256" / sha(first_layer)[7:9] / sha(first_layer)[7:]).is_file()
    assert not list((work / "staging").iterdir())     # the cut download was not kept

    del upstream.faults[sha(second_layer)]
    result = await Exporter(config, plan, out, progress=quiet).run()
    assert result.exit_code == 0, result.report
    assert out.is_file() and not work.exists()
    # Resumed: the finished blob was not downloaded again; the cut one was fetched once more.
    assert upstream.hits[f"GET blob {sha(first_layer)}"] == 1
    assert upstream.hits[f"GET blob {sha(second_layer)}"] == 2
    report = await Importer(config_for("http://127.0.0.1:9", tmp_path / "store"),
                            progress=quiet).run([out])
    assert report["ok"], report
    assert len(report["archives"][0]["images"]) == 2


async def test_upstream_down_for_a_manifest_is_an_interruption(fake, tmp_path) -> None:
    upstream, url = fake
    upstream.add_image("library/one", "v1", [b"layer"])
    upstream.faults["v1"] = "503"
    config = config_for(url, tmp_path / "unused")
    plan = load_plan(write_plan(tmp_path / "plan.yaml", [{"ref": "docker.io/library/one:v1"}]),
                     config)
    result = await Exporter(config, plan, tmp_path / "out.tar",
                            progress=LineProgress(io.StringIO(), "sigil")).run()
    assert result.exit_code == 1
    assert result.report["interrupted"][0]["name"] == "docker.io/library/one:v1"
    assert not (tmp_path / "out.tar").exists()


async def test_tag_regexes_select_over_the_upstream_tag_list(fake, tmp_path) -> None:
    upstream, url = fake
    for tag in ("3.12", "3.13", "3.13.1", "3.13-dev", "latest"):
        upstream.add_image("library/python", tag, [tag.encode()])
    config = config_for(url, tmp_path / "unused")
    plan = load_plan(write_plan(tmp_path / "plan.yaml", [
        {"repository": "docker.io/library/python", "tags": [r"^3\.13(\.[0-9]+)?$"]},
        {"ref": "docker.io/library/missing:v1"}]), config)
    result = await Exporter(config, plan, tmp_path / "out",
                            progress=LineProgress(io.StringIO(), "sigil")).run()
    assert [i["name"] for i in result.report["images"]] == [
        "docker.io/library/python:3.13", "docker.io/library/python:3.13.1"]
    # A plan entry naming something the upstream does not have fails the run (exit 1), and
    # the archive still carries the rest.
    assert result.exit_code == 1
    assert result.report["failed"][0]["name"] == "docker.io/library/missing:v1"
    assert (tmp_path / "out" / "index.json").is_file()


@pytest.mark.parametrize(("images", "key", "problem"), [
    ([{"ref": "quay.io/library/alpine:3.20"}], "images[0].ref", "unknown upstream 'quay.io'"),
    ([{"ref": "docker.io/library/alpine:3.20"},
      {"repository": "docker.io/library/python", "tags": ["^3.(13$"]}], "images[1].tags[0]",
     "bad regular expression"),
    ([{"repository": "docker.io/library/python"}], "images[0].tags", "non-empty list"),
    ([{"ref": "docker.io/library/alpine", "repository": "docker.io/x"}], "images[0]",
     "exactly one of 'ref' or 'repository'"),
    ([{"ref": "docker.io/library/alpine", "platforms": ["amd64"]}], "images[0].platforms",
     "linux/amd64"),
    ([{"ref": "alpine:3.20"}], "images[0].ref", "does not start with an upstream name"),
    ([{"image": "docker.io/library/alpine"}], "images[0]", "unknown key(s) image"),
])
def test_plan_errors_name_file_entry_and_problem(tmp_path, images, key, problem) -> None:
    config = config_for("http://127.0.0.1:9", tmp_path / "store")
    plan = write_plan(tmp_path / "plan.yaml", images)
    with pytest.raises(ConfigError) as info:
        load_plan(plan, config)
    assert str(info.value).startswith(f"{plan}: {key}: ")
    assert problem in str(info.value)


def test_cli_plan_error_is_one_line_exit_2(tmp_path) -> None:
    config = tmp_path / "sigil.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "store")},
                                      "upstreams": [{"name": "docker.io",
                                                     "url": "http://127.0.0.1:9"}]}))
    plan = write_plan(tmp_path / "plan.yaml", [{"repository": "docker.io/library/python",
                                                "tags": ["("]}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    result = subprocess.run([sys.executable, "-m", "sigil", "export", "--config", str(config),
                             "--plan", str(plan), "--output", str(tmp_path / "out.tar")],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"{plan}: images[0].tags[0]: bad regular expression" in lines[0]
    missing = subprocess.run([sys.executable, "-m", "sigil", "import", "--config", str(config),
                              str(tmp_path / "nope.tar")], capture_output=True, text=True,
                             timeout=60, env=env)
    assert missing.returncode == 1
    assert "no such archive" in missing.stdout


async def test_a_killed_import_leaves_no_working_store_behind(fake, tmp_path) -> None:
    upstream, url = fake
    upstream.add_image("library/one", "v1", [b"layer one"])
    config = config_for(url, tmp_path / "unused")
    plan = load_plan(write_plan(tmp_path / "plan.yaml", [{"ref": "docker.io/library/one:v1"}]),
                     config)
    quiet = LineProgress(io.StringIO(), "sigil")
    out = tmp_path / "out"
    assert (await Exporter(config, plan, out, progress=quiet).run()).exit_code == 0
    store = tmp_path / "store"
    # A working store of an import that was SIGKILLed (pid that no longer exists), and one
    # of an import running right now (this process).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = store / f".airgap-import-{dead.pid}-0"
    live = store / f".airgap-import-{os.getpid()}-1"
    for d in (stale, live):
        (d / "blobs").mkdir(parents=True)
    report = await Importer(config_for("http://127.0.0.1:9", store), progress=quiet).run([out])
    assert report["ok"]
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in store.glob(".airgap-import-*")) == [live.name]


async def test_digest_plan_entry_round_trip(fake, tmp_path) -> None:
    upstream, url = fake
    digest, _ = upstream.add_image("library/one", "v1", [b"pinned layer"])
    config = config_for(url, tmp_path / "unused")
    plan = load_plan(write_plan(tmp_path / "plan.yaml",
                                [{"ref": f"docker.io/library/one@{digest}"}]), config)
    quiet = LineProgress(io.StringIO(), "sigil")
    out = tmp_path / "layout"
    result = await Exporter(config, plan, out, progress=quiet).run()
    assert result.exit_code == 0, result.report
    index = json.loads((out / "index.json").read_text())
    names = [m["annotations"].get("org.opencontainers.image.ref.name")
             for m in index["manifests"]]
    assert f"docker.io/library/one@{digest}" in names
    store = tmp_path / "store"
    report = await Importer(config_for("http://127.0.0.1:9", store), progress=quiet).run([out])
    assert report["ok"], report
    from sigil.oci.digest import Digest
    from sigil.storage import Index
    index_db = Index(store / "index.sqlite")
    try:
        assert index_db.get_manifest(Digest.parse(digest)) is not None
        assert index_db.get_tag("docker.io", "library/one", "v1") is None  # not asked for
    finally:
        index_db.close()
