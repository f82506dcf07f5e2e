"""A real PostgreSQL server (Debian ``postgresql``) on a free loopback port, data in a temp dir.

``initdb`` makes a fresh cluster (trust authentication on loopback, ``fsync=off``: test data
needs no durability), and the ``postgres`` server binary runs in the foreground as a daemon of
the harness, so it is stopped by its own PID (SIGINT: PostgreSQL's "fast" shutdown). PostgreSQL
refuses to run as root; the tests do run as root, so the server runs as the ``postgres`` system
user the Debian package creates, through ``setpriv`` (which execs, so the PID stays the
server's). :meth:`RealPostgres.stop` and :meth:`RealPostgres.start` keep the data directory and
the port, so a test can take the database away and bring it back.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from ._process import (
    ProcessError,
    TempDirDaemon,
    free_port,
    start_daemon,
    stop_daemon,
    wait_until,
)

SERVICE_USER = "postgres"  # created by the Debian package


def _bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    if found is None:
        raise ProcessError("PostgreSQL not found: run .ci/install-deps.sh")
    return Path(found).parent


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RealPostgres(TempDirDaemon):
    """A PostgreSQL cluster for tests; superuser ``sigil`` without password on loopback."""

    user = "sigil"
    name = "postgres"
    log_name = "postgres.log"

    def __init__(self, *, start_timeout: float = 30.0) -> None:
        super().__init__()
        self.start_timeout = start_timeout
        self.bindir = _bindir()
        self.port = 0

    def dsn(self, database: str = "postgres") -> str:
        """A DSN for ``database`` (no password: trust authentication on loopback)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> str:
        """Run one SQL command with ``psql`` against the ``postgres`` database."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
             "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ProcessError(f"psql {sql!r} failed: {result.stderr[-2000:]}")
        return result.stdout

    def _as_service_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}",
                "--init-groups", "--", *argv]

    def _init(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sigil-postgres-"))
        (self._dir / "socket").mkdir()
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVICE_USER)
            for path in (self._dir, self._dir / "socket"):
                os.chown(path, account.pw_uid, account.pw_gid)
        result = subprocess.run(
            self._as_service_user([str(self.bindir / "initdb"), "-D", str(self._dir / "data"),
                                   "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync",
                                   "--no-instructions"]),
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ProcessError(f"initdb failed ({result.returncode}):\n{result.stderr[-3000:]}")

    def start(self) -> Self:
        """Start the server (initialising the cluster the first time) and wait until it
        accepts connections. Restarts reuse the data directory and the port."""
        if self.running:
            raise RuntimeError("postgres already running")
        if self._dir is None:
            self._init()
            self.port = free_port()
        argv = [str(self.bindir / "postgres"), "-D", str(self.directory / "data"),
                "-p", str(self.port), "-k", str(self.directory / "socket"),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200", "-c", "shared_buffers=32MB"]
        proc = start_daemon(self._as_service_user(argv), log_path=self.log_path)
        try:
            wait_until(lambda: _accepts(self.port), timeout=self.start_timeout,
                       what=f"postgres on 127.0.0.1:{self.port}", proc=proc,
                       log_path=self.log_path)
            # Accepting TCP comes a moment before accepting logins: wait for pg_isready too.
            wait_until(lambda: subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", self.user], capture_output=True, timeout=10).returncode == 0,
                timeout=self.start_timeout, what="postgres ready", proc=proc,
                log_path=self.log_path)
        except BaseException:
            stop_daemon(proc)
            raise
        self._proc = proc
        return self

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT: disconnect clients, checkpoint, exit); keeps data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        stop_daemon(proc)

    def remove(self) -> None:
        """Stop and delete the temp directory."""
        self.stop()
        self._remove_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
