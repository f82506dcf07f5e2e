"""Run sigil as a real process (``python -m sigil serve``) for end-to-end tests and benches."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SigilProcess:
    """One sigil server process with its own config, store and log file."""

    def __init__(self, workdir: Path, upstreams: list[dict[str, Any]],
                 policy: dict[str, Any] | str | None = None, *, workers: int = 1,
                 extra: dict[str, Any] | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        # Trust the server's own certificate (self-signed in tests) for https probes.
        self.ssl_context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
        self.store = workdir / "store"
        self.log_path = workdir / "sigil.log"
        self.config_path = workdir / "sigil.yaml"
        config: dict[str, Any] = {
            "server": {"listen": self.host, "workers": workers,
                       **({"tls": {"cert": str(tls[0]), "key": str(tls[1])}} if tls else {})},
            "storage": {"root": str(self.store)},
            "upstreams": upstreams,
            "log": {"level": "info", "format": "json"},
        }
        if isinstance(policy, dict):
            policy_path = workdir / "policy.yaml"
            policy_path.write_text(yaml.safe_dump(policy))
            config["policy"] = str(policy_path)
        elif isinstance(policy, str):
            config["policy"] = policy
        config.update(extra or {})
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 30.0, *, args: Sequence[str] = ()) -> SigilProcess:
        """Start (``args``: more ``sigil serve`` options, e.g. ``--offline``) and wait for
        /readyz."""
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigil", "serve", "--config", str(self.config_path), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"sigil exited with {self.proc.returncode}: {self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1,
                                            context=self.ssl_context) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sigil did not become ready: {self.logs()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self) -> str:
        """Everything the process logged so far."""
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines as dicts."""
        events = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample from /metrics (0 when absent)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5,
                                    context=self.ssl_context) as response:
            text = response.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, label_text = key.partition("{")
            if metric != name:
                continue
            got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if got == want:
                return float(value)
        return 0.0

    def __enter__(self) -> SigilProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
