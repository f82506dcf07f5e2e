"""Authentication to upstream registries.

Registries answer an unauthenticated request with ``401`` and a ``WWW-Authenticate`` challenge
(RFC 7235 syntax). Two schemes matter:

- ``Bearer realm="...",service="...",scope="..."`` (the distribution token protocol, RFC 6750
  challenge syntax): sigil asks the realm for a token with ``service`` and
  ``scope=repository:<repo>:pull``, sending Basic credentials to the realm when it has any, and
  caches the token per (realm, service, scope) until shortly before it expires.
- ``Basic realm="..."``: sigil sends the credentials with every request.

Once an upstream has challenged, later requests authenticate up front, so a warm client makes
one request per call instead of two. Credentials and tokens are never logged or put in error
messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from sigil.config import Credentials, UpstreamConfig
from sigil.errors import ConfigError, Denied, Unauthorized, UpstreamError
from sigil.logs import get_logger

log = get_logger("sigil.upstream.auth")

#: Lifetime assumed when the token response has no ``expires_in`` (distribution token spec).
DEFAULT_TOKEN_SECONDS = 60.0
#: Tokens claiming a longer life are still refreshed after this long.
MAX_TOKEN_SECONDS = 24 * 3600.0
#: Token endpoint answers larger than this are refused (a token is a few KiB at most).
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
#: Cached tokens kept per upstream (one per repository scope); least recently used go first.
MAX_CACHED_TOKENS = 1024

# RFC 7230 tchar.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = frozenset("-._~+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


# ------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge. ``scheme`` and parameter names are lower-case."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges (RFC 7235 section 4.1).

    Handles several challenges in one value, quoted strings containing commas and escaped
    quotes, unquoted parameter values, and token68 credentials. Malformed trailing input ends
    the parse; what was understood so far is returned.
    """
    out: list[Challenge] = []
    pos, n = 0, len(value)
    scheme: str | None = None
    params: dict[str, str] = {}
    token68: str | None = None

    def flush() -> None:
        if scheme is not None:
            out.append(Challenge(scheme.lower(), dict(params), token68))

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < n and value[pos] in chars:
            pos += 1

    def read_token() -> str:
        nonlocal pos
        start = pos
        while pos < n and value[pos] in _TCHAR:
            pos += 1
        return value[start:pos]

    while pos < n:
        skip(" \t,")
        if pos >= n:
            break
        name = read_token()
        if not name:
            break  # not a token: malformed; keep what we have
        skip(" \t")
        if pos < n and value[pos] == "=" and scheme is not None:
            # auth-param = token BWS "=" BWS ( token / quoted-string )
            pos += 1
            skip(" \t")
            if pos < n and value[pos] == '"':
                pos += 1
                chars: list[str] = []
                while pos < n and value[pos] != '"':
                    if value[pos] == "\\" and pos + 1 < n:
                        pos += 1
                    chars.append(value[pos])
                    pos += 1
                if pos >= n:
                    break  # unterminated quoted string: drop the parameter
                pos += 1
                params[name.lower()] = "".join(chars)
            else:
                # RFC 7235 wants a token here; registries have been seen sending bare URLs,
                # so take everything up to the next comma or space.
                start = pos
                while pos < n and value[pos] not in ", \t":
                    pos += 1
                params[name.lower()] = value[start:pos]
            continue
        # A token not followed by "=" starts a new challenge.
        flush()
        scheme, params, token68 = name, {}, None
        if pos < n and value[pos] not in ",":
            # Either token68 or the first auth-param; token68 is followed by "=" padding only
            # and then a comma or the end.
            start = pos
            while pos < n and value[pos] in _TOKEN68:
                pos += 1
            while pos < n and value[pos] == "=":
                pos += 1
            end = pos
            skip(" \t")
            if end > start and (pos >= n or value[pos] == ",") and (
                    value[end - 1] == "=" or "=" not in value[start:end]):
                token68 = value[start:end]
            else:
                pos = start
    flush()
    return out


# -------------------------------------------------------------------------------- credentials
@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """A username and password. ``repr`` hides the password."""

    username: str
    password: str

    def header(self) -> str:
        """The ``Authorization`` header value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return f"BasicCredentials(username={self.username!r}, password='***')"


def _normalise_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000`` stays as is."""
    key = key.strip()
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


