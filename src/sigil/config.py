"""Typed, validated configuration. The only module that reads ``os.environ``.

``load_config(path)`` reads the YAML main config, applies ``SIGIL_<SECTION>_<KEY>`` environment
overrides, validates every key and returns a frozen :class:`Config`. Any problem raises
:class:`~sigil.errors.ConfigError` naming the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sigil.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
               "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
               "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}
_UPSTREAM_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:\d+)?$")


def parse_duration(value: Any, *, file: str, key: str) -> float:
    """Parse ``30s``, ``5m``, ``24h``, ``1d``, ``250ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration, got {value!r}", file=file, key=key)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(f"expected a duration like 30s, 5m or 24h, got {value!r}",
                              file=file, key=key)
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError("duration must not be negative", file=file, key=key)
    return seconds


def parse_size(value: Any, *, file: str, key: str) -> int:
    """Parse ``100GiB``, ``512MB``, ``1024`` (bytes)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size, got {value!r}", file=file, key=key)
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"expected a size like 512MiB or 100GiB, got {value!r}",
                              file=file, key=key)
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ConfigError("size must be positive", file=file, key=key)
    return size


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to an upstream. Secrets are resolved at load time, never logged."""

    username: str | None = None
    password: str | None = None
    docker_config: str | None = None  # path of a docker config.json to look the host up in

    def __repr__(self) -> str:  # never print secrets
        hidden = "***" if self.password else None
        return f"Credentials(username={self.username!r}, password={hidden})"


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry."""

    name: str                       # registry host as clients name it, e.g. docker.io
    url: str                        # base URL, e.g. https://registry-1.docker.io
    default: bool = False
    aliases: tuple[str, ...] = ()
    credentials: Credentials = field(default_factory=Credentials)
    ca_bundle: str | None = None
    tls_verify: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0      # max silence between bytes
    retries: int = 3
    tag_ttl: float = 300.0
    max_stale: float = 86400.0
    # Repository where signatures/attestations live if not beside the image (DHI mirrors).
    signature_repository: str | None = None


@dataclass(frozen=True)
class TokenAuthConfig:
    """``server.auth.token``: Bearer JWTs from an external issuer (docker token-auth spec)."""

    issuer: str | None = None       # required ``iss``
    audience: str | None = None     # required in ``aud``
    jwks: str | None = None         # JWKS file of the issuer's public keys
    pem: tuple[str, ...] = ()       # or PEM files (public keys or certificates)
    realm_url: str | None = None    # where clients get tokens (challenge ``realm``)
    service: str | None = None      # challenge ``service``; defaults to the audience
    leeway: float = 30.0            # clock skew allowed on exp/nbf/iat
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class AuthConfig:
    """``server.auth``: who may pull. See docs/operations.md, "Authentication and TLS"."""

    type: str = "none"              # none | htpasswd | token
    htpasswd: str = "/etc/sigil/htpasswd"
    realm: str = "sigil"
    token: TokenAuthConfig = field(default_factory=TokenAuthConfig)
    protect_metrics: bool = False
    cache_ttl: float = 60.0         # verified credentials are trusted this long
    cache_size: int = 10000         # entries in the verified-credentials cache
    max_failures: int = 10          # failed attempts per client address per window ...
    failure_window: float = 60.0    # ... before 429 for the rest of the window


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    tls_cert: str | None = None
    tls_key: str | None = None
    workers: int = 1
    # Serve only what the store holds; never open a connection to an upstream (air gap).
    offline: bool = False
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls_client_ca: str | None = None   # PEM CA bundle for client certificates (mTLS)
    tls_client_auth: str = "none"      # none | optional | required
    tls_reload_interval: float = 5.0   # how often cert/key mtimes are checked (0: never)
    # host:port of the internal peer endpoint replicas stream in-flight blobs from (fleet).
    peer_listen: tuple[str, int] | None = None
    # The address other replicas use to reach peer_listen (default: peer_listen itself), and
    # the shared secret peer requests are signed with (never logged, not in repr).
    peer_advertise: tuple[str, int] | None = None
    peer_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class S3Config:
    """``storage.s3``: the bucket of ``storage.backend: s3``. Secrets are resolved at load
    time from env or files and never printed: ``repr`` names only where they came from."""

    bucket: str
    endpoint: str | None = None        # None: AWS's own endpoint for the region
    region: str = "us-east-1"
    prefix: str = ""                   # "" or ending in "/"
    access_key: str | None = field(default=None, repr=False)  # None: default AWS chain
    secret_key: str | None = field(default=None, repr=False)
    # Where the credentials came from (config keys and env variable or file names).
    credential_source: str = "the default AWS credential chain"
    create_bucket: bool = False
    redirect: bool = False             # 307 to a presigned URL for allowed blobs
    redirect_expiry: float = 300.0     # lifetime of those URLs
    part_size: int = 8 * 1024 * 1024   # multipart part size
    upload_concurrency: int = 2        # parts in flight per upload (memory: this + 1 parts)
    max_attempts: int = 5              # tries per S3 request (500/503/SlowDown are retried)
    abandoned_after: float = 86400.0   # pending multipart uploads older than this are aborted
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 32


@dataclass(frozen=True)
class StorageConfig:
    root: str = "/var/lib/sigil"
    max_bytes: int = 100 * 1024**3
    backend: str = "filesystem"        # filesystem | s3
    s3: S3Config | None = None
    # gc deletes a committed object no index row accounts for once it is this old (seconds).
    orphan_grace: float = 24 * 3600.0


@dataclass(frozen=True)
class IndexConfig:
    """``index``: where tags, references, verdicts and leases live."""

    backend: str = "sqlite"            # sqlite (index.sqlite under storage.root) | postgres
    postgres_dsn: str | None = field(default=None, repr=False)  # may hold a password
    dsn_source: str = "index.postgres.dsn"  # the config key (and env variable) it came from
    max_connections: int = 10


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto | json | console


@dataclass(frozen=True)
class Config:
    """The whole validated main configuration."""

    server: ServerConfig
    storage: StorageConfig
    upstreams: tuple[UpstreamConfig, ...]
    policy: str | None
    log: LogConfig
    source: str = "<defaults>"
    index: IndexConfig = field(default_factory=IndexConfig)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.default:
                return upstream
        return None


#: The smallest ``storage.orphan_grace`` accepted (seconds).
MIN_ORPHAN_GRACE = 3600.0

_SECTIONS: dict[str, set[str]] = {
    "server": {"listen", "tls", "workers", "offline", "auth", "peer_listen",
               "peer_advertise", "peer_secret_env", "peer_secret_file"},
    "storage": {"root", "max_bytes", "backend", "s3", "orphan_grace"},
    "log": {"level", "format"},
    "index": {"backend", "postgres"},
}
_TOP = {"server", "storage", "upstreams", "policy", "log", "index"}
_UPSTREAM_KEYS = {"name", "url", "default", "aliases", "credentials", "ca_bundle", "tls_verify",
                  "connect_timeout", "read_timeout", "retries", "tag_ttl", "max_stale",
                  "signature_repository"}


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply ``SIGIL_<SECTION>_<KEY>=value`` overrides (YAML-parsed scalars)."""
    for name, value in env.items():
        if not name.startswith("SIGIL_"):
            continue
        rest = name[len("SIGIL_"):].lower()
        if rest == "policy":
            data["policy"] = value
            continue
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or key not in _SECTIONS[section]:
            continue  # unknown SIGIL_* variables are ignored, like other tools' env prefixes
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"section must be a mapping (override {name})", key=section)
        target[key] = yaml.safe_load(value) if value else value


