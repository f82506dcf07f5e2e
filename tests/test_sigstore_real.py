"""Real signatures against the real production trusted root, and tampering with every byte.

* a real cosign legacy keyless ``.sig`` layer (simple-signing payload, Fulcio certificate,
  Rekor SET in ``dev.sigstore.cosign/bundle``), Rekor logIndex 3942845;
* a real cosign v0.3 DSSE attestation bundle (Rekor v1 ``dsse/0.0.1`` with SET, inclusion
  proof and checkpoint).

Altering any byte of the signature, payload, certificate, SET, log body, proof or checkpoint
must make verification fail.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sigil.errors import ConfigError, VerificationError
from sigil.verify.authority import IN_TOTO, SIMPLE_SIGNING, Authority
from sigil.verify.sigstore import (
    IdentityRule,
    KeylessAuthority,
    KeylessRequirements,
    TrustedRoot,
    verify_bundle,
    verify_cosign_keyless_layer,
)

ASSETS = Path(__file__).parent / "assets" / "sigstore"
ROOT = TrustedRoot.load(ASSETS / "trusted_root" / "production.json")

LEGACY = json.loads((ASSETS / "legacy" / "legacy-keyless-sig.json").read_text())
LEGACY_BLOB = (ASSETS / "legacy" / "legacy-keyless.payload.json").read_bytes()
LEGACY_ANN: dict[str, str] = LEGACY["layerDescriptor"]["annotations"]
LEGACY_TYPE: str = LEGACY["layerDescriptor"]["mediaType"]
LEGACY_REQ = KeylessRequirements((IdentityRule(
    issuer="https://accounts.google.com",
    subject="cosign@cosign-test-363613.iam.gserviceaccount.com"),))

ATT_BYTES = (ASSETS / "cosign" / "oci-attestation.sigstore.json").read_bytes()
ATT = json.loads(ATT_BYTES)
ATT_REQ = KeylessRequirements((IdentityRule(issuer="https://github.com/login/oauth",
                                            subject="cody@soyland.com"),))
ATT_SUBJECT = bytes.fromhex("732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4")


def flips(data: bytes):
    """Every single-byte alteration of ``data`` (one bit flipped per byte)."""
    for i in range(len(data)):
        yield i, data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def verify_legacy(annotations=None, blob=LEGACY_BLOB, req=LEGACY_REQ):
    return verify_cosign_keyless_layer(blob=blob, media_type=LEGACY_TYPE,
                                       annotations=LEGACY_ANN if annotations is None
                                       else annotations, trusted_root=ROOT, keyless=req)


def assert_all_fail(variants, verify) -> int:
    n = 0
    for where, variant in variants:
        with pytest.raises(VerificationError):
            verify(variant)
            pytest.fail(f"alteration at {where} verified")
        n += 1
    return n


# -- legacy keyless .sig ------------------------------------------------------------------

def test_legacy_sig_verifies() -> None:
    result = verify_legacy()
    assert result.payload_type == SIMPLE_SIGNING
    assert result.payload == LEGACY_BLOB
    assert hashlib.sha256(result.payload).hexdigest() == LEGACY["layerDescriptor"]["digest"][7:]
    assert result.signer.kind == "keyless"
    assert result.signer.identity == "cosign@cosign-test-363613.iam.gserviceaccount.com"
    assert result.signer.issuer == "https://accounts.google.com"  # from the .1.1 extension
    checks = " | ".join(result.signer.checks)
    for fragment in (("rekor SET log rekor.sigstore.dev (c0d23d6a) index 3942845 integrated "
                      "2022-09-25T13:16:35Z"), "SCT from log ctfe.sigstore.dev/test",
                     "fulcio chain to CN=sigstore-intermediate", "identity cosign@"):
        assert fragment in checks


def test_legacy_chain_annotation_is_only_a_hint() -> None:
    without = {k: v for k, v in LEGACY_ANN.items() if k != "dev.sigstore.cosign/chain"}
    verify_legacy(without)
    # A chain naming some other "root" changes nothing: roots come from the trusted root.
    bogus = dict(LEGACY_ANN, **{"dev.sigstore.cosign/chain": LEGACY_ANN[
        "dev.sigstore.cosign/certificate"]})
    verify_legacy(bogus)


def test_legacy_signature_any_byte() -> None:
    sig = base64.b64decode(LEGACY_ANN["dev.cosignproject.cosign/signature"])
    assert_all_fail(((i, dict(LEGACY_ANN, **{"dev.cosignproject.cosign/signature": b64(v)}))
                     for i, v in flips(sig)), verify_legacy)


def test_legacy_payload_any_byte() -> None:
    for i, blob in flips(LEGACY_BLOB):
        with pytest.raises(VerificationError):
            verify_legacy(blob=blob)
            pytest.fail(f"payload byte {i}")


def test_legacy_certificate_any_byte() -> None:
    cert = x509.load_pem_x509_certificate(LEGACY_ANN["dev.sigstore.cosign/certificate"].encode())
    der = cert.public_bytes(Encoding.DER)

    def variants():
        for i, v in flips(der):
            pem = ("-----BEGIN CERTIFICATE-----\n" + b64(v)
                   + "\n-----END CERTIFICATE-----\n")
            yield i, dict(LEGACY_ANN, **{"dev.sigstore.cosign/certificate": pem})
    assert assert_all_fail(variants(), verify_legacy) == len(der)


def _rekor_bundle() -> dict:
    return json.loads(LEGACY_ANN["dev.sigstore.cosign/bundle"])


def _with_rekor_bundle(doc: dict) -> dict[str, str]:
    return dict(LEGACY_ANN, **{"dev.sigstore.cosign/bundle": json.dumps(doc)})


def test_legacy_set_any_byte() -> None:
    doc = _rekor_bundle()
    sig = base64.b64decode(doc["SignedEntryTimestamp"])

    def variants():
        for i, v in flips(sig):
            d = copy.deepcopy(doc)
            d["SignedEntryTimestamp"] = b64(v)
            yield i, _with_rekor_bundle(d)
    assert_all_fail(variants(), verify_legacy)


def test_legacy_body_any_byte() -> None:
    doc = _rekor_bundle()
    body = base64.b64decode(doc["Payload"]["body"])

    def variants():
        for i, v in flips(body):
            d = copy.deepcopy(doc)
            d["Payload"]["body"] = b64(v)
            yield i, _with_rekor_bundle(d)
    assert_all_fail(variants(), verify_legacy)


@pytest.mark.parametrize("field,value", [
    ("integratedTime", 1664111796), ("logIndex", 3942846),
    ("logID", "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801e")])
def test_legacy_set_fields(field: str, value: object) -> None:
    doc = _rekor_bundle()
    doc["Payload"][field] = value
    with pytest.raises(VerificationError) as info:
        verify_legacy(_with_rekor_bundle(doc))
    assert info.value.reason == "tlog"


def test_legacy_body_for_other_signature_is_rejected() -> None:
    """A valid SET whose (valid) body records another artifact: the body check catches it."""
    doc = _rekor_bundle()
    body = json.loads(base64.b64decode(doc["Payload"]["body"]))
    body["spec"]["data"]["hash"]["value"] = "00" * 32
    from sigil.verify.sigstore import ExpectedEntry
    from sigil.verify.sigstore.rekor import check_body
    cert = x509.load_pem_x509_certificate(LEGACY_ANN["dev.sigstore.cosign/certificate"].encode())
    sig = base64.b64decode(LEGACY_ANN["dev.cosignproject.cosign/signature"])
    expected = ExpectedEntry.hashedrekord(sig, hashlib.sha256(LEGACY_BLOB).digest(),
                                          certificate=cert)
    check_body(base64.b64decode(doc["Payload"]["body"]), expected)
    with pytest.raises(VerificationError) as info:
        check_body(json.dumps(body).encode(), expected)
    assert info.value.reason == "tlog"


def test_legacy_policy_failures() -> None:
    with pytest.raises(VerificationError) as info:
        verify_legacy(req=KeylessRequirements((IdentityRule(
            issuer="https://accounts.google.com", subject_regexp=r"cosign@.*\.example\.com"),)))
    assert info.value.reason == "identity"
    with pytest.raises(VerificationError) as info:
        verify_legacy(req=KeylessRequirements(LEGACY_REQ.identities,
                                               github_workflow={"repository": "acme/app"}))
    assert info.value.reason == "identity"
    # Only one verified time source (the SET): asking for two fails.
    with pytest.raises(VerificationError) as info:
        verify_legacy(req=KeylessRequirements(LEGACY_REQ.identities, min_timestamps=2))
    assert info.value.reason == "timestamp"
    no_tlog = {k: v for k, v in LEGACY_ANN.items() if k != "dev.sigstore.cosign/bundle"}
    with pytest.raises(VerificationError) as info:
        verify_legacy(no_tlog)
    assert info.value.reason == "tlog"
    # tlog optional still needs a verified time, which only the SET gave.
    with pytest.raises(VerificationError) as info:
        verify_legacy(no_tlog, req=KeylessRequirements(LEGACY_REQ.identities, tlog="optional"))
    assert info.value.reason == "timestamp"


def test_legacy_wrong_media_type_and_missing_material() -> None:
    with pytest.raises(VerificationError):
        verify_cosign_keyless_layer(blob=LEGACY_BLOB, media_type="application/octet-stream",
                                    annotations=LEGACY_ANN, trusted_root=ROOT,
                                    keyless=LEGACY_REQ)
    no_cert = {k: v for k, v in LEGACY_ANN.items() if k != "dev.sigstore.cosign/certificate"}
    with pytest.raises(VerificationError) as info:
        verify_legacy(no_cert)
    assert info.value.reason == "no_key"


# -- cosign attestation bundle ------------------------------------------------------------

def verify_att(doc: dict | bytes, **kwargs):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return verify_bundle(raw, trusted_root=kwargs.pop("root", ROOT), keyless=ATT_REQ, **kwargs)


def test_attestation_bundle_verifies() -> None:
    result = verify_att(ATT_BYTES)
    assert result.payload_type == IN_TOTO
    statement = json.loads(result.payload)
    assert statement["subject"][0]["digest"]["sha256"] == ATT_SUBJECT.hex()
    assert result.signer.identity == "cody@soyland.com"
    assert result.signer.issuer == "https://github.com/login/oauth"
    checks = " | ".join(result.signer.checks)
    for fragment in ("inclusion proof at index 53604734",
                     "checkpoint signed by rekor.sigstore.dev - 1193050959916656506",
                     "rekor SET log",
                     "SCT from log ctfe.sigstore.dev/2022", "tlog body dsse/0.0.1"):
        assert fragment in checks
    # The root cosign ships next to it works too, and the subject digest binds the artifact.
    verify_att(ATT_BYTES, root=TrustedRoot.load(ASSETS / "cosign" / "trusted_root_pgi.json"),
               artifact_digest=ATT_SUBJECT)
    with pytest.raises(VerificationError) as info:
        verify_att(ATT_BYTES, artifact_digest=bytes(32))
    assert info.value.reason == "digest_mismatch"


def _att_variants(path: tuple, data: bytes, encode=b64):
    for i, v in flips(data):
        doc = copy.deepcopy(ATT)
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = encode(v)
        yield (path, i), doc


_ENTRY = ("verificationMaterial", "tlogEntries", 0)


@pytest.mark.parametrize("path", [
    ("dsseEnvelope", "signatures", 0, "sig"),
    ("dsseEnvelope", "payload"),
    ("verificationMaterial", "certificate", "rawBytes"),
    (*_ENTRY, "inclusionPromise", "signedEntryTimestamp"),
    (*_ENTRY, "canonicalizedBody"),
    (*_ENTRY, "inclusionProof", "rootHash"),
    (*_ENTRY, "inclusionProof", "hashes", 0),
    (*_ENTRY, "inclusionProof", "hashes", 15),
], ids=lambda p: "/".join(str(x) for x in p[-3:]))
def test_attestation_any_byte(path: tuple) -> None:
    node = ATT
    for key in path:
        node = node[key]
    data = base64.b64decode(node)
    assert assert_all_fail(_att_variants(path, data), verify_att) == len(data)


def test_attestation_checkpoint_any_byte() -> None:
    path = (*_ENTRY, "inclusionProof", "checkpoint", "envelope")
    text = ATT["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"][
        "envelope"].encode()
    assert_all_fail(_att_variants(path, text, encode=lambda v: v.decode("utf-8", "replace")),
                    verify_att)


@pytest.mark.parametrize("field,value", [("integratedTime", "1740770292"),
                                         ("logIndex", "175508997")])
def test_attestation_set_fields(field: str, value: str) -> None:
    doc = copy.deepcopy(ATT)
    doc["verificationMaterial"]["tlogEntries"][0][field] = value
    with pytest.raises(VerificationError) as info:
        verify_att(doc)
    assert info.value.reason == "tlog"


def test_attestation_proof_index_and_size() -> None:
    for field, value in (("logIndex", "53604733"), ("treeSize", "53604736")):
        doc = copy.deepcopy(ATT)
        doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"][field] = value
        with pytest.raises(VerificationError) as info:
            verify_att(doc)
        assert info.value.reason == "tlog"


def test_attestation_needs_its_trusted_root() -> None:
    staging = TrustedRoot.load(ASSETS / "trusted_root" / "staging.json")
    with pytest.raises(VerificationError):
        verify_att(ATT_BYTES, root=staging)


def test_staging_bundle_verifies_against_staging_root() -> None:
    """The conformance 'wrong instance' bundle is fine against the instance that made it."""
    case = ASSETS / "bundle-verify" / "bundle-from-wrong-instance_fail"
    staging = TrustedRoot.load(ASSETS / "trusted_root" / "staging.json")
    rule = IdentityRule(issuer="https://token.actions.githubusercontent.com",
                        subject_regexp=r"https://github\.com/sigstore-conformance/.+")
    result = verify_bundle((case / "bundle.sigstore.json").read_bytes(), trusted_root=staging,
                           keyless=KeylessRequirements((rule,)),
                           artifact=(ASSETS / "bundle-verify" / "a.txt").read_bytes())
    assert "rekor.sigstage.dev" in " ".join(result.signer.checks)


# -- KeylessAuthority ---------------------------------------------------------------------

def test_keyless_authority() -> None:
    auth: Authority = KeylessAuthority("release", LEGACY_REQ, ROOT)  # structural (mypy)
    assert auth.name == "release" and len(auth.fingerprint) == 64
    result = auth.verify_cosign_layer(blob=LEGACY_BLOB, media_type=LEGACY_TYPE,
                                      annotations=LEGACY_ANN)
    assert result.signer.authority == "release"
    att = KeylessAuthority("att", ATT_REQ, ROOT)
    assert att.verify_bundle(ATT_BYTES).signer.authority == "att"
    with pytest.raises(VerificationError):
        auth.verify_bundle(ATT_BYTES)          # wrong identity for this authority
    # The fingerprint is stable and changes with the rules or the trust material.
    assert auth.fingerprint == KeylessAuthority("release", LEGACY_REQ, ROOT).fingerprint
    assert auth.fingerprint != KeylessAuthority("release", ATT_REQ, ROOT).fingerprint
    staging = TrustedRoot.load(ASSETS / "trusted_root" / "staging.json")
    assert auth.fingerprint != KeylessAuthority("release", LEGACY_REQ, staging).fingerprint


def test_verify_bundle_argument_errors() -> None:
    with pytest.raises(ConfigError):
        verify_bundle(ATT_BYTES, trusted_root=ROOT)
    with pytest.raises(ConfigError):
        verify_bundle(ATT_BYTES, trusted_root=ROOT, keyless=ATT_REQ, artifact=b"x",
                      artifact_digest=bytes(32))


# -- legacy .att layer built from the real attestation's envelope, certificate and SET -------

def _att_layer() -> tuple[bytes, dict[str, str]]:
    entry = ATT["verificationMaterial"]["tlogEntries"][0]
    cert = x509.load_der_x509_certificate(
        base64.b64decode(ATT["verificationMaterial"]["certificate"]["rawBytes"]))
    rekor_bundle = {"SignedEntryTimestamp": entry["inclusionPromise"]["signedEntryTimestamp"],
                    "Payload": {"body": entry["canonicalizedBody"],
                                "integratedTime": int(entry["integratedTime"]),
                                "logIndex": int(entry["logIndex"]),
                                "logID": base64.b64decode(entry["logId"]["keyId"]).hex()}}
    annotations = {
        "dev.cosignproject.cosign/signature": "",
        "dev.sigstore.cosign/certificate": cert.public_bytes(Encoding.PEM).decode(),
        "dev.sigstore.cosign/bundle": json.dumps(rekor_bundle),
    }
    return json.dumps(ATT["dsseEnvelope"]).encode(), annotations


def test_legacy_att_layer_verifies() -> None:
    blob, annotations = _att_layer()
    result = verify_cosign_keyless_layer(blob=blob, media_type="application/vnd.dsse.envelope.v1+json",
                                         annotations=annotations, trusted_root=ROOT,
                                         keyless=ATT_REQ)
    assert result.payload_type == IN_TOTO
    assert json.loads(result.payload)["subject"][0]["digest"]["sha256"] == ATT_SUBJECT.hex()
    assert any("tlog body dsse/0.0.1" in c for c in result.signer.checks)
    # Another envelope (same signature bytes, other payload) is not the logged one.
    env = dict(ATT["dsseEnvelope"], payload=base64.b64encode(b'{"_type":"x"}').decode())
    with pytest.raises(VerificationError):
        verify_cosign_keyless_layer(blob=json.dumps(env).encode(),
                                    media_type="application/vnd.dsse.envelope.v1+json",
                                    annotations=annotations, trusted_root=ROOT, keyless=ATT_REQ)


def test_expired_ca_certificate_breaks_the_path() -> None:
    import datetime as dt

    from sigil.verify.sigstore.x509chain import build_chain
    cert = x509.load_pem_x509_certificate(LEGACY_ANN["dev.sigstore.cosign/certificate"].encode())
    ca = ROOT.certificate_authorities[1]
    at = dt.datetime(2022, 9, 25, 13, 16, 35, tzinfo=dt.UTC)
    assert len(build_chain(cert, ca, at, intermediates=())) == 2
    late = ca.certificates[0].not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(ValueError, match="CA certificate"):
        build_chain(cert, ca, late, intermediates=())
