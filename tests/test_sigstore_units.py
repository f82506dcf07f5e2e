"""Unit tests: RFC 6962 Merkle proofs, signed-note checkpoints, trusted roots, policy, DER."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sigil.errors import ConfigError, VerificationError
from sigil.verify.sigstore import (
    IdentityRule,
    KeylessRequirements,
    TrustedRoot,
    load_public_key,
    verify_bundle,
)
from sigil.verify.sigstore import _der as der
from sigil.verify.sigstore.bundle import Bundle
from sigil.verify.sigstore.checkpoint import Checkpoint
from sigil.verify.sigstore.merkle import (
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    verify_inclusion,
)
from sigil.verify.sigstore.policy import check_identity
from sigil.verify.sigstore.rekor import set_payload
from sigil.verify.sigstore.tsa import verify_timestamp

ASSETS = Path(__file__).parent / "assets" / "sigstore"
PRODUCTION_BYTES = (ASSETS / "trusted_root" / "production.json").read_bytes()


# -- Merkle (RFC 6962 §2.1) ---------------------------------------------------------------

def _mth(leaves: list[bytes]) -> bytes:
    """Reference Merkle Tree Hash, straight from RFC 6962 §2.1."""
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    """Reference audit path PATH(m, D[n]), RFC 6962 §2.1.1."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return _path(m, leaves[:k]) + [_mth(leaves[k:])]
    return _path(m - k, leaves[k:]) + [_mth(leaves[:k])]


def test_merkle_every_leaf_of_small_trees() -> None:
    for n in range(1, 34):
        leaves = [b"leaf %d" % i for i in range(n)]
        root = _mth(leaves)
        for m in range(n):
            proof = _path(m, leaves)
            verify_inclusion(m, n, leaf_hash(leaves[m]), proof, root)


@pytest.mark.parametrize("n,m", [(1, 0), (2, 1), (7, 6), (8, 3), (13, 12), (33, 16)])
def test_merkle_mutations_fail(n: int, m: int) -> None:
    leaves = [b"leaf %d" % i for i in range(n)]
    root, proof, leaf = _mth(leaves), _path(m, leaves), leaf_hash(leaves[m])
    bad_cases = [
        (m + 1, n, leaf, proof),                       # wrong index
        # A different size with the same path shape yields the same root (the checkpoint
        # binds size and root together); a size of another depth must fail.
        (m, 2 * n + 1, leaf, proof),
        (m, n, leaf_hash(b"other"), proof),            # wrong leaf
        (m, n, leaf, proof + [bytes(32)]),             # too long
    ]
    if proof:
        bad_cases.append((m, n, leaf, proof[:-1]))     # too short
        flipped = bytearray(proof[0])
        flipped[0] ^= 1
        bad_cases.append((m, n, leaf, [bytes(flipped)] + proof[1:]))
    for index, size, lf, pf in bad_cases:
        with pytest.raises(VerificationError) as info:
            verify_inclusion(index, size, lf, pf, root)
        assert info.value.reason == "tlog"


def test_merkle_rejects_malformed_input() -> None:
    for index, size, proof in ((0, 0, []), (5, 5, []), (-1, 3, []), (0, 2, [b"short"])):
        with pytest.raises(VerificationError):
            root_from_inclusion_proof(index, size, bytes(32), proof)


def test_merkle_real_rekor_proof() -> None:
    """A production proof: tree-local index 53604734 of a 53604735-leaf shard."""
    doc = json.loads((ASSETS / "cosign" / "oci-attestation.sigstore.json").read_text())
    entry = doc["verificationMaterial"]["tlogEntries"][0]
    proof = entry["inclusionProof"]
    body = base64.b64decode(entry["canonicalizedBody"])
    hashes_ = [base64.b64decode(h) for h in proof["hashes"]]
    root = base64.b64decode(proof["rootHash"])
    verify_inclusion(int(proof["logIndex"]), int(proof["treeSize"]), leaf_hash(body), hashes_,
                     root)
    # The global logIndex (what the SET signs) is not the tree-local index.
    with pytest.raises(VerificationError):
        verify_inclusion(int(entry["logIndex"]) % int(proof["treeSize"]),
                         int(proof["treeSize"]), leaf_hash(body), hashes_, root)