def _mapping(value: Any, *, file: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", file=file, key=key)
    return value


def _unknown(keys: set[str], allowed: set[str], *, file: str, key: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})",
                          file=file, key=key)


def _str(value: Any, *, file: str, key: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", file=file, key=key)
    return value


def _bool(value: Any, *, file: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", file=file, key=key)
    return value


def _parse_listen(value: Any, *, file: str, key: str = "server.listen") -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {value!r}", file=file, key=key)
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_credentials(value: Any, *, file: str, key: str,
                       env: Mapping[str, str]) -> Credentials:
    data = _mapping(value, file=file, key=key)
    _unknown(set(data), {"username", "password", "username_env", "password_env", "docker_config"},
             file=file, key=key)
    username = data.get("username")
    password = data.get("password")
    for field_name, env_key in (("username", "username_env"), ("password", "password_env")):
        if env_key in data:
            var = _str(data[env_key], file=file, key=f"{key}.{env_key}")
            assert var is not None
            if var not in env:
                raise ConfigError(f"environment variable {var} is not set",
                                  file=file, key=f"{key}.{env_key}")
            if field_name == "username":
                username = env[var]
            else:
                password = env[var]
    if (username is None) != (password is None):
        raise ConfigError("username and password must be given together", file=file, key=key)
    docker_config = _str(data.get("docker_config"), file=file, key=f"{key}.docker_config",
                         optional=True)
    return Credentials(username=username, password=password, docker_config=docker_config)


def _parse_upstream(item: Any, index: int, *, file: str,
                    env: Mapping[str, str]) -> UpstreamConfig:
    key = f"upstreams[{index}]"
    data = _mapping(item, file=file, key=key)
    _unknown(set(data), _UPSTREAM_KEYS, file=file, key=key)
    name = _str(data.get("name"), file=file, key=f"{key}.name")
    assert name is not None
    if not _UPSTREAM_NAME.match(name):
        raise ConfigError(f"invalid registry host name {name!r}", file=file, key=f"{key}.name")
    url = _str(data.get("url"), file=file, key=f"{key}.url")
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected an http(s) URL, got {url!r}", file=file, key=f"{key}.url")
    aliases = data.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError("expected a list of strings", file=file, key=f"{key}.aliases")
    for alias in aliases:
        if "/" in alias or not _UPSTREAM_NAME.match(alias):
            raise ConfigError(f"invalid alias {alias!r}", file=file, key=f"{key}.aliases")
    retries = data.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
        raise ConfigError("expected an integer from 0 to 10", file=file, key=f"{key}.retries")
    ca_bundle = _str(data.get("ca_bundle"), file=file, key=f"{key}.ca_bundle", optional=True)
    if ca_bundle and not Path(ca_bundle).is_file():
        raise ConfigError(f"CA bundle {ca_bundle} does not exist", file=file,
                          key=f"{key}.ca_bundle")

    def duration(k: str, default: float) -> float:
        return parse_duration(data.get(k, default), file=file, key=f"{key}.{k}")

    return UpstreamConfig(
        name=name, url=url.rstrip("/"),
        default=_bool(data.get("default", False), file=file, key=f"{key}.default"),
        aliases=tuple(aliases),
        credentials=_parse_credentials(data.get("credentials"), file=file,
                                       key=f"{key}.credentials", env=env),
        ca_bundle=ca_bundle,
        tls_verify=_bool(data.get("tls_verify", True), file=file, key=f"{key}.tls_verify"),
        connect_timeout=duration("connect_timeout", 10.0),
        read_timeout=duration("read_timeout", 60.0),
        retries=retries,
        tag_ttl=duration("tag_ttl", 300.0),
        max_stale=duration("max_stale", 86400.0),
        signature_repository=_str(data.get("signature_repository"), file=file,
                                  key=f"{key}.signature_repository", optional=True),
    )


# ------------------------------------------------------------ server.auth and server.tls
_AUTH_KEYS = {"type", "htpasswd", "realm", "token", "protect_metrics", "cache_ttl", "cache_size",
              "max_failures", "failure_window"}
_TOKEN_KEYS = {"issuer", "audience", "jwks", "pem", "realm_url", "service", "leeway",
               "algorithms"}
_TOKEN_ALGORITHMS = set(TokenAuthConfig.algorithms)
_S3_KEYS = {"endpoint", "bucket", "region", "prefix", "access_key_env", "secret_key_env",
            "access_key_file", "secret_key_file", "create_bucket", "redirect", "redirect_expiry",
            "part_size", "upload_concurrency", "max_attempts", "abandoned_after"}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _secret(data: dict[str, Any], name: str, default_env: str, *, file: str, key: str,
            env: Mapping[str, str]) -> tuple[str | None, str]:
    """A secret from ``<name>_file`` or the variable ``<name>_env`` names; return it and a
    description of its source (never the value)."""
    file_key, env_key = f"{name}_file", f"{name}_env"
    path = _str(data.get(file_key), file=file, key=f"{key}.{file_key}", optional=True)
    if path is not None:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", file=file,
                              key=f"{key}.{file_key}") from exc
        if not value:
            raise ConfigError(f"{path} is empty", file=file, key=f"{key}.{file_key}")
        return value, f"{key}.{file_key} ({path})"
    var = _str(data.get(env_key, default_env), file=file, key=f"{key}.{env_key}", optional=True)
    if var is None:
        return None, ""
    if not env.get(var):
        raise ConfigError(f"environment variable {var} is not set", file=file,
                          key=f"{key}.{env_key}")
    return env[var], f"{key}.{env_key} ({var})"


def _int_in(value: Any, low: int, high: int, *, file: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"expected an integer from {low} to {high}, got {value!r}",
                          file=file, key=key)
    return value


def _parse_token(value: Any, *, file: str) -> TokenAuthConfig:
    key = "server.auth.token"
    data = _mapping(value, file=file, key=key)
    _unknown(set(data), _TOKEN_KEYS, file=file, key=key)

    def text(name: str) -> str:
        found = _str(data.get(name), file=file, key=f"{key}.{name}", optional=True)
        if found is None:
            raise ConfigError("required when server.auth.type is token", file=file,
                              key=f"{key}.{name}")
        return found

    issuer, audience, realm_url = text("issuer"), text("audience"), text("realm_url")
    parts = urlsplit(realm_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected an http(s) URL, got {realm_url!r}", file=file,
                          key=f"{key}.realm_url")
    jwks = _str(data.get("jwks"), file=file, key=f"{key}.jwks", optional=True)
    pem_value = data.get("pem") or []
    pem = [pem_value] if isinstance(pem_value, str) else pem_value
    if not isinstance(pem, list) or not all(isinstance(p, str) and p for p in pem):
        raise ConfigError("expected a file name or a list of file names", file=file,
                          key=f"{key}.pem")
    if not jwks and not pem:
        raise ConfigError("give the issuer's public keys as jwks (a JWKS file) or pem",
                          file=file, key=key)
    algorithms = data.get("algorithms", list(TokenAuthConfig.algorithms))
    if (not isinstance(algorithms, list) or not algorithms
            or not all(a in _TOKEN_ALGORITHMS for a in algorithms)):
        raise ConfigError("expected a non-empty list of "
                          f"{', '.join(TokenAuthConfig.algorithms)} (public-key algorithms "
                          "only)", file=file, key=f"{key}.algorithms")
    return TokenAuthConfig(
        issuer=issuer, audience=audience, jwks=jwks, pem=tuple(pem), realm_url=realm_url,
        service=_str(data.get("service"), file=file, key=f"{key}.service", optional=True),
        leeway=parse_duration(data.get("leeway", "30s"), file=file, key=f"{key}.leeway"),
        algorithms=tuple(algorithms))


def _parse_auth(value: Any, *, file: str) -> AuthConfig:
    key = "server.auth"
    data = _mapping(value, file=file, key=key)
    _unknown(set(data), _AUTH_KEYS, file=file, key=key)
    kind = data.get("type", "none")
    if kind not in ("none", "htpasswd", "token"):
        raise ConfigError(f"expected none, htpasswd or token, got {kind!r}", file=file,
                          key=f"{key}.type")
    htpasswd = _str(data.get("htpasswd", AuthConfig.htpasswd), file=file,
                    key=f"{key}.htpasswd")
    assert htpasswd is not None
    realm = _str(data.get("realm", "sigil"), file=file, key=f"{key}.realm")
    assert realm is not None
    if '"' in realm or "\\" in realm:
        raise ConfigError("must not contain quotes or backslashes", file=file,
                          key=f"{key}.realm")
    token = _parse_token(data.get("token"), file=file) if kind == "token" else TokenAuthConfig()
    auth = AuthConfig(
        type=kind, htpasswd=htpasswd, realm=realm, token=token,
        protect_metrics=_bool(data.get("protect_metrics", False), file=file,
                              key=f"{key}.protect_metrics"),
        cache_ttl=parse_duration(data.get("cache_ttl", "1m"), file=file,
                                 key=f"{key}.cache_ttl"),
        cache_size=_int_in(data.get("cache_size", 10000), 0, 1_000_000, file=file,
                           key=f"{key}.cache_size"),
        max_failures=_int_in(data.get("max_failures", 10), 1, 1_000_000, file=file,
                             key=f"{key}.max_failures"),
        failure_window=parse_duration(data.get("failure_window", "1m"), file=file,
                                      key=f"{key}.failure_window"))
    if kind != "none":
        # The credential files are read now, so a bad entry stops start-up (before any
        # worker forks) with the file and line; imported here: only auth users need it.
        from sigil.server.auth import load_verifier

        load_verifier(auth, config_file=file)
    return auth


def _parse_tls_extras(tls: Mapping[str, Any], cert: str | None, key: str | None, *,
                      file: str) -> tuple[str | None, str, float]:
    """``server.tls.client_ca``, ``client_auth`` and ``reload_interval``; and a trial load of
    the certificate, key and client CA, so that an unusable file stops start-up."""
    client_ca = _str(tls.get("client_ca"), file=file, key="server.tls.client_ca",
                     optional=True)
    client_auth = tls.get("client_auth", "required" if client_ca else "none")
    if client_auth not in ("none", "optional", "required"):
        raise ConfigError(f"expected none, optional or required, got {client_auth!r}",
                          file=file, key="server.tls.client_auth")
    if client_auth != "none" and not client_ca:
        raise ConfigError("client certificates need server.tls.client_ca", file=file,
                          key="server.tls.client_auth")
    if client_auth == "none" and client_ca:
        raise ConfigError("client_ca is set but client_auth is none: set optional or required",
                          file=file, key="server.tls.client_auth")
    if client_ca and not cert:
        raise ConfigError("client certificates need TLS (server.tls.cert and key)",
                          file=file, key="server.tls.client_ca")
    interval = parse_duration(tls.get("reload_interval", "5s"), file=file,
                              key="server.tls.reload_interval")
    if cert and key:
        import ssl  # only a TLS set-up pays for it

        for name, path in (("cert", cert), ("key", key), ("client_ca", client_ca)):
            if path is None:
                continue
            try:
                with open(path, "rb") as handle:
                    handle.read(1)
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", file=file,
                                  key=f"server.tls.{name}") from exc
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            trial.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{cert} and {key} are not a usable certificate and key: "
                              f"{getattr(exc, 'reason', None) or exc}", file=file,
                              key="server.tls") from exc
        if client_ca:
            try:
                trial.load_verify_locations(cafile=client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"{client_ca} holds no usable CA certificate: "
                                  f"{getattr(exc, 'reason', None) or exc}", file=file,
                                  key="server.tls.client_ca") from exc
    return client_ca, str(client_auth), interval


