"""The policy file and trust material an archive carries, and how they compare to local ones.

Only files the policy names are carried: public keys (``authorities[].key.path``) and trusted
roots (``authorities[].trusted_root``, ``authorities[].keyless.trusted_root``). On import they
are *shown*, never used: the local policy and its own files decide.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sigil.errors import ConfigError


@dataclass(frozen=True)
class TrustFile:
    """One file the policy names, with where the policy names it."""

    key: str          # e.g. policies[signed].authorities[release-key].key.path
    path: str         # as resolved when exported
    data: bytes

    @property
    def sha256(self) -> str:
        """Hex sha256 of the file's bytes."""
        return hashlib.sha256(self.data).hexdigest()


def trust_files(policy_path: str | Path) -> list[TrustFile]:
    """Every key and trusted-root file ``policy_path`` names (already validated by
    :func:`sigil.verify.policy.load_policy`; this only collects them)."""
    path = Path(policy_path)
    try:
        doc = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read policy file: {exc}", file=str(path)) from exc
    found: list[TrustFile] = []
    seen: set[str] = set()

    def add(key: str, value: Any) -> None:
        if not isinstance(value, str):
            return
        full = Path(value) if Path(value).is_absolute() else path.parent / value
        if str(full) in seen:
            return
        seen.add(str(full))
        try:
            found.append(TrustFile(key, str(full), full.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read {full}: {exc.strerror or exc}", file=str(path),
                              key=key) from exc

    for rule in (doc or {}).get("policies") or []:
        if not isinstance(rule, dict):
            continue
        where = f"policies[{rule.get('name')}]"
        for auth in rule.get("authorities") or []:
            if not isinstance(auth, dict):
                continue
            at = f"{where}.authorities[{auth.get('name')}]"
            keys = auth.get("key")
            for i, entry in enumerate(keys if isinstance(keys, list) else [keys]):
                if isinstance(entry, dict):
                    add(f"{at}.key" + (f"[{i}]" if isinstance(keys, list) else "") + ".path",
                        entry.get("path"))
            add(f"{at}.trusted_root", auth.get("trusted_root"))
            keyless = auth.get("keyless")
            if isinstance(keyless, dict):
                add(f"{at}.keyless.trusted_root", keyless.get("trusted_root"))
    return found


def text_diff(archived: bytes, local: bytes, archived_name: str, local_name: str) -> list[str]:
    """A unified diff of two policy files (empty when they are byte-identical)."""
    if archived == local:
        return []
    return list(difflib.unified_diff(
        archived.decode("utf-8", "replace").splitlines(),
        local.decode("utf-8", "replace").splitlines(),
        fromfile=archived_name, tofile=local_name, lineterm=""))


def trust_diff(archived: list[dict[str, Any]], local: list[TrustFile]) -> list[str]:
    """Human lines comparing the archive's trust files with the local policy's, by content."""
    local_digests = {t.sha256 for t in local}
    archived_digests = {str(t.get("sha256")) for t in archived}
    lines = [f"archive only: {t.get('key')} ({t.get('path')}, sha256 {t.get('sha256')})"
             for t in archived if t.get("sha256") not in local_digests]
    lines += [f"local only: {t.key} ({t.path}, sha256 {t.sha256})"
              for t in local if t.sha256 not in archived_digests]
    return lines


class RecordingPolicy:
    """A policy hook that remembers the full verdict of every decision it makes.

    The mirror keeps only what it needs of a verdict; the archive's report wants every check,
    so export and import put this in front of the real :class:`~sigil.verify.engine.Verifier`
    (same fingerprint, same decisions)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.verdicts: dict[str, Any] = {}

    @property
    def fingerprint(self) -> str:
        """The inner policy's fingerprint (allows and verdicts are keyed by it)."""
        return str(self.inner.fingerprint)

    async def evaluate(self, image: str, repo: str, manifest: Any, source: Any) -> Any:
        """Decide through the inner policy and remember the verdict by digest."""
        verdict = await self.inner.evaluate(image, repo, manifest, source)
        self.verdicts[str(manifest.digest)] = verdict
        return verdict


def verdict_json(verdict: Any) -> dict[str, Any]:
    """Any verdict (engine or mirror) as JSON-able data."""
    data: dict[str, Any] = dict(verdict.to_json())
    data.setdefault("checks", list(getattr(verdict, "checks", [])))
    data["related"] = [[repo, str(d)] for repo, d in getattr(verdict, "related", [])]
    return data
