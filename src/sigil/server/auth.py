"""Client authentication: who may pull through the mirror (``server.auth``).

Two verifiers, as CNCF distribution has them:

- ``htpasswd``: HTTP Basic against bcrypt entries written by ``htpasswd -B`` (``$2y$``; also
  ``$2a$``/``$2b$``). Any other hash refuses start-up with the file and line. An authenticated
  user may pull every repository (distribution's htpasswd auth has no ACL either).
- ``token``: Bearer JWTs from an external issuer (docker token-auth spec), checked for
  signature (JWKS or PEM keys; public-key algorithms only), ``exp``/``nbf``, ``iss``, ``aud``
  and the ``access`` claim: a request for repository ``<name>`` needs an entry
  ``{"type": "repository", "name": "<name>", "actions": [.., "pull", ..]}``.

The scope name is the repository name as the client sent it (what distribution uses): the
path name, e.g. ``library/nginx`` or, with a path prefix, ``ghcr.io/org/app``. A request routed
by ``?ns=<registry>`` (containerd) needs ``<registry>/<name>``, the same name as the path-prefix
form, so one token name means one upstream repository whichever way a client routes; the
challenge carries that scope and containerd asks the issuer for it.

bcrypt is deliberately slow, so verified credentials are cached (bounded, keyed by a hash of
the ``Authorization`` header, never the header itself) for ``cache_ttl``, tokens until
``min(exp, cache_ttl)``. Failed attempts are counted per client address; past
``max_failures`` in ``failure_window`` the address gets ``429 TOOMANYREQUESTS`` with
``Retry-After`` for the rest of the window (a credential already verified keeps working).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sigil import metrics
from sigil.config import AuthConfig, TokenAuthConfig
from sigil.errors import ConfigError, TooManyRequests, Unauthorized
from sigil.logs import get_logger
from sigil.singleflight import SingleFlight

log = get_logger("sigil.auth")

# The repository a /v2/ request addresses (the rest is checked by the routes).
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|referrers|tags)/")
_SCOPE_SAFE = re.compile(r"[A-Za-z0-9._:/-]{1,512}")
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
# bcrypt reads at most 72 bytes of a password (htpasswd -B hashes the first 72).
_BCRYPT_MAX = 72
# Clients tracked by the failure limiter (bounded: the oldest entry goes first).
FAILURE_TABLE_MAX = 65536
# Longest Authorization header looked at (a JWT with a few hundred access entries fits).
MAX_HEADER = 16384
# Most keys tried for a token without a ``kid``.
MAX_KEYS_TRIED = 16
_ALGORITHMS_BY_KEY: dict[type, frozenset[str]] = {
    rsa.RSAPublicKey: frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ec.EllipticCurvePublicKey: frozenset({"ES256", "ES384", "ES512"}),
    ed25519.Ed25519PublicKey: frozenset({"EdDSA"}),
    ed448.Ed448PublicKey: frozenset({"EdDSA"}),
}


class AuthFailure(Exception):
    """A credential was refused; ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified credential belongs to and what it may pull.

    ``repositories`` is None for "every repository" (htpasswd users, client certificates)."""

    subject: str
    method: str                                # basic | token | certificate
    repositories: frozenset[str] | None
    expires: float                             # monotonic deadline of the cache entry

    def may_pull(self, name: str) -> bool:
        return self.repositories is None or name in self.repositories


# --------------------------------------------------------------------------- htpasswd
def load_htpasswd(path: str, *, config_file: str = "") -> dict[str, bytes]:
    """Parse an htpasswd file of bcrypt entries (``user:$2y$..``); blank and ``#`` lines are
    skipped. Any other entry is a :class:`ConfigError` with the file and the line number."""
    where = f" (server.auth.htpasswd in {config_file})" if config_file else ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read htpasswd file{where}: {problem or exc}",
                          file=path) from exc
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"expected user:bcrypt-hash{where}", file=path,
                              key=f"line {number}")
        if not _BCRYPT.match(hashed):
            # Never echo the hash: MD5/SHA1/crypt entries are as sensitive as bcrypt ones.
            raise ConfigError(f"the entry for {user!r} is not a bcrypt hash; sigil accepts "
                              f"only bcrypt (write entries with htpasswd -B){where}",
                              file=path, key=f"line {number}")
        if user in users:
            raise ConfigError(f"user {user!r} is listed twice{where}", file=path,
                              key=f"line {number}")
        users[user] = hashed.encode("ascii")
    return users


class HtpasswdVerifier:
    """HTTP Basic against an htpasswd file of bcrypt entries."""

    scheme = "Basic"

    def __init__(self, config: AuthConfig, *, config_file: str = "") -> None:
        self._path = config.htpasswd
        self._config_file = config_file
        self._challenge = f'Basic realm="{config.realm}"'
        self._users, self._dummy = self._load()

    def _load(self) -> tuple[dict[str, bytes], bytes]:
        users = load_htpasswd(self._path, config_file=self._config_file)
        # A hash checked for unknown users, at the file's own cost, so that "no such user"
        # takes as long as "wrong password" (no probing for user names by timing).
        cost = max((int(h[4:6]) for h in users.values()), default=5)
        return users, bcrypt.hashpw(b"sigil-no-such-user", bcrypt.gensalt(max(4, cost)))

    def reload(self) -> None:
        """Read the file again (SIGHUP); raises ConfigError and keeps the old users."""
        self._users, self._dummy = self._load()

    def challenge(self, scope_name: str | None, error: str | None = None) -> str:
        return self._challenge

    def credential(self, header: str) -> tuple[str, str]:
        """(user, password) from a Basic header; AuthFailure on anything malformed."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            raise AuthFailure("wrong_scheme", "expected Basic credentials")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise AuthFailure("malformed", "malformed Basic credentials") from exc
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise AuthFailure("malformed", "malformed Basic credentials")
        return user, password

    def verify(self, header: str, now: float, ttl: float) -> Principal:
        """Check the password (slow: bcrypt; run in a thread)."""
        user, password = self.credential(header)
        hashed = self._users.get(user)
        secret = password.encode("utf-8")[:_BCRYPT_MAX]
        if hashed is None:
            bcrypt.checkpw(secret, self._dummy)  # same cost as a wrong password
            raise AuthFailure("unknown_user", f"unknown user {user!r}")
        try:
            matched = bcrypt.checkpw(secret, hashed)
        except ValueError as exc:  # a hash bcrypt cannot use (checked at load; be safe)
            raise AuthFailure("wrong_password", "password does not match") from exc
        if not matched:
            raise AuthFailure("wrong_password", f"wrong password for {user!r}")
        return Principal(user, "basic", None, now + ttl)


