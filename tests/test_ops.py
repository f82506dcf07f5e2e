"""Operating sigil: TLS for clients, several worker processes, the gc command."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.realparts import RealRegistry, RegistryPusher, skopeo_copy
from tests.support.e2e import self_signed_cert
from tests.support.sigilproc import SigilProcess


def test_tls_listener(tmp_path: Path, real_registry: RealRegistry) -> None:
    cert, key = self_signed_cert(tmp_path)
    sigil = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                               "default": True}], tls=(cert, key))
    with sigil:
        assert sigil.url.startswith("https://")
        with urllib.request.urlopen(f"{sigil.url}/v2/", timeout=10,
                                    context=sigil.ssl_context) as response:
            assert response.status == 200
            assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        # Plain HTTP on the TLS port is not served.
        try:
            urllib.request.urlopen(f"http://{sigil.host}/v2/", timeout=10)
            raise AssertionError("plain HTTP answered on the TLS listener")
        except (urllib.error.URLError, ConnectionError):
            pass


async def test_two_workers_serve_pulls_and_stop(tmp_path: Path, real_registry: RealRegistry,
                                                registry_pusher: RegistryPusher,
                                                unique_repo: str) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "w")
    sigil = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                               "default": True}], workers=2)
    sigil.start()
    try:
        for i in range(3):
            copy = await skopeo_copy(f"{sigil.host}/{unique_repo}:w", tmp_path / f"o{i}")
            assert copy.digest == pushed.digest
    finally:
        assert sigil.stop() == 0
    started = [e for e in sigil.log_events() if e.get("event") == "sigil.listening"]
    assert len(started) == 2
    # Both workers write to one stderr: every line is still one whole JSON object.
    lines = [line for line in sigil.log_path.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") and line.endswith("}") for line in lines)
    assert len(sigil.log_events()) == len(lines)


async def test_gc_and_fsck_commands(tmp_path: Path, real_registry: RealRegistry,
                                    registry_pusher: RegistryPusher, unique_repo: str) -> None:
    await registry_pusher.make_image(unique_repo, "g")
    sigil = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                               "default": True}],
                         extra={"storage": {"root": str(tmp_path / "sigil" / "store"),
                                            "max_bytes": 1}})
    sigil.start()
    try:
        await skopeo_copy(f"{sigil.host}/{unique_repo}:g", tmp_path / "out")
    finally:
        sigil.stop()

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigil", command, "--config",
                               str(sigil.config_path), "--json"],
                              capture_output=True, text=True, timeout=120)

    gc = run("gc")
    assert gc.returncode == 0, gc.stderr
    stats = json.loads(gc.stdout)
    # Everything was used seconds ago (inside the grace period): over budget, nothing lost.
    assert stats["bytes_before"] > 1 and stats["objects_deleted"] == 0
    assert stats["over_budget"] is True
    fsck = run("fsck")
    assert fsck.returncode == 0, fsck.stderr
    assert json.loads(fsck.stdout)["objects_checked"] == stats["objects_before"]


def test_a_dead_worker_stops_the_set(tmp_path: Path, real_registry: RealRegistry) -> None:
    """A worker that dies takes the others down (exit 1) so the supervisor restarts them,
    instead of a mirror left silently short of capacity."""
    import os
    import signal as signals
    import time

    sigil = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                               "default": True}], workers=2)
    sigil.start()
    try:
        assert sigil.proc is not None
        children = Path(f"/proc/{sigil.proc.pid}/task/{sigil.proc.pid}/children")
        deadline = time.monotonic() + 10
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:
            pids = [int(p) for p in children.read_text().split()]
            time.sleep(0.05)
        assert len(pids) == 1
        os.kill(pids[0], signals.SIGKILL)
        assert sigil.proc.wait(timeout=30) == 1
        assert any(e.get("event") == "worker.died" for e in sigil.log_events())
    finally:
        sigil.stop()
