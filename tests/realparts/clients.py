"""Real container clients against loopback registries: skopeo, containerd's ctr, podman.

Every client runs isolated: private config files in a temp dir (policy, registries.conf,
storage, HOME), ``HTTP(S)_PROXY`` at a dead loopback port with loopback exempt, and every
fallback/primary location at a dead loopback port, so a client can only ever reach the loopback
server under test. Each command is bounded by a timeout (killed when it expires) and runs
without blocking the event loop, so an in-process server in the same loop keeps answering.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from ._process import (
    DEAD_PORT,
    DEAD_URL,
    CommandResult,
    ProcessError,
    TempDirDaemon,
    client_env,
    run_bounded,
    start_daemon,
    stop_daemon,
    wait_until,
)

_ACCEPT_ANYTHING_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ProcessError(f"{binary} not found: run .ci/install-deps.sh")
    return path


def _docker_ref(ref: str) -> str:
    return ref if "://" in ref else f"docker://{ref}"


class _IsolatedConfig:
    """A temp dir with a permissive signature policy, an empty registries.conf and a HOME."""

    def __init__(self, prefix: str, registries_conf: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.policy = self.dir / "policy.json"
        self.policy.write_text(_ACCEPT_ANYTHING_POLICY)
        self.registries_conf = self.dir / "registries.conf"
        self.registries_conf.write_text(registries_conf)
        self.registries_d = self.dir / "registries.d"
        self.registries_d.mkdir()
        self.auth = self.dir / "auth.json"
        self.auth.write_text('{"auths": {}}\n')
        self.home = self.dir / "home"
        self.home.mkdir()
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return client_env(
            {
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                "REGISTRIES_CONFIG_PATH": str(self.registries_conf),
                "REGISTRY_AUTH_FILE": str(self.auth),
                "TMPDIR": str(self.tmp),
                **(extra or {}),
            },
            home=self.home,
        )

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- skopeo ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyResult:
    """What ``skopeo copy`` wrote: the top manifest's digest and the destination directory.

    ``layout`` is ``"dir"`` (manifests and blobs byte for byte, any media type) or ``"oci"``
    (an OCI image layout; holds only OCI manifests).
    """

    digest: str
    path: Path
    layout: Literal["dir", "oci"]

    def manifest(self, digest: str | None = None) -> bytes:
        """The top manifest (or an index child's, by ``digest``) as copied."""
        if self.layout == "oci":
            return self.blob(digest or self.digest)
        if digest is None or digest == self.digest:
            return (self.path / "manifest.json").read_bytes()
        return (self.path / f"{digest.partition(':')[2]}.manifest.json").read_bytes()

    def blob(self, digest: str) -> bytes:
        """A copied blob's bytes."""
        algorithm, _, hexpart = digest.partition(":")
        if self.layout == "oci":
            return (self.path / "blobs" / algorithm / hexpart).read_bytes()
        return (self.path / hexpart).read_bytes()


async def skopeo(
    *args: str, timeout: float = 60.0, check: bool = True, registries_conf: str = ""
) -> CommandResult:
    """Run ``skopeo`` isolated (private policy, registries.conf, auth and HOME; dead proxy)."""
    binary = _require("skopeo")
    config = _IsolatedConfig("sigil-skopeo-", registries_conf)
    try:
        argv = [binary, "--policy", str(config.policy), "--registries.d",
                str(config.registries_d), "--tmpdir", str(config.tmp), *args]
        return await run_bounded(argv, timeout=timeout, env=config.env(), check=check)
    finally:
        config.remove()


async def skopeo_copy(
    src_ref: str,
    dest_dir: Path,
    *,
    layout: Literal["dir", "oci"] = "dir",
    all_platforms: bool = True,
    tls_verify: bool = False,
    preserve_digests: bool = True,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> CopyResult:
    """``skopeo copy`` an image from a registry (``HOST/repo:tag``) into ``dest_dir``.

    With ``preserve_digests`` (default) skopeo fails instead of converting a manifest, so the
    returned digest (from ``--digestfile``) is the digest of the bytes the registry served.
    Use ``layout="dir"`` (default) for Docker media types: an OCI layout only holds OCI ones.
    ``--retry-times 0``: a failure shows at once instead of after retries.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    digest_file = dest_dir.parent / f".{dest_dir.name}.digest"
    args = ["copy", "--quiet", "--retry-times", "0", "--src-no-creds",
            f"--src-tls-verify={str(tls_verify).lower()}", "--digestfile", str(digest_file)]
    if all_platforms:
        args.append("--all")
    if preserve_digests:
        args.append("--preserve-digests")
    args.extend(extra_args)
    dest = f"oci:{dest_dir}" if layout == "oci" else f"dir:{dest_dir}"
    try:
        await skopeo(*args, _docker_ref(src_ref), dest, timeout=timeout)
        digest = digest_file.read_text().strip()
    finally:
        digest_file.unlink(missing_ok=True)
    return CopyResult(digest, dest_dir, layout)


async def skopeo_inspect_raw(
    ref: str, *, config: bool = False, tls_verify: bool = False, timeout: float = 30.0
) -> bytes:
    """The raw manifest (or with ``config=True`` the raw config) of ``HOST/repo:tag|@digest``."""
    args = ["inspect", "--raw", "--retry-times", "0", "--no-creds",
            f"--tls-verify={str(tls_verify).lower()}"]
    if config:
        args.append("--config")
    result = await skopeo(*args, _docker_ref(ref), timeout=timeout)
    return result.stdout.encode()


# -- the client configs shipped in deploy/clients/ -------------------------------------------------

#: What users install (docs/clients.md); tests configure clients from these very files.
SHIPPED_CLIENT_CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "clients"
#: How the shipped files name sigil.
SHIPPED_SIGIL_HOST = "sigil.internal:5000"
#: How the shipped files name Docker Hub's own endpoint (the place a fallback would go).
SHIPPED_UPSTREAM_HOST = "registry-1.docker.io"


def shipped_client_config(name: str, sigil_host: str, *, upstream_host: str | None = None,
                          ca_file: Path | None = None) -> str:
    """The shipped ``deploy/clients/<name>`` for a sigil at ``sigil_host`` (``host:port``).

    Templating only: ``sigil.internal:5000`` becomes ``sigil_host``. Without ``ca_file`` the
    sigil under test speaks plain HTTP, so ``https://`` before it becomes ``http://``; with
    ``ca_file`` (sigil serving TLS) the file's commented ``# ca = ...`` lines name that CA.
    With ``upstream_host``, Docker Hub's endpoint name becomes it (a real loopback registry,
    so a fallback can be observed).
    """
    text = (SHIPPED_CLIENT_CONFIGS / name).read_text()
    if ca_file is None:
        text = text.replace(f"https://{SHIPPED_SIGIL_HOST}", f"http://{sigil_host}")
    else:
        text = re.sub(r'(?m)^(\s*)# ca = "[^"]*"$', lambda m: f'{m.group(1)}ca = "{ca_file}"',
                      text)
    text = text.replace(SHIPPED_SIGIL_HOST, sigil_host)
    if upstream_host is not None:
        text = text.replace(SHIPPED_UPSTREAM_HOST, upstream_host)
    return text


# -- containerd ------------------------------------------------------------------------------------


def write_hosts_dir(
    hosts_dir: Path, mirrors: Mapping[str, str], *, override_path: bool = False
) -> Path:
    """Write containerd ``hosts.toml`` files: registry host name -> mirror URL.

    The registry's own ``server`` is a dead loopback port, so containerd can never fall back
    past the mirror. With ``override_path`` the mirror URL carries the full API path
    (e.g. ``http://127.0.0.1:PORT/v2/docker.io``), containerd's way to use a path prefix.
    """
    for registry, mirror in mirrors.items():
        host_dir = hosts_dir / registry
        host_dir.mkdir(parents=True, exist_ok=True)
        lines = [f'server = "{DEAD_URL}"', "", f'[host."{mirror}"]',
                 '  capabilities = ["pull", "resolve"]']
        if override_path:
            lines.append("  override_path = true")
        (host_dir / "hosts.toml").write_text("\n".join(lines) + "\n")
    return hosts_dir


@dataclass(frozen=True)
class CtrImage:
    """One row of ``ctr images ls``."""

    ref: str
    media_type: str
    digest: str


class Containerd(TempDirDaemon):
    """A private ``containerd`` daemon (root only) and ``ctr`` commands against it.

    Its ``root``, ``state``, sockets and plugin dirs live in one temp dir; the CRI plugin is
    disabled. Use as a context manager or :meth:`start` / :meth:`stop`. ``ctr`` does the
    registry traffic itself (the daemon only stores content), with a dead proxy in its env.
    Its temp dir holds ``config.toml``, ``root/``, ``state/``, the sockets and the log.
    """

    name = "containerd"
    log_name = "containerd.log"

    def __init__(
        self,
        *,
        namespace: str = "sigil-test",
        snapshotter: str = "native",
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.start_timeout = start_timeout
        self._hosts_dirs = 0

    @property
    def address(self) -> Path:
        """The gRPC socket (``ctr --address``)."""
        return self.directory / "containerd.sock"

    @property
    def root(self) -> Path:
        """containerd's persistent ``root`` (content store, snapshots, metadata)."""
        return self.directory / "root"

    def config_toml(self) -> str:
        """The daemon configuration (version 2)."""
        d = self.directory
        return "\n".join([
            "version = 2",
            f'root = "{d / "root"}"',
            f'state = "{d / "state"}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  level = "warn"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{d / "opt"}"',
            "",
        ])

    def start(self) -> Self:
        """Start the daemon and wait (bounded) until ``ctr version`` reaches it."""
        if self._proc is not None:
            raise RuntimeError("containerd already running")
        binary = _require("containerd")
        _require("ctr")
        self._dir = Path(tempfile.mkdtemp(prefix="sigil-containerd-"))
        config = self.directory / "config.toml"
        config.write_text(self.config_toml())
        self._proc = start_daemon([binary, "--config", str(config)], log_path=self.log_path,
                                  env=client_env())
        try:
            wait_until(self._answers, timeout=self.start_timeout, what="containerd",
                       proc=self._proc, log_path=self.log_path, interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if not self.address.exists():
            return False
        done = subprocess.run(
            ["ctr", "--address", str(self.address), "version"], stdin=subprocess.DEVNULL,
            capture_output=True, timeout=10, check=False,
        )
        return done.returncode == 0

    def stop(self) -> None:
        """Stop the daemon by PID (SIGTERM, then SIGKILL) and remove its temp dir."""
        if self._proc is not None:
            stop_daemon(self._proc, term_timeout=10.0)
            self._proc = None
        self._remove_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def ctr(self, *args: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        """Run ``ctr --address SOCK --namespace NS ARGS...`` with a dead proxy."""
        argv = [_require("ctr"), "--address", str(self.address), "--namespace",
                self.namespace, *args]
        return await run_bounded(argv, timeout=timeout, env=client_env(home=self.directory),
                                 check=check)

    def hosts_dir(self, mirrors: Mapping[str, str], *, override_path: bool = False) -> Path:
        """A new hosts dir (see :func:`write_hosts_dir`) inside the daemon's temp dir."""
        self._hosts_dirs += 1
        return write_hosts_dir(self.directory / f"hosts-{self._hosts_dirs}", mirrors,
                               override_path=override_path)

    def shipped_hosts_dir(self, registries: Sequence[str], sigil_host: str, *,
                          ca_file: Path | None = None) -> Path:
        """A new hosts dir with the shipped ``containerd/hosts.toml`` for each registry name
        (see :func:`shipped_client_config`)."""
        self._hosts_dirs += 1
        hosts_dir = self.directory / f"hosts-{self._hosts_dirs}"
        text = shipped_client_config("containerd/hosts.toml", sigil_host, ca_file=ca_file)
        for registry in registries:
            (hosts_dir / registry).mkdir(parents=True)
            (hosts_dir / registry / "hosts.toml").write_text(text)
        return hosts_dir

    async def pull(
        self,
        ref: str,
        *,
        mirrors: Mapping[str, str] | None = None,
        hosts_dir: Path | None = None,
        override_path: bool = False,
        platform: str | None = "linux/amd64",
        all_platforms: bool = False,
        timeout: float = 60.0,
    ) -> str:
        """``ctr images pull`` ``ref`` (``registry/repo:tag``) through mirrors; return its digest.

        ``mirrors`` maps registry host names (``docker.io``, or a made-up name) to mirror URLs
        and is written as ``hosts.toml``; or pass a prepared ``hosts_dir``. containerd adds
        ``?ns=<registry>`` to every mirror request and sends no ``/v2/`` ping. The image is
        unpacked into the configured snapshotter unless ``all_platforms``.
        """
        if hosts_dir is None:
            hosts_dir = self.hosts_dir(mirrors or {}, override_path=override_path)
        args = ["images", "pull", "--hosts-dir", str(hosts_dir),
                "--snapshotter", self.snapshotter]
        if all_platforms:
            args.append("--all-platforms")
        elif platform is not None:
            args += ["--platform", platform]
        await self.ctr(*args, ref, timeout=timeout)
        image = await self.image(ref)
        if image is None:
            raise ProcessError(f"ctr pulled {ref} but does not list it")
        return image.digest

    async def images(self) -> list[CtrImage]:
        """The images in this namespace."""
        result = await self.ctr("images", "ls", timeout=30.0)
        rows = []
        for line in result.stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3:
                rows.append(CtrImage(cols[0], cols[1], cols[2]))
        return rows

    async def image(self, ref: str) -> CtrImage | None:
        """The image named ``ref``, if present."""
        return next((img for img in await self.images() if img.ref == ref), None)

    async def remove_image(self, ref: str) -> None:
        """``ctr images rm --sync`` (content is garbage-collected)."""
        await self.ctr("images", "rm", "--sync", ref, timeout=30.0)

    def snapshot_dirs(self) -> list[Path]:
        """Unpacked layer directories of the ``native`` snapshotter (to check real unpacking)."""
        base = self.root / "io.containerd.snapshotter.v1.native" / "snapshots"
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


# -- podman ----------------------------------------------------------------------------------------


def registries_conf_mirror(
    registry: str, mirror: str, *, insecure: bool = True, pull_from_mirror: str = "all"
) -> str:
    """A ``registries.conf`` making ``mirror`` (``127.0.0.1:PORT[/prefix]``) serve ``registry``.

    The registry's own location is a dead loopback port, so podman cannot fall back past the
    mirror. podman sends no ``ns``: route by a path prefix in ``mirror``.
    """
    return "\n".join([
        "unqualified-search-registries = []",
        "",
        "[[registry]]",
        f'prefix = "{registry}"',
        f'location = "127.0.0.1:{DEAD_PORT}"',
        f"insecure = {str(insecure).lower()}",
        "",
        "[[registry.mirror]]",
        f'location = "{mirror}"',
        f"insecure = {str(insecure).lower()}",
        f'pull-from-mirror = "{pull_from_mirror}"',
        "",
    ])


@dataclass(frozen=True)
class PodmanImage:
    """What podman stored: the manifest (or index) digest it pulled, its image id, digests."""

    digest: str
    image_id: str
    repo_digests: tuple[str, ...]


class Podman:
    """Rootful podman with private storage (vfs), config and registries.conf in a temp dir.

    Storage persists across :meth:`pull` calls until :meth:`close`, so a second pull of the
    same image can be observed hitting the local store.
    """

    def __init__(self, registries_conf: str) -> None:
        _require("podman")
        self._config = _IsolatedConfig("sigil-podman-", registries_conf)
        d = self._config.dir
        (d / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{d / "events.log"}"\n'
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{d / "runroot"}"\n'
            f'graphroot = "{d / "root"}"\n'
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the storage and config temp dir."""
        self._config.remove()

    async def podman(self, *args: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        """Run ``podman`` with the private root, runroot, vfs driver and config files."""
        d = self._config.dir
        argv = [
            _require("podman"), "--root", str(d / "root"), "--runroot", str(d / "runroot"),
            "--tmpdir", str(d / "libpod-tmp"), "--storage-driver", "vfs",
            "--cgroup-manager=cgroupfs", "--events-backend=file",
            "--network-config-dir", str(d / "networks"), *args,
        ]
        env = self._config.env({"CONTAINERS_CONF": str(d / "containers.conf"),
                                "CONTAINERS_STORAGE_CONF": str(d / "storage.conf")})
        return await run_bounded(argv, timeout=timeout, env=env, check=check)

    async def pull(
        self,
        image: str,
        *,
        tls_verify: bool = False,
        cert_dir: Path | None = None,
        platform: str | None = None,
        timeout: float = 60.0,
    ) -> PodmanImage:
        """``podman pull`` a fully qualified ``image`` and return what was stored.

        ``cert_dir``: a directory of CA certificates (``*.crt``) trusted for every registry.
        """
        args = ["pull", "--quiet", f"--tls-verify={str(tls_verify).lower()}",
                # Hidden in podman 4.3's help, but honoured.
                "--signature-policy", str(self._config.policy)]
        if cert_dir is not None:
            args += ["--cert-dir", str(cert_dir)]
        if platform is not None:
            args += ["--platform", platform]
        await self.podman(*args, image, timeout=timeout)
        return await self.inspect(image)

    async def inspect(self, image: str) -> PodmanImage:
        """The stored image named ``image``."""
        result = await self.podman("image", "inspect", image, timeout=30.0)
        info = json.loads(result.stdout)[0]
        return PodmanImage(info["Digest"], info["Id"], tuple(info.get("RepoDigests") or ()))


async def podman_pull(
    image: str,
    registries_conf: str,
    *,
    tls_verify: bool = False,
    platform: str | None = None,
    timeout: float = 60.0,
) -> PodmanImage:
    """Pull ``image`` with a fresh, private podman store configured by ``registries_conf``.

    The store is removed afterwards, so every call really fetches from the mirror.
    """
    async with Podman(registries_conf) as podman:
        return await podman.pull(image, tls_verify=tls_verify, platform=platform,
                                 timeout=timeout)