# --------------------------------------------------------------------------- tokens
def libtrust_key_id(key: Any) -> str:
    """The ``kid`` docker's libtrust (and docker_auth, distribution) gives a public key:
    base32 of the first 240 bits of SHA-256 over the DER SubjectPublicKeyInfo, in groups of 4."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def _load_pem_keys(path: str) -> list[Any]:
    data = Path(path).read_bytes()
    keys: list[Any] = []
    for match in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", data, re.S):
        pem, label = match.group(0), match.group(1)
        if label == b"CERTIFICATE":
            keys.append(x509.load_pem_x509_certificate(pem).public_key())
        elif label == b"PUBLIC KEY":
            keys.append(serialization.load_pem_public_key(pem))
        elif b"PRIVATE" in label:
            raise ValueError("holds a private key; give the issuer's public key or certificate")
    if not keys:
        raise ValueError("holds no PEM public key or certificate")
    return keys


def _key_algorithms(key: Any) -> frozenset[str]:
    for kind, names in _ALGORITHMS_BY_KEY.items():
        if isinstance(key, kind):
            return names
    raise ValueError(f"unsupported key type {type(key).__name__}")


def load_token_keys(config: TokenAuthConfig, *, config_file: str = "") -> dict[str, Any]:
    """The issuer's public keys by ``kid`` (JWKS ``kid``, or the libtrust id of PEM keys)."""
    keys: dict[str, Any] = {}
    if config.jwks:
        try:
            jwks = jwt.PyJWKSet.from_json(Path(config.jwks).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, jwt.PyJWTError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load JWKS {config.jwks}: {exc}", file=config_file,
                              key="server.auth.token.jwks") from exc
        for index, jwk in enumerate(jwks.keys):
            if isinstance(jwk.key, (bytes, str)) or not hasattr(jwk.key, "public_bytes"):
                raise ConfigError(f"key {index} of {config.jwks} is not a public key "
                                  "(shared-secret keys are refused)", file=config_file,
                                  key="server.auth.token.jwks")
            public = jwk.key.public_key() if hasattr(jwk.key, "private_bytes") else jwk.key
            keys[jwk.key_id or libtrust_key_id(public)] = public
    for path in config.pem:
        try:
            found = _load_pem_keys(path)
            for key in found:
                _key_algorithms(key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load {path}: {getattr(exc, 'strerror', None) or exc}",
                              file=config_file, key="server.auth.token.pem") from exc
        for key in found:
            keys[libtrust_key_id(key)] = key
    if not keys:
        raise ConfigError("no public keys found", file=config_file, key="server.auth.token")
    return keys


