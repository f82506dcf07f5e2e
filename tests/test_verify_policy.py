"""Policy file parsing, validation errors, glob matching and the fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_verify_support import ASSETS, Signer

from sigil.errors import ConfigError
from sigil.verify.keys import KeyAuthority
from sigil.verify.policy import compile_glob, load_policy, load_yaml_file

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, doc: Any) -> Path:
    shutil.copy(ASSETS / "dhi-2.pub", tmp_path / "dhi-2.pub")
    path = tmp_path / "policy.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def dhi(**extra: Any) -> dict[str, Any]:
    policy = {"name": "hardened-images", "images": ["dhi.io/**"],
              "authorities": [{"name": "dhi-key", "key": {"path": "dhi-2.pub"}}]}
    policy.update(extra)
    return policy


def test_minimal_key_policy(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, {"policies": [dhi()]}))
    rule, = policy.rules
    assert rule.name == "hardened-images" and rule.mode == "enforce" and rule.threshold == 1
    auth = rule.authorities[0].authority
    assert isinstance(auth, KeyAuthority) and auth.keys[0].algorithm == "ecdsa-p256-sha256"
    assert policy.matching("dhi.io/python") == [rule]
    assert policy.matching("docker.io/library/python") == []
    assert len(policy.fingerprint) == 64


@pytest.mark.parametrize("glob,yes,no", [
    ("dhi.io/**", ["dhi.io/python", "dhi.io/a/b/c"], ["dhi.io", "docker.io/dhi.io/x"]),
    ("docker.io/acme/dhi-*", ["docker.io/acme/dhi-python"],
     ["docker.io/acme/dhi-python/sub", "docker.io/acme/python"]),
    ("localhost:5000/*/app", ["localhost:5000/team/app"], ["localhost:5000/a/b/app"]),
    ("**", ["anything/at/all"], []),
    ("ghcr.io/acme/app", ["ghcr.io/acme/app"], ["ghcr.io/acme/app2", "ghcr.io/acme/ap"]),
    ("a.io/x.y", ["a.io/x.y"], ["a.io/xzy"]),  # dots are literal
])
def test_globs(glob: str, yes: list[str], no: list[str]) -> None:
    pattern = compile_glob(glob)
    assert all(pattern.fullmatch(i) for i in yes)
    assert not any(pattern.fullmatch(i) for i in no)


def test_static_and_warn(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, {"policies": [
        dhi(mode="warn"),
        {"name": "sandbox", "images": ["registry.internal/sandbox/**"], "static": "pass"}]}))
    assert policy.rules[0].mode == "warn"
    assert policy.rules[1].static == "pass"


def test_fingerprint_tracks_rules_and_keys(tmp_path: Path) -> None:
    base = load_policy(write(tmp_path, {"policies": [dhi()]})).fingerprint
    assert load_policy(write(tmp_path, {"policies": [dhi()]})).fingerprint == base
    assert load_policy(write(tmp_path, {"policies": [dhi(mode="warn")]})).fingerprint != base
    # Same path, other key material: a new fingerprint.
    path = write(tmp_path, {"policies": [dhi()]})
    (tmp_path / "dhi-2.pub").write_text(Signer().pem())
    assert load_policy(path).fingerprint != base


def test_inline_key_and_key_list(tmp_path: Path) -> None:
    a, b = Signer(), Signer("rsa")
    policy = load_policy(write(tmp_path, {"policies": [{
        "name": "internal", "images": ["registry.internal/**"], "threshold": 1,
        "authorities": [{"name": "rotating", "key": [{"data": a.pem()},
                                                      {"data": b.pem(),
                                                       "algorithm": "rsa-pss-sha256"}]}]}]}))
    auth = policy.rules[0].authorities[0].authority
    assert isinstance(auth, KeyAuthority)
    assert [k.algorithm for k in auth.keys] == ["ecdsa-p256-sha256", "rsa-pss-sha256"]


def test_attestations_and_signature_constraints(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, {"policies": [dhi(
        attestations=[{"name": "provenance", "predicateType": "https://slsa.dev/provenance/v0.2",
                       "conditions": [{"key": "predicate.builder.id", "operator": "Matches",
                                       "value": "^https://github.com/docker-hardened-images/.*"}]}],
        authorities=[{"name": "dhi-key", "key": {"path": "dhi-2.pub"},
                      "signature": {"dockerReference": "dhi.io/**",
                                    "annotations": {"team": "platform"}}}])]}))
    rule = policy.rules[0]
    assert rule.attestations[0].predicate_type == "https://slsa.dev/provenance/v0.2"
    assert rule.authorities[0].reference is not None
    assert dict(rule.authorities[0].annotations) == {"team": "platform"}


def test_example_policy_file_loads() -> None:
    policy = load_policy(REPO_ROOT / "config" / "policy.yaml")
    assert {r.name for r in policy.rules} >= {"hardened-images"}


ERRORS = [
    # (policy document, key the error must name, words of the problem)
    ({"policies": []}, "policies", "non-empty"),
    ({"policies": [dhi()], "extra": 1}, None, "unknown key(s) extra"),
    ({"policies": [{"name": "p", "images": ["dhi.io/**"]}]}, "policies[p].authorities",
     "'authorities'"),
    ({"policies": [{"name": "p", "images": ["dhi.io/**"], "authorities": []}]},
     "policies[p].authorities", "or 'static'"),
    ({"policies": [dhi(colour="red")]}, "policies[hardened-images]", "unknown key(s) colour"),
    ({"policies": [dhi(images=["DHI.io/**"])]}, "policies[hardened-images].images[0]",
     "bad glob"),
    ({"policies": [dhi(images=["dhi.io/***"])]}, "policies[hardened-images].images[0]",
     "bad glob"),
    ({"policies": [dhi(images=[])]}, "policies[hardened-images].images", "non-empty"),
    ({"policies": [dhi(mode="audit")]}, "policies[hardened-images].mode", "enforce, warn"),
    ({"policies": [dhi(threshold=2)]}, "policies[hardened-images].threshold", "threshold"),
    ({"policies": [dhi(), dhi()]}, "policies[hardened-images]", "duplicate policy"),
    ({"policies": [dhi(static="pass")]}, "policies[hardened-images]", "static policy"),
    ({"policies": [{"name": "p", "images": ["a/**"], "static": "maybe"}]},
     "policies[p].static", "pass, deny"),
    ({"policies": [{"name": "bad name!", "images": ["a/**"], "static": "pass"}]},
     "policies[0].name", "'name'"),
    ({"policies": [dhi(authorities=[{"name": "k", "key": {"path": "missing.pub"}}])]},
     "policies[hardened-images].authorities[k].key", "cannot read key file"),
    ({"policies": [dhi(authorities=[{"name": "k", "key": {"data": "not a key"}}])]},
     "policies[hardened-images].authorities[k].key", "not a PEM public key"),
    ({"policies": [dhi(authorities=[{"name": "k", "key": {"path": "dhi-2.pub",
                                                          "algorithm": "rsa-pss-sha256"}}])]},
     "policies[hardened-images].authorities[k].key", "does not fit"),
    ({"policies": [dhi(authorities=[{"name": "k", "key": {"path": "dhi-2.pub"},
                                     "tlog": "required"}])]},
     "policies[hardened-images].authorities[k].trusted_root", "needs 'trusted_root'"),
    ({"policies": [dhi(authorities=[{"name": "k", "key": {"path": "dhi-2.pub"},
                                     "tlog": "maybe"}])]},
     "policies[hardened-images].authorities[k].tlog", "required, optional, skip"),
    ({"policies": [dhi(authorities=[{"name": "k"}])]},
     "policies[hardened-images].authorities[k]", "exactly one of 'key' or 'keyless'"),
    ({"policies": [dhi(authorities=[{"name": "k", "keyless": {"trusted_root": "root.json"}}])]},
     "policies[hardened-images].authorities[k].keyless.identities", "needs 'identities'"),
    ({"policies": [dhi(authorities=[{"name": "k", "keyless": {
        "trusted_root": "root.json",
        "identities": [{"issuer": "https://x", "subjectRegExp": "(unclosed"}]}}])]},
     "policies[hardened-images].authorities[k].keyless.identities[0].subjectRegExp",
     "bad regular expression"),
    ({"policies": [dhi(authorities=[{"name": "k", "keyless": {
        "trusted_root": "root.json", "identities": [{"issuer": "https://x"}]}}])]},
     "policies[hardened-images].authorities[k].keyless.identities[0]",
     "'subject' or 'subjectRegExp'"),
    ({"policies": [dhi(authorities=[{"name": "k", "keyless": {
        "trusted_root": "missing.json", "identities": [{"issuer": "i", "subject": "s"}]}}])]},
     "policies[hardened-images].authorities[k].keyless.trusted_root", "cannot read"),
    ({"policies": [dhi(attestations=[{"name": "prov", "predicateType": "x",
                                      "conditions": [{"key": "a", "operator": "Matches",
                                                      "value": "(("}]}])]},
     "policies[hardened-images].attestations[prov].conditions[0].value",
     "bad regular expression"),
    ({"policies": [dhi(attestations=[{"name": "prov"}])]},
     "policies[hardened-images].attestations[prov].predicateType", "non-empty string"),
    ({"policies": [dhi(signatureRepository="UPPER/case")]},
     "policies[hardened-images].signatureRepository", "invalid repository name"),
    ({"policies": [dhi()], "limits": {"maxArtifacts": 0}}, "limits.maxArtifacts", "between"),
    ("policies: [\n  - {name: x", None, "invalid YAML"),
]


@pytest.mark.parametrize("doc,key,words", ERRORS)
def test_errors_name_file_policy_and_problem(tmp_path: Path, doc: Any, key: str | None,
                                             words: str) -> None:
    (tmp_path / "root.json").write_text("{}")
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    text = str(err.value)
    assert err.value.file == str(path), text
    assert text.startswith(str(path)), text
    if key is not None:
        assert err.value.key is not None and err.value.key.startswith(key), text
    assert words in text, text


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_policy(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_the_bounded_yaml_read_names_the_file_and_what_it_is(tmp_path: Path) -> None:
    # One reader for policy and plan files: refused before parsing when too big.
    big = tmp_path / "plan.yaml"
    big.write_bytes(b"images: []\n" + b"#" * 2048)
    with pytest.raises(ConfigError, match="plan file is too large") as raised:
        load_yaml_file(big, 1024, "plan file")
    assert str(big) in str(raised.value)
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_yaml_file(tmp_path / "absent.yaml", 1024, "policy file")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml_file(tmp_path / "bad.yaml", 1024, "plan file")
    assert load_yaml_file(big, 4096, "plan file") == {"images": []}
