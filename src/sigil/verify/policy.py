"""The policy file: parsing, validation, image matching and the policy fingerprint.

``load_policy(path)`` reads the YAML file described in docs/policy.md and returns a frozen
:class:`Policy`. Every problem raises :class:`~sigil.errors.ConfigError` naming the file, the
policy (``policies[hardened-images].authorities[dhi-key].key.path``) and what is wrong.
Fail closed (DESIGN.md conventions, 3): an empty policy list, a policy with neither
authorities nor ``static``, an unreadable key, a bad regular expression or glob, an unknown
key, or a keyless authority without identities is an error, never a silent default.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sigil.config import parse_duration, parse_size
from sigil.errors import ConfigError, NameInvalid
from sigil.oci.reference import validate_name
from sigil.verify.authority import Authority
from sigil.verify.conditions import ConditionGroup, parse_conditions
from sigil.verify.keys import (
    TLOG_MODES,
    KeyAuthority,
    PublicKey,
    UnavailableAuthority,
    load_public_key,
    load_public_key_file,
    load_trusted_root,
    sigstore_name,
)

MODES = ("enforce", "warn")
STATICS = ("pass", "deny")
MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024
MAX_TRUSTED_ROOT_BYTES = 8 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# <registry>/<repository> globs: the distribution name grammar's characters, a registry port,
# and the wildcards.
_GLOB_CHARS = re.compile(r"[a-z0-9._\-/:*]+")

_TOP_KEYS = {"policies", "limits"}
_POLICY_KEYS = {"name", "images", "mode", "static", "authorities", "threshold", "attestations",
                "signatureRepository"}
_AUTHORITY_KEYS = {"name", "key", "keyless", "tlog", "timestamps", "trusted_root", "signature"}
_KEY_KEYS = {"path", "data", "algorithm"}
_KEYLESS_KEYS = {"trusted_root", "identities", "githubWorkflow"}
_IDENTITY_KEYS = {"issuer", "issuerRegExp", "subject", "subjectRegExp"}
_WORKFLOW_KEYS = {"repository", "ref", "trigger", "sha", "name"}
_SIGNATURE_KEYS = {"dockerReference", "annotations"}
_ATTESTATION_KEYS = {"name", "predicateType", "conditions"}
_LIMIT_KEYS = {"maxArtifacts", "maxBlobBytes", "maxTotalBytes", "maxChildren", "timeout"}


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile an image glob over ``<registry>/<repository>``.

    ``**`` matches any run of characters including ``/``; ``*`` matches any run without ``/``;
    everything else is literal. Raises ``ValueError`` for an empty pattern, characters outside
    ``[a-z0-9._-/:*]`` (names are lowercase per the distribution spec), ``***`` or ``//``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("empty glob")
    if not _GLOB_CHARS.fullmatch(pattern):
        raise ValueError(f"glob {pattern!r} has characters outside [a-z0-9._-/:*]")
    if "***" in pattern or "//" in pattern or pattern.startswith("/"):
        raise ValueError(f"glob {pattern!r} is malformed (***, // or a leading /)")
    parts = []
    for i, chunk in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append("[^/]*".join(re.escape(s) for s in chunk.split("*")))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Limits:
    """Discovery caps (DESIGN.md: "all capped in count, size and time")."""

    max_artifacts: int = 64          # signature/attestation manifests fetched per decision
    max_blob_bytes: int = 4 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_children: int = 64           # index children examined for attestations
    timeout: float = 30.0


@dataclass(frozen=True)
class AuthorityRule:
    """One ``authorities[]`` entry: the authority plus signature constraints on its payloads."""

    name: str
    authority: Authority
    kind: str                                         # "key" | "keyless"
    reference: re.Pattern[str] | None = None          # signature.dockerReference glob
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AttestationRule:
    """One ``attestations[]`` entry: a predicate type that must be present and pass conditions."""

    name: str
    predicate_type: str
    conditions: ConditionGroup | None = None


@dataclass(frozen=True)
class PolicyRule:
    """One entry of ``policies``."""

    name: str
    images: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    mode: str = "enforce"
    static: str | None = None
    authorities: tuple[AuthorityRule, ...] = ()
    threshold: int = 1
    attestations: tuple[AttestationRule, ...] = ()
    signature_repository: str | None = None

    def matches(self, image: str) -> bool:
        """True if ``image`` (``<registry>/<repository>``) matches one of the globs."""
        return any(p.fullmatch(image) for p in self.patterns)


@dataclass(frozen=True)
class Policy:
    """The whole policy file. ``fingerprint`` changes whenever rules or trust material do."""

    rules: tuple[PolicyRule, ...]
    limits: Limits
    fingerprint: str
    file: str = "<policy>"

    def matching(self, image: str) -> list[PolicyRule]:
        """Every rule whose ``images`` match ``image``, in file order."""
        return [r for r in self.rules if r.matches(image)]


def load_yaml_file(path: str | Path, max_bytes: int, what: str) -> Any:
    """The YAML document in ``path``, read up to ``max_bytes`` (a bigger file is refused
    before it is parsed); :class:`ConfigError` naming the file and ``what`` it is (``"policy
    file"``, ``"plan file"``) when it cannot be read, is too large or is not YAML."""
    file = str(path)
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", file=file) from exc
    if len(raw) > max_bytes:
        raise ConfigError(f"{what} is too large", file=file)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from exc


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate a policy file; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    data = load_yaml_file(path, MAX_POLICY_FILE_BYTES, "policy file")
    return parse_policy(data, file=str(path), base_dir=path.parent)


def parse_policy(data: Any, *, file: str = "<policy>", base_dir: str | Path = ".") -> Policy:
    """Validate an already-decoded policy document (see :func:`load_policy`)."""
    base = Path(base_dir)
    if not isinstance(data, dict):
        raise ConfigError("the policy file must be a mapping with a 'policies' list", file=file)
    _unknown(data, _TOP_KEYS, file=file, key="")
    limits = _parse_limits(data.get("limits"), file=file)
    items = data.get("policies")
    if not isinstance(items, list) or not items:
        raise ConfigError("'policies' must be a non-empty list (an empty policy would "
                          "deny everything)", file=file, key="policies")
    rules: list[PolicyRule] = []
    canonical: list[Any] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        rule, canon = _parse_rule(item, index, file=file, base=base)
        if rule.name in seen:
            raise ConfigError(f"duplicate policy name {rule.name!r}", file=file,
                              key=f"policies[{rule.name}]")
        seen.add(rule.name)
        rules.append(rule)
        canonical.append(canon)
    doc = {"limits": limits.__dict__, "policies": canonical}
    fingerprint = hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Policy(rules=tuple(rules), limits=limits, fingerprint=fingerprint, file=file)


# --- helpers --------------------------------------------------------------------------------

def _unknown(obj: Mapping[str, Any], allowed: set[str], *, file: str, key: str) -> None:
    unknown = sorted(str(k) for k in set(obj) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(allowed))}", file=file, key=key or None)