# Docker stores Docker Hub credentials under https://index.docker.io/v1/, whatever the
# registry endpoint is called.
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io",
                               "registry.hub.docker.com"})


def upstream_hosts(config: UpstreamConfig) -> list[str]:
    """Host names under which a docker ``config.json`` may hold this upstream's credentials."""
    hosts = [_normalise_host(config.url), config.name.lower()]
    if any(h in _DOCKER_HUB_HOSTS for h in hosts):
        hosts += ["index.docker.io", "docker.io", "registry-1.docker.io"]
    return list(dict.fromkeys(hosts))


def load_docker_config(path: str | Path, hosts: Iterable[str]) -> BasicCredentials | None:
    """Credentials for the first of ``hosts`` found in a docker ``config.json``'s ``auths``.

    An entry holds either ``auth`` (base64 of ``user:password``) or ``username`` and
    ``password``. Credential helpers (``credsStore``, ``credHelpers``) and ``identitytoken``
    are not supported. A missing or unreadable file raises :class:`ConfigError`; a file without
    the host returns None (anonymous access).
    """
    file = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read docker config: {exc.strerror or exc}", file=file) from exc
    except ValueError as exc:
        raise ConfigError("docker config is not valid JSON", file=file) from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    by_host: dict[str, Any] = {}
    for key, entry in auths.items():
        if isinstance(key, str):
            by_host.setdefault(_normalise_host(key), entry)
    for host in hosts:
        entry = by_host.get(host.lower())
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as exc:
                # Never echo the value: it is the secret.
                raise ConfigError(f"auths[{host}].auth is not base64 of user:password",
                                  file=file) from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ConfigError(f"auths[{host}].auth is not base64 of user:password",
                                  file=file)
            return BasicCredentials(user, password)
        name, secret = entry.get("username"), entry.get("password")
        if isinstance(name, str) and isinstance(secret, str) and name:
            return BasicCredentials(name, secret)
    return None


def resolve_credentials(config: UpstreamConfig) -> BasicCredentials | None:
    """The credentials for ``config``: explicit username/password, else its docker config."""
    creds: Credentials = config.credentials
    if creds.username is not None and creds.password is not None:
        return BasicCredentials(creds.username, creds.password)
    if creds.docker_config:
        found = load_docker_config(creds.docker_config, upstream_hosts(config))
        if found is None:
            log.info("upstream.credentials_not_found", upstream=config.name,
                     docker_config=creds.docker_config)
        return found
    return None