def _pull_grants(access: Any) -> frozenset[str]:
    """Repository names the ``access`` claim grants ``pull`` on; AuthFailure if malformed."""
    if access is None:
        return frozenset()
    if not isinstance(access, list):
        raise AuthFailure("invalid_token", "access claim is not a list")
    names = set()
    for entry in access:
        if not isinstance(entry, dict):
            raise AuthFailure("invalid_token", "access entry is not an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if (not isinstance(kind, str) or not isinstance(name, str) or not isinstance(actions, list)
                or not all(isinstance(a, str) for a in actions)):
            raise AuthFailure("invalid_token", "access entry needs type, name and actions")
        if kind == "repository" and ("pull" in actions or "*" in actions):
            names.add(name)
    return frozenset(names)


_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidSignatureError, "bad_signature"),
)


class TokenVerifier:
    """Bearer JWTs from an external issuer."""

    scheme = "Bearer"

    def __init__(self, config: AuthConfig, *, config_file: str = "") -> None:
        token = config.token
        assert token.issuer and token.audience and token.realm_url
        self._config = token
        self._config_file = config_file
        self._keys = load_token_keys(token, config_file=config_file)
        self._allowed = frozenset(token.algorithms)
        self._base = (f'Bearer realm="{token.realm_url}",'
                      f'service="{token.service or token.audience}"')

    def reload(self) -> None:
        """Read the key files again (issuer key rotation, SIGHUP)."""
        self._keys = load_token_keys(self._config, config_file=self._config_file)

    def challenge(self, scope_name: str | None, error: str | None = None) -> str:
        text = self._base
        if scope_name is not None:
            text += f',scope="repository:{scope_name}:pull"'
        if error:
            text += f',error="{error}"'
        return text

    def _candidates(self, header: Mapping[str, Any]) -> Iterable[Any]:
        kid = header.get("kid")
        if kid is not None:
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthFailure("bad_signature", "token signed by an unknown key")
            return (key,)
        return list(self._keys.values())[:MAX_KEYS_TRIED]

    def verify(self, header: str, now: float, ttl: float) -> Principal:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthFailure("wrong_scheme", "expected a Bearer token")
        token = value.strip()
        try:
            unverified = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthFailure("malformed", "malformed token") from exc
        alg = unverified.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise AuthFailure("invalid_token", f"token algorithm {str(alg)[:20]!r} not allowed")
        claims: dict[str, Any] | None = None
        failure: AuthFailure | None = None
        for key in self._candidates(unverified):
            if alg not in _key_algorithms(key):
                failure = AuthFailure("bad_signature", "token algorithm does not fit the key")
                continue
            try:
                claims = jwt.decode(
                    token, key, algorithms=[alg], audience=self._config.audience,
                    issuer=self._config.issuer, leeway=self._config.leeway,
                    options={"require": ["exp", "iss", "aud"]})
                break
            except jwt.InvalidSignatureError:
                failure = AuthFailure("bad_signature", "token signature does not verify")
            except jwt.PyJWTError as exc:
                reason = next((r for kind, r in _JWT_REASONS if isinstance(exc, kind)),
                              "invalid_token")
                raise AuthFailure(reason, f"token refused: {exc}") from exc
        if claims is None:
            raise failure or AuthFailure("bad_signature", "no key verifies the token")
        grants = _pull_grants(claims.get("access"))
        subject = claims.get("sub")
        # Monotonic deadline: the cache entry ends with the token (exp is wall clock).
        left = float(claims["exp"]) - time.time()
        return Principal(str(subject) if subject is not None else "", "token", grants,
                         now + max(0.0, min(ttl, left)))


