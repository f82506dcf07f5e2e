"""``sigil verify <image-ref>``: the decision for one image, with every check and reason.

The tool an operator runs when a pull is denied. It reads the upstreams and the policy from
the mirror's config (``--policy`` overrides the policy file), fetches the manifest and its
signatures straight from the upstream into a throw-away store, and evaluates the policy exactly
as the server does. Exit code: 0 allowed, 1 denied, 2 error.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from sigil.config import Config
from sigil.errors import ConfigError, NameInvalid
from sigil.mirror import Mirror
from sigil.routing import Router
from sigil.storage import BlobStore, Index
from sigil.upstream import UpstreamClient


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
    with tempfile.TemporaryDirectory(prefix="sigil-verify-") as tmp:
        store, index = BlobStore(Path(tmp)), Index(Path(tmp) / "index.sqlite")
        clients = {u.name: UpstreamClient(u) for u in config.upstreams}
        try:
            mirror = Mirror(config, store, index, clients, verifier)
            manifest = await mirror.fetch_manifest(route, reference)
            verdict = await verifier.evaluate(route.image, route.repo, manifest,
                                              mirror.source(route))
        finally:
            for client in clients.values():
                await client.close()
            index.close()
    data: dict[str, Any] = verdict.to_json()
    data["reference"] = ref
    data["policy_file"] = path
    return data


def render(data: dict[str, Any]) -> str:
    """Human-readable report."""
    lines = [f"image:    {data['image']}  ({data['reference']})",
             f"digest:   {data['digest']}",
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