# ----------------------------------------------------------------------------- authenticator
#: ``fetch(url, headers) -> (status, body)``: one GET to a token realm, with the client's
#: retries; raises sigil errors only.
TokenFetch = Callable[[URL, dict[str, str]], Awaitable[tuple[int, bytes]]]


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Per-upstream authentication state: the last challenge and a bounded token cache.

    The client calls :meth:`authorization` before each request and :meth:`on_unauthorized`
    when the upstream answers 401; the latter returns the header to retry with, or None when
    sigil cannot do better (the client then raises :class:`Unauthorized`).
    """

    def __init__(self, upstream: str, registry_url: str, credentials: BasicCredentials | None,
                 fetch: TokenFetch, *, clock: Callable[[], float] = time.monotonic,
                 max_cached: int = MAX_CACHED_TOKENS) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self._registry_scheme = URL(registry_url).scheme
        self._fetch = fetch
        self.clock = clock
        self._max_cached = max_cached
        self._bearer: tuple[str, str | None] | None = None  # (realm, service) last challenged
        self._basic = False
        self._tokens: OrderedDict[tuple[str, str | None, str], _Token] = OrderedDict()
        self._pending: dict[tuple[str, str | None, str], asyncio.Task[_Token]] = {}

    @staticmethod
    def scope(repo: str) -> str:
        """The token scope sigil asks for: pull access to one repository."""
        return f"repository:{repo}:pull"

    async def authorization(self, repo: str) -> str | None:
        """The ``Authorization`` value to send up front for ``repo``, if the upstream is known
        to want one (it challenged before)."""
        if self._bearer is not None:
            realm, service = self._bearer
            token = await self._token((realm, service, self.scope(repo)))
            return f"Bearer {token.value}"
        if self._basic and self.credentials is not None:
            return self.credentials.header()
        return None

    async def on_unauthorized(self, challenges: Iterable[str], repo: str,
                              sent: str | None) -> str | None:
        """Answer a 401: parse its challenges and return the header to retry with.

        ``sent`` is the ``Authorization`` value of the refused request. A token that was
        refused is dropped from the cache so a fresh one is fetched; credentials that were
        refused are not sent again (None is returned).
        """
        parsed = [c for value in challenges for c in parse_www_authenticate(value)]
        bearer = next((c for c in parsed if c.scheme == "bearer" and c.params.get("realm")),
                      None)
        if bearer is not None:
            realm = bearer.params["realm"]
            service = bearer.params.get("service") or None
            self._bearer, self._basic = (realm, service), False
            key = (realm, service, self.scope(repo))
            cached = self._tokens.get(key)
            if cached is not None and sent == f"Bearer {cached.value}":
                del self._tokens[key]  # refused (revoked or expired early): fetch a new one
            token = await self._token(key)
            header = f"Bearer {token.value}"
            return None if header == sent else header
        if any(c.scheme == "basic" for c in parsed):
            self._bearer, self._basic = None, True
            if self.credentials is None:
                return None
            header = self.credentials.header()
            return None if header == sent else header
        return None

    async def _token(self, key: tuple[str, str | None, str]) -> _Token:
        cached = self._tokens.get(key)
        if cached is not None and cached.expires_at > self.clock():
            self._tokens.move_to_end(key)
            return cached
        task = self._pending.get(key)
        if task is None:
            # The fetch runs as its own task shared by every caller wanting this scope, so N
            # concurrent requests make one token request, and one caller being cancelled does
            # not cancel the others' token.
            task = asyncio.get_running_loop().create_task(self._fetch_token(key),
                                                          name=f"token {self.upstream}")
            self._pending[key] = task
            task.add_done_callback(functools.partial(self._fetched, key))
        return await asyncio.shield(task)

    def _fetched(self, key: tuple[str, str | None, str], task: asyncio.Task[_Token]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if task.cancelled():
            return
        # Retrieve the exception even if every waiter was cancelled (no "never retrieved").
        if task.exception() is None:
            self._tokens[key] = task.result()
            self._tokens.move_to_end(key)
            while len(self._tokens) > self._max_cached:
                self._tokens.popitem(last=False)

    async def _fetch_token(self, key: tuple[str, str | None, str]) -> _Token:
        realm, service, scope = key
        try:
            url = URL(realm)
        except ValueError as exc:
            raise UpstreamError(f"upstream {self.upstream}: invalid token realm") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise UpstreamError(f"upstream {self.upstream}: token realm is not an http(s) URL")
        query = {"scope": scope}
        if service:
            query = {"service": service, **query}
        url = url.update_query(query)
        headers: dict[str, str] = {}
        if self.credentials is not None:
            if url.scheme == "http" and self._registry_scheme == "https":
                # An https registry pointing at a plain-http realm would expose the password.
                log.warning("upstream.token_realm_insecure", upstream=self.upstream,
                            realm_host=url.host)
            else:
                headers["Authorization"] = self.credentials.header()
        status, body = await self._fetch(url, headers)
        if status in (401, 403):
            cls = Unauthorized if status == 401 else Denied
            who = "the configured credentials" if self.credentials else "anonymous access"
            raise cls(f"upstream {self.upstream}: token service refused {who}")
        if not 200 <= status < 300:
            raise UpstreamError(f"upstream {self.upstream}: token service answered {status}")
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise UpstreamError(f"upstream {self.upstream}: token response is not JSON") from exc
        token = None
        if isinstance(obj, dict):
            token = obj.get("token") or obj.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"upstream {self.upstream}: token response has no token")
        expires_in = obj.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                or expires_in <= 0:
            expires_in = DEFAULT_TOKEN_SECONDS
        lifetime = min(float(expires_in), MAX_TOKEN_SECONDS)
        # Refresh before the upstream's own expiry: a request in flight must not carry a
        # token that expires on the way. A fifth of the lifetime, at most 30 s.
        margin = min(30.0, lifetime / 5)
        log.debug("upstream.token", upstream=self.upstream, realm_host=url.host,
                  service=service, scope=scope, expires_in=lifetime)
        return _Token(token, self.clock() + lifetime - margin)

    async def close(self) -> None:
        """Cancel token fetches still running (client shutdown)."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()
