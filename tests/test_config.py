"""Config loading: defaults, env overrides, and one clear error per bad key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sigil.config import build_config, load_config
from sigil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_documented_defaults() -> None:
    config = load_config(REPO / "config" / "sigil.yaml", env={})
    assert config.server.listen_port == 5000
    assert config.storage.max_bytes == 100 * 1024**3
    hub = config.default_upstream
    assert hub is not None and hub.name == "docker.io"
    assert hub.tag_ttl == 300 and hub.max_stale == 86400
    assert config.policy == str(REPO / "config" / "policy.yaml")


def test_env_overrides() -> None:
    config = build_config({}, env={"SIGIL_STORAGE_ROOT": "/tmp/elsewhere",
                                   "SIGIL_SERVER_LISTEN": "127.0.0.1:5555",
                                   "SIGIL_LOG_LEVEL": "debug"})
    assert config.storage.root == "/tmp/elsewhere"
    assert (config.server.listen_host, config.server.listen_port) == ("127.0.0.1", 5555)
    assert config.log.level == "debug"


def test_credentials_from_env_are_not_in_repr() -> None:
    config = build_config({"upstreams": [{
        "name": "r.example", "url": "https://r.example", "default": True,
        "credentials": {"username_env": "U", "password_env": "P"}}]},
        env={"U": "alice", "P": "s3cret"})
    assert config.upstreams[0].credentials.password == "s3cret"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(("data", "key", "problem"), [
    ({"storage": {"max_bytes": "lots"}}, "storage.max_bytes", "expected a size"),
    ({"server": {"listen": "nowhere"}}, "server.listen", "expected host:port"),
    ({"server": {"lisen": "x"}}, "server", "unknown key 'lisen'"),
    ({"upstreams": [{"name": "a.example", "url": "ftp://x"}]}, "upstreams[0].url", "http(s) URL"),
    ({"upstreams": [{"name": "a.example", "url": "https://a", "tag_ttl": "soon"}]},
     "upstreams[0].tag_ttl", "duration"),
    ({"upstreams": [{"name": "a.example", "url": "https://a", "default": True},
                    {"name": "b.example", "url": "https://b", "default": True}]},
     "upstreams", "at most one"),
    ({"upstreams": [{"name": "a.example", "url": "https://a",
                     "credentials": {"password_env": "NOPE_NOT_SET"}}]},
     "upstreams[0].credentials.password_env", "NOPE_NOT_SET is not set"),
    ({"log": {"level": "loud"}}, "log.level", "expected one of"),
])
def test_bad_values_name_file_key_and_problem(data, key, problem) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(data, source="/etc/sigil.yaml", env={})
    message = str(info.value)
    assert message.startswith(f"/etc/sigil.yaml: {key}: "), message
    assert problem in message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "sigil.yaml"
    path.write_text("server:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value) and "line" in str(info.value)


def test_cli_bad_config_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "sigil.yaml"
    path.write_text("storage:\n  max_bytes: -3\n")
    result = subprocess.run([sys.executable, "-m", "sigil", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: storage.max_bytes" in result.stderr


def test_shipped_policy_and_its_keyless_example_load(tmp_path: Path) -> None:
    """config/policy.yaml loads as shipped, and so does its commented keyless example once
    uncommented (against the shipped public-good trusted root): the docs cannot drift."""
    from sigil.verify.policy import load_policy

    shipped = REPO / "config" / "policy.yaml"
    assert [rule.name for rule in load_policy(shipped).rules] == ["hardened-images",
                                                                  "sandbox-exemption"]
    lines = shipped.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name: acme"))
    example = [line.replace("  # ", "  ", 1) for line in lines[start:]
               if line.startswith("  # ")]
    text = "\n".join(lines[:start] + example) + "\n"
    (tmp_path / "sigstore").mkdir()
    (tmp_path / "sigstore" / "trusted_root.json").write_bytes(
        (REPO / "config" / "sigstore" / "trusted_root.json").read_bytes())
    (tmp_path / "policy.yaml").write_text(text)
    policy = load_policy(tmp_path / "policy.yaml")
    assert [rule.name for rule in policy.rules][-1] == "acme-releases"


def test_policy_doc_examples_load(tmp_path: Path) -> None:
    """Every complete example in docs/policy.md is a valid policy (keys and the trusted root
    it names are put where it expects them)."""
    import re
    import shutil

    from sigil.verify.policy import load_policy
    from tests.test_verify_support import Signer

    text = (REPO / "docs" / "policy.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
              if b.startswith("policies:")]
    assert len(blocks) >= 3
    (tmp_path / "keys").mkdir()
    dhi = REPO / "tests" / "assets" / "verify"
    for name in ("dhi-1.pub", "dhi-2.pub"):
        shutil.copy(next(dhi.rglob(name)), tmp_path / "keys" / name)
    (tmp_path / "keys" / "ci.pub").write_text(Signer("p256").pem())
    shutil.copytree(REPO / "config" / "sigstore", tmp_path / "sigstore")
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        assert load_policy(path).rules, block


def test_shipped_config_starts_and_serves(tmp_path: Path) -> None:
    """The README's first command, minus the install: the shipped config and policy start a
    server (store and port moved by the documented env overrides; no upstream is contacted)."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    env.update(SIGIL_STORAGE_ROOT=str(tmp_path / "store"),
               SIGIL_SERVER_LISTEN=f"127.0.0.1:{port}", SIGIL_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "sigil", "serve", "--config",
                             "config/sigil.yaml"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "not ready in 30 s"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5) as response:
            assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    started = [json.loads(line) for line in err.decode().splitlines()
               if '"sigil.started"' in line]
    assert started and started[0]["policy"].endswith("config/policy.yaml")
    assert (tmp_path / "store" / "index.sqlite").exists()
