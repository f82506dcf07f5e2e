"""Command line: ``sigil serve | gc | fsck | verify | export | import``.

Exit codes: 0 success, 1 a negative answer (fsck found problems, verify denied), 2 an error
(bad config, unreachable upstream). Errors print one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sigil import __version__
from sigil.config import Config, load_config
from sigil.errors import ConfigError, SigilError
from sigil.logs import configure, get_logger
from sigil.storage import BlobStore, Index, collect, fsck

DEFAULT_CONFIG = "config/sigil.yaml"
log = get_logger("sigil.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigil", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sigil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", default=os.environ.get("SIGIL_CONFIG", DEFAULT_CONFIG))
    serve.add_argument("--workers", type=int, default=None,
                       help="processes sharing the port (SO_REUSEPORT); overrides server.workers")
    serve.add_argument("--offline", action="store_true",
                       help="serve only from the store, never contact an upstream "
                            "(sets server.offline)")
    for name, text in (("gc", "evict least-recently-used images to fit storage.max_bytes"),
                       ("fsck", "re-hash the store; quarantine corrupt objects")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", default=os.environ.get("SIGIL_CONFIG", DEFAULT_CONFIG))
        cmd.add_argument("--json", action="store_true", help="print a JSON report")
    verify = sub.add_parser("verify", help="explain the policy decision for one image")
    verify.add_argument("image",
                        help="e.g. docker.io/library/alpine:3.20 or dhi.io/python@sha256:...")
    verify.add_argument("--config", default=os.environ.get("SIGIL_CONFIG", DEFAULT_CONFIG))
    verify.add_argument("--policy", default=None, help="policy file (default: the config's)")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.add_argument("--offline", action="store_true",
                        help="decide from the configured store alone, no upstream (default "
                             "when server.offline is set)")
    from sigil.airgap.commands import add_parsers  # air-gapped mirrors: export / import

    add_parsers(sub, DEFAULT_CONFIG)
    return parser


def _verify(args: argparse.Namespace) -> int:
    from sigil.verify_cli import run

    config = _offline(_load(args.config), args.offline)
    configure("warning", "console")
    return run(config, args.image, args.policy, args.json)


def _export(args: argparse.Namespace) -> int:
    from sigil.airgap.commands import run_export

    config = _load(args.config)
    configure("warning", "console")
    return run_export(config, args)


def _import(args: argparse.Namespace) -> int:
    from sigil.airgap.commands import run_import

    config = _load(args.config)
    configure("warning", "console")
    return run_import(config, args)


def _load(path: str) -> Config:
    return load_config(path)


def _offline(config: Config, flag: bool) -> Config:
    """``config`` with ``server.offline`` switched on by an ``--offline`` flag."""
    from sigil.upstream.offline import offline_config

    return offline_config(config) if flag else config


def _load_policy(config: Config) -> Any:
    """The policy hook for ``config`` (None: no policy file, allow all)."""
    if not config.policy:
        return None
    from sigil.verify.engine import Verifier  # imported late: verify/ is heavier
    from sigil.verify.policy import load_policy

    return Verifier(load_policy(config.policy))


def _serve(args: argparse.Namespace) -> int:
    from sigil.server.app import listen_socket, serve

    config = _offline(_load(args.config), args.offline)
    configure(config.log.level, config.log.format)
    policy = _load_policy(config)
    Path(config.storage.root).mkdir(parents=True, exist_ok=True)
    # Create or migrate the index once, before workers open it side by side (a fleet: open
    # and close the backends, so an unreachable database or bucket fails the start here).
    if _fleet(config):
        asyncio.run(_check_backends(config))
    else:
        Index(Path(config.storage.root) / "index.sqlite").close()
    sock = listen_socket(config)  # bound before forking: a port in use fails the start
    workers = args.workers or config.server.workers
    if workers > 1:
        # The workers share one fetch lease table; each must know it is not alone.
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, workers=workers))
        _prepare_shared_store(Path(config.storage.root))
    children: list[int] = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:  # a worker: serve, and never return into the parent's code
            code = 1
            try:
                # Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads
                # connections over the processes; with one shared socket, whichever process
                # woke first took a batch of them and another could sit idle.
                own = sock
                if hasattr(socket, "SO_REUSEPORT"):
                    own = listen_socket(config, sock.getsockname()[1])
                    sock.close()
                code = 0 if asyncio.run(serve(config, policy, own,
                                              lambda: _load_policy(config))) else 1
            finally:
                os._exit(code)
        children.append(pid)

    def reload_all() -> Any:
        # SIGHUP reaches the first process: it reloads, then passes the signal on.
        new = _load_policy(config)
        for pid in children:
            os.kill(pid, signal.SIGHUP)
        return new

    clean = False
    try:
        clean = asyncio.run(serve(config, policy, sock, reload_all, children))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0 if clean else 1


def _fleet(config: Config) -> bool:
    """Is the store or the index a shared (fleet) backend?"""
    return config.storage.backend == "s3" or config.index.backend == "postgres"


async def _check_backends(config: Config) -> None:
    """Open (creating or migrating the schema) and close the configured backends."""
    from sigil.storage.backends import open_backends

    await (await open_backends(config)).close()


def _prepare_shared_store(root: Path) -> None:
    """Before ``--workers`` fork: remove the staging files of an earlier run and its leases
    once, here, so that no worker's start-up removes a file a sibling is already writing."""
    from sigil.storage.lease_sqlite import reset_leases

    BlobStore(root).cleanup_staging()
    reset_leases(root)


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[tuple[Config, BlobStore, Index]]:
    """The configured store and index for a maintenance command (logs to stderr)."""
    config = _load(args.config)
    configure(config.log.level, config.log.format)
    root = Path(config.storage.root)
    store, index = BlobStore(root), Index(root / "index.sqlite")
    try:
        yield config, store, index
    finally:
        index.close()