def _mapping(value: Any, *, file: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping", file=file, key=key)
    return value


def _string(value: Any, *, file: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("expected a non-empty string", file=file, key=key)
    return value


def _regexp(value: Any, *, file: str, key: str) -> re.Pattern[str]:
    text = _string(value, file=file, key=key)
    try:
        return re.compile(text)
    except re.error as exc:
        raise ConfigError(f"bad regular expression {text!r}: {exc}", file=file, key=key) from exc


def _read(path_text: Any, base: Path, *, file: str, key: str, limit: int) -> tuple[bytes, str]:
    text = _string(path_text, file=file, key=key)
    path = Path(text) if Path(text).is_absolute() else base / text
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", file=file,
                          key=key) from exc
    if len(data) > limit:
        raise ConfigError(f"{path} is too large", file=file, key=key)
    return data, str(path)


def _parse_limits(value: Any, *, file: str) -> Limits:
    if value is None:
        return Limits()
    obj = _mapping(value, file=file, key="limits")
    _unknown(obj, _LIMIT_KEYS, file=file, key="limits")
    defaults = Limits()

    def count(name: str, default: int) -> int:
        v = obj.get(name, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10_000:
            raise ConfigError("expected an integer between 1 and 10000", file=file,
                              key=f"limits.{name}")
        return v

    return Limits(
        max_artifacts=count("maxArtifacts", defaults.max_artifacts),
        max_children=count("maxChildren", defaults.max_children),
        max_blob_bytes=parse_size(obj.get("maxBlobBytes", defaults.max_blob_bytes), file=file,
                                  key="limits.maxBlobBytes"),
        max_total_bytes=parse_size(obj.get("maxTotalBytes", defaults.max_total_bytes), file=file,
                                   key="limits.maxTotalBytes"),
        timeout=parse_duration(obj.get("timeout", defaults.timeout), file=file,
                               key="limits.timeout") or defaults.timeout,
    )


def _parse_rule(item: Any, index: int, *, file: str, base: Path) -> tuple[PolicyRule, Any]:
    where = f"policies[{index}]"
    obj = _mapping(item, file=file, key=where)
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("every policy needs a 'name' of letters, digits, '.', '_' or '-' "
                          "(it is a metric label)", file=file, key=f"{where}.name")
    where = f"policies[{name}]"
    _unknown(obj, _POLICY_KEYS, file=file, key=where)

    images = obj.get("images")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise ConfigError("'images' must be a non-empty list of globs", file=file,
                          key=f"{where}.images")
    patterns = []
    for i, glob in enumerate(images):
        try:
            patterns.append(compile_glob(glob))
        except ValueError as exc:
            raise ConfigError(f"bad glob: {exc}", file=file, key=f"{where}.images[{i}]") from exc

    mode = obj.get("mode", "enforce")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}", file=file,
                          key=f"{where}.mode")
    static = obj.get("static")
    if static is not None and static not in STATICS:
        raise ConfigError(f"static must be one of {', '.join(STATICS)}", file=file,
                          key=f"{where}.static")
    raw_auths = obj.get("authorities")
    raw_atts = obj.get("attestations")
    if static is not None:
        if raw_auths or raw_atts:
            raise ConfigError("a static policy takes no authorities or attestations",
                              file=file, key=where)
        rule = PolicyRule(name=name, images=tuple(images), patterns=tuple(patterns), mode=mode,
                          static=static)
        return rule, {"name": name, "images": images, "mode": mode, "static": static}
    if not isinstance(raw_auths, list) or not raw_auths:
        raise ConfigError("a policy needs 'authorities' (a non-empty list) or 'static'",
                          file=file, key=f"{where}.authorities")

    authorities = []
    canon_auths = []
    auth_names: set[str] = set()
    for i, raw in enumerate(raw_auths):
        auth, canon = _parse_authority(raw, i, file=file, where=where, base=base)
        if auth.name in auth_names:
            raise ConfigError(f"duplicate authority name {auth.name!r}", file=file,
                              key=f"{where}.authorities[{auth.name}]")
        auth_names.add(auth.name)
        authorities.append(auth)
        canon_auths.append(canon)

    threshold = obj.get("threshold", 1)
    if (not isinstance(threshold, int) or isinstance(threshold, bool)
            or not 1 <= threshold <= len(authorities)):
        raise ConfigError(f"threshold must be an integer from 1 to the number of authorities "
                          f"({len(authorities)})", file=file, key=f"{where}.threshold")

    attestations = []
    canon_atts = []
    if raw_atts is not None:
        if not isinstance(raw_atts, list):
            raise ConfigError("'attestations' must be a list", file=file,
                              key=f"{where}.attestations")
        att_names: set[str] = set()
        for i, raw in enumerate(raw_atts):
            att = _parse_attestation(raw, i, file=file, where=where)
            if att.name in att_names:
                raise ConfigError(f"duplicate attestation name {att.name!r}", file=file,
                                  key=f"{where}.attestations[{att.name}]")
            att_names.add(att.name)
            attestations.append(att)
            canon_atts.append({"name": att.name, "predicateType": att.predicate_type,
                               "conditions": att.conditions.canonical() if att.conditions
                               else None})

    repo = obj.get("signatureRepository")
    if repo is not None:
        try:
            validate_name(_string(repo, file=file, key=f"{where}.signatureRepository"))
        except NameInvalid as exc:
            raise ConfigError(f"invalid repository name: {exc.message}", file=file,
                              key=f"{where}.signatureRepository") from exc
    rule = PolicyRule(name=name, images=tuple(images), patterns=tuple(patterns), mode=mode,
                      authorities=tuple(authorities), threshold=threshold,
                      attestations=tuple(attestations), signature_repository=repo)
    canon = {"name": name, "images": images, "mode": mode, "threshold": threshold,
             "authorities": canon_auths, "attestations": canon_atts,
             "signatureRepository": repo}
    return rule, canon


