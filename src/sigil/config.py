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
class ServerConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    tls_cert: str | None = None
    tls_key: str | None = None
    workers: int = 1
    # Serve only what the store holds; never open a connection to an upstream (air gap).
    offline: bool = False


@dataclass(frozen=True)
class StorageConfig:
    root: str = "/var/lib/sigil"
    max_bytes: int = 100 * 1024**3


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
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.default:
                return upstream
        return None


_SECTIONS: dict[str, set[str]] = {
    "server": {"listen", "tls", "workers", "offline"},
    "storage": {"root", "max_bytes"},
    "log": {"level", "format"},
}
_TOP = {"server", "storage", "upstreams", "policy", "log"}
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


def _parse_listen(value: Any, *, file: str) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {value!r}", file=file, key="server.listen")
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
    _unknown(set(tls), {"cert", "key"}, file=file, key="server.tls")
    cert = _str(tls.get("cert"), file=file, key="server.tls.cert", optional=True)
    tls_key = _str(tls.get("key"), file=file, key="server.tls.key", optional=True)
    if bool(cert) != bool(tls_key):
        raise ConfigError("cert and key must be given together", file=file, key="server.tls")
    for k, p in (("cert", cert), ("key", tls_key)):
        if p and not Path(p).is_file():
            raise ConfigError(f"file {p} does not exist", file=file, key=f"server.tls.{k}")
    workers = server.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise ConfigError("expected an integer from 1 to 64", file=file, key="server.workers")
    offline = _bool(server.get("offline", False), file=file, key="server.offline")

    storage = _mapping(root.get("storage"), file=file, key="storage")
    _unknown(set(storage), _SECTIONS["storage"], file=file, key="storage")
    storage_root = _str(storage.get("root", "/var/lib/sigil"), file=file, key="storage.root")
    assert storage_root is not None
    max_bytes = parse_size(storage.get("max_bytes", "100GiB"), file=file, key="storage.max_bytes")

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
                            workers=workers, offline=offline),
        storage=StorageConfig(root=storage_root, max_bytes=max_bytes),
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