# -- signed notes / checkpoints -----------------------------------------------------------

def _ed25519_root(name: str, key: ed25519.Ed25519PrivateKey) -> tuple[TrustedRoot, bytes]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()  # C2SP note key ID
    doc = {"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
           "tlogs": [{"baseUrl": f"https://{name}", "hashAlgorithm": "SHA2_256",
                      "publicKey": {"rawBytes": base64.b64encode(key.public_key().public_bytes(
                          serialization.Encoding.DER,
                          serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
                          "keyDetails": "PKIX_ED25519",
                          "validFor": {"start": "2020-01-01T00:00:00Z"}},
                      "logId": {"keyId": base64.b64encode(key_id).decode()}}],
           "certificateAuthorities": [], "ctlogs": [], "timestampAuthorities": []}
    return TrustedRoot.from_json(json.dumps(doc)), key_id


def _note(origin: str, size: int, root: bytes, extra: str = "") -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n{extra}"


def _sig_line(name: str, hint: bytes, sig: bytes) -> str:
    return f"\u2014 {name} {base64.b64encode(hint + sig).decode()}\n"


def test_checkpoint_ed25519_and_cosignatures() -> None:
    name = "log.example.org"
    key = ed25519.Ed25519PrivateKey.generate()
    root, key_id = _ed25519_root(name, key)
    log = root.tlogs[0]
    note = _note(name, 42, bytes(range(32)))
    good = _sig_line(name, key_id[:4], key.sign(note.encode()))
    witness = _sig_line("witness.example", b"\x01\x02\x03\x04", bytes(72))
    for block in (good, witness + good, good + witness, witness + witness + good):
        cp = Checkpoint.parse(note + "\n" + block)
        assert (cp.origin, cp.tree_size, cp.root_hash) == (name, 42, bytes(range(32)))
        assert cp.verify(log).name == name
    # Only foreign lines; the log's line under another name; a wrong hint; a bad signature.
    other = ed25519.Ed25519PrivateKey.generate()
    for block in (witness, _sig_line("evil.example.org", key_id[:4], key.sign(note.encode())),
                  _sig_line(name, b"\0\0\0\0", key.sign(note.encode())),
                  _sig_line(name, key_id[:4], other.sign(note.encode()))):
        with pytest.raises(VerificationError) as info:
            Checkpoint.parse(note + "\n" + block).verify(log)
        assert info.value.reason == "tlog"
    # The signature covers the whole note, extension lines included.
    extended = _note(name, 42, bytes(range(32)), "Timestamp: 1\n")
    with pytest.raises(VerificationError):
        Checkpoint.parse(extended + "\n" + good).verify(log)


def test_checkpoint_ecdsa_rekor_v1_style() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    log_id = hashlib.sha256(spki).digest()
    doc = json.loads(PRODUCTION_BYTES)
    doc["tlogs"] = [{"baseUrl": "https://rekor.example.com", "hashAlgorithm": "SHA2_256",
                     "publicKey": {"rawBytes": base64.b64encode(spki).decode(),
                                   "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                                   "validFor": {"start": "2021-01-12T11:53:27Z"}},
                     "logId": {"keyId": base64.b64encode(log_id).decode()}}]
    log = TrustedRoot.from_json(json.dumps(doc)).tlogs[0]
    note = _note("rekor.example.com - 123", 7, bytes(32), "Timestamp: 1689177396617352539\n")
    sig = key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
    cp = Checkpoint.parse(note + "\n" + _sig_line("rekor.example.com", log_id[:4], sig))
    assert cp.extensions == ("Timestamp: 1689177396617352539",)
    cp.verify(log)


@pytest.mark.parametrize("text", [
    "",
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n",            # no signatures
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n",          # empty block
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAA=",  # no \n
    "1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAAA\n",        # 2 lines
    "origin\n01\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAAA\n",
    "origin\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAAA\n",
    "origin\n1\n" + base64.b64encode(bytes(31)).decode() + "\n\n\u2014 n AAAAAAAA\n",
    "origin\n1\nnot base64!\n\n\u2014 n AAAAAAAA\n",
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n- n AAAAAAAA\n",  # hyphen
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAA\n",  # too short
    "origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAAA\n\n",
    " origin\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n\u2014 n AAAAAAAA\n",
])
def test_checkpoint_malformed(text: str) -> None:
    with pytest.raises(VerificationError) as info:
        Checkpoint.parse(text)
    assert info.value.reason == "tlog"


def test_checkpoint_real_rekor_v2() -> None:
    case = ASSETS / "bundle-verify" / "rekor2-checkpoint-origin-not-first"
    root = TrustedRoot.load(case / "trusted_root.json")
    entry = json.loads((case / "bundle.sigstore.json").read_text())[
        "verificationMaterial"]["tlogEntries"][0]
    cp = Checkpoint.parse(entry["inclusionProof"]["checkpoint"]["envelope"])
    log = root.tlog(base64.b64decode(entry["logId"]["keyId"]))
    assert log is not None and log.key_details == "PKIX_ED25519"
    assert cp.verify(log).name == "log2025-alpha1.rekor.sigstage.dev"
    assert cp.origin == "log2025-alpha1.rekor.sigstage.dev" and len(cp.signatures) == 2


# -- SET payload --------------------------------------------------------------------------

def test_set_payload_is_canonical_json() -> None:
    assert set_payload("Ym9keQ==", 5, bytes([0xC0, 0xD2]), 7) == (
        b'{"body":"Ym9keQ==","integratedTime":5,"logID":"c0d2","logIndex":7}')


# -- trusted root -------------------------------------------------------------------------

def test_trusted_root_parsing_and_cache() -> None:
    root = TrustedRoot.from_json(PRODUCTION_BYTES)
    assert root is TrustedRoot.from_json(PRODUCTION_BYTES)                # cached by content
    assert root.fingerprint == "sha256:" + hashlib.sha256(PRODUCTION_BYTES).hexdigest()
    assert {t.key_details for t in root.tlogs} == {"PKIX_ECDSA_P256_SHA_256", "PKIX_ED25519"}
    rekor_v1 = root.tlog(bytes.fromhex(
        "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"))
    assert rekor_v1 is not None and rekor_v1.name == "rekor.sigstore.dev"
    assert len(root.certificate_authorities) == 2 and len(root.ctlogs) == 2
    assert len(root.timestamp_authorities) == 1
    ca = root.certificate_authorities[0]
    assert ca.valid_for.end is not None and ca.root.subject == ca.root.issuer
    # validFor is inclusive at both ends.
    assert ca.valid_for.contains(ca.valid_for.start) and ca.valid_for.contains(ca.valid_for.end)
    assert not ca.valid_for.contains(ca.valid_for.end + dt.timedelta(microseconds=1))
    # The v0.2 media type spelling is accepted.
    doc = json.loads(PRODUCTION_BYTES)
    doc["mediaType"] = "application/vnd.dev.sigstore.trustedroot.v0.2+json"
    assert TrustedRoot.from_json(json.dumps(doc)).media_type.endswith("v0.2+json")


def _mutated_root(mutate) -> bytes:
    doc = json.loads(PRODUCTION_BYTES)
    mutate(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(mediaType="application/json"),
    lambda d: d["tlogs"][0]["publicKey"]["validFor"].pop("start"),
    lambda d: d["tlogs"][0]["publicKey"].pop("validFor"),
    lambda d: d["ctlogs"][0]["publicKey"].update(keyDetails="PKIX_ED25519"),
    lambda d: d["tlogs"][0]["publicKey"].update(rawBytes="AAAA"),
    lambda d: d["tlogs"][0]["logId"].update(keyId="AAAA"),
    lambda d: d["certificateAuthorities"][0]["validFor"].update(start="yesterday"),
    lambda d: d["certificateAuthorities"][1]["certChain"]["certificates"].pop(),  # no root
    lambda d: d["timestampAuthorities"][0]["certChain"]["certificates"].pop(0),  # root only
    lambda d: d["tlogs"].append(copy.deepcopy(d["tlogs"][0])),                    # duplicate
], ids=["media-type", "no-start", "no-validFor", "key-details", "bad-key", "short-logid",
        "bad-time", "ca-without-root", "tsa-root-only", "duplicate-log"])
def test_trusted_root_rejects_malformed(mutate) -> None:
    with pytest.raises(ConfigError):
        TrustedRoot.from_json(_mutated_root(mutate))


def test_trusted_root_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TrustedRoot.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError) as info:
        TrustedRoot.load(bad)
    assert "bad.json" in str(info.value)


def test_load_public_key_pem_and_der() -> None:
    pem = (ASSETS / "bundle-verify" / "managed-key-happy-path" / "key.pub").read_bytes()
    key = load_public_key(pem)
    der_bytes = key.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_public_key(der_bytes).public_numbers() == key.public_numbers()  # type: ignore
    with pytest.raises(VerificationError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# -- identity policy ----------------------------------------------------------------------

def _happy_cert() -> x509.Certificate:
    doc = json.loads((ASSETS / "bundle-verify" / "happy-path-v0.3" /
                      "bundle.sigstore.json").read_text())
    return x509.load_der_x509_certificate(base64.b64decode(
        doc["verificationMaterial"]["certificate"]["rawBytes"]))


GH = "https://token.actions.githubusercontent.com"
WORKFLOW = ("https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/"
            ".github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main")


def test_requirements_config_errors() -> None:
    with pytest.raises(ConfigError):
        KeylessRequirements(())
    for kwargs in ({}, {"issuer": GH}, {"subject": WORKFLOW},
                   {"issuer": GH, "issuer_regexp": ".*", "subject": WORKFLOW},
                   {"issuer": GH, "subject": WORKFLOW, "subject_regexp": ".*"},
                   {"issuer": GH, "subject_regexp": "("}, {"issuer": "", "subject": "x"}):
        with pytest.raises(ConfigError):
            IdentityRule(**kwargs)
    rule = IdentityRule(issuer=GH, subject=WORKFLOW)
    for kwargs in ({"tlog": "sometimes"}, {"min_timestamps": 0},
                   {"github_workflow": {"colour": "blue"}},
                   {"github_workflow": {"ref": 1}}):
        with pytest.raises(ConfigError):
            KeylessRequirements((rule,), **kwargs)  # type: ignore[arg-type]


def test_identity_and_github_claims() -> None:
    cert = _happy_cert()
    ok = IdentityRule(issuer=GH, subject=WORKFLOW)
    claims = {"trigger": "workflow_dispatch", "sha": "c7b3dfb335f051e1c86bda4c716fac97df62ad81",
              "name": "Extremely dangerous OIDC beacon",
              "repository": "sigstore-conformance/extremely-dangerous-public-oidc-beacon",
              "ref": "refs/heads/main",
              "1.3.6.1.4.1.57264.1.11": "github-hosted"}   # DER-encoded Fulcio claim by OID
    assert check_identity(cert, KeylessRequirements((ok,), github_workflow=claims)) == (
        WORKFLOW, GH)
    regexp = IdentityRule(issuer_regexp=r"https://token\.actions\.githubusercontent\.com",
                          subject_regexp=r"https://github\.com/sigstore-conformance/.+@refs/"
                                         r"heads/main")
    other = IdentityRule(issuer=GH, subject="https://github.com/acme/x")
    assert check_identity(cert, KeylessRequirements((other, regexp)))[0] == WORKFLOW
    for req in (KeylessRequirements((other,)),
                KeylessRequirements((IdentityRule(issuer_regexp="https://token", subject_regexp=
                                                  ".*"),)),       # anchored: no prefix match
                KeylessRequirements((ok,), github_workflow={"ref": "refs/heads/evil"}),
                KeylessRequirements((ok,), github_workflow={"1.3.6.1.4.1.57264.1.99": "x"})):
        with pytest.raises(VerificationError) as info:
            check_identity(cert, req)
        assert info.value.reason == "identity"
    fp = KeylessRequirements((ok,)).fingerprint
    assert fp == KeylessRequirements((IdentityRule(issuer=GH, subject=WORKFLOW),)).fingerprint
    assert fp != KeylessRequirements((ok,), min_timestamps=2).fingerprint


# -- bundle parsing -----------------------------------------------------------------------

def _happy_doc() -> dict:
    return json.loads((ASSETS / "bundle-verify" / "happy-path-v0.3" /
                       "bundle.sigstore.json").read_text())


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("messageSignature"),
    lambda d: d.update(dsseEnvelope={"payload": "", "payloadType": "x", "signatures": []}),
    lambda d: d["verificationMaterial"].pop("certificate"),
    lambda d: d["verificationMaterial"].update(x509CertificateChain={"certificates": []}),
    lambda d: d["verificationMaterial"]["tlogEntries"][0].update(logIndex="1e3"),
    lambda d: d["verificationMaterial"]["tlogEntries"][0]["inclusionProof"].update(
        treeSize="0"),
    lambda d: d["verificationMaterial"]["tlogEntries"][0].update(canonicalizedBody="%%"),
    lambda d: d["verificationMaterial"].update(tlogEntries="x"),
    lambda d: d["messageSignature"].update(signature=""),
], ids=["no-content", "two-contents", "no-material", "two-materials", "bad-int",
        "zero-tree", "bad-b64", "entries-not-list", "empty-signature"])
