"""DSSE PAE, envelopes, in-toto statements, simple-signing payloads, JMESPath conditions."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509
from test_verify_support import ASSETS, Signer, b64, canon, envelope, statement

from sigil.errors import ConfigError, VerificationError
from sigil.oci.digest import Digest
from sigil.verify import dsse
from sigil.verify.conditions import parse_conditions
from sigil.verify.intoto import STATEMENT_V1, parse_statement
from sigil.verify.keys import PublicKey, load_public_key
from sigil.verify.simplesigning import check_simple_signing, parse_simple_signing

D1 = Digest.of(b"one")
D2 = Digest.of(b"two")


# --- DSSE ------------------------------------------------------------------------------------

def test_pae_spec_vector() -> None:
    # secure-systems-lab/dsse protocol.md test vector.
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_bytes_not_characters() -> None:
    assert dsse.pae("t\u00e9", b"") == "DSSEv1 3 t\u00e9 0 ".encode()
    assert dsse.pae("", b"\x00\xff") == b"DSSEv1 0  2 \x00\xff"


def test_envelope_roundtrip_and_keyid_is_ignored() -> None:
    signer = Signer("p256")
    payload = statement(D1)
    env = json.loads(envelope(signer, payload))
    env["signatures"][0]["keyid"] = "some-other-key"
    parsed = dsse.parse_envelope(canon(env))
    key = load_public_key(signer.pem().encode())
    assert parsed.payload == payload
    assert dsse.verify_envelope(parsed, [key.verify]) == 0


def test_envelope_accepts_urlsafe_unpadded_base64() -> None:
    signer = Signer("p256")
    payload = b'{"x":"\xfe\xff"}' * 3
    sig = signer.sign(dsse.pae("t", payload))
    env = {"payloadType": "t",
           "payload": base64.urlsafe_b64encode(payload).decode().rstrip("="),
           "signatures": [{"sig": base64.urlsafe_b64encode(sig).decode().rstrip("=")}]}
    parsed = dsse.parse_envelope(canon(env))
    assert parsed.payload == payload
    assert dsse.verify_envelope(parsed, [load_public_key(signer.pem().encode()).verify]) == 0


def test_envelope_signature_covers_payload_type() -> None:
    signer = Signer("p256")
    env = json.loads(envelope(signer, statement(D1)))
    env["payloadType"] = "application/vnd.other+json"
    with pytest.raises(VerificationError) as err:
        dsse.verify_envelope(dsse.parse_envelope(canon(env)),
                             [load_public_key(signer.pem().encode()).verify])
    assert err.value.reason == "wrong_key"


@pytest.mark.parametrize("doc,reason", [
    ({"payload": "e30=", "signatures": [{"sig": "AA=="}]}, "invalid"),
    ({"payloadType": "t", "payload": "e30=", "signatures": []}, "no_signature"),
    ({"payloadType": "t", "payload": "!!", "signatures": [{"sig": "AA=="}]}, "invalid"),
    ({"payloadType": "t", "payload": "e30=", "signatures": [{"sig": 5}]}, "invalid"),
])
def test_envelope_malformed(doc: dict[str, object], reason: str) -> None:
    with pytest.raises(VerificationError) as err:
        dsse.parse_envelope(canon(doc))
    assert err.value.reason == reason


def test_real_cosign_attestation_bundle_dsse_verifies_with_its_certificate_key() -> None:
    """sigstore/cosign testdata: the DSSE envelope of a real v0.3 bundle, checked with the
    public key of the bundle's own (Fulcio) certificate through our PAE code."""
    bundle = json.loads((ASSETS / "oci-attestation.sigstore.json").read_bytes())
    cert = x509.load_der_x509_certificate(
        base64.b64decode(bundle["verificationMaterial"]["certificate"]["rawBytes"]))
    key = PublicKey(key=cert.public_key(), algorithm="ecdsa-p256-sha256", source="cert",
                    fingerprint="")
    env = dsse.parse_envelope(bundle["dsseEnvelope"])
    assert dsse.verify_envelope(env, [key.verify]) == 0
    st = parse_statement(env.payload)
    assert st.predicate_type == "https://cosign.sigstore.dev/attestation/v1"
    assert st.names(Digest.parse(
        "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"))
    # One flipped payload byte and the same signature fails.
    tampered = dsse.Envelope(env.payload_type, env.payload.replace(b"foo", b"fop"),
                             env.signatures)
    with pytest.raises(VerificationError):
        dsse.verify_envelope(tampered, [key.verify])


# --- in-toto ---------------------------------------------------------------------------------

def test_statement_v01_and_v1() -> None:
    assert parse_statement(statement(D1)).names(D1)
    st = parse_statement(statement(D1, version="v1"))
    assert st.type == STATEMENT_V1 and st.names(D1) and not st.names(D2)


@pytest.mark.parametrize("doc", [
    {"_type": "https://in-toto.io/Statement/v2", "predicateType": "p",
     "subject": [{"digest": {"sha256": "a" * 64}}]},
    {"_type": STATEMENT_V1, "subject": [{"digest": {"sha256": "a" * 64}}]},
    {"_type": STATEMENT_V1, "predicateType": "p", "subject": []},
    {"_type": STATEMENT_V1, "predicateType": "p", "subject": [{"digest": {"sha256": "zz"}}]},
    ["not", "an", "object"],
])
def test_statement_malformed(doc: object) -> None:
    with pytest.raises(VerificationError):
        parse_statement(canon(doc))


# --- simple signing --------------------------------------------------------------------------

