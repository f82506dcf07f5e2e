"""Bounded process handling shared by the real-parts harness.

Every process the harness starts is either a daemon (a registry, containerd) started with
:func:`start_daemon` and stopped by PID with :func:`stop_daemon`, or a short client command
(skopeo, ctr, podman) run with :func:`run_bounded`, which kills it when its time is up.
Output always goes to files or is fully read, so no pipe is ever left open (the test suite
runs with ``filterwarnings = error``, which turns a leaked pipe's ResourceWarning into a failure).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: A loopback port where nothing listens (the "discard" port; nothing runs it here). Every
#: client's fallback and HTTP(S)_PROXY point here, so a refused mirror request fails at once
#: instead of leaving the machine.
DEAD_PORT = 9
DEAD_URL = f"http://127.0.0.1:{DEAD_PORT}"

# Daemons still running, stopped at interpreter exit if a test run dies before teardown.
_LIVE_DAEMONS: dict[int, subprocess.Popen[bytes]] = {}


class ProcessError(RuntimeError):
    """A harness subprocess failed, timed out or never became ready."""


def free_port() -> int:
    """Return a loopback TCP port that is free right now (the caller must bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_env(extra: Mapping[str, str] | None = None, *, home: Path | None = None) -> dict[str, str]:
    """Environment for a client tool: proxies at a dead loopback port, loopback exempt.

    Loopback traffic goes direct (``NO_PROXY``); anything else would go to the dead proxy and
    fail, so a misconfigured client can never reach a public registry.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        # Drop inherited proxy and container-tool settings: the harness sets its own.
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        and not key.startswith(("CONTAINERS_", "REGISTRIES_", "REGISTRY_AUTH", "DOCKER_"))
    }
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[key] = DEAD_URL
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    if home is not None:
        env["HOME"] = str(home)
        env["XDG_RUNTIME_DIR"] = str(home / "run")
        env["XDG_CONFIG_HOME"] = str(home / "config")
        (home / "run").mkdir(mode=0o700, exist_ok=True)
        (home / "config").mkdir(exist_ok=True)
    if extra:
        env.update(extra)
    return env


def start_daemon(
    argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running process with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            # Own process group: a Ctrl-C of pytest reaches pytest, which then stops it.
            start_new_session=True,
        )
    _LIVE_DAEMONS[proc.pid] = proc
    return proc


def stop_daemon(proc: subprocess.Popen[bytes], *, term_timeout: float = 5.0) -> int:
    """Stop ``proc`` by PID: SIGTERM, then SIGKILL after ``term_timeout`` seconds.

    Returns the exit status. Safe to call on a process that already exited.
    """
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=term_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=term_timeout)
        return proc.returncode
    finally:
        _LIVE_DAEMONS.pop(proc.pid, None)


@atexit.register
def _stop_leftover_daemons() -> None:
    for proc in list(_LIVE_DAEMONS.values()):
        stop_daemon(proc, term_timeout=2.0)


class TempDirDaemon:
    """What every test daemon here shares: a temp dir of its own, a log file in it, one
    process. Subclasses set ``name`` and ``log_name`` and fill ``_dir`` and ``_proc``."""

    name = "daemon"
    log_name = "daemon.log"

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> Path:
        """The daemon's temp directory (raises if it was never started)."""
        if self._dir is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._dir

    @property
    def log_path(self) -> Path:
        """The daemon's log."""
        return self.directory / self.log_name

    @property
    def running(self) -> bool:
        """True while the daemon process lives."""
        return self._proc is not None and self._proc.poll() is None

    def _remove_dir(self) -> None:
        """Delete the temp directory (after the process stopped)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check()`` until it returns true, at most ``timeout`` seconds.

    Fails early (with the log's tail) if ``proc`` exits while waiting.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(
                f"{what}: process exited with status {proc.returncode} before it was ready"
                + _log_tail(log_path)
            )
        if check():
            return
        if time.monotonic() >= deadline:
            raise ProcessError(f"{what}: not ready after {timeout:.0f}s" + _log_tail(log_path))
        time.sleep(interval)


def _log_tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- log tail ---\n" + "\n".join(tail)


def http_status(url: str, *, timeout: float = 1.0) -> int | None:
    """Return the HTTP status of ``GET url`` (no proxy), or ``None`` if nothing answered."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a finished client command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        """Raise :class:`ProcessError` (with the output) unless the command exited 0."""
        if self.returncode != 0:
            raise ProcessError(
                f"{' '.join(self.argv)!r} exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
            )
        return self


async def run_bounded(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> CommandResult:
    """Run a client command without blocking the event loop, killed after ``timeout`` seconds.

    Non-blocking matters: the server under test may run in the same event loop as the test,
    and must keep answering while the client talks to it.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        out, err = await proc.communicate()
        raise ProcessError(
            f"{' '.join(argv)!r} timed out after {timeout:.0f}s\n"
            f"--- stdout ---\n{out.decode(errors='replace')[-4000:]}\n"
            f"--- stderr ---\n{err.decode(errors='replace')[-4000:]}"
        ) from None
    except BaseException:
        # Cancelled (e.g. the test timed out): never leave the client running.
        _kill_group(proc.pid)
        await asyncio.shield(proc.wait())
        raise
    assert proc.returncode is not None
    result = CommandResult(
        tuple(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    return result.check() if check else result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
