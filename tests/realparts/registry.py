"""A real CNCF distribution registry (Debian ``docker-registry``, 2.8) on loopback.

It is the upstream in integration tests (seed it with :mod:`realparts.images`), and in proxy
mode the pull-through cache that the benchmarks compare sigil with. Distribution 2.8 has no
referrers API (``GET /v2/<name>/referrers/<digest>`` answers 404), so referrers live under the
OCI 1.1 tag schema ``sha256-<hex>``.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from ._process import ProcessError, free_port, http_status, start_daemon, stop_daemon, wait_until

#: The Debian binary; the package is ``docker-registry``.
REGISTRY_BINARY = "docker-registry"

# Combined log format: host - user [time] "METHOD target HTTP/x" status size "referer" "agent"
_ACCESS_LOG_LINE = re.compile(
    r'^\S+ - \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


def _answers_200(url: str) -> bool:
    return http_status(url) == 200


@dataclass(frozen=True)
class LoggedRequest:
    """One line of the registry's access log."""

    method: str
    target: str  # path and query, as sent
    status: int
    user_agent: str

    @property
    def path(self) -> str:
        """The request path without its query string."""
        return self.target.split("?", 1)[0]


class RealRegistry:
    """A ``docker-registry serve`` process on ``127.0.0.1:<free port>``, data in a temp dir.

    Use as a context manager or call :meth:`start` and :meth:`stop`::

        with RealRegistry() as upstream:
            ...  # upstream.url == "http://127.0.0.1:PORT", upstream.host == "127.0.0.1:PORT"

    ``proxy_remote_url`` turns it into distribution's pull-through cache of that registry
    (read-only: pushes are refused). Its storage and logs live in a private temp directory,
    removed by :meth:`stop` unless ``keep_dir`` is set.
    """

    def __init__(
        self,
        *,
        proxy_remote_url: str | None = None,
        log_level: str = "warn",
        access_log: bool = True,
        start_timeout: float = 20.0,
        keep_dir: bool = False,
    ) -> None:
        self.proxy_remote_url = proxy_remote_url
        self.log_level = log_level
        self.access_log = access_log
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_start = 0

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The loopback TCP port it listens on (only while running)."""
        if self._port is None:
            raise RuntimeError("registry is not running")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry host part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}"

    @property
    def directory(self) -> Path:
        """The private temp directory holding ``config.yml``, ``data/`` and ``registry.log``."""
        if self._dir is None:
            raise RuntimeError("registry is not running")
        return self._dir

    @property
    def storage_dir(self) -> Path:
        """The filesystem storage root (``docker/registry/v2/...`` lives below it)."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The file receiving the registry's stdout and stderr (access log and warnings)."""
        return self.directory / "registry.log"

    @property
    def pid(self) -> int:
        """The process id of the running registry."""
        if self._proc is None:
            raise RuntimeError("registry is not running")
        return self._proc.pid

    # -- lifecycle -----------------------------------------------------------------------------

    def config(self, port: int) -> dict[str, object]:
        """The distribution configuration written to ``config.yml`` (JSON is valid YAML)."""
        cfg: dict[str, object] = {
            "version": 0.1,
            "log": {
                "level": self.log_level,
                "accesslog": {"disabled": not self.access_log},
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                # A fixed secret silences the "No HTTP secret provided" warning.
                "secret": "sigil-realparts-test-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.proxy_remote_url is not None:
            cfg["proxy"] = {"remoteurl": self.proxy_remote_url}
        return cfg

    def start(self) -> Self:
        """Start the registry and wait (bounded) until ``GET /v2/`` answers 200."""
        if self._proc is not None:
            raise RuntimeError("registry already running")
        if shutil.which(REGISTRY_BINARY) is None:
            raise ProcessError(f"{REGISTRY_BINARY} not found: run .ci/install-deps.sh")
        self._dir = Path(tempfile.mkdtemp(prefix="sigil-registry-"))
        self.storage_dir.mkdir()
        last_error: ProcessError | None = None
        # A free port can be taken between the probe and the registry's bind: retry a few times.
        for _attempt in range(5):
            port = free_port()
            config_path = self.directory / "config.yml"
            config_path.write_text(json.dumps(self.config(port), indent=2))
            proc = start_daemon(
                [REGISTRY_BINARY, "serve", str(config_path)], log_path=self.log_path
            )
            try:
                wait_until(
                    functools.partial(_answers_200, f"http://127.0.0.1:{port}/v2/"),
                    timeout=self.start_timeout,
                    what=f"docker-registry on 127.0.0.1:{port}",
                    proc=proc,
                    log_path=self.log_path,
                )
            except ProcessError as exc:
                stop_daemon(proc)
                last_error = exc
                if "address already in use" in self.log_path.read_text(errors="replace"):
                    self.log_path.unlink()
                    continue
                break
            self._proc, self._port = proc, port
            self._skip_readiness_probes()
            return self
        self._remove_dir()
        assert last_error is not None
        raise last_error

    def _skip_readiness_probes(self) -> None:
        """Start :meth:`requests` after the probe's access-log line, written after its response."""
        if self.access_log:
            deadline = time.monotonic() + 2.0
            while not self.requests() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._log_start = self.log_mark()

    def stop(self) -> None:
        """Stop the registry by PID (SIGTERM, then SIGKILL after 5 s) and remove its temp dir."""
        if self._proc is not None:
            stop_daemon(self._proc)
        self._proc = None
        self._port = None
        if not self.keep_dir:
            self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def running(self) -> bool:
        """Whether the registry process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------------

    def log_mark(self) -> int:
        """A position in the log; pass it to :meth:`requests` to see only later requests."""
        if self._dir is None or not self.log_path.exists():
            return 0
        return self.log_path.stat().st_size

    def requests(self, since: int | None = None) -> list[LoggedRequest]:
        """Requests logged since start (or since a :meth:`log_mark`), oldest first.

        Distribution writes the access-log line when a response finishes, so the line for a
        response the caller has just read is normally there; poll briefly if it is not.
        """
        if self._dir is None or not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start if since is None else since)
            text = log.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            match = _ACCESS_LOG_LINE.match(line)
            if match:
                found.append(
                    LoggedRequest(
                        match["method"], match["target"], int(match["status"]), match["agent"]
                    )
                )
        return found

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "stopped"
        mode = f" proxy of {self.proxy_remote_url}" if self.proxy_remote_url else ""
        return f"<RealRegistry {where}{mode}>"
