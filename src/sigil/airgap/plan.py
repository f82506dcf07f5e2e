"""The export plan: which images to carry, by upstream name as clients name them.

```yaml
images:
  - ref: docker.io/library/alpine:3.20          # a tag or @sha256:... digest
  - repository: dhi.io/python                   # many tags of one repository
    tags: ["^3\\.13(\\.[0-9]+)?$"]                # regexes over the upstream tag list
    platforms: [linux/amd64, linux/arm64]        # default: all platforms of an index
```
Every problem is a :class:`ConfigError` naming the plan file, the entry and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigil.config import Config
from sigil.errors import ConfigError, NameUnknown, RegistryError
from sigil.oci.digest import Digest
from sigil.oci.reference import validate_tag
from sigil.routing import Route, Router
from sigil.verify.policy import load_yaml_file
from sigil.verify_cli import split_reference

MAX_PLAN_BYTES = 1024 * 1024
_ENTRY_KEYS = {"ref", "repository", "tags", "platforms"}
_PLATFORM = re.compile(r"^[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_]+)?$")


@dataclass(frozen=True)
class PlanEntry:
    """One ``images[]`` entry, resolved against the config's upstreams."""

    where: str                                   # "images[2]" for messages
    route: Route
    reference: str | None                        # a tag or digest (``ref`` entries)
    tag_patterns: tuple[re.Pattern[str], ...]    # ``repository`` entries
    platforms: frozenset[str]                    # empty: every platform

    def wants_platform(self, platform: dict[str, Any] | None) -> bool:
        """Whether an index child with this ``platform`` object is carried."""
        if not self.platforms:
            return True
        if not platform:
            return False
        base = f"{platform.get('os', '')}/{platform.get('architecture', '')}"
        variant = platform.get("variant")
        return base in self.platforms or (bool(variant) and f"{base}/{variant}"
                                          in self.platforms)


@dataclass(frozen=True)
class Plan:
    """A validated plan file."""

    file: str
    entries: tuple[PlanEntry, ...]


def load_plan(path: str | Path, config: Config) -> Plan:
    """Read and validate a plan file against ``config``'s upstreams."""
    file = str(path)
    data = load_yaml_file(path, MAX_PLAN_BYTES, "plan file")
    if not isinstance(data, dict) or set(data) != {"images"}:
        raise ConfigError("the plan must be a mapping with exactly one key, 'images'",
                          file=file)
    items = data["images"]
    if not isinstance(items, list) or not items:
        raise ConfigError("'images' must be a non-empty list", file=file, key="images")
    router = Router(config)
    entries = tuple(_entry(item, f"images[{i}]", file, router) for i, item in enumerate(items))
    return Plan(file=file, entries=entries)


def _entry(item: Any, where: str, file: str, router: Router) -> PlanEntry:
    if not isinstance(item, dict):
        raise ConfigError("an entry must be a mapping with 'ref' or 'repository'", file=file,
                          key=where)
    unknown = set(item) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; expected "
                          f"{', '.join(sorted(_ENTRY_KEYS))}", file=file, key=where)
    if ("ref" in item) == ("repository" in item):
        raise ConfigError("an entry needs exactly one of 'ref' or 'repository'", file=file,
                          key=where)
    platforms = item.get("platforms") or []
    if not isinstance(platforms, list) or not all(isinstance(p, str) and _PLATFORM.match(p)
                                                  for p in platforms):
        raise ConfigError("'platforms' must be a list like [linux/amd64, linux/arm64/v8]",
                          file=file, key=f"{where}.platforms")
    if "ref" in item:
        if "tags" in item:
            raise ConfigError("'tags' goes with 'repository', not with 'ref'", file=file,
                              key=f"{where}.tags")
        text = item["ref"]
        if not isinstance(text, str) or not text:
            raise ConfigError("'ref' must be an image reference such as "
                              "docker.io/library/alpine:3.20", file=file, key=f"{where}.ref")
        name, reference = split_reference(text)
        route = _route(router, name, file, f"{where}.ref")
        try:
            if Digest.is_digest(reference):
                Digest.parse(reference)
            else:
                validate_tag(reference)
        except RegistryError as exc:
            raise ConfigError(f"bad reference {reference!r}: {exc}", file=file,
                              key=f"{where}.ref") from exc
        return PlanEntry(where, route, reference, (), frozenset(platforms))
    name = item["repository"]
    if not isinstance(name, str) or not name or "@" in name or ":" in name.rpartition("/")[2]:
        raise ConfigError("'repository' must be a repository name without tag or digest",
                          file=file, key=f"{where}.repository")
    route = _route(router, name, file, f"{where}.repository")
    tags = item.get("tags")
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
        raise ConfigError("'tags' must be a non-empty list of regular expressions", file=file,
                          key=f"{where}.tags")
    patterns = []
    for i, text in enumerate(tags):
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise ConfigError(f"bad regular expression {text!r}: {exc}", file=file,
                              key=f"{where}.tags[{i}]") from exc
    return PlanEntry(where, route, None, tuple(patterns), frozenset(platforms))


def _route(router: Router, name: str, file: str, key: str) -> Route:
    first, sep, _ = name.partition("/")
    try:
        # The plan names images as clients do, registry first; only a configured upstream
        # (name or alias) is accepted here: a silent fallback to the default upstream would
        # carry images from a registry the operator did not name.
        route = router.resolve(name, ns=first) if sep else None
    except NameUnknown as exc:
        raise ConfigError(f"unknown upstream {first!r}: not a name or alias in the config's "
                          "'upstreams'", file=file, key=key) from exc
    except RegistryError as exc:
        raise ConfigError(f"bad repository name {name!r}: {exc}", file=file, key=key) from exc
    if route is None:
        raise ConfigError(f"{name!r} does not start with an upstream name "
                          "(e.g. docker.io/library/alpine)", file=file, key=key)
    return route
