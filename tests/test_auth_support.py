"""Helpers for the auth and TLS tests (and bench/bench_auth.py): htpasswd files written by the
real ``htpasswd -B``, a small token issuer standing for the external one (docker token-auth
spec), and a test CA issuing server and client certificates. Keys are generated at run time.

Holds no tests itself (pytest collects nothing from it)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.sigilproc import SigilProcess

ISSUER = "https://issuer.test"
AUDIENCE = "sigil.test"
PASSWORD_FOR_TESTS = "correct horse battery staple"
BOUND = 20.0  # longest wait for anything to happen (never asserted as a time)


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file made by ``htpasswd -B`` (apache2-utils), one bcrypt entry per user."""
    path.unlink(missing_ok=True)
    for number, (user, password) in enumerate(users.items()):
        flags = "-cbB" if number == 0 else "-bB"
        subprocess.run(["htpasswd", flags, "-C", "5", str(path), user, password], check=True,
                       capture_output=True, timeout=30)
    return path


def basic(user: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class SigningKey:
    """An EC P-256 key pair with a key id."""

    kid: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
            self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "ES256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class TokenIssuer:
    """Stands for the external token issuer: signs registry JWTs and serves ``GET /token``
    (docker token-auth spec) to clients that present Basic credentials it knows.

    ``acl`` maps users to the repository names they may pull ("*" for any); the issuer
    grants the requested ``scope`` values the ACL allows, as docker_auth does."""

    def __init__(self, users: dict[str, str] | None = None,
                 acl: dict[str, set[str]] | None = None, *, lifetime: int = 300) -> None:
        self.key = SigningKey("test-key-1")
        self.users = users or {}
        self.acl = acl or {}
        self.lifetime = lifetime
        self.requests: list[dict[str, Any]] = []  # service, scopes, account, user per request
        self.issued: list[str] = []  # every token handed out (to check none is logged)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def write_jwks(self, path: Path, extra: Iterable[SigningKey] = ()) -> Path:
        keys = [self.key.jwk(), *(k.jwk() for k in extra)]
        path.write_text(json.dumps({"keys": keys}))
        return path

    def token(self, access: list[dict[str, Any]] | None = None, *, sub: str = "alice",
              iss: str = ISSUER, aud: str | list[str] = AUDIENCE, exp: float | None = None,
              nbf: float | None = None, key: SigningKey | None = None,
              headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed JWT (by default: valid, 5 minutes)."""
        signer = key or self.key
        now = time.time()
        payload: dict[str, Any] = {"iss": iss, "aud": aud, "sub": sub, "iat": int(now),
                                   "exp": int(exp if exp is not None else now + self.lifetime),
                                   "access": access if access is not None else [], **claims}
        if nbf is not None:
            payload["nbf"] = int(nbf)
        return jwt.encode(payload, signer.private, algorithm="ES256",
                          headers={"kid": signer.kid, **(headers or {})})

    @staticmethod
    def pull(*names: str) -> list[dict[str, Any]]:
        """The ``access`` claim granting pull on ``names``."""
        return [{"type": "repository", "name": n, "actions": ["pull"]} for n in names]

    # -- the HTTP endpoint
    async def _token(self, request: web.Request) -> web.Response:
        user = None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            decoded = base64.b64decode(header[6:]).decode()
            name, _, password = decoded.partition(":")
            if self.users.get(name) != password:
                return web.json_response({"details": "wrong credentials"}, status=401)
            user = name
        scopes = [s for value in request.query.getall("scope", []) for s in value.split(" ")]
        self.requests.append({"service": request.query.get("service"), "scopes": scopes,
                              "account": request.query.get("account"), "user": user})
        allowed = self.acl.get(user or "", set())
        granted = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and "pull" in actions.split(",") and (
                    "*" in allowed or name in allowed):
                granted.append({"type": "repository", "name": name, "actions": ["pull"]})
        token = self.token(granted, sub=user or "anonymous",
                           aud=request.query.get("service") or AUDIENCE)
        self.issued.append(token)
        return web.json_response({"token": token, "access_token": token,
                                  "expires_in": self.lifetime,
                                  "issued_at": datetime.datetime.now(datetime.UTC).isoformat()})

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def start(self) -> TokenIssuer:
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def auth_config(self, jwks: Path, **extra: Any) -> dict[str, Any]:
        """``server.auth`` for sigil trusting this issuer."""
        return {"type": "token", "token": {"issuer": ISSUER, "audience": AUDIENCE,
                                           "jwks": str(jwks), "realm_url": self.realm,
                                           **extra}}


class TestCA:
    """A CA that issues server certificates for 127.0.0.1 and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "sigil test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, common_name: str = "127.0.0.1", *, client: bool = False
              ) -> tuple[Path, Path, int]:
        """Write ``<stem>.crt`` (the certificate, then the CA: a chain a server sends whole and
        a client can use as its CA file) and ``<stem>.key``; returns (cert, key, serial)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(serial)
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path, serial


# ------------------------------------------------------------------------ TLS clients
def client_context(ca: TestCA, *, cert: tuple[Path, Path] | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca``, with a client certificate and a TLS version cap."""
    context = ssl.create_default_context(cafile=str(ca.path))
    if cert is not None:
        context.load_cert_chain(*cert)
    if max_version is not None:
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = max_version
        # Let this client offer old versions, so that a refusal is the server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def replace_pair(ca: TestCA, files: dict[str, Any], stem: str) -> int:
    """Issue a new certificate and key and move them over the served files."""
    cert, key, serial = ca.issue(stem)
    cert.replace(files["cert"])
    key.replace(files["key"])
    return serial


def https_serial(process: SigilProcess, ca: TestCA) -> int:
    """The serial of the certificate a new connection to ``process`` is shown."""
    with socket.create_connection(("127.0.0.1", process.port), timeout=BOUND) as sock, \
            client_context(ca).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def wait_for(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until true, at most BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


