"""The aiohttp application factory and process runner."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path

from aiohttp import web

from sigil import metrics
from sigil.config import Config
from sigil.downloads import RelayPeers
from sigil.errors import SigilError
from sigil.logs import get_logger
from sigil.mirror import AllowAll, Mirror, PolicyHook, Upstream
from sigil.oci.digest import Digest
from sigil.routing import Router
from sigil.server.auth import AUTH, build_client_auth
from sigil.server.middleware import request_middleware
from sigil.server.routes import add_routes
from sigil.server.state import CONFIG, MIRROR, READY, ROUTER
from sigil.server.tls import CertificateReloader, TLSFiles
from sigil.storage import BlobStore, collect
from sigil.storage.backends import Backends, open_backends
from sigil.storage.contracts import FilesystemObjectStore, SqliteAsyncIndex
from sigil.storage.lease import FetchLeases, process_holder_id
from sigil.storage.maintenance import collect_incremental
from sigil.upstream import UpstreamClient
from sigil.upstream.offline import OfflineUpstreamClient

log = get_logger("sigil.server")
DRAIN_SECONDS = 30.0
# How long a relaying replica waits on a silent peer before cutting its clients.
PEER_TIMEOUT = 30.0
# A fleet gc never evicts an image accessed this recently (another replica may be serving it).
GC_INTERVAL = 300.0
FIRST_GC_DELAY = 5.0


def build_app(config: Config, policy: PolicyHook | None = None) -> web.Application:
    """Build the app. Store, index and upstream sessions open and close in one cleanup_ctx."""
    app = web.Application(middlewares=[request_middleware], client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[ROUTER] = Router(config)
    app[READY] = asyncio.Event()
    client_auth = build_client_auth(
        config.server.auth, config_file=config.source,
        client_certificates=config.server.tls_client_auth == "optional")
    if client_auth is not None:
        app[AUTH] = client_auth
        if not config.server.tls_cert:
            log.warning("auth.without_tls", type=config.server.auth.type,
                        hint="credentials cross the network in clear text: set server.tls "
                             "or terminate TLS in front of sigil")
    add_routes(app)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        root = Path(config.storage.root)
        backends = await open_backends(config)
        try:
            removed = await _cleanup_uploads(config, backends, startup=True)
            leases, relay, peer = await _single_flight(config, backends)
        except BaseException:
            await backends.close()
            raise
        # Offline: stand-ins that answer "not found" without a socket (upstream/offline.py).
        offline = config.server.offline
        clients: dict[str, Upstream] = {
            u.name: OfflineUpstreamClient(u) if offline else UpstreamClient(u)
            for u in config.upstreams}
        metrics.OFFLINE.set(1 if offline else 0)
        mirror = Mirror(config, backends.objects, backends.index, clients, policy,
                        leases=leases, relay=relay)
        app[MIRROR] = mirror
        try:
            peer_runner = await peer(mirror) if peer is not None else None
        except BaseException:
            await backends.close()
            for client in clients.values():
                await client.close()
            raise
        maintenance = asyncio.get_running_loop().create_task(
            _maintain(mirror, config, backends))
        app[READY].set()
        log.info("sigil.started", storage=str(root), staging_removed=removed,
                 objects=config.storage.backend, index=config.index.backend,
                 peer=relay.location if relay is not None else None,
                 upstreams=[u.name for u in config.upstreams],
                 policy=config.policy or "none (allow all)", offline=offline)
        try:
            yield
        finally:
            app[READY].clear()
            maintenance.cancel()
            await asyncio.gather(maintenance, return_exceptions=True)
            await mirror.downloads.drain(DRAIN_SECONDS)
            if peer_runner is not None:
                await peer_runner.cleanup()
            for client in clients.values():
                await client.close()
            await backends.close()
            log.info("sigil.stopped")

    app.cleanup_ctx.append(resources)
    return app


def _fleet(config: Config) -> bool:
    """Is the store or the index shared with other replicas?"""
    return config.storage.backend == "s3" or config.index.backend == "postgres"


async def _cleanup_uploads(config: Config, backends: Backends, *, startup: bool) -> int:
    """Cleanup of uploads nobody will finish; return how many were removed.

    One box, at start-up: every staging file (with --workers the parent did it before
    forking: a sibling may be writing already). A fleet: at start-up this replica's local
    scratch files, and (at start-up and after each gc pass) the shared store's pending
    uploads older than ``storage.s3.abandoned_after`` whose digest has no live fetch lease
    (another replica's download in progress keeps its upload)."""
    alone = config.server.workers == 1
    if not _fleet(config):
        return await backends.objects.cleanup_abandoned(0) if startup and alone else 0
    removed = 0
    if startup and alone:
        removed = await asyncio.to_thread(BlobStore(Path(config.storage.root)).cleanup_staging)
    if isinstance(backends.objects, FilesystemObjectStore):
        return removed
    # The table this process's downloads take their leases in (see _single_flight).
    relaying = config.server.peer_listen is not None
    leases = backends.leases if alone or relaying else backends.host_leases

    async def in_progress(digest: Digest) -> bool:
        return await leases.current(digest) is not None

    older = config.storage.s3.abandoned_after if config.storage.s3 is not None else 86400.0
    return removed + await backends.objects.cleanup_abandoned(older, keep=in_progress)


PeerStarter = Callable[[Mirror], Coroutine[object, object, web.AppRunner]]


async def _single_flight(config: Config, backends: Backends
                         ) -> tuple[FetchLeases | None, RelayPeers | None, PeerStarter | None]:
    """Which lease table makes cold fetches single-flight, and across what.

    - one process: none (the in-process table suffices);
    - ``--workers N`` on one host: the host's lease table, followers read staging files;
    - replicas over a remote store with ``server.peer_listen``: the shared lease table,
      followers relay the holder's peer endpoint (a second site, started with the mirror);
      with ``--workers N`` also the host's table, which elects the worker that takes part;
    - replicas without a peer endpoint: none across replicas (each fetches on its own; a
      staging path means nothing on another host), the host's lease file among the
      ``--workers`` of each."""
    remote = not isinstance(backends.objects, FilesystemObjectStore)
    if not (remote and config.server.peer_listen is not None):
        if config.index.backend == "postgres":
            # A shared lease table, but nothing another host could follow.
            log.warning("fleet.no_peer_endpoint",
                        hint="without server.peer_listen each replica fetches cold blobs "
                             "on its own")
        # One host (its SQLite lease file, whatever the index): workers follow each other's
        # staging files.
        return (backends.host_leases if config.server.workers > 1 else None), None, None
    if not config.server.peer_secret:
        raise SigilError("server.peer_listen is set but no peer secret is configured "
                         "(server.peer_secret_env or server.peer_secret_file)")
    try:
        from sigil.server.peer import add_peer_routes
        from sigil.upstream.peer import PeerClient, valid_peer_location
    except ImportError as exc:
        raise SigilError("server.peer_listen: this build has no peer endpoint "
                         f"({exc.name} is missing)") from exc
    secret = config.server.peer_secret.encode()
    host, port = config.server.peer_advertise or config.server.peer_listen
    location = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if not valid_peer_location(location):
        # Other replicas would refuse this lease location: no relay would ever reach us.
        raise SigilError(f"server.peer_advertise: {host!r} is not a host name or address "
                         "other replicas can reach")
    client = PeerClient(secret, timeout=PEER_TIMEOUT)
    # --workers N: the workers share the one peer port, so they elect one of them per blob
    # in the host's lease file and the others follow its scratch file (RelayPeers).
    siblings = backends.host_leases if config.server.workers > 1 else None
    relay = RelayPeers(location, client.open_blob, siblings)
    listen_host, listen_port = config.server.peer_listen

    async def close_client(_: web.Application) -> None:
        await client.close()  # its connection pool, at the peer site's cleanup

    async def start_peer(mirror: Mirror) -> web.AppRunner:
        peer_app = web.Application()
        add_peer_routes(peer_app, mirror.downloads, secret)
        peer_app.on_cleanup.append(close_client)
        runner = web.AppRunner(peer_app, access_log=None, handle_signals=False,
                               shutdown_timeout=DRAIN_SECONDS)
        await runner.setup()
        try:
            await web.TCPSite(runner, listen_host, listen_port, reuse_port=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise SigilError(f"server.peer_listen: cannot listen on {listen_host}:"
                             f"{listen_port}: {exc.strerror or exc}") from exc
        return runner

    return backends.leases, relay, start_peer


async def _maintain(mirror: Mirror, config: Config, backends: Backends) -> None:
    """Keep the store under ``storage.max_bytes`` every GC_INTERVAL seconds: on one box a
    mark-and-sweep pass in a thread (it does nothing while under budget except refresh the
    store gauges; each pass is timed and counted, ``sigil_gc_*``); over shared backends an
    incremental pass under the gc lease, then the abandoned-upload cleanup. A failed pass is
    logged."""
    # The budget as a gauge, so "store near full" is one division in PromQL.
    metrics.STORE_MAX_BYTES.set(config.storage.max_bytes)
    delay = FIRST_GC_DELAY  # the first pass soon after start: it also sets the store gauges
    # Offline the store is the only copy (nothing evicted could be fetched again): the passes
    # only refresh the gauges; `sigil gc` by hand still evicts.
    budget = sys.maxsize if config.server.offline else config.storage.max_bytes
    holder = process_holder_id()
    while True:
        await asyncio.sleep(delay)
        delay = GC_INTERVAL
        try:
            if _fleet(config):
                # A shared store: one replica at a time (the gc lease), index-driven, plus
                # the uploads replicas abandoned (killed mid-download).
                await collect_incremental(backends.objects, backends.index, backends.leases,
                                          holder, budget, now=time.time(),
                                          orphan_grace=config.storage.orphan_grace)
                await _cleanup_uploads(config, backends, startup=False)
            else:
                store, index = mirror.store, mirror.index
                assert isinstance(store, FilesystemObjectStore)
                assert isinstance(index, SqliteAsyncIndex)
                await asyncio.to_thread(collect, store.blobs, index.sync, budget,
                                        now=time.time())
        except Exception:  # a failed pass must not stop the server
            log.exception("gc.failed")


async def reload(app: web.Application,
                 load: Callable[[], PolicyHook | None]) -> bool:
    """Load the policy again and swap it in; keep the old one if the new one is invalid.

    Verdicts and blob-gate allows are keyed by the policy fingerprint, so nothing allowed
    under the old policy is served under the new one without being decided again."""
    mirror = app[MIRROR]
    try:
        policy = await asyncio.to_thread(load)
    except SigilError as exc:
        log.error("policy.reload_failed", error=str(exc), kept=mirror.policy.fingerprint[:16])
        return False
    old = mirror.policy.fingerprint
    mirror.set_policy(policy or AllowAll())
    pruned = await mirror.index.prune_allows(mirror.policy.fingerprint)
    log.info("policy.reloaded", old=old[:16], new=mirror.policy.fingerprint[:16],
             allows_pruned=pruned)
    return True


async def reload_credentials(app: web.Application,
                             certificates: CertificateReloader | None) -> None:
    """SIGHUP, besides the policy: the TLS certificate and the client credential files
    (htpasswd, issuer keys). Each keeps its old state if its new files are unusable."""
    if certificates is not None:
        await asyncio.to_thread(certificates.reload, "signal")
    client_auth = app.get(AUTH)
    if client_auth is not None:
        try:
            await asyncio.to_thread(client_auth.reload_files)
            log.info("auth.reloaded", type=client_auth.config.type)
        except SigilError as exc:
            log.error("auth.reload_failed", error=str(exc))
        client_auth.forget()  # credentials are checked again under the files now in force


def listen_socket(config: Config, port: int | None = None) -> socket.socket:
    """A bound listening socket (SO_REUSEPORT so ``--workers`` processes can share the port).

    ``port`` overrides the configured port (a worker binding the port its parent got, which
    matters when the configured one is 0)."""
    family = socket.AF_INET6 if ":" in config.server.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.server.listen_host,
               config.server.listen_port if port is None else port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(config: Config, policy: PolicyHook | None = None,
                sock: socket.socket | None = None,
                reload_policy: Callable[[], PolicyHook | None] | None = None,
                workers: list[int] | None = None) -> bool:
    """Run until SIGTERM/SIGINT, then drain in-flight downloads and stop. SIGHUP reloads
    the policy through ``reload_policy``; an invalid new policy keeps the old one.

    ``workers`` are the PIDs of sibling worker processes (``--workers``): if one dies, this
    process stops too, so the supervisor (systemd, Kubernetes) restarts the whole set rather
    than leaving a mirror silently short of capacity. Returns False in that case."""
    app = build_app(config, policy)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=DRAIN_SECONDS)
    await runner.setup()
    tls_files = TLSFiles.from_config(config.server)
    certificates = (CertificateReloader(tls_files, config.server.tls_reload_interval)
                    if tls_files else None)
    site = web.SockSite(runner, sock or listen_socket(config),
                        ssl_context=certificates.listener if certificates else None)
    await site.start()
    log.info("sigil.listening", address=f"{config.server.listen_host}:{config.server.listen_port}",
             tls=bool(config.server.tls_cert))
    stop = asyncio.Event()
    clean = True
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: set[asyncio.Task[object]] = set()

    def spawn(work: Coroutine[object, object, object]) -> None:
        task = loop.create_task(work)
        background.add(task)
        task.add_done_callback(background.discard)

    def on_sighup() -> None:
        if reload_policy is not None:
            spawn(reload(app, reload_policy))
        spawn(reload_credentials(app, certificates))

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if certificates is not None:
        spawn(certificates.watch())

    def reap() -> None:
        nonlocal clean
        for pid in list(workers or ()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, -1
            if done:
                workers.remove(pid)  # type: ignore[union-attr]
                log.error("worker.died", pid=pid, status=status)
                clean = False
                stop.set()

    if workers:
        loop.add_signal_handler(signal.SIGCHLD, reap)
    await stop.wait()
    log.info("sigil.stopping")
    for task in list(background):
        task.cancel()
    await runner.cleanup()
    return clean
