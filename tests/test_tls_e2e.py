"""A TLS certificate swap during a running pull: skopeo pulls a large blob through sigil over
TLS (behind a throttled TCP link, so the transfer is still running), the certificate and key
are replaced and sigil gets SIGHUP; the pull finishes intact on its old connection and new
connections see the new certificate."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from pathlib import Path

import pytest
import yaml

from bench.harness import ThrottledLink, _seed, make_random_file
from tests.realparts import RealRegistry, skopeo
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