def test_bundle_parse_rejects(mutate) -> None:
    doc = _happy_doc()
    mutate(doc)
    with pytest.raises(VerificationError) as info:
        Bundle.from_dict(doc)
    assert info.value.reason == "malformed"


def test_bundle_media_types() -> None:
    doc = _happy_doc()
    assert Bundle.from_dict(doc).version == "0.3"
    doc["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.2"
    with pytest.raises(VerificationError):      # a bare certificate is v0.3 only
        Bundle.from_dict(doc)


def test_keyless_bundle_with_public_key_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(VerificationError) as info:
        verify_bundle(json.dumps(_happy_doc()).encode(),
                      trusted_root=TrustedRoot.from_json(PRODUCTION_BYTES), public_key=key)
    assert info.value.reason == "no_key"


def test_tlog_skip_and_min_timestamps_on_rekor_v2() -> None:
    """Rekor v2 entries carry no time: the TSA is the only verified time source."""
    case = ASSETS / "bundle-verify" / "rekor2-happy-path"
    root = TrustedRoot.load(case / "trusted_root.json")
    bundle = (case / "bundle.sigstore.json").read_bytes()
    art = (ASSETS / "bundle-verify" / "a.txt").read_bytes()
    rule = IdentityRule(issuer=GH, subject=WORKFLOW)
    result = verify_bundle(bundle, trusted_root=root, keyless=KeylessRequirements((rule,)),
                           artifact=art)
    assert any(c.startswith("RFC 3161 timestamp by") for c in result.signer.checks)
    skipped = verify_bundle(bundle, trusted_root=root,
                            keyless=KeylessRequirements((rule,), tlog="skip"), artifact=art)
    assert not any("tlog body" in c for c in skipped.signer.checks)
    with pytest.raises(VerificationError) as info:
        verify_bundle(bundle, trusted_root=root,
                      keyless=KeylessRequirements((rule,), min_timestamps=2), artifact=art)
    assert info.value.reason == "timestamp"


# -- DER and RFC 3161 ---------------------------------------------------------------------

def test_der_reader() -> None:
    assert der.decode_oid(der.parse(bytes.fromhex("06092a864886f70d010702"))) == \
        "1.2.840.113549.1.7.2"
    assert der.decode_int(der.parse(b"\x02\x02\x01\x00")) == 256
    t = der.decode_generalized_time(der.parse(b"\x18\x1320250612120220.123Z"))
    assert t == dt.datetime(2025, 6, 12, 12, 2, 20, 123000, tzinfo=dt.UTC)
    for bad in (b"\x30\x80\x00\x00", b"\x30\x81\x01\x00", b"\x02\x05\x00", b"\x1f\x01\x00",
                b"\x02\x01\x00\x00", b"\x18\x0f20250612120220Z"[:5]):
        with pytest.raises(der.DERError):
            der.parse(bad)
    for bad_time in (b"\x18\x0d250612120220Z", b"\x18\x1020250612120220.Z",
                     b"\x18\x1120250612120220.10Z"):
        with pytest.raises(der.DERError):
            der.decode_generalized_time(der.parse(bad_time))


def _rekor2_timestamp(name: str = "rekor2-happy-path") -> tuple[TrustedRoot, bytes, bytes]:
    case = ASSETS / "bundle-verify" / name
    doc = json.loads((case / "bundle.sigstore.json").read_text())
    token = base64.b64decode(doc["verificationMaterial"]["timestampVerificationData"][
        "rfc3161Timestamps"][0]["signedTimestamp"])
    signature = base64.b64decode(doc["messageSignature"]["signature"])
    return TrustedRoot.load(case / "trusted_root.json"), token, signature


def test_rfc3161_real_token() -> None:
    root, token, signature = _rekor2_timestamp()
    ts = verify_timestamp(token, signature, root)
    assert ts.time == dt.datetime(2025, 6, 12, 12, 2, 20, tzinfo=dt.UTC)
    assert "sigstore-tsa" in ts.authority.subject
    # The bare TimeStampToken (without the TimeStampResp wrapper) verifies too.
    inner = der.parse(token).children()[1].raw
    assert verify_timestamp(inner, signature, root).time == ts.time
    with pytest.raises(VerificationError) as info:
        verify_timestamp(token, signature + b"x", root)
    assert info.value.reason == "timestamp"
    # "Now" before genTime: a timestamp from the future.
    with pytest.raises(VerificationError):
        verify_timestamp(token, signature, root, at=ts.time - dt.timedelta(hours=1))


@pytest.mark.parametrize("case", ["rekor2-happy-path",      # signer certificate embedded
                                  "rekor2-timestamp-without-embedded-cert"])
def test_rfc3161_every_byte(case: str) -> None:
    """No single-byte change of a real token still verifies.

    Except the unsigned PKIStatus (byte 8): 0 "granted" and 1 "grantedWithMods" are both
    successful responses (RFC 3161 §2.4.2).
    """
    root, token, signature = _rekor2_timestamp(case)
    verify_timestamp(token, signature, root)
    assert token[6:9] == b"\x02\x01\x00"
    for i in range(len(token)):
        if i == 8:
            continue
        bad = token[:i] + bytes([token[i] ^ 0x01]) + token[i + 1:]
        with pytest.raises(VerificationError):
            verify_timestamp(bad, signature, root)
            pytest.fail(f"token byte {i} altered and still verified")


# -- signature schemes --------------------------------------------------------------------

def test_verify_signature_schemes() -> None:
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from sigil.verify.sigstore._common import verify_signature

    data = b"artifact"
    digest384 = hashlib.sha384(data).digest()
    p384 = ec.generate_private_key(ec.SECP384R1())
    verify_signature(p384.public_key(), p384.sign(data, ec.ECDSA(hashes.SHA384())), data)
    verify_signature(p384.public_key(), p384.sign(digest384, ec.ECDSA(Prehashed(
        hashes.SHA384()))), digest384, prehashed=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    pss_max = rsa_key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                             salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
    verify_signature(rsa_key.public_key(), pkcs1, data)
    verify_signature(rsa_key.public_key(), pss_max, data)
    ed = ed25519.Ed25519PrivateKey.generate()
    verify_signature(ed.public_key(), ed.sign(data), data)
    for key, sig, msg, kw in ((p384.public_key(), pkcs1, data, {}),
                              (rsa_key.public_key(), pkcs1, b"other", {}),
                              (ed.public_key(), ed.sign(data), hashlib.sha256(data).digest(),
                               {"prehashed": True})):
        with pytest.raises(VerificationError):
            verify_signature(key, sig, msg, **kw)  # type: ignore[arg-type]