async def _fleet_gc(config: Config) -> Any:
    """One incremental gc pass over the shared backends (under the gc lease)."""
    from sigil.storage.backends import open_backends
    from sigil.storage.lease import process_holder_id
    from sigil.storage.maintenance import collect_incremental

    backends = await open_backends(config)
    try:
        return await collect_incremental(backends.objects, backends.index, backends.leases,
                                         process_holder_id(), config.storage.max_bytes,
                                         now=time.time(),
                                         orphan_grace=config.storage.orphan_grace)
    finally:
        await backends.close()


async def _fleet_fsck(config: Config) -> Any:
    """The storage-level fsck over the shared backends."""
    from sigil.storage.backends import open_backends
    from sigil.storage.maintenance import check_objects

    backends = await open_backends(config)
    try:
        return await check_objects(backends.objects, backends.index)
    finally:
        await backends.close()


def _fleet_report(name: str, report: Any, as_json: bool, ok: bool) -> int:
    """Print a fleet gc/fsck report (JSON, or one ``key: value`` a line)."""
    if as_json:
        _print_json(report)
    else:
        from dataclasses import asdict

        for key, value in asdict(report).items():
            print(f"{key}: {value}")
        print(f"result: {'ok' if ok else 'PROBLEMS FOUND'}" if name == "fsck" else
              f"ran: {'yes' if report.ran else 'no (another replica holds the gc lease)'}")
    return 0 if ok else 1


def _gc(args: argparse.Namespace) -> int:
    from sigil.progress import BYTES, format_amount, print_summary, progress_for

    fleet_config = _load(args.config)
    if _fleet(fleet_config):
        configure(fleet_config.log.level, fleet_config.log.format)
        return _fleet_report("gc", asyncio.run(_fleet_gc(fleet_config)), args.json, True)
    with _store(args) as (config, store, index):
        stats = collect(store, index, config.storage.max_bytes, now=time.time(),
                        progress=progress_for(sys.stderr, "sigil gc"))
    if args.json:
        _print_json(stats)
        return 0

    def size(amount: int) -> str:
        return format_amount(amount, BYTES)

    print_summary("sigil gc", [
        ("store before", f"{stats.objects_before:,} objects, {size(stats.bytes_before)}"),
        ("store after", f"{stats.objects_after:,} objects, {size(stats.bytes_after)}"),
        ("budget (storage.max_bytes)", size(config.storage.max_bytes)),
        ("images evicted", f"{stats.roots_evicted:,}"),
        ("manifests forgotten", f"{stats.manifests_forgotten:,}"),
        ("tags deleted", f"{stats.tags_deleted:,}"),
        ("objects deleted", f"{stats.objects_deleted:,}"),
        ("freed", size(stats.bytes_freed)),
        ("over budget", "yes (everything left is recent or referenced)"
         if stats.over_budget else "no"),
    ], sys.stdout)
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from sigil.progress import BYTES, format_amount, print_summary, progress_for

    fleet_config = _load(args.config)
    if _fleet(fleet_config):
        configure(fleet_config.log.level, fleet_config.log.format)
        report = asyncio.run(_fleet_fsck(fleet_config))
        return _fleet_report("fsck", report, args.json, report.ok)
    with _store(args) as (_, store, index):
        report = fsck(store, index, progress_for(sys.stderr, "sigil fsck"))
    if args.json:
        _print_json(report)
        return 0 if report.ok else 1
    print_summary("sigil fsck", [
        ("objects checked", f"{report.objects_checked:,}"),
        ("bytes checked", format_amount(report.bytes_checked, BYTES)),
        ("corrupt (quarantined)", f"{len(report.corrupt):,}"),
        ("missing", f"{len(report.missing):,}"),
        ("unindexed", f"{len(report.unindexed):,}"),
        ("staging leftovers", f"{len(report.staging):,}"),
        ("result", "ok" if report.ok else "PROBLEMS FOUND"),
    ], sys.stdout)
    # The digests an operator acts on, one a line (the table has only their counts).
    for digest in report.corrupt:
        print(f"corrupt: {digest}")
    for digest in report.missing:
        print(f"missing: {digest}")
    return 0 if report.ok else 1


def _print_json(report: object) -> None:
    """A gc/fsck report (a dataclass) as the ``--json`` output."""
    from dataclasses import asdict, is_dataclass

    data = asdict(report) if is_dataclass(report) and not isinstance(report, type) else report
    print(json.dumps(data, default=str, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "gc": _gc, "fsck": _fsck, "verify": _verify,
                "export": _export, "import": _import}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"sigil: config error: {exc}", file=sys.stderr)
        return 2
    except SigilError as exc:
        print(f"sigil: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sigil: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
