"""Client authentication (server.auth): htpasswd and token, every bad input of issue 9.

sigil runs in-process (aiohttp test server) in front of the real docker-registry upstream;
credentials come from the real ``htpasswd -B`` and from a test issuer's run-time keys.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from sigil import metrics
from sigil.config import build_config
from sigil.errors import ConfigError
from sigil.server.app import build_app
from sigil.server.auth import AUTH, FailureLimiter, HtpasswdVerifier, TokenVerifier
from tests.realparts import RealRegistry, RegistryPusher
from tests.test_auth_support import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    TokenIssuer,
    basic,
    write_htpasswd,
)

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
PASSWORD = "correct horse battery staple"


def failures(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("sigil_auth_failures_total",
                                             {"reason": reason}) or 0.0


def rate_limited() -> float:
    return metrics.REGISTRY.get_sample_value("sigil_auth_rate_limited_total") or 0.0


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD, "bob": "hunter2"})


@pytest.fixture
def issuer() -> TokenIssuer:
    issuer = TokenIssuer()
    issuer.port = 9  # not served: these tests sign tokens directly
    return issuer


@pytest.fixture
async def start(tmp_path: Path, real_registry: RealRegistry
                ) -> AsyncIterator[Callable[..., Any]]:
    """``await start(auth={...}, **server)``: sigil in-process over the real registry."""
    clients: list[TestClient[Any, Any]] = []

    async def make(auth: dict[str, Any], **server: Any) -> TestClient[Any, Any]:
        config = build_config({
            "server": {"auth": auth, **server},
            "storage": {"root": str(tmp_path / f"store{len(clients)}")},
            "upstreams": [{"name": "docker.io", "url": real_registry.url, "default": True},
                          {"name": "registry.test", "url": real_registry.url}],
            "log": {"level": "warning"}}, env={}, source=str(tmp_path / "sigil.yaml"))
        client = TestClient(TestServer(build_app(config), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def challenge(response: Any) -> str:
    value: str = response.headers["WWW-Authenticate"]
    return value


async def error_code(response: Any) -> str:
    body = await response.json()
    code: str = body["errors"][0]["code"]
    return code


# ------------------------------------------------------------------------- htpasswd
async def test_htpasswd_challenge_login_and_pull(start, htpasswd, registry_pusher: RegistryPusher,
                                                 unique_repo: str) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v1")
    client = await start({"type": "htpasswd", "htpasswd": str(htpasswd), "realm": "my mirror"})
    ping = await client.get("/v2/")
    assert ping.status == 401
    assert challenge(ping) == 'Basic realm="my mirror"'
    assert await error_code(ping) == "UNAUTHORIZED"
    # The header docker's ping looks for to know it talks to a v2 registry.
    assert ping.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    ok = await client.get("/v2/", headers={"Authorization": basic("alice", PASSWORD)})
    assert ok.status == 200
    manifest = await client.get(f"/v2/{unique_repo}/manifests/v1",
                                headers={**ACCEPT, "Authorization": basic("bob", "hunter2")})
    assert manifest.status == 200
    assert await manifest.read() == pushed.manifest
    # Every /v2/ route is protected, blobs too.
    blob = await client.get(f"/v2/{unique_repo}/blobs/{pushed.blobs[0]}")
    assert blob.status == 401


async def test_wrong_password_and_unknown_user(start, htpasswd) -> None:
    client = await start({"type": "htpasswd", "htpasswd": str(htpasswd)})
    before = failures("wrong_password"), failures("unknown_user")
    wrong = await client.get("/v2/", headers={"Authorization": basic("alice", "nope")})
    assert wrong.status == 401
    assert challenge(wrong) == 'Basic realm="sigil"'
    assert await error_code(wrong) == "UNAUTHORIZED"
    unknown = await client.get("/v2/", headers={"Authorization": basic("mallory", PASSWORD)})
    assert unknown.status == 401
    assert (failures("wrong_password"), failures("unknown_user")) == (before[0] + 1,
                                                                    before[1] + 1)
    # The other user's password does not open this one's account.
    crossed = await client.get("/v2/", headers={"Authorization": basic("alice", "hunter2")})
    assert crossed.status == 401


MALFORMED = [
    "Basic",
    "Basic ",
    "Basic !!!not-base64!!!",
    "Basic " + base64.b64encode(b"no-colon-here").decode(),
    "Basic " + base64.b64encode(b":password-without-user").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
    "Bearer",
    "Bearer not.a.jwt",
    "Bearer " + "A" * 5000,
    "Digest username=alice",
    "alice:" + PASSWORD,
    "Basic " + "QQ" * 3500,
]


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
async def test_malformed_authorization_headers_get_401_with_challenge(
        start, htpasswd, issuer, tmp_path, kind) -> None:
    auth = ({"type": "htpasswd", "htpasswd": str(htpasswd)} if kind == "htpasswd"
            else issuer.auth_config(issuer.write_jwks(tmp_path / "jwks.json")))
    client = await start({**auth, "max_failures": 1000})
    for header in MALFORMED:
        response = await client.get("/v2/t/app/manifests/v1", headers={"Authorization": header})
        assert response.status == 401, (header[:40], await response.text())
        assert challenge(response).startswith("Basic " if kind == "htpasswd" else "Bearer ")
        assert await error_code(response) == "UNAUTHORIZED"


async def test_credentials_are_cached_bcrypt_runs_once(start, htpasswd) -> None:
    client = await start({"type": "htpasswd", "htpasswd": str(htpasswd)})
    gate = client.server.app[AUTH]
    assert isinstance(gate.verifier, HtpasswdVerifier)
    calls = []
    real_verify = gate.verifier.verify

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real_verify(*args)

    gate.verifier.verify = counting  # type: ignore[method-assign]
    for _ in range(5):
        response = await client.get("/v2/", headers={"Authorization": basic("alice", PASSWORD)})
        assert response.status == 200
    assert len(calls) == 1
    # A wrong password is never cached as good, nor does it evict the good entry.
    assert (await client.get("/v2/", headers={"Authorization": basic("alice", "x")})).status == 401
    assert len(calls) == 2


def test_non_bcrypt_htpasswd_line_refuses_start_up_with_line_number(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD})
    md5 = subprocess.run(["htpasswd", "-nbm", "carol", "pw"], capture_output=True, text=True,
                         check=True).stdout.strip()
    path.write_text(path.read_text() + "# a comment\n\n" + md5 + "\n")
    with pytest.raises(ConfigError) as info:
        build_config({"server": {"auth": {"type": "htpasswd", "htpasswd": str(path)}}},
                     env={}, source="sigil.yaml")
    message = str(info.value)
    assert str(path) in message and "line 4" in message and "bcrypt" in message
    assert md5.split(":", 1)[1] not in message  # never echo the hash
    # The command line says it in one line and exits 2, before serving anything.
    config = tmp_path / "sigil.yaml"
    config.write_text(json.dumps({"server": {"listen": "127.0.0.1:0", "auth": {
        "type": "htpasswd", "htpasswd": str(path)}}, "storage": {"root": str(tmp_path / "s")}}))
    done = subprocess.run([sys.executable, "-m", "sigil", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "line 4" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("auth", "key", "problem"), [
    ({"type": "ldap"}, "server.auth.type", "expected none, htpasswd or token"),
    ({"type": "htpasswd", "htpasswd": "/nonexistent/htpasswd"}, "/nonexistent/htpasswd",
     "cannot read htpasswd file"),
    ({"type": "token", "token": {"audience": "a", "jwks": "j", "realm_url": "http://x/t"}},
     "server.auth.token.issuer", "required"),
    ({"type": "token", "token": {"issuer": "i", "audience": "a", "realm_url": "http://x/t"}},
     "server.auth.token", "jwks"),
    ({"type": "token", "token": {"issuer": "i", "audience": "a", "realm_url": "x",
                                 "jwks": "j"}}, "server.auth.token.realm_url", "http(s) URL"),
    ({"type": "token", "token": {"issuer": "i", "audience": "a", "realm_url": "http://x/t",
                                 "jwks": "j", "algorithms": ["HS256"]}},
     "server.auth.token.algorithms", "public-key algorithms only"),
    ({"type": "token", "token": {"issuer": "i", "audience": "a", "realm_url": "http://x/t",
                                 "jwks": "/nonexistent.json"}},
     "server.auth.token.jwks", "cannot load JWKS"),
    ({"type": "none", "cache_ttl": "soon"}, "server.auth.cache_ttl", "duration"),
    ({"type": "none", "max_failures": 0}, "server.auth.max_failures", "integer"),
    ({"type": "none", "protect_metrics": "yes"}, "server.auth.protect_metrics", "true or false"),
    ({"type": "none", "realm": 'a"b'}, "server.auth.realm", "quotes"),
    ({"type": "none", "users": []}, "server.auth", "unknown key 'users'"),
])
def test_bad_auth_config_names_file_key_and_problem(auth, key, problem) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"server": {"auth": auth}}, env={}, source="sigil.yaml")
    message = str(info.value)
    assert key in message and problem in message, message


def test_pem_key_file_with_a_private_key_is_refused(tmp_path: Path) -> None:
    key = SigningKey("k")
    from cryptography.hazmat.primitives import serialization
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(key.private.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    with pytest.raises(ConfigError) as info:
        build_config({"server": {"auth": {"type": "token", "token": {
            "issuer": ISSUER, "audience": AUDIENCE, "realm_url": "http://127.0.0.1:9/t",
            "pem": str(pem)}}}}, env={}, source="sigil.yaml")
    assert "server.auth.token.pem" in str(info.value) and "private key" in str(info.value)


# ------------------------------------------------------------------------- tokens
async def test_token_challenge_carries_realm_service_and_scope(start, issuer, tmp_path) -> None:
    client = await start(issuer.auth_config(issuer.write_jwks(tmp_path / "jwks.json"),
                                            service="sigil.test"))
    ping = await client.get("/v2/")
    assert ping.status == 401
    assert challenge(ping) == f'Bearer realm="{issuer.realm}",service="sigil.test"'
    manifest = await client.head("/v2/t/app/manifests/v1")
    assert manifest.status == 401
    assert challenge(manifest) == (f'Bearer realm="{issuer.realm}",service="sigil.test",'
                                   'scope="repository:t/app:pull"')
    # Path-prefix routing: the scope is the name as sent, prefix included.
    prefixed = await client.get("/v2/registry.test/t/app/blobs/sha256:" + "a" * 64)
    assert 'scope="repository:registry.test/t/app:pull"' in challenge(prefixed)
    # ?ns= routing (containerd): the same name as the prefix form.
    routed = await client.get("/v2/t/app/manifests/v1?ns=registry.test")
    assert 'scope="repository:registry.test/t/app:pull"' in challenge(routed)
    # A name that could break out of the quoted parameter gets no scope (and no 500).
    for evil in ("/v2/a%0d%0aX-Evil:%201/manifests/v1", '/v2/a%22,realm=%22x/manifests/v1',
                 "/v2/t/app/manifests/v1?ns=a%22b"):
        response = await client.get(evil)
        assert response.status == 401, evil
        assert challenge(response) == f'Bearer realm="{issuer.realm}",service="sigil.test"'
        assert "X-Evil" not in response.headers


async def test_valid_token_pulls_only_its_repository(start, issuer, tmp_path, registry_pusher,
                                                     unique_repo) -> None:
    pushed = await registry_pusher.make_image(unique_repo, "v1")
    other = await registry_pusher.make_image(unique_repo + "-other", "v1")
    client = await start(issuer.auth_config(issuer.write_jwks(tmp_path / "jwks.json")))
    token = issuer.token(issuer.pull(unique_repo, f"registry.test/{unique_repo}"))
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v2/", headers=bearer)).status == 200
    got = await client.get(f"/v2/{unique_repo}/manifests/v1", headers={**ACCEPT, **bearer})
    assert got.status == 200 and await got.read() == pushed.manifest
    blob = await client.get(f"/v2/{unique_repo}/blobs/{pushed.blobs[-1]}", headers=bearer)
    assert blob.status == 200
    routed = await client.get(f"/v2/{unique_repo}/manifests/v1?ns=registry.test",
                              headers={**ACCEPT, **bearer})
    assert routed.status == 200
    before = failures("insufficient_scope")
    refused = await client.get(f"/v2/{unique_repo}-other/manifests/v1",
                               headers={**ACCEPT, **bearer})
    assert refused.status == 401
    assert await error_code(refused) == "UNAUTHORIZED"
    assert challenge(refused).endswith(
        f'scope="repository:{unique_repo}-other:pull",error="insufficient_scope"')
    assert failures("insufficient_scope") == before + 1
    assert other.digest  # exists upstream: the refusal is sigil's, not a 404
    # A push grant is not a pull grant.
    push_only = issuer.token([{"type": "repository", "name": unique_repo,
                               "actions": ["push"]}])
    denied = await client.get(f"/v2/{unique_repo}/manifests/v1",
                              headers={**ACCEPT, "Authorization": f"Bearer {push_only}"})
    assert denied.status == 401


@pytest.mark.parametrize(("make_token", "reason"), [
    (lambda i: i.token(i.pull("t/app"), exp=time.time() - 600), "expired"),
    (lambda i: i.token(i.pull("t/app"), nbf=time.time() + 600), "not_yet_valid"),
    (lambda i: i.token(i.pull("t/app"), aud="another-registry"), "wrong_audience"),
    (lambda i: i.token(i.pull("t/app"), iss="https://evil.test"), "wrong_issuer"),
    # Wrongly signed: another key under the trusted key's id, and an unknown key id.
    (lambda i: i.token(i.pull("t/app"), key=SigningKey(i.key.kid)), "bad_signature"),
    (lambda i: i.token(i.pull("t/app"), key=SigningKey("someone-else")), "bad_signature"),
    # Tampered payload: the signature no longer covers it.
    (lambda i: _tamper(i.token(i.pull("other/repo"))), "bad_signature"),
    # alg none, and HS256 keyed with the public key (algorithm confusion).
    (lambda i: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 60,
                           "access": i.pull("t/app")}, None, algorithm="none"), "invalid_token"),
    (lambda i: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 60,
                           "access": i.pull("t/app")}, "k" * 32, algorithm="HS256",
                          headers={"kid": i.key.kid}), "invalid_token"),
    # The access claim's grammar: actions must be a list.
    (lambda i: i.token([{"type": "repository", "name": "t/app", "actions": "pull"}]),
     "invalid_token"),
])
async def test_bad_tokens_are_refused(start, issuer, tmp_path, make_token, reason) -> None:
    client = await start(issuer.auth_config(issuer.write_jwks(tmp_path / "jwks.json")))
    token = make_token(issuer)
    before = failures(reason)
    response = await client.get("/v2/t/app/manifests/v1",
                                headers={**ACCEPT, "Authorization": f"Bearer {token}"})
    assert response.status == 401
    assert await error_code(response) == "UNAUTHORIZED"
    assert challenge(response).startswith(f'Bearer realm="{issuer.realm}"')
    assert 'error="invalid_token"' in challenge(response)
    assert failures(reason) == before + 1


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["access"] = [{"type": "repository", "name": "t/app", "actions": ["pull"]}]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


def test_pem_keys_and_token_cache_deadline(tmp_path: Path, issuer: TokenIssuer) -> None:
    pem = tmp_path / "issuer.pub"
    pem.write_bytes(issuer.key.public_pem())
    config = build_config({"server": {"auth": {"type": "token", "cache_ttl": "10m", "token": {
        "issuer": ISSUER, "audience": AUDIENCE, "realm_url": "http://127.0.0.1:9/token",
        "pem": [str(pem)]}}}}, env={})
    verifier = TokenVerifier(config.server.auth)
    # PEM keys carry no kid: the token's kid is unknown, so only a kid-less token verifies.
    with_kid = issuer.token(issuer.pull("a/b"))
    without_kid = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 30,
                              "access": issuer.pull("a/b")}, issuer.key.private,
                              algorithm="ES256")
    with pytest.raises(Exception, match="unknown key"):
        verifier.verify(f"Bearer {with_kid}", 1000.0, 600.0)
    principal = verifier.verify(f"Bearer {without_kid}", 1000.0, 600.0)
    assert principal.repositories == frozenset({"a/b"})
    # Cached until min(exp, cache_ttl): the token ends in ~30 s, well before 10 minutes.
    assert 1000.0 < principal.expires <= 1031.0


# ------------------------------------------------------------------------- endpoints
async def test_health_open_metrics_protected_only_when_asked(start, htpasswd) -> None:
    open_metrics = await start({"type": "htpasswd", "htpasswd": str(htpasswd)})
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await open_metrics.get(path)).status == 200, path
    protected = await start({"type": "htpasswd", "htpasswd": str(htpasswd),
                             "protect_metrics": True})
    for path in ("/healthz", "/readyz"):
        assert (await protected.get(path)).status == 200, path
    refused = await protected.get("/metrics")
    assert refused.status == 401 and challenge(refused) == 'Basic realm="sigil"'
    allowed = await protected.get("/metrics", headers={"Authorization": basic("alice", PASSWORD)})
    assert allowed.status == 200 and b"sigil_auth_failures_total" in await allowed.read()


async def test_auth_none_serves_without_credentials(start) -> None:
    client = await start({})
    assert (await client.get("/v2/")).status == 200
    assert AUTH not in client.server.app


# ------------------------------------------------------------------------- brute force
async def test_brute_force_is_rate_limited_per_address_and_counted(start, htpasswd) -> None:
    client = await start({"type": "htpasswd", "htpasswd": str(htpasswd), "max_failures": 3,
                          "failure_window": "10m"})
    good = {"Authorization": basic("alice", PASSWORD)}
    assert (await client.get("/v2/", headers=good)).status == 200  # verified before the attack
    limited_before = rate_limited()
    statuses = []
    for attempt in range(6):
        response = await client.get("/v2/", headers={"Authorization": basic("alice",
                                                                            f"guess{attempt}")})
        statuses.append(response.status)
        if response.status == 429:
            assert await error_code(response) == "TOOMANYREQUESTS"
            assert 0 < int(response.headers["Retry-After"]) <= 600
    assert statuses == [401, 401, 401, 429, 429, 429]
    assert rate_limited() == limited_before + 3
    # Even the right password is not checked while the address is blocked ...
    assert (await client.get("/v2/", headers={"Authorization": basic("bob", "hunter2")})
            ).status == 429
    # ... but a credential verified before the attack still works (it is not a guess).
    assert (await client.get("/v2/", headers=good)).status == 200
    # Asking without credentials is the normal first step of every client, not a failure.
    assert (await client.get("/v2/")).status == 401


def test_failure_limiter_window_and_bounded_table() -> None:
    limiter = FailureLimiter(max_failures=2, window=60.0, size=3)
    assert limiter.retry_after("a", 0.0) is None
    assert limiter.failed("a", 0.0) is False
    assert limiter.failed("a", 1.0) is True
    assert limiter.retry_after("a", 1.0) == pytest.approx(59.0)
    assert limiter.retry_after("a", 61.0) is None  # the window passed
    for address in ("b", "c", "d", "e"):
        limiter.failed(address, 100.0)
    assert len(limiter._table) == 3  # the oldest entries went first
    assert "e" in limiter._table and "b" not in limiter._table


# ------------------------------------------------------------------------- SIGHUP
def test_sighup_rereads_htpasswd_and_forgets_cached_credentials(tmp_path: Path,
                                                                 real_registry: RealRegistry
                                                                 ) -> None:
    import signal
    import urllib.error
    import urllib.request

    import yaml

    from tests.support.sigilproc import SigilProcess
    from tests.test_auth_support import wait_for

    path = write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD})
    process = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": real_registry.url,
                                                 "default": True}])
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["auth"] = {"type": "htpasswd", "htpasswd": str(path)}
    process.config_path.write_text(yaml.safe_dump(config))

    def status(user: str, password: str) -> int:
        request = urllib.request.Request(f"{process.url}/v2/",
                                         headers={"Authorization": basic(user, password)})
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    with process:
        assert process.proc is not None
        assert status("alice", PASSWORD) == 200  # now cached
        write_htpasswd(path, {"dave": "new-password"})  # alice removed, dave added
        process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status("dave", "new-password") == 200, "the htpasswd reload")
        assert status("alice", PASSWORD) == 401  # the cache was dropped with the file
        # A broken file on SIGHUP: logged, and the users in force stay.
        path.write_text("dave:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
        process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "auth.reload_failed"
                             for e in process.log_events()), "the reload error")
        assert status("dave", "new-password") == 200
    failed = [e for e in process.log_events() if e.get("event") == "auth.reload_failed"]
    assert "line 1" in failed[0]["error"] and "W6ph5Mm5" not in failed[0]["error"]
    assert any(e.get("event") == "auth.without_tls" for e in process.log_events())


async def test_credential_cache_is_bounded(start, tmp_path) -> None:
    users = {f"user{i}": f"password{i}" for i in range(5)}
    path = write_htpasswd(tmp_path / "many", users)
    client = await start({"type": "htpasswd", "htpasswd": str(path), "cache_size": 3})
    for user, password in users.items():
        response = await client.get("/v2/", headers={"Authorization": basic(user, password)})
        assert response.status == 200
    gate = client.server.app[AUTH]
    assert len(gate._cache) == 3
    # Keys are digests of the header, never the credentials themselves.
    assert all(isinstance(k, bytes) and len(k) == 32 for k in gate._cache)
    assert not any(b"password" in k for k in gate._cache)


def test_rs256_token_from_a_certificate_bundle_with_libtrust_key_ids(tmp_path: Path) -> None:
    """docker_auth and distribution name keys by their libtrust id; a PEM certificate of the
    issuer (distribution's rootcertbundle) verifies RS256 tokens carrying that kid."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from sigil.server.auth import libtrust_key_id

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    config = build_config({"server": {"auth": {"type": "token", "token": {
        "issuer": ISSUER, "audience": AUDIENCE, "realm_url": "http://127.0.0.1:9/token",
        "pem": str(bundle)}}}}, env={})
    verifier = TokenVerifier(config.server.auth)
    kid = libtrust_key_id(key.public_key())
    assert len(kid.split(":")) == 12 and all(len(part) == 4 for part in kid.split(":"))
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60,
              "access": [{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}]}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
    assert verifier.verify(f"Bearer {token}", 0.0, 60.0).repositories == frozenset({"a/b"})
    # A token signed by another key under the same kid is refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(Exception, match="signature"):
        verifier.verify(f"Bearer {forged}", 0.0, 60.0)
