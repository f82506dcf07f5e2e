"""A TLS certificate swap during a running pull: skopeo pulls a large blob through sigil over
TLS (behind a throttled TCP link, so the transfer is still running), the certificate and key
are replaced and sigil gets SIGHUP; the pull finishes intact on its old connection and new
connections see the new certificate."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.harness import ThrottledLink, _seed, make_random_file
from tests.realparts import ProcessError, RealRegistry, RegistryPusher, skopeo
from tests.support.sigilproc import SigilProcess
from tests.test_auth_support import (
    BOUND,
    PASSWORD_FOR_TESTS,
    TestCA,
    https_serial,
    replace_pair,
    write_htpasswd,
)

pytestmark = pytest.mark.realparts
MiB = 1024 * 1024
LAYER = 40 * MiB
RATE = 4 * MiB  # bytes/s on the link: the pull takes ~10 s, the swap happens in its first part


async def test_certificate_swap_during_a_running_pull(tmp_path: Path,
                                                      real_registry: RealRegistry,
                                                      unique_repo: str) -> None:
    # Streamed from a file (bench's seeding): one 40 MiB body would block the test's loop.
    blob = make_random_file(tmp_path / "layer.bin", LAYER)
    (image,) = await _seed(real_registry.url, [(unique_repo, "big", blob)])
    ca = TestCA(tmp_path / "ca")
    cert, key, first = ca.issue("server")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD_FOR_TESTS})
    process = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                                 "default": True}], tls=(cert, key))
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["tls"]["reload_interval"] = 0  # SIGHUP only: the swap is the test's
    config["server"]["auth"] = {"type": "htpasswd", "htpasswd": str(htpasswd)}
    process.config_path.write_text(yaml.safe_dump(config))
    certs = tmp_path / "client-certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.path.read_bytes())
    dest = tmp_path / "out"
    with process, ThrottledLink("127.0.0.1", process.port, RATE) as link:
        assert process.proc is not None
        assert https_serial(process, ca) == first
        pull = asyncio.get_running_loop().create_task(skopeo(
            "copy", "--quiet", "--retry-times", "0", "--src-creds",
            f"alice:{PASSWORD_FOR_TESTS}", "--src-cert-dir", str(certs),
            "--src-tls-verify=true", "--preserve-digests", "--digestfile",
            str(tmp_path / "digest"),
            f"docker://127.0.0.1:{link.port}/{unique_repo}:big", f"dir:{dest}", timeout=120))
        # Wait (bounded) until the layer is flowing through the link.
        deadline = time.monotonic() + BOUND
        while process.metric("sigil_bytes_served_total", {"source": "upstream"}) < 4 * MiB:
            assert not pull.done(), "the pull ended before the layer started flowing"
            assert time.monotonic() < deadline, "the layer did not start flowing"
            await asyncio.sleep(0.1)
        second = replace_pair(ca, {"cert": cert, "key": key}, "second")
        process.proc.send_signal(signal.SIGHUP)
        while https_serial(process, ca) != second:
            assert time.monotonic() < deadline + BOUND, "the new certificate was not served"
            await asyncio.sleep(0.05)
        served = process.metric("sigil_bytes_served_total", {"source": "upstream"})
        assert not pull.done() and served < LAYER, \
            "the pull finished before the swap: the test proved nothing (slow the link)"
        await pull  # raises if skopeo failed (a dropped connection fails it: no retries)
        assert https_serial(process, ca) == second
    copied = dest / blob.digest.split(":", 1)[1]
    assert "sha256:" + hashlib.sha256(copied.read_bytes()).hexdigest() == blob.digest
    assert (tmp_path / "digest").read_text().strip() == image.manifest_digest
    reloaded = [e for e in process.log_events() if e.get("event") == "tls.reloaded"]
    assert reloaded and reloaded[0]["new_serial"] == format(second, "x")


async def test_skopeo_with_a_client_certificate(tmp_path: Path, real_registry: RealRegistry,
                                                unique_repo: str) -> None:
    """client_auth: required: skopeo pulls with a certificate from client_ca (containers'
    cert dir: ca.crt, client.cert, client.key) and is refused without one."""
    async with RegistryPusher(real_registry.url) as pusher:
        pushed = await pusher.make_image(unique_repo, "m1")
    ca = TestCA(tmp_path / "ca")
    cert, key, _ = ca.issue("server")
    client_cert, client_key, _ = ca.issue("node", "node-1", client=True)
    process = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                                 "default": True}], tls=(cert, key))
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["tls"].update({"client_ca": str(ca.path), "client_auth": "required"})
    process.config_path.write_text(yaml.safe_dump(config))
    with_cert, without_cert = tmp_path / "with", tmp_path / "without"
    for folder in (with_cert, without_cert):
        folder.mkdir()
        (folder / "ca.crt").write_bytes(ca.path.read_bytes())
    (with_cert / "client.cert").write_bytes(client_cert.read_bytes())
    (with_cert / "client.key").write_bytes(client_key.read_bytes())
    # The readiness probe of SigilProcess has no client certificate: start by hand.
    assert process.proc is None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    with open(process.log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sigil", "serve", "--config",
                                 str(process.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + BOUND
        while not any(e.get("event") == "sigil.listening" for e in process.log_events()):
            assert proc.poll() is None, process.logs()
            assert time.monotonic() < deadline, process.logs()
            await asyncio.sleep(0.05)
        ref = f"docker://{process.host}/{unique_repo}:m1"

        async def pull(cert_dir: Path, dest: Path) -> None:
            await skopeo("copy", "--quiet", "--retry-times", "0", "--src-no-creds",
                         "--src-cert-dir", str(cert_dir), "--src-tls-verify=true",
                         "--preserve-digests", "--digestfile", str(dest) + ".digest", ref,
                         f"dir:{dest}", timeout=60)

        await pull(with_cert, tmp_path / "ok")
        assert (tmp_path / "ok.digest").read_text().strip() == pushed.digest
        with pytest.raises(ProcessError) as info:
            await pull(without_cert, tmp_path / "refused")
        assert "certificate" in str(info.value).lower() or "tls" in str(info.value).lower()
    finally:
        proc.terminate()
        proc.wait(timeout=40)