def test_simple_signing_real_payload() -> None:
    # A real cosign payload (salrashid123/cosign_bazel_cloud_build, see NOTICE-verify.md).
    payload = (ASSETS / "legacy-keyless.payload.json").read_bytes()
    ss = parse_simple_signing(payload)
    digest = Digest.parse("sha256:83ab2ba6689713f2d68104cd208feadfebdd6bc881c455dcb55d2b45ac3a0753")
    assert ss.digest == digest
    assert ss.docker_reference == "us-central1-docker.pkg.dev/cosign-test-363613/repo1/myimage"
    assert ss.optional == {"key1": "value1"}
    check_simple_signing(ss, digest=digest, annotations={"key1": "value1"})
    with pytest.raises(VerificationError) as err:
        check_simple_signing(ss, digest=digest, annotations={"key1": "other"})
    assert err.value.reason == "annotation_mismatch"
    with pytest.raises(VerificationError) as err:
        check_simple_signing(ss, digest=D1)
    assert err.value.reason == "digest_mismatch"
    with pytest.raises(VerificationError) as err:
        check_simple_signing(ss, digest=digest, reference_matches=lambda r: r.startswith("x"))
    assert err.value.reason == "reference_mismatch"


@pytest.mark.parametrize("doc", [
    {"critical": {"type": "atomic container signature",
                  "image": {"docker-manifest-digest": str(D1)}}},
    {"critical": {"type": "cosign container image signature", "image": {}}},
    {"critical": {"type": "cosign container image signature",
                  "image": {"docker-manifest-digest": "sha512:abcd"}}},
    {"optional": {}},
])
def test_simple_signing_malformed(doc: object) -> None:
    with pytest.raises(VerificationError):
        parse_simple_signing(canon(doc))


# --- conditions ------------------------------------------------------------------------------

DOC = {"predicate": {"builder": {"id": "https://github.com/acme/builder@v1"},
                     "buildType": "x", "metadata": {"reproducible": True, "n": 3},
                     "materials": [{"uri": "git+https://github.com/acme/app"}]}}


def cond(obj: object) -> tuple[bool, list[str]]:
    return parse_conditions(obj, file="p.yaml", key="c").evaluate(DOC)


@pytest.mark.parametrize("c,expected", [
    ({"key": "predicate.builder.id", "operator": "Equals",
      "value": "https://github.com/acme/builder@v1"}, True),
    ({"key": "predicate.builder.id", "operator": "Equals", "value": "other"}, False),
    ({"key": "predicate.metadata.reproducible", "operator": "Equals", "value": True}, True),
    ({"key": "predicate.metadata.reproducible", "operator": "Equals", "value": 1}, False),
    ({"key": "predicate.metadata.n", "operator": "Equals", "value": 3.0}, True),
    ({"key": "predicate.metadata.n", "operator": "Equals", "value": "3"}, False),
    ({"key": "predicate.buildType", "operator": "NotEquals", "value": "y"}, True),
    ({"key": "predicate.buildType", "operator": "NotEquals", "value": "x"}, False),
    ({"key": "predicate.absent", "operator": "NotEquals", "value": "x"}, False),  # fail closed
    ({"key": "predicate.buildType", "operator": "In", "value": ["a", "x"]}, True),
    ({"key": "predicate.buildType", "operator": "In", "value": ["a", "b"]}, False),
    ({"key": "predicate.builder.id", "operator": "Matches",
      "value": r"https://github\.com/acme/.+"}, True),
    ({"key": "predicate.builder.id", "operator": "Matches", "value": "https://github"}, False),
    ({"key": "predicate.metadata.n", "operator": "Matches", "value": "3"}, False),
    ({"key": "predicate.materials[0].uri", "operator": "Exists"}, True),
    ({"key": "predicate.nothing", "operator": "Exists"}, False),
    ({"key": "predicate.nothing", "operator": "Exists", "value": False}, True),
])
def test_condition_operators(c: dict[str, object], expected: bool) -> None:
    ok, why = cond([c])
    assert ok is expected, why
    assert why


def test_condition_groups() -> None:
    yes = {"key": "predicate.buildType", "operator": "Equals", "value": "x"}
    no = {"key": "predicate.buildType", "operator": "Equals", "value": "y"}
    assert cond({"all": [yes, yes]})[0]
    assert not cond({"all": [yes, no]})[0]
    assert cond({"any": [no, yes]})[0]
    ok, why = cond({"any": [no, no]})
    assert not ok and why[0].startswith("none of")
    assert cond([yes, {"any": [no, {"all": [yes, yes]}]}])[0]
    assert not cond([yes, {"any": [no, {"all": [yes, no]}]}])[0]


@pytest.mark.parametrize("obj,needle", [
    ([{"key": "a", "operator": "Like", "value": 1}], "unknown operator"),
    ([{"key": "a[", "operator": "Equals", "value": 1}], "invalid JMESPath"),
    ([{"key": "a", "operator": "Matches", "value": "("}], "bad regular expression"),
    ([{"key": "a", "operator": "In", "value": "x"}], "needs a list"),
    ([{"key": "a", "operator": "Equals"}], "needs a 'value'"),
    ([{"key": "a", "operator": "Equals", "value": 1, "extra": 2}], "unknown condition field"),
    ({"all": []}, "must not be empty"),
    ({"some": []}, "must be a list"),
])
def test_condition_errors(obj: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_conditions(obj, file="p.yaml", key="policies[x].attestations[y].conditions")
    assert needle in str(err.value)
    assert str(err.value).startswith("p.yaml: policies[x].attestations[y].conditions")


def test_b64_helper() -> None:
    assert dsse.b64decode_any(b64(b"\xff\xfe"), what="x") == b"\xff\xfe"
    with pytest.raises(VerificationError):
        dsse.b64decode_any("a b c", what="x")


def test_assets_exist() -> None:
    assert Path(ASSETS / "dhi-2.pub").exists()
