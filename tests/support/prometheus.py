"""A real Prometheus (Debian ``prometheus``) on loopback, for the observability tests.

It scrapes the given targets every second, loads the given rule files, keeps its data in its
own directory and is stopped by PID. :meth:`Prometheus.query` runs an instant query through
the HTTP API and raises on any error the API reports (a PromQL parse or evaluation error).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from tests.realparts._process import (
    ProcessError,
    free_port,
    http_status,
    start_daemon,
    stop_daemon,
    wait_until,
)

PROMETHEUS_BINARY = "prometheus"
PROMTOOL_BINARY = "promtool"


class PromQLError(RuntimeError):
    """The Prometheus API answered an error for a query."""


class Prometheus:
    """``prometheus`` on ``127.0.0.1:<free port>`` with a 1 s scrape and evaluation interval."""

    def __init__(self, workdir: Path, targets: Sequence[str], *, job: str = "sigil",
                 rule_files: Sequence[Path] = (), interval: str = "1s") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.config_path = workdir / "prometheus.yml"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self._proc: Any = None

    def start(self, timeout: float = 60.0) -> Self:
        """Start and wait until ``/-/ready`` answers 200."""
        self._proc = start_daemon(
            [PROMETHEUS_BINARY, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            log_path=self.log_path)
        try:
            wait_until(lambda: http_status(f"{self.url}/-/ready") == 200, timeout=timeout,
                       what="prometheus", proc=self._proc, log_path=self.log_path)
        except ProcessError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL if it lingers)."""
        if self._proc is not None:
            stop_daemon(self._proc, term_timeout=10.0)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, else :class:`PromQLError`."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            exc.close()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", {"query": expr})
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromQLError(f"{expr}: unexpected result type {data['resultType']}")

    def wait_for(self, expr: str, accept: Callable[[list[dict[str, Any]]], bool], *,
                 timeout: float, what: str) -> list[dict[str, Any]]:
        """Query ``expr`` until ``accept(result)``; at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if accept(result):
                return result
            if time.monotonic() >= deadline:
                raise ProcessError(f"{what}: {expr} gave {result} after {timeout:.0f}s")
            time.sleep(0.25)


def value(sample: dict[str, Any]) -> float:
    """The float value of one sample of a query result."""
    return float(sample["value"][1])