def _parse_attestation(raw: Any, index: int, *, file: str, where: str) -> AttestationRule:
    key = f"{where}.attestations[{index}]"
    obj = _mapping(raw, file=file, key=key)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every attestation needs a 'name'", file=file, key=f"{key}.name")
    key = f"{where}.attestations[{name}]"
    _unknown(obj, _ATTESTATION_KEYS, file=file, key=key)
    predicate_type = _string(obj.get("predicateType"), file=file, key=f"{key}.predicateType")
    conditions = None
    if obj.get("conditions") is not None:
        conditions = parse_conditions(obj["conditions"], file=file, key=f"{key}.conditions")
    return AttestationRule(name=name, predicate_type=predicate_type, conditions=conditions)


def _parse_authority(raw: Any, index: int, *, file: str, where: str,
                     base: Path) -> tuple[AuthorityRule, Any]:
    key = f"{where}.authorities[{index}]"
    obj = _mapping(raw, file=file, key=key)
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("every authority needs a 'name' of letters, digits, '.', '_' or '-'",
                          file=file, key=f"{key}.name")
    key = f"{where}.authorities[{name}]"
    _unknown(obj, _AUTHORITY_KEYS, file=file, key=key)
    if ("key" in obj) == ("keyless" in obj):
        raise ConfigError("an authority needs exactly one of 'key' or 'keyless'", file=file,
                          key=key)
    tlog = obj.get("tlog", "optional" if "key" in obj else "required")
    if tlog not in TLOG_MODES:
        raise ConfigError(f"tlog must be one of {', '.join(TLOG_MODES)}", file=file,
                          key=f"{key}.tlog")

    reference = None
    annotations: dict[str, str] = {}
    sig_canon: Any = None
    if obj.get("signature") is not None:
        sig = _mapping(obj["signature"], file=file, key=f"{key}.signature")
        _unknown(sig, _SIGNATURE_KEYS, file=file, key=f"{key}.signature")
        if sig.get("dockerReference") is not None:
            try:
                reference = compile_glob(sig["dockerReference"])
            except ValueError as exc:
                raise ConfigError(f"bad glob: {exc}", file=file,
                                  key=f"{key}.signature.dockerReference") from exc
        raw_ann = sig.get("annotations") or {}
        if not isinstance(raw_ann, dict) or not all(isinstance(k, str) for k in raw_ann):
            raise ConfigError("annotations must map strings to values", file=file,
                              key=f"{key}.signature.annotations")
        annotations = {k: str(v) for k, v in raw_ann.items()}
        sig_canon = {"dockerReference": sig.get("dockerReference"), "annotations": annotations}

    authority: Authority
    if "key" in obj:
        if "timestamps" in obj:
            raise ConfigError("timestamps applies to keyless authorities only", file=file,
                              key=f"{key}.timestamps")
        keys = _parse_keys(obj["key"], file=file, key=f"{key}.key", base=base)
        root = None
        root_source = ""
        if obj.get("trusted_root") is not None:
            root, root_source = _read(obj["trusted_root"], base, file=file,
                                      key=f"{key}.trusted_root", limit=MAX_TRUSTED_ROOT_BYTES)
        if tlog == "required" and root is None:
            raise ConfigError("tlog: required needs 'trusted_root' (the Rekor public keys)",
                              file=file, key=f"{key}.trusted_root")
        key_authority = KeyAuthority(name, keys, tlog=tlog, trusted_root=root,
                                     trusted_root_source=root_source)
        try:
            key_authority.preload()
        except ConfigError as exc:
            raise ConfigError(f"unusable trusted root: {exc}", file=file,
                              key=f"{key}.trusted_root") from exc
        authority = key_authority
        kind = "key"
    else:
        if "trusted_root" in obj:
            raise ConfigError("for keyless authorities write keyless.trusted_root", file=file,
                              key=f"{key}.trusted_root")
        # How many verified signing times (Rekor SETs + RFC 3161 timestamps) are needed.
        timestamps = obj.get("timestamps", 1)
        if (not isinstance(timestamps, int) or isinstance(timestamps, bool)
                or not 1 <= timestamps <= 16):
            raise ConfigError("timestamps must be an integer from 1 to 16 (verified signing "
                              "times needed: Rekor SETs + RFC 3161 timestamps)", file=file,
                              key=f"{key}.timestamps")
        authority = _parse_keyless(obj["keyless"], name, tlog=tlog, timestamps=timestamps,
                                   file=file, key=f"{key}.keyless", base=base)
        kind = "keyless"
    canon = {"name": name, "kind": kind, "fingerprint": authority.fingerprint,
             "signature": sig_canon}
    return AuthorityRule(name=name, authority=authority, kind=kind, reference=reference,
                         annotations=annotations), canon