Verifier = HtpasswdVerifier | TokenVerifier


def load_verifier(config: AuthConfig, *, config_file: str = "") -> Verifier | None:
    """The verifier ``server.auth`` asks for (None for ``type: none``); ConfigError if its
    files are unusable."""
    if config.type == "htpasswd":
        return HtpasswdVerifier(config, config_file=config_file)
    if config.type == "token":
        return TokenVerifier(config, config_file=config_file)
    return None


# --------------------------------------------------------------------------- limiter
class FailureLimiter:
    """Failed attempts per client address in a fixed window; bounded table."""

    def __init__(self, max_failures: int, window: float, size: int = FAILURE_TABLE_MAX) -> None:
        self.max_failures = max_failures
        self.window = window
        self.size = size
        self._table: OrderedDict[str, list[float]] = OrderedDict()  # addr -> [start, count]

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None when it is not blocked."""
        entry = self._table.get(address)
        if entry is None:
            return None
        start, count = entry
        if now - start >= self.window:
            del self._table[address]
            return None
        if count < self.max_failures:
            return None
        return self.window - (now - start)

    def failed(self, address: str, now: float) -> bool:
        """Record a failure; True when this one reached the limit."""
        entry = self._table.get(address)
        if entry is None or now - entry[0] >= self.window:
            self._table.pop(address, None)
            if len(self._table) >= self.size:
                self._table.popitem(last=False)
            entry = self._table[address] = [now, 0]
        entry[1] += 1
        return entry[1] == self.max_failures


# --------------------------------------------------------------------------- the gate
def scope_name(request: web.Request) -> str | None:
    """The repository name a token must grant for this request (see the module doc)."""
    match = _REPO_PATH.match(request.path)
    if match is None:
        return None
    name = match["name"]
    ns = request.query.get("ns")
    if ns and not name.startswith(f"{ns}/"):
        name = f"{ns}/{name}"
    # The name goes into a quoted header parameter: anything outside the characters of
    # registry hosts and repository names (a quote, CR/LF from %0d%0a) gets no scope at all;
    # the route answers NAME_INVALID for it after authentication.
    return name if _SCOPE_SAFE.fullmatch(name) else None


class ClientAuth:
    """The per-process gate: verifier, credential cache, failure limiter, metrics."""

    def __init__(self, config: AuthConfig, verifier: Verifier | None,
                 client_certificates: bool = False) -> None:
        self.config = config
        self.verifier = verifier
        # A verified TLS client certificate authenticates the request (client_auth optional).
        self.client_certificates = client_certificates
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self.limiter = FailureLimiter(config.max_failures, config.failure_window)
        self._flights: SingleFlight[Principal] = SingleFlight()

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def reload_files(self) -> None:
        """Re-read htpasswd / keys (SIGHUP; may run in a thread); on a bad file raise
        ConfigError and keep the old ones."""
        if self.verifier is not None:
            self.verifier.reload()

    def forget(self) -> None:
        """Drop every cached credential (in the event loop's thread)."""
        self._cache.clear()

    def protects(self, path: str) -> bool:
        """Whether ``path`` needs credentials: every /v2/ route; /metrics if configured;
        never the health endpoints."""
        if path.startswith("/v2"):
            return True
        return path == "/metrics" and self.config.protect_metrics

    def _unauthorized(self, message: str, name: str | None,
                      error: str | None = None) -> Unauthorized:
        assert self.verifier is not None
        detail = ([{"Type": "repository", "Name": name, "Action": "pull"}]
                  if name is not None else None)
        return Unauthorized(message, detail=detail, headers={
            "WWW-Authenticate": self.verifier.challenge(name, error)})

    async def check(self, request: web.Request) -> Principal | None:
        """Let the request through (returns who it is) or raise 401/429."""
        verifier = self.verifier
        if verifier is None:
            return None
        if self.client_certificates and request.transport is not None:
            peer = request.transport.get_extra_info("peercert")
            if peer:
                return _certificate_principal(peer)
        header = request.headers.get("Authorization")
        if not header:
            raise self._unauthorized("authentication required", scope_name(request))
        now = time.monotonic()
        key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        principal = self._cache.get(key)
        if principal is not None and principal.expires <= now:
            del self._cache[key]
            principal = None
        if principal is None:
            principal = await self._verify(request, verifier, header, key, now)
        if principal.repositories is None:  # htpasswd users and certificates pull anything
            return principal
        name = scope_name(request)
        if name is not None and not principal.may_pull(name):
            metrics.AUTH_FAILURES.labels("insufficient_scope").inc()
            log.warning("auth.denied", reason="insufficient_scope", subject=principal.subject,
                        repository=name, remote=request.remote)
            raise self._unauthorized(f"the token does not grant pull on {name}", name,
                                     "insufficient_scope")
        return principal

    async def _verify(self, request: web.Request, verifier: Verifier, header: str, key: bytes,
                      now: float) -> Principal:
        address = request.remote or "unknown"
        retry = self.limiter.retry_after(address, now)
        if retry is not None:
            metrics.AUTH_RATE_LIMITED.inc()
            raise TooManyRequests("too many failed authentication attempts",
                                  headers={"Retry-After": str(max(1, round(retry + 0.5)))})
        ttl = self.config.cache_ttl
        try:
            if len(header) > MAX_HEADER:
                raise AuthFailure("malformed", "Authorization header too long")
            if isinstance(verifier, HtpasswdVerifier):
                verifier.credential(header)  # malformed headers fail before any thread hop
                principal = await self._flights.do(
                    key, lambda: asyncio.to_thread(verifier.verify, header, now, ttl))
            else:
                principal = verifier.verify(header, now, ttl)
        except AuthFailure as failure:
            metrics.AUTH_FAILURES.labels(failure.reason).inc()
            if self.limiter.failed(address, now):
                log.warning("auth.rate_limited", remote=address,
                            failures=self.limiter.max_failures,
                            window_s=self.limiter.window)
            log.warning("auth.failed", reason=failure.reason, remote=address,
                        detail=str(failure)[:200])
            error = "invalid_token" if isinstance(verifier, TokenVerifier) else None
            raise self._unauthorized("authentication failed", scope_name(request),
                                     error) from None
        if self.config.cache_size:
            if len(self._cache) >= self.config.cache_size:
                self._cache.popitem(last=False)
            self._cache[key] = principal
        return principal


def _certificate_principal(peer: Mapping[str, Any]) -> Principal:
    subject = peer.get("subject") or ()
    names = [value for rdn in subject for (field_name, value) in rdn
             if field_name == "commonName"]
    return Principal(names[0] if names else json.dumps(subject)[:200], "certificate", None,
                     float("inf"))


AUTH = web.AppKey("client_auth", ClientAuth)


def build_client_auth(config: AuthConfig, *, config_file: str = "",
                      client_certificates: bool = False) -> ClientAuth | None:
    """The gate for ``server.auth`` (None when nothing needs checking per request)."""
    verifier = load_verifier(config, config_file=config_file)
    if verifier is None:
        return None
    return ClientAuth(config, verifier, client_certificates)