def _parse_s3(value: Any, *, file: str, env: Mapping[str, str]) -> S3Config:
    key = "storage.s3"
    data = _mapping(value, file=file, key=key)
    _unknown(set(data), _S3_KEYS, file=file, key=key)
    bucket = _str(data.get("bucket"), file=file, key=f"{key}.bucket")
    assert bucket is not None
    if not _BUCKET.match(bucket):
        raise ConfigError(f"invalid bucket name {bucket!r} (3-63 of a-z 0-9 . -)", file=file,
                          key=f"{key}.bucket")
    endpoint = _str(data.get("endpoint"), file=file, key=f"{key}.endpoint", optional=True)
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"expected an http(s) URL, got {endpoint!r}", file=file,
                              key=f"{key}.endpoint")
    region = _str(data.get("region", "us-east-1"), file=file, key=f"{key}.region")
    assert region is not None
    prefix = data.get("prefix", "") or ""
    if not isinstance(prefix, str) or prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError("expected a relative key prefix such as sigil/", file=file,
                          key=f"{key}.prefix")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    access, access_from = _secret(data, "access_key", "AWS_ACCESS_KEY_ID", file=file, key=key,
                                  env=env)
    secret, secret_from = _secret(data, "secret_key", "AWS_SECRET_ACCESS_KEY", file=file,
                                  key=key, env=env)
    if (access is None) != (secret is None):
        raise ConfigError("access and secret key must both be given or both be null (null: "
                          "the default AWS credential chain)", file=file, key=key)
    return S3Config(
        bucket=bucket, endpoint=endpoint.rstrip("/") if endpoint else None, region=region,
        prefix=prefix, access_key=access, secret_key=secret,
        credential_source=(f"{access_from} and {secret_from}" if access is not None
                           else "the default AWS credential chain"),
        create_bucket=_bool(data.get("create_bucket", False), file=file,
                            key=f"{key}.create_bucket"),
        redirect=_bool(data.get("redirect", False), file=file, key=f"{key}.redirect"),
        redirect_expiry=parse_duration(data.get("redirect_expiry", "5m"), file=file,
                                       key=f"{key}.redirect_expiry"),
        part_size=_int_in(parse_size(data.get("part_size", "8MiB"), file=file,
                                     key=f"{key}.part_size"), 5 * 1024**2, 5 * 1024**3,
                          file=file, key=f"{key}.part_size"),
        upload_concurrency=_int_in(data.get("upload_concurrency", 2), 1, 16, file=file,
                                   key=f"{key}.upload_concurrency"),
        max_attempts=_int_in(data.get("max_attempts", 5), 1, 20, file=file,
                             key=f"{key}.max_attempts"),
        abandoned_after=parse_duration(data.get("abandoned_after", "24h"), file=file,
                                       key=f"{key}.abandoned_after"),
    )