def _parse_keys(value: Any, *, file: str, key: str, base: Path) -> tuple[PublicKey, ...]:
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise ConfigError("'key' must name at least one key", file=file, key=key)
    keys = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        obj = _mapping(entry, file=file, key=where)
        _unknown(obj, _KEY_KEYS, file=file, key=where)
        if ("path" in obj) == ("data" in obj):
            raise ConfigError("a key needs exactly one of 'path' or 'data' (PEM)", file=file,
                              key=where)
        algorithm = obj.get("algorithm")
        try:
            if "path" in obj:
                p = Path(_string(obj["path"], file=file, key=f"{where}.path"))
                keys.append(load_public_key_file(p if p.is_absolute() else base / p,
                                                 algorithm=algorithm))
            else:
                pem = _string(obj["data"], file=file, key=f"{where}.data").encode()
                keys.append(load_public_key(pem, algorithm=algorithm, source=f"{where}.data"))
        except ConfigError as exc:
            # Re-raise naming the policy file and location as well as the key file.
            raise ConfigError(f"unusable key: {exc}", file=file, key=where) from exc
    return tuple(keys)


def _parse_keyless(value: Any, name: str, *, tlog: str, timestamps: int, file: str, key: str,
                   base: Path) -> Authority:
    obj = _mapping(value, file=file, key=key)
    _unknown(obj, _KEYLESS_KEYS, file=file, key=key)
    root, root_source = _read(obj.get("trusted_root"), base, file=file,
                              key=f"{key}.trusted_root", limit=MAX_TRUSTED_ROOT_BYTES)
    identities = obj.get("identities")
    if not isinstance(identities, list) or not identities:
        raise ConfigError("a keyless authority needs 'identities' (a non-empty list): "
                          "without them any certificate from the CA would pass",
                          file=file, key=f"{key}.identities")
    rules: list[dict[str, Any]] = []
    for i, ident in enumerate(identities):
        where = f"{key}.identities[{i}]"
        ident_obj = _mapping(ident, file=file, key=where)
        _unknown(ident_obj, _IDENTITY_KEYS, file=file, key=where)
        rule: dict[str, Any] = {}
        for exact, regexp in (("issuer", "issuerRegExp"), ("subject", "subjectRegExp")):
            if (exact in ident_obj) == (regexp in ident_obj):
                raise ConfigError(f"an identity needs exactly one of '{exact}' or '{regexp}'",
                                  file=file, key=where)
            if exact in ident_obj:
                rule[exact] = _string(ident_obj[exact], file=file, key=f"{where}.{exact}")
            else:
                rule[regexp] = _regexp(ident_obj[regexp], file=file,
                                       key=f"{where}.{regexp}").pattern
        rules.append(rule)
    workflow = None
    if obj.get("githubWorkflow") is not None:
        workflow = _mapping(obj["githubWorkflow"], file=file, key=f"{key}.githubWorkflow")
        _unknown(workflow, _WORKFLOW_KEYS, file=file, key=f"{key}.githubWorkflow")
        for k, v in workflow.items():
            _string(v, file=file, key=f"{key}.githubWorkflow.{k}")
    material = json.dumps({"root": hashlib.sha256(root).hexdigest(), "identities": rules,
                           "githubWorkflow": workflow, "tlog": tlog, "timestamps": timestamps},
                          sort_keys=True).encode()
    return build_keyless_authority(name, root=root, root_source=root_source, identities=rules,
                                   github_workflow=workflow, tlog=tlog, timestamps=timestamps,
                                   material=material, file=file, key=key)


