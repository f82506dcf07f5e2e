"""A worker SIGKILLed mid-download leaves its staging file; the survivors remove it (the file
name carries the writer's pid), never a live writer's file.

The unit test kills real processes that created real staging files; the end-to-end test runs
``sigil serve --workers 2`` and SIGKILLs the worker holding a download's lease, then lets the
survivor take the lease over and fetch the blob: its own staging file must survive the sweep
(the blob is committed whole) and the dead worker's must be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from aiohttp.test_utils import TestServer

from sigil.downloads import LEASE_TTL
from sigil.storage.blobs import BlobStore
from sigil.storage.lease_sqlite import FILE_NAME
from tests.support.fakeupstream import FakeUpstream, sha
from tests.support.sigilproc import SigilProcess
from tests.test_workers import (
    _connect,
    _wait_gone,
    blob_file,
    close_all,
    lease_holder_pid,
    pull,
    run_fsck,
    spread_clients,
)

MiB = 1024 * 1024
# A process that opens a staging file of the store at argv[1], says where, and waits.
WRITER = ("import sys\n"
          "from sigil.storage.blobs import BlobStore\n"
          "staging = BlobStore(sys.argv[1]).new_staging()\n"
          "staging.write(b'half a layer')\n"
          "print(staging.path, flush=True)\n"
          "sys.stdin.read()\n")


def _lease_live(sigil: SigilProcess, digest: str) -> bool:
    with contextlib.closing(sqlite3.connect(sigil.store / FILE_NAME, timeout=5)) as db:
        row = db.execute("SELECT expires_at FROM fetch_leases WHERE digest = ?",
                         (digest,)).fetchone()
    return row is not None and float(row[0]) > time.time()


def _start_writer(root: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_the_sweep_removes_only_files_of_dead_writers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    killed, killed_file = _start_writer(store.root)
    live, live_file = _start_writer(store.root)
    try:
        killed.kill()  # SIGKILL: no abort, no cleanup
        killed.communicate(timeout=30)
        own = store.new_staging()
        anonymous = store.staging_dir / ("ab" * 16)  # an earlier version's name: no owner
        anonymous.write_bytes(b"x")
        foreign = store.staging_dir / f"{killed.pid}-{'0' * 8}-{'cd' * 16}"  # another host
        foreign.write_bytes(b"x")
        assert killed_file.exists() and killed_file.parent == store.staging_dir
        assert store.sweep_dead_staging() == 1
        assert not killed_file.exists()
        for kept in (live_file, own.path, anonymous, foreign):
            assert kept.exists(), kept
        assert store.sweep_dead_staging() == 0
        own.abort()
    finally:
        for proc in (live, killed):
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)  # also closes the pipes


async def test_a_killed_workers_staging_file_is_removed_by_the_survivor(tmp_path: Path) -> None:
    fake = FakeUpstream()
    layer, probe = os.urandom(8 * MiB), os.urandom(256 * 1024)
    fake.add_image("library/app", "v1", [layer, probe])
    fake.blob_delay = 0.05  # 256 KiB every 0.05 s: the layer takes about 1.6 s
    upstream = TestServer(fake.app(), host="127.0.0.1")
    await upstream.start_server()
    sigil = SigilProcess(tmp_path, [{"name": "docker.io", "default": True, "retries": 0,
                                     "url": str(upstream.make_url("")).rstrip("/")}],
                         workers=2)
    child: int | None = None
    groups = {}
    try:
        await asyncio.to_thread(sigil.start)
        assert sigil.proc is not None
        parent = sigil.proc.pid
        child = int(Path(f"/proc/{parent}/task/{parent}/children").read_text().split()[0])
        groups = await spread_clients(sigil.url, per_worker=1)
        first = groups[next(iter(groups))][0]
        async with first.session.get(f"{sigil.url}/v2/app/manifests/v1") as response:
            assert response.status == 200
        # Which connection reaches the parent (killing the child stops the set by design)?
        async with first.session.head(f"{sigil.url}/v2/app/blobs/{sha(probe)}") as response:
            assert response.status == 200
        on_parent = lease_holder_pid(sigil, sha(probe)) == parent
        parent_group = first.worker if on_parent else next(w for w in groups
                                                           if w != first.worker)
        child_group = next(w for w in groups if w != parent_group)
        staging = sigil.store / "staging"
        deadline = time.monotonic() + 30
        while list(staging.iterdir()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the probe's download finishes
        assert list(staging.iterdir()) == []

        url = f"{sigil.url}/v2/app/blobs/{sha(layer)}"
        killed = asyncio.Event()

        def kill_mid_body(got: int) -> None:
            if got >= MiB and not killed.is_set():
                os.kill(parent, signal.SIGKILL)
                killed.set()

        got, _, failed = await asyncio.wait_for(pull(groups[parent_group][0], url,
                                                     kill_mid_body), 60)
        assert killed.is_set() and failed and got < len(layer)
        left = [p.name for p in staging.iterdir()]
        assert [name for name in left if name.startswith(f"{parent}-")], left  # the leftover
        # Once the dead worker's lease expired, the survivor takes it over and fetches.
        deadline = time.monotonic() + 4 * LEASE_TTL
        while _lease_live(sigil, sha(layer)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        retry = await _connect(sigil.url)
        try:
            assert retry.worker == child_group
            assert await asyncio.wait_for(pull(retry, url), 60) == (len(layer), sha(layer),
                                                                    False)
        finally:
            await retry.session.close()
        deadline = time.monotonic() + 20
        while not blob_file(sigil, sha(layer)).exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert blob_file(sigil, sha(layer)).read_bytes() == layer  # its own file survived
        assert [p.name for p in staging.iterdir()] == []  # and the dead worker's is gone
    finally:
        await close_all(groups)
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGTERM)
            await _wait_gone(child, 40)
        sigil.stop()
        await upstream.close()
    report = run_fsck(sigil)
    assert report["corrupt"] == [] and report["missing"] == [] and report["staging"] == []
