"""The Dockerfile and the package build: checked by reading it and by running what it runs.

No container can be built here, so the Dockerfile is parsed into its stages and instructions,
and its steps are executed on this machine with each container path mapped to a temp dir:
the builder's RUN (``pip wheel``, offline), the runtime's RUN (venv from those wheels,
compileall), its COPY, ENV, USER, WORKDIR, VOLUME, then its ENTRYPOINT + CMD run as the image
would run it -- as its numeric USER, with a read-only root and only the VOLUME and /tmp
writable (tests/support/confined.py) -- and its HEALTHCHECK command must succeed against it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.realparts._process import DEAD_URL, http_status
from tests.support.confined import run_confined, start_confined, world_readable_tempdir
from tests.support.sigilproc import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One ``FROM`` stage: its base, name and instructions (keyword, argument text)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction with this keyword, in order."""
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        """The argument of the last instruction with this keyword (the one in force)."""
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    """A parsed Dockerfile: global ARGs (before the first FROM) and the stages."""

    args: dict[str, str | None]
    stages: list[Stage]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages and keyword == "ARG":
            key, sep, default = rest.partition("=")
            args[key] = default if sep else None
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def _image_uid(runtime: Stage) -> tuple[int, int]:
    user = runtime.last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without the image's /etc/passwd.
    assert uid.isdigit() and gid.isdigit(), f"USER {user} must be numeric uid:gid"
    return int(uid), int(gid)


# -- reading ---------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_base_image_argument(dockerfile) -> None:
    assert dockerfile.args.get("PYTHON_IMAGE"), "the base image is a build ARG with a default"
    assert [s.base for s in dockerfile.stages] == ["${PYTHON_IMAGE}"] * len(dockerfile.stages)
    builder, runtime = dockerfile.stages[0], dockerfile.stages[-1]
    assert builder.name == "builder" and len(dockerfile.stages) == 2
    assert any("pip wheel" in run for run in builder.all("RUN"))
    # The runtime stage takes the wheels only (no source tree, no build tools), from the
    # builder, and installs them with no index: exactly what the builder resolved.
    assert not any(args.split()[0] in ("src", "./src") for args in runtime.all("COPY"))
    (install,) = [run for run in runtime.all("RUN") if "pip install" in run]
    assert "from=builder" in install and "--no-index" in install and "venv" in install
    # One image for every documented set-up: the fleet backends and .tar.zst archives too.
    (wheel,) = [run for run in builder.all("RUN") if "pip wheel" in run]
    assert "'.[fleet,airgap]'" in wheel and "'sigil[fleet,airgap]'" in install


def test_dockerfile_runs_as_non_root_with_volume_and_healthcheck(dockerfile) -> None:
    runtime = dockerfile.stages[-1]
    uid, gid = _image_uid(runtime)
    assert uid != 0 and gid != 0
    # The user the image creates is that uid (the store's owner).
    assert any(f"--uid {uid}" in run for run in runtime.all("RUN"))
    assert _exec_form(runtime.last("VOLUME")) == ["/var/lib/sigil"]
    health = runtime.last("HEALTHCHECK")
    assert "/healthz" in health and " CMD [" in health
    entry = _exec_form(runtime.last("ENTRYPOINT")) + _exec_form(runtime.last("CMD"))
    assert entry[:3] == ["sigil", "serve", "--config"]
    # The config the command names is what `COPY config/ /etc/sigil/` puts there.
    assert "config/ /etc/sigil/" in runtime.all("COPY")
    assert (REPO / "config" / Path(entry[3]).name).is_file()