def build_keyless_authority(name: str, *, root: bytes, root_source: str,
                            identities: list[dict[str, Any]],
                            github_workflow: dict[str, str] | None, tlog: str, timestamps: int,
                            material: bytes, file: str = "<policy>",
                            key: str | None = None) -> Authority:
    """Turn a validated keyless config into the sigstore module's ``KeylessAuthority``.

    The import is lazy: when the sigstore module (or one of its names) is missing, or its
    constructors do not accept this shape, the result is an :class:`UnavailableAuthority`
    that fails every verification (reason ``unsupported``): the policy loads, nothing it
    guards is allowed.
    """
    from sigil.errors import VerificationError

    try:
        identity_rule = sigstore_name("IdentityRule")
        requirements_cls = sigstore_name("KeylessRequirements")
        authority_cls = sigstore_name("KeylessAuthority")
    except VerificationError as exc:
        return UnavailableAuthority(name, f"keyless verification is not available ({exc})",
                                    material)
    try:
        trusted_root = load_trusted_root(root, root_source)
        rules = tuple(identity_rule(issuer=r.get("issuer"), issuer_regexp=r.get("issuerRegExp"),
                                    subject=r.get("subject"),
                                    subject_regexp=r.get("subjectRegExp"))
                      for r in identities)
        requirements = requirements_cls(identities=rules, github_workflow=github_workflow,
                                        tlog=tlog, min_timestamps=timestamps)
        authority: Authority = authority_cls(name, requirements, trusted_root)
    except TypeError as exc:
        return UnavailableAuthority(name, f"keyless verification is not available "
                                    f"(sigstore API mismatch: {exc})", material)
    except ConfigError as exc:
        raise ConfigError(f"keyless authority {name!r}: {exc}", file=file, key=key) from exc
    except (VerificationError, ValueError) as exc:
        raise ConfigError(f"keyless authority {name!r}: {exc}", file=file, key=key) from exc
    return authority
