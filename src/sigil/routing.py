"""Which upstream a request is for, and under what repository name.

Order (DESIGN §2 Routing):
1. ``?ns=<host>`` (containerd sends it on every request to a mirror);
2. a path prefix ``/v2/<upstream name or alias>/<repo>/...`` (podman/CRI-O mirrors with a path,
   containerd ``override_path``);
3. otherwise the default upstream, with ``library/`` added to one-segment Docker Hub names so
   docker's ``registry-mirrors`` works.
An unknown ``ns`` or a name with no default upstream is ``NAME_UNKNOWN``, never a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from sigil.config import Config, UpstreamConfig
from sigil.errors import NameUnknown
from sigil.oci.reference import validate_name

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved request target."""

    upstream: UpstreamConfig
    repo: str        # repository name at the upstream, e.g. library/nginx
    client_name: str  # the name as the client sent it (for Link headers)

    @property
    def image(self) -> str:
        """``<registry>/<repository>``: what policy ``images`` globs match."""
        return f"{self.upstream.name}/{self.repo}"


class Router:
    """Maps (name, ns) to a :class:`Route` for one configuration."""

    def __init__(self, config: Config) -> None:
        self._by_label: dict[str, UpstreamConfig] = {}
        for upstream in config.upstreams:
            for label in (upstream.name, *upstream.aliases):
                self._by_label[label] = upstream
            if upstream.name == DOCKER_HUB:
                for label in _DOCKER_HUB_ALIASES:
                    self._by_label.setdefault(label, upstream)
        self._default = config.default_upstream

    def resolve(self, name: str, ns: str | None = None) -> Route:
        """Resolve a validated-or-not client repository name; raise NAME_INVALID/NAME_UNKNOWN."""
        if ns is not None:
            upstream = self._by_label.get(ns)
            if upstream is None:
                raise NameUnknown(f"registry {ns[:100]!r} (from ?ns=) is not configured")
            repo = name
            # containerd sends the full name relative to ns; a client that also adds the
            # path prefix (override_path set up both ways) gets it stripped once.
            first, sep, rest = name.partition("/")
            if sep and self._by_label.get(first) is upstream:
                repo = rest
        else:
            first, sep, rest = name.partition("/")
            upstream_for_prefix = self._by_label.get(first) if sep else None
            if upstream_for_prefix is not None:
                upstream, repo = upstream_for_prefix, rest
            elif self._default is not None:
                upstream, repo = self._default, name
            else:
                raise NameUnknown(f"no upstream registry for {name[:100]!r} and no default")
        validate_name(repo)
        if upstream.name == DOCKER_HUB and "/" not in repo:
            repo = f"library/{repo}"
        return Route(upstream=upstream, repo=repo, client_name=name)