def _parse_index(value: Any, *, file: str, env: Mapping[str, str]) -> IndexConfig:
    data = _mapping(value, file=file, key="index")
    _unknown(set(data), _SECTIONS["index"], file=file, key="index")
    backend = str(data.get("backend", "sqlite"))
    if backend not in ("sqlite", "postgres"):
        raise ConfigError("expected sqlite or postgres", file=file, key="index.backend")
    postgres = _mapping(data.get("postgres"), file=file, key="index.postgres")
    _unknown(set(postgres), {"dsn", "dsn_env", "max_connections"}, file=file,
             key="index.postgres")
    max_connections = _int_in(postgres.get("max_connections", 10), 1, 1000, file=file,
                              key="index.postgres.max_connections")
    if backend == "sqlite":
        return IndexConfig(max_connections=max_connections)
    dsn = _str(postgres.get("dsn"), file=file, key="index.postgres.dsn", optional=True)
    source = "index.postgres.dsn"
    if dsn is None:
        var = _str(postgres.get("dsn_env", "SIGIL_PG_DSN"), file=file,
                   key="index.postgres.dsn_env")
        assert var is not None
        if not env.get(var):
            raise ConfigError(f"environment variable {var} is not set", file=file,
                              key="index.postgres.dsn_env")
        dsn, source = env[var], f"index.postgres.dsn_env ({var})"
    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        # The value is not repeated: it may hold a password.
        raise ConfigError("expected a postgresql://user@host:port/database URL", file=file,
                          key=source.split(" ")[0])
    return IndexConfig(backend="postgres", postgres_dsn=dsn, dsn_source=source,
                       max_connections=max_connections)


