"""``sigil verify <image-ref>``: the decision for one image, with every check and reason.

The tool an operator runs when a pull is denied. It reads the upstreams and the policy from
the mirror's config (``--policy`` overrides the policy file), fetches the manifest and its
signatures straight from the upstream into a throw-away store, and evaluates the policy exactly
as the server does. Exit code: 0 allowed, 1 denied, 2 error.

``--offline`` (or ``server.offline`` in the config) decides from the configured store alone:
the manifest, its tags, signatures, attestations and referrer links as imported or pulled
earlier, and no upstream (the clients are offline stand-ins that never connect). The store is
only read: the verdict is reported, not recorded, so a running offline server is unaffected.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from sigil.config import Config
from sigil.errors import ConfigError, ManifestUnknown, NameInvalid, SigilError, StorageError
from sigil.mirror import Mirror, PolicyHook, Upstream
from sigil.routing import Route, Router
from sigil.storage import BlobStore, Index
from sigil.storage.contracts import FilesystemObjectStore, SqliteAsyncIndex
from sigil.upstream import UpstreamClient
from sigil.upstream.offline import offline_clients


def split_reference(ref: str) -> tuple[str, str]:
    """``name[:tag|@digest]`` -> (name, reference); the tag defaults to ``latest``."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    if not ref:
        raise NameInvalid("empty image reference")
    return ref, "latest"


async def verify_image(config: Config, ref: str, policy_path: str | None) -> dict[str, Any]:
    """Evaluate the policy for ``ref``; returns the verdict as JSON-able data."""
    from sigil.verify.engine import Verifier
    from sigil.verify.policy import load_policy

    path = policy_path or config.policy
    if not path:
        raise ConfigError("no policy: give --policy or set `policy` in the config",
                          file=config.source, key="policy")
    verifier = Verifier(load_policy(path))
    name, reference = split_reference(ref)
    route = Router(config).resolve(name)
    if config.server.offline:
        root = Path(config.storage.root)
        if not (root / "index.sqlite").is_file():
            raise StorageError(f"no sigil store at {root} (storage.root of {config.source})")
        offline: dict[str, Upstream] = dict(offline_clients(config))
        try:
            data = await _decide(config, verifier, route, reference, root, offline)
        except ManifestUnknown as exc:
            raise SigilError(f"{ref} is not in the store at {root} (offline: import it, or "
                             "pull it through an online sigil first)") from exc
        data["offline"] = True
        data["store"] = str(root)
    else:
        with tempfile.TemporaryDirectory(prefix="sigil-verify-") as tmp:
            online: dict[str, Upstream] = {u.name: UpstreamClient(u) for u in config.upstreams}
            data = await _decide(config, verifier, route, reference, Path(tmp), online)
    data["reference"] = ref
    data["policy_file"] = path
    return data


async def _decide(config: Config, verifier: PolicyHook, route: Route, reference: str,
                  root: Path, clients: dict[str, Upstream]) -> dict[str, Any]:
    """The verdict for ``reference`` over the store at ``root`` and ``clients``, as JSON."""
    store, index = BlobStore(root), Index(root / "index.sqlite")
    try:
        mirror = Mirror(config, FilesystemObjectStore(store), SqliteAsyncIndex(index), clients,
                        verifier)
        manifest = await mirror.fetch_manifest(route, reference)
        verdict = await verifier.evaluate(route.image, route.repo, manifest,
                                          mirror.source(route))
    finally:
        for client in clients.values():
            await client.close()
        index.close()
    data: dict[str, Any] = verdict.to_json()
    return data


def render(data: dict[str, Any]) -> str:
    """Human-readable report."""
    lines = [f"image:    {data['image']}  ({data['reference']})",
             f"digest:   {data['digest']}",
             *([f"source:   store {data['store']} (offline)"] if data.get("offline") else []),
             f"decision: {'ALLOW' if data['allowed'] else 'DENY'}"
             + (f" ({data['reason']})" if data.get("reason") else "")]
    if data.get("message"):
        lines.append(f"message:  {data['message']}")
    for policy in data.get("policies", []):
        mark = "pass" if policy["passed"] else "FAIL"
        lines.append(f"policy {policy['name']!r} [{policy['mode']}]: {mark}")
        lines.extend(f"    - {reason}" for reason in policy.get("reasons", []))
    if data.get("checks"):
        lines.append("checks:")
        lines.extend(f"    {check}" for check in data["checks"])
    return "\n".join(lines)


def run(config: Config, ref: str, policy_path: str | None, as_json: bool) -> int:
    """CLI body: print the report, return the exit code."""
    data = asyncio.run(verify_image(config, ref, policy_path))
    print(json.dumps(data, indent=2) if as_json else render(data))
    return 0 if data["allowed"] else 1