def test_kubernetes_pod_runs_as_the_image_user(dockerfile) -> None:
    uid, gid = _image_uid(dockerfile.stages[-1])
    deployment = yaml.safe_load((REPO / "deploy/kubernetes/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (uid, gid)
    # The pod's args replace CMD and keep the image's ENTRYPOINT.
    runtime = dockerfile.stages[-1]
    assert pod["containers"][0]["args"] == _exec_form(runtime.last("CMD"))


def test_package_builds_with_entry_point(tmp_path: Path) -> None:
    """The builder's wheel, built offline the same way, holds the package and entry point."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheels = list(tmp_path.glob("sigil-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        assert "sigil/cli.py" in names and "sigil/server/app.py" in names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "sigil = sigil.cli:main" in wheel.read(entry_points).decode()


# -- running ---------------------------------------------------------------------------------------


class PathMap:
    """Container paths -> temp dirs, substituted in command lines and environment values."""

    def __init__(self, mapping: dict[str, Path]) -> None:
        self.mapping = mapping
        keys = sorted(mapping, key=len, reverse=True)
        # A container path only where a path starts (not inside another path).
        self._pattern = re.compile(r"(?<![\w/.])(" + "|".join(map(re.escape, keys))
                                   + r")(?=/|\s|$|['\":;])")

    def __call__(self, text: str) -> str:
        return self._pattern.sub(lambda m: str(self.mapping[m.group(1)]), text)


def _offline(command: str) -> str:
    """Make a pip step offline: dependencies come from this venv (see the .pth below)."""
    command = command.replace("pip wheel", "pip wheel --no-deps --no-build-isolation")
    return command.replace("pip install", "pip install --no-deps")


def _run_step(command: str, *, cwd: Path, env: dict[str, str]) -> None:
    command = re.sub(r"^(--mount=\S+\s+)+", "", command)
    result = subprocess.run(["sh", "-ec", command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


@pytest.fixture
def image_root() -> Iterator[Path]:
    with world_readable_tempdir("sigil-image-") as path:
        yield path


def test_dockerfile_steps_build_an_image_that_runs_read_only_as_its_user(
        dockerfile, image_root: Path) -> None:
    builder, runtime = dockerfile.stages
    paths = PathMap({"/src": image_root / "src", "/wheels": image_root / "wheels",
                     "/opt/sigil": image_root / "opt-sigil",
                     "/etc/sigil": image_root / "etc-sigil",
                     "/var/lib/sigil": image_root / "store", "/tmp": image_root / "tmp"})
    for directory in paths.mapping.values():
        directory.mkdir()
    # `python` in the image is the base image's interpreter with pip: here, this venv's.
    shim = image_root / "bin"
    shim.mkdir()
    # A script, not a symlink: a symlinked venv interpreter would not find its pyvenv.cfg.
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (shim / "python").chmod(0o755)
    build_env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}",
                 "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    # builder: COPY the build context's files into WORKDIR, then its RUN steps.
    workdir = Path(paths(builder.last("WORKDIR")))
    for copy in builder.all("COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            src = REPO / source.rstrip("/")
            target = workdir / Path(source.rstrip("/")).name
            if src.is_dir():
                shutil.copytree(src, target)
            else:
                shutil.copy2(src, target)
    for run in builder.all("RUN"):
        _run_step(_offline(paths(run)), cwd=workdir, env=build_env)
    assert [p.name.split("-")[0] for p in (image_root / "wheels").iterdir()] == ["sigil"]

    # runtime: the user is created by useradd (root only; uid checked above); the venv step.
    for run in runtime.all("RUN"):
        if "useradd" in run:
            continue
        command = _offline(paths(run))
        if "pip install" in command:
            # The dependency wheels the builder would have fetched: this venv's packages,
            # added after the install (pip would take the editable sigil for installed).
            steps = command.split(" && ")
            at = next(i for i, step in enumerate(steps) if "pip install" in step) + 1
            venv = image_root / "opt-sigil"
            steps.insert(at, f"echo {shlex.quote(sysconfig.get_paths()['purelib'])} > "
                             f"$(echo {venv}/lib/python3*/site-packages)/deps.pth")
            command = " && ".join(steps)
        _run_step(command, cwd=image_root, env=build_env)
    # sigil itself came from the builder's wheel, into the image's venv.
    assert list((image_root / "opt-sigil").glob("lib/python3*/site-packages/sigil/cli.py"))
    for copy in runtime.all("COPY"):
        source, dest = copy.split()
        shutil.copytree(REPO / source, paths(dest), dirs_exist_ok=True)
    uid, gid = _image_uid(runtime)
    store = Path(paths(_exec_form(runtime.last("VOLUME"))[0]))
    for writable in (store, image_root / "tmp"):
        os.chown(writable, uid, gid)

    # ENV as the image sets it (PATH first), then what `docker run -e` would add here: a
    # loopback listen address on a free port, and proxies at a dead port.
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    for assignment in shlex.split(" ".join(runtime.all("ENV"))):
        key, _, value = assignment.partition("=")
        env[key] = paths(value.replace("$PATH", env.get("PATH", "")))
    port = free_port()
    env.update({"SIGIL_SERVER_LISTEN": f"127.0.0.1:{port}", "HTTP_PROXY": DEAD_URL,
                "HTTPS_PROXY": DEAD_URL, "NO_PROXY": "127.0.0.1"})
    argv = [paths(a) for a in
            _exec_form(runtime.last("ENTRYPOINT")) + _exec_form(runtime.last("CMD"))]
    cwd = Path(paths(runtime.last("WORKDIR")))
    writable = [store, image_root / "tmp"]
    before = sorted(str(p) for p in (image_root / "opt-sigil").rglob("*"))
    log = image_root / "sigil.log"
    proc = start_confined(argv, uid=uid, gid=gid, writable=writable, env=env, log_path=log,
                          cwd=cwd)
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/readyz") != 200:
            assert proc.poll() is None, f"sigil exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready: {log.read_text()}"
            time.sleep(0.1)
        health = runtime.last("HEALTHCHECK")
        check = _exec_form(health.partition(" CMD ")[2])
        check = [arg.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for arg in check]
        result = run_confined(check, uid=uid, gid=gid, writable=writable, env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    # It ran as the image user, wrote its store on the volume and nothing into the venv.
    assert (store / "index.sqlite").stat().st_uid == uid
    assert sorted(str(p) for p in (image_root / "opt-sigil").rglob("*")) == before
    # The healthcheck fails when nothing serves /healthz (it is not a no-op).
    result = run_confined(check, uid=uid, gid=gid, writable=writable, env=env, cwd=cwd)
    assert result.returncode != 0