def build_config(data: Mapping[str, Any] | None, *, source: str = "<config>",
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed config mapping (plus env overrides) into a :class:`Config`."""
    env = os.environ if env is None else env
    file = source
    root: dict[str, Any] = dict(_mapping(data, file=file, key="(top level)"))
    root = {k: (dict(v) if isinstance(v, dict) else v) for k, v in root.items()}
    _apply_env(root, env)
    _unknown(set(root), _TOP, file=file, key="(top level)")

    server = _mapping(root.get("server"), file=file, key="server")
    _unknown(set(server), _SECTIONS["server"], file=file, key="server")
    host, port = _parse_listen(server.get("listen", "0.0.0.0:5000"), file=file)
    tls = _mapping(server.get("tls"), file=file, key="server.tls")
    _unknown(set(tls), {"cert", "key", "client_ca", "client_auth", "reload_interval"},
             file=file, key="server.tls")
    cert = _str(tls.get("cert"), file=file, key="server.tls.cert", optional=True)
    tls_key = _str(tls.get("key"), file=file, key="server.tls.key", optional=True)
    if bool(cert) != bool(tls_key):
        raise ConfigError("cert and key must be given together", file=file, key="server.tls")
    for k, p in (("cert", cert), ("key", tls_key)):
        if p and not Path(p).is_file():
            raise ConfigError(f"file {p} does not exist", file=file, key=f"server.tls.{k}")
    client_ca, client_auth, reload_interval = _parse_tls_extras(tls, cert, tls_key, file=file)
    workers = server.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise ConfigError("expected an integer from 1 to 64", file=file, key="server.workers")
    offline = _bool(server.get("offline", False), file=file, key="server.offline")
    auth = _parse_auth(server.get("auth"), file=file)
    peer_listen = server.get("peer_listen")
    peer = (None if peer_listen is None
            else _parse_listen(peer_listen, file=file, key="server.peer_listen"))
    peer_advertise = server.get("peer_advertise")
    advertise = (None if peer_advertise is None
                 else _parse_listen(peer_advertise, file=file, key="server.peer_advertise"))
    # The peer secret only matters (and is only read) when the peer endpoint is on.
    peer_secret = (None if peer is None else
                   _secret(server, "peer_secret", "SIGIL_PEER_SECRET", file=file,
                           key="server", env=env)[0])

    storage = _mapping(root.get("storage"), file=file, key="storage")
    _unknown(set(storage), _SECTIONS["storage"], file=file, key="storage")
    storage_root = _str(storage.get("root", "/var/lib/sigil"), file=file, key="storage.root")
    assert storage_root is not None
    max_bytes = parse_size(storage.get("max_bytes", "100GiB"), file=file, key="storage.max_bytes")
    backend = str(storage.get("backend", "filesystem"))
    if backend not in ("filesystem", "s3"):
        raise ConfigError("expected filesystem or s3", file=file, key="storage.backend")
    if backend == "s3" and storage.get("s3") is None:
        raise ConfigError("storage.backend is s3 but storage.s3 is missing", file=file,
                          key="storage.s3")
    s3 = _parse_s3(storage["s3"], file=file, env=env) if backend == "s3" else None
    orphan_grace = parse_duration(storage.get("orphan_grace", "24h"), file=file,
                                  key="storage.orphan_grace")
    if orphan_grace < MIN_ORPHAN_GRACE:
        # Shorter than a long import or download: gc would delete objects about to be indexed.
        raise ConfigError("expected at least 1h (objects of an import or download still in "
                          "progress have no index row yet)", file=file,
                          key="storage.orphan_grace")
    index_config = _parse_index(root.get("index"), file=file, env=env)

    items = root.get("upstreams")
    if items is None:
        items = [{"name": "docker.io", "url": "https://registry-1.docker.io", "default": True}]
    if not isinstance(items, list) or not items:
        raise ConfigError("expected a non-empty list of upstreams", file=file, key="upstreams")
    upstreams = tuple(_parse_upstream(item, i, file=file, env=env) for i, item in enumerate(items))
    seen: dict[str, str] = {}
    for i, upstream in enumerate(upstreams):
        for label in (upstream.name, *upstream.aliases):
            if label in seen:
                raise ConfigError(f"{label!r} is already used by upstream {seen[label]!r}",
                                  file=file, key=f"upstreams[{i}]")
            seen[label] = upstream.name
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("at most one upstream may be the default", file=file, key="upstreams")

    policy = _str(root.get("policy"), file=file, key="policy", optional=True)
    if policy and not Path(policy).is_absolute() and source not in ("<config>", "<defaults>"):
        # A relative policy path is relative to the config file's folder, then to the cwd.
        candidate = Path(source).parent / policy
        if candidate.exists() or not Path(policy).exists():
            policy = str(candidate)

    log = _mapping(root.get("log"), file=file, key="log")
    _unknown(set(log), _SECTIONS["log"], file=file, key="log")
    level = str(log.get("level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("expected one of debug, info, warning, error", file=file,
                          key="log.level")
    fmt = str(log.get("format", "auto")).lower()
    if fmt not in ("auto", "json", "console"):
        raise ConfigError("expected one of auto, json, console", file=file, key="log.format")

    return Config(
        server=ServerConfig(listen_host=host, listen_port=port, tls_cert=cert, tls_key=tls_key,
                            workers=workers, offline=offline, auth=auth,
                            tls_client_ca=client_ca, tls_client_auth=client_auth,
                            tls_reload_interval=reload_interval, peer_listen=peer,
                            peer_advertise=advertise, peer_secret=peer_secret),
        storage=StorageConfig(root=storage_root, max_bytes=max_bytes, backend=backend, s3=s3,
                              orphan_grace=orphan_grace),
        index=index_config,
        upstreams=upstreams, policy=policy, log=LogConfig(level=level, format=fmt),
        source=source, raw=root,
    )


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the main config file at ``path``."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{problem}{where}", file=file) from exc
    return build_config(data, source=file, env=env)
