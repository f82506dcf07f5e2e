"""The machinery the benchmark scenarios share: seed an upstream, start the systems under test,
fetch with a C client, count upstream requests, read peak RSS, drive ``ab``.

Everything runs on loopback and every external process is bounded in time. Clients are C
programs (``curl`` for blobs, ApacheBench ``ab`` for request rates) so that the bench process,
which is Python, is never what limits a number. :class:`SendfileServer` is a server doing no
work per byte, the reference every throughput number is read against; :func:`ab_head` reports
how much CPU ``ab`` itself needed per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import yarl

from tests.realparts import RealRegistry, RegistryPusher
from tests.realparts.images import (
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    descriptor,
    image_config,
    image_manifest,
    sha256_digest,
)
from tests.support.sigilproc import SigilProcess

MiB = 1024 * 1024
#: Longest any single client command may run (a 1 GiB pull on a slow disk is far below this).
CLIENT_TIMEOUT = 180.0
#: The upstream name sigil is configured with (the default upstream, like Docker Hub).
UPSTREAM_NAME = "docker.io"


# ------------------------------------------------------------------------------ statistics
@dataclass
class Sample:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def spread(self) -> str:
        """``min..max`` (the noise band around the median)."""
        if not self.values:
            return "-"
        return f"{_fmt(self.low)}..{_fmt(self.high)}"


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# ------------------------------------------------------------------------------ test data
@dataclass(frozen=True)
class BlobFile:
    """Random bytes on disk, with their digest (never held in memory as a whole)."""

    path: Path
    size: int
    digest: str


def make_random_file(path: Path, size: int, chunk: int = 4 * MiB) -> BlobFile:
    """Write ``size`` random bytes to ``path`` in chunks, hashing as it goes."""
    hasher = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            out.write(data)
            hasher.update(data)
            left -= len(data)
    return BlobFile(path, size, "sha256:" + hasher.hexdigest())


@dataclass(frozen=True)
class Image:
    """A one-layer image in the upstream: ``repo:tag`` whose layer is ``blob``."""

    repo: str
    tag: str
    manifest_digest: str
    blob: BlobFile

    def manifest_path(self, reference: str | None = None) -> str:
        return f"/v2/{self.repo}/manifests/{reference or self.tag}"

    @property
    def blob_path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.blob.digest}"


async def _push_file_blob(pusher: RegistryPusher, repo: str, blob: BlobFile) -> None:
    """Monolithic upload of a file, streamed from disk (aiohttp reads file objects in chunks)."""
    if await pusher.blob_exists(repo, blob.digest):
        return
    async with pusher.session.post(pusher._url(f"{repo}/blobs/uploads/")) as resp:
        if resp.status != 202:
            raise RuntimeError(f"start upload: HTTP {resp.status}")
        location = resp.headers["Location"]
    location = urljoin(pusher.base_url + "/", location)
    separator = "&" if "?" in location else "?"
    target = yarl.URL(f"{location}{separator}digest={quote(blob.digest)}", encoded=True)
    with open(blob.path, "rb") as body:
        async with pusher.session.put(
            target, data=body,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(blob.size)},
        ) as resp:
            if resp.status != 201:
                text = (await resp.read())[:500]
                raise RuntimeError(f"upload {blob.digest}: HTTP {resp.status} {text!r}")


async def _seed(url: str, images: Sequence[tuple[str, str, BlobFile]]) -> list[Image]:
    pushed = []
    async with RegistryPusher(url, timeout=600) as pusher:
        for repo, tag, blob in images:
            await _push_file_blob(pusher, repo, blob)
            config = image_config("linux/amd64", [blob.digest])
            await pusher.push_blob(repo, config)
            manifest = image_manifest(
                descriptor(OCI_CONFIG, config),
                [{"mediaType": OCI_LAYER_GZIP, "digest": blob.digest, "size": blob.size}])
            digest = await pusher.push_manifest(repo, tag, manifest, OCI_MANIFEST)
            if digest != sha256_digest(manifest):
                raise RuntimeError("registry computed another manifest digest")
            pushed.append(Image(repo, tag, digest, blob))
    return pushed


def seed_upstream(upstream: RealRegistry, workdir: Path,
                  sizes: dict[str, int]) -> dict[str, Image]:
    """Push one image per ``name -> layer size`` to ``upstream`` as ``bench/<name>:latest``."""
    specs = []
    for name, size in sizes.items():
        blob = make_random_file(workdir / f"{name}.bin", size)
        specs.append((f"bench/{name}", "latest", blob))
    images = asyncio.run(_seed(upstream.url, specs))
    return {name: image for name, image in zip(sizes, images, strict=True)}


# ------------------------------------------------------------------------------ systems
def start_sigil(workdir: Path, upstream_url: str, *, workers: int = 1,
                log_level: str = "info", tag_ttl: str = "1h") -> SigilProcess:
    """A sigil server with a fresh store: one upstream ``docker.io`` (default), no policy.

    ``log.level`` stays at the shipped default (info: one JSON line per request) unless asked.
    """
    upstreams = [{"name": UPSTREAM_NAME, "url": upstream_url, "default": True,
                  "tag_ttl": tag_ttl}]
    proc = SigilProcess(workdir, upstreams, None, workers=workers,
                        extra={"log": {"level": log_level, "format": "json"}})
    try:
        return proc.start()
    except RuntimeError:
        proc.stop()  # start() leaves its log file open when the server exits early
        raise


def start_proxy(upstream_url: str) -> RealRegistry:
    """distribution as a pull-through cache of the upstream, fresh storage."""
    return RealRegistry(proxy_remote_url=upstream_url).start()


@contextmanager
def running_sigil(upstream_url: str, **kwargs: Any) -> Iterator[SigilProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-"))
    proc = None
    try:
        proc = start_sigil(workdir, upstream_url, **kwargs)
        yield proc
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def running_proxy(upstream_url: str) -> Iterator[RealRegistry]:
    proxy = start_proxy(upstream_url)
    try:
        yield proxy
    finally:
        proxy.stop()


# ------------------------------------------------------------------------------ clients
@dataclass(frozen=True)
class Fetch:
    """One curl transfer."""

    status: int
    size: int
    seconds: float     # curl's own time_total (excludes process start)

    def mib_per_s(self) -> float:
        return self.size / MiB / self.seconds if self.seconds > 0 else float("nan")


_CURL_FORMAT = "%{http_code} %{size_download} %{time_total}\\n"


def _curl_argv(url: str, *, head: bool = False, output: str = "/dev/null") -> list[str]:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(CLIENT_TIMEOUT)),
            "-H", f"Accept: {MANIFEST_ACCEPT}", "-o", output, "-w", _CURL_FORMAT]
    if head:
        argv.append("-I")
    return [*argv, url]


def _parse_curl(stdout: str) -> Fetch:
    status, size, seconds = stdout.strip().split()[-3:]
    return Fetch(int(status), int(size), float(seconds))


def curl_get(url: str, *, head: bool = False, output: str = "/dev/null") -> Fetch:
    """One GET (or HEAD) with curl; the body goes to ``output`` (discarded by default)."""
    done = subprocess.run(_curl_argv(url, head=head, output=output), capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT + 10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url}: exit {done.returncode}: {done.stderr.strip()}")
    return _parse_curl(done.stdout)


def curl_many(url: str, count: int, *, outputs: Sequence[str] | None = None
              ) -> tuple[float, list[Fetch]]:
    """``count`` concurrent curl GETs of ``url``; returns (wall seconds until the last one
    finished, each transfer). Bodies are discarded unless ``outputs`` names files."""
    outs = list(outputs) if outputs is not None else ["/dev/null"] * count
    start = time.monotonic()
    procs = [subprocess.Popen(_curl_argv(url, output=out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    fetches = []
    errors = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=CLIENT_TIMEOUT + 10)
            if proc.returncode != 0:
                errors.append(f"exit {proc.returncode}: {err.strip()}")
            else:
                fetches.append(_parse_curl(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - start
    if errors:
        raise RuntimeError(f"curl {url}: {len(errors)} of {count} failed: {errors[:3]}")
    return wall, fetches


def expect_ok(fetch: Fetch, size: int, what: str) -> Fetch:
    if fetch.status != 200 or fetch.size != size:
        raise RuntimeError(f"{what}: HTTP {fetch.status}, {fetch.size} bytes "
                           f"(expected 200, {size})")
    return fetch


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            hasher.update(data)
    return "sha256:" + hasher.hexdigest()


# ------------------------------------------------------------------------------ observation
def upstream_requests(upstream: RealRegistry, since: int, method: str, path: str) -> int:
    """How many ``method path`` requests the upstream logged after ``since``."""
    return sum(1 for r in upstream.requests(since) if r.method == method and r.path == path)


def settled_upstream_count(upstream: RealRegistry, since: int, method: str, path: str, *,
                           quiet: float = 1.0, timeout: float = 60.0) -> int:
    """The count once it stopped changing for ``quiet`` seconds (distribution's proxy keeps
    fetching in a background goroutine after its clients are done; an access-log line is
    written when a response ends)."""
    deadline = time.monotonic() + timeout
    count = upstream_requests(upstream, since, method, path)
    changed = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now_count = upstream_requests(upstream, since, method, path)
        if now_count != count:
            count, changed = now_count, time.monotonic()
        elif time.monotonic() - changed >= quiet:
            break
    return count


def proxy_has_blob(proxy: RealRegistry, blob: BlobFile) -> bool:
    """distribution's proxy finished storing ``blob`` locally (its background fetch)."""
    hexpart = blob.digest.split(":", 1)[1]
    data = (proxy.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart
            / "data")
    try:
        return data.stat().st_size == blob.size
    except OSError:
        return False


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live_children(pid: int) -> list[int]:
    """Child processes of ``pid`` that are not zombies (sigil's extra workers)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    alive = []
    for child in found:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(int(child))
    return alive


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, in bytes (VmHWM = peak RSS, VmRSS = now)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB$", text, re.M)
    if match is None:
        raise RuntimeError(f"no {key} in /proc/{pid}/status")
    return int(match.group(1)) * 1024


# ------------------------------------------------------------------------------ request rate
@dataclass(frozen=True)
class LoadResult:
    """One ``ab`` run."""

    requests: int
    seconds: float
    failed: int           # connection errors, wrong lengths, non-2xx
    client_cpu: float     # CPU seconds ab itself used

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    @property
    def client_ceiling(self) -> float:
        """Requests per second ab could issue if it had a core to itself."""
        return self.requests / self.client_cpu if self.client_cpu else float("inf")


def ab_head(url: str, *, connections: int = 16, seconds: float = 4.0) -> LoadResult:
    """HEAD load with ApacheBench: ``connections`` keep-alive connections for ``seconds``.

    ``ab`` is used rather than ``wrk`` because wrk 4.1 (Debian) waits for a body after a HEAD
    response that carries Content-Length and so completes no request at all.
    """
    argv = ["ab", "-q", "-i", "-k", "-c", str(connections), "-t", str(max(1, round(seconds))),
            "-n", "100000000", "-s", "10", "-H", f"Accept: {MANIFEST_ACCEPT}", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def field_(name: str, default: str | None = None) -> str:
        match = re.search(rf"^{name}:\s+([\d.]+)", done.stdout, re.M)
        if match is None:
            if default is not None:
                return default
            raise RuntimeError(f"ab failed ({done.returncode}): {done.stdout[-800:]} "
                               f"{done.stderr[-800:]}")
        return match.group(1)

    complete = int(field_("Complete requests"))
    failed = int(field_("Failed requests")) + int(field_("Non-2xx responses", "0"))
    return LoadResult(complete, float(field_("Time taken for tests")), failed, cpu)


# ------------------------------------------------------------------------------ WAN link
class ThrottledLink:
    """A TCP proxy to ``target`` whose upstream->client direction, over all connections
    together, is limited to ``rate`` bytes/s: a shared WAN link to a remote registry.

    Runs its own event loop in a thread of the bench process (a few MiB/s of copying)."""

    def __init__(self, target_host: str, target_port: int, rate: float) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self._next = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _take(self, n: int) -> None:
        now = self._loop.time()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if self._next - now > 0.002:
            await asyncio.sleep(self._next - now)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    throttle: bool) -> None:
        try:
            while data := await reader.read(64 * 1024):
                if throttle:
                    await self._take(len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, up_w, False),
                             self._pump(up_r, client_w, True))

    def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._loop.create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._track, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        self._loop.run_until_complete(stop())
        self._loop.close()

    def __enter__(self) -> ThrottledLink:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("throttled link did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


# ------------------------------------------------------------------------------ ceiling
class SendfileServer:
    """A bare HTTP/1.1 server (a thread per connection) that answers every GET with one file,
    by ``sendfile`` or, with ``copy=True``, by read/send of 1 MiB buffers: what a server that
    does no work per byte gets over loopback on this machine."""

    def __init__(self, path: Path, *, copy: bool = False) -> None:
        self.path = path
        self.copy = copy
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/blob"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopped = False

    def _serve(self) -> None:
        workers = []
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(None)
            worker = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(timeout=CLIENT_TIMEOUT)

    def _answer(self, conn: socket.socket) -> None:
        size = self.path.stat().st_size
        with conn, open(self.path, "rb") as body:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head = (f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                    "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
            try:
                conn.sendall(head.encode())
                if self.copy:
                    while data := body.read(MiB):
                        conn.sendall(data)
                else:
                    conn.sendfile(body)
            except OSError:
                pass

    def __enter__(self) -> SendfileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped = True
        self._sock.close()
        self._thread.join(timeout=CLIENT_TIMEOUT)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
