"""Real clients log in to sigil and pull through it from the real docker-registry upstream:
skopeo (``--src-creds``), containerd's ctr (``--user``, hosts.toml, ``?ns=``) and podman
(``podman login --authfile`` / ``--creds``), with htpasswd and with tokens from an issuer that
the test runs in-process (it stands for the external issuer; its keys are made at run time)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.realparts import (
    Containerd,
    Podman,
    ProcessError,
    RealRegistry,
    RegistryPusher,
    registries_conf_mirror,
    skopeo,
)
from tests.support.sigilproc import SigilProcess
from tests.test_auth_support import PASSWORD_FOR_TESTS, TokenIssuer, write_htpasswd

pytestmark = pytest.mark.realparts
PASSWORD = PASSWORD_FOR_TESTS
ACCEPT_ANYTHING = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def auth_sigil(workdir: Path, upstream: RealRegistry, auth: dict[str, Any]) -> SigilProcess:
    """sigil over the real registry as `docker.io` (default) and `registry.test`, with
    ``server.auth`` set."""
    process = SigilProcess(workdir, [
        {"name": "docker.io", "url": upstream.url, "default": True},
        {"name": "registry.test", "url": upstream.url}])
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["auth"] = auth
    process.config_path.write_text(yaml.safe_dump(config))
    return process


async def skopeo_pull(ref: str, dest: Path, creds: str | None) -> str:
    """``skopeo copy`` ``ref`` into ``dest`` with ``--src-creds``; returns the digest."""
    digest_file = dest.parent / f".{dest.name}.digest"
    auth = ["--src-creds", creds] if creds else ["--src-no-creds"]
    await skopeo("copy", "--quiet", "--retry-times", "0", *auth, "--src-tls-verify=false",
                 "--preserve-digests", "--digestfile", str(digest_file), f"docker://{ref}",
                 f"dir:{dest}", timeout=90)
    return digest_file.read_text().strip()


def assert_no_secrets_logged(process: SigilProcess, *secrets: str) -> None:
    text = process.log_path.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text


@pytest.fixture
def htpasswd_sigil(tmp_path: Path, real_registry: RealRegistry) -> Iterator[SigilProcess]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD, "ci": "ci-secret"})
    with auth_sigil(tmp_path / "sigil", real_registry,
                    {"type": "htpasswd", "htpasswd": str(htpasswd)}) as process:
        yield process


@pytest.fixture
async def issuer(unique_repo: str) -> AsyncIterator[TokenIssuer]:
    issuer = TokenIssuer(
        users={"alice": PASSWORD, "node": "node-secret", "nobody": "nobody-secret"},
        # alice may pull anything; node only the ns-routed name of the test repository.
        acl={"alice": {"*"}, "node": {f"registry.test/{unique_repo}"}})
    await issuer.start()
    yield issuer
    await issuer.stop()


@pytest.fixture
def token_sigil(tmp_path: Path, real_registry: RealRegistry,
                issuer: TokenIssuer) -> Iterator[SigilProcess]:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    with auth_sigil(tmp_path / "sigil", real_registry, issuer.auth_config(jwks)) as process:
        yield process


# ------------------------------------------------------------------------- htpasswd
async def test_skopeo_htpasswd(htpasswd_sigil: SigilProcess, registry_pusher: RegistryPusher,
                               unique_repo: str, tmp_path: Path) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v1")
    ref = f"{htpasswd_sigil.host}/{unique_repo}:v1"
    assert await skopeo_pull(ref, tmp_path / "ok", f"alice:{PASSWORD}") == pushed.digest
    for creds in (None, "alice:wrong"):
        with pytest.raises(ProcessError) as info:
            await skopeo_pull(ref, tmp_path / "refused", creds)
        assert "unauthorized" in str(info.value).lower() or "401" in str(info.value)
    assert htpasswd_sigil.metric("sigil_auth_failures_total", {"reason": "wrong_password"}) >= 1
    assert_no_secrets_logged(htpasswd_sigil, PASSWORD)


async def test_ctr_htpasswd(htpasswd_sigil: SigilProcess, registry_pusher: RegistryPusher,
                            unique_repo: str, containerd_daemon: Containerd) -> None:
    pushed = await registry_pusher.make_multiplatform_image(unique_repo, "c1")
    ref = f"registry.test/{unique_repo}:c1"
    hosts = containerd_daemon.hosts_dir({"registry.test": htpasswd_sigil.url})
    pull = ["images", "pull", "--hosts-dir", str(hosts), "--snapshotter",
            containerd_daemon.snapshotter, "--platform", "linux/amd64"]
    with pytest.raises(ProcessError):
        await containerd_daemon.ctr(*pull, ref, timeout=60)
    await containerd_daemon.ctr(*pull, "--user", "ci:ci-secret", ref, timeout=90)
    image = await containerd_daemon.image(ref)
    assert image is not None and image.digest == pushed.index.digest
    assert_no_secrets_logged(htpasswd_sigil, "ci-secret")


async def test_podman_login_htpasswd(htpasswd_sigil: SigilProcess,
                                     registry_pusher: RegistryPusher, unique_repo: str,
                                     tmp_path: Path) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "p1")
    conf = registries_conf_mirror("registry.test", f"{htpasswd_sigil.host}/registry.test")
    authfile = tmp_path / "auth.json"
    policy = tmp_path / "policy.json"
    policy.write_text(ACCEPT_ANYTHING)
    image = f"registry.test/{unique_repo}:p1"
    async with Podman(conf) as podman:
        with pytest.raises(ProcessError):
            await podman.podman("login", "--authfile", str(authfile), "--tls-verify=false",
                                "-u", "alice", "-p", "wrong", htpasswd_sigil.host)
        await podman.podman("login", "--authfile", str(authfile), "--tls-verify=false",
                            "-u", "alice", "-p", PASSWORD, htpasswd_sigil.host)
        assert htpasswd_sigil.host in json.loads(authfile.read_text())["auths"]
        await podman.podman("pull", "--quiet", "--tls-verify=false", "--authfile",
                            str(authfile), "--signature-policy", str(policy), image,
                            timeout=90)
        stored = await podman.inspect(image)
    assert stored.digest == pushed.digest


# ------------------------------------------------------------------------- tokens
async def test_skopeo_token(token_sigil: SigilProcess, issuer: TokenIssuer,
                            registry_pusher: RegistryPusher, unique_repo: str,
                            tmp_path: Path) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v1")
    ref = f"{token_sigil.host}/{unique_repo}:v1"
    assert await skopeo_pull(ref, tmp_path / "ok", f"alice:{PASSWORD}") == pushed.digest
    # skopeo asked the issuer for this repository's pull scope, for sigil's service.
    asked = [r for r in issuer.requests if r["user"] == "alice"]
    assert any(f"repository:{unique_repo}:pull" in r["scopes"] and r["service"] == "sigil.test"
               for r in asked)
    # A user the issuer grants nothing gets a token that sigil refuses.
    with pytest.raises(ProcessError):
        await skopeo_pull(ref, tmp_path / "refused", "nobody:nobody-secret")
    assert token_sigil.metric("sigil_auth_failures_total",
                              {"reason": "insufficient_scope"}) >= 1
    assert_no_secrets_logged(token_sigil, PASSWORD, *issuer.issued)


async def test_ctr_token_scope_carries_ns(token_sigil: SigilProcess, issuer: TokenIssuer,
                                          registry_pusher: RegistryPusher, unique_repo: str,
                                          containerd_daemon: Containerd) -> None:
    pushed = await registry_pusher.make_multiplatform_image(unique_repo, "c1")
    ref = f"registry.test/{unique_repo}:c1"
    hosts = containerd_daemon.hosts_dir({"registry.test": token_sigil.url})
    # `node` may pull only registry.test/<repo>: the name the ?ns= request must carry.
    await containerd_daemon.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter",
                                containerd_daemon.snapshotter, "--platform", "linux/amd64",
                                "--user", "node:node-secret", ref, timeout=90)
    image = await containerd_daemon.image(ref)
    assert image is not None and image.digest == pushed.index.digest
    asked = [s for r in issuer.requests if r["user"] == "node" for s in r["scopes"]]
    assert f"repository:registry.test/{unique_repo}:pull" in asked
    assert_no_secrets_logged(token_sigil, "node-secret", *issuer.issued)


async def test_podman_login_token(token_sigil: SigilProcess, issuer: TokenIssuer,
                                  registry_pusher: RegistryPusher, unique_repo: str,
                                  tmp_path: Path) -> None:
    # podman applies --creds to an image's primary location only, never to its mirrors:
    # credentials for a mirror come from `podman login <mirror host>` (auth.json).
    pushed = await registry_pusher.make_image(unique_repo, "p1")
    conf = registries_conf_mirror("registry.test", f"{token_sigil.host}/registry.test")
    authfile = tmp_path / "auth.json"
    policy = tmp_path / "policy.json"
    policy.write_text(ACCEPT_ANYTHING)
    image = f"registry.test/{unique_repo}:p1"
    async with Podman(conf) as podman:
        await podman.podman("login", "--authfile", str(authfile), "--tls-verify=false",
                            "-u", "alice", "-p", PASSWORD, token_sigil.host)
        await podman.podman("pull", "--quiet", "--tls-verify=false", "--authfile",
                            str(authfile), "--signature-policy", str(policy), image,
                            timeout=90)
        stored = await podman.inspect(image)
    assert stored.digest == pushed.digest
    # podman asked for the path-prefix name: the scope sigil requires for that route.
    assert any(f"repository:registry.test/{unique_repo}:pull" in r["scopes"]
               for r in issuer.requests if r["user"] == "alice")
