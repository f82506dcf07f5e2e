"""Public keys with pinned algorithms and the KeyAuthority."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from test_verify_support import (
    ASSETS,
    DSSE,
    Signer,
    b64,
    canon,
    envelope,
    simple_signing,
    statement,
)

from sigil.errors import ConfigError, VerificationError
from sigil.oci.digest import Digest
from sigil.verify.authority import IN_TOTO, MESSAGE_DIGEST, SIMPLE_SIGNING
from sigil.verify.keys import KeyAuthority, load_public_key, load_public_key_file

D = Digest.of(b"image")
KINDS = [("p256", "ecdsa-p256-sha256"), ("p384", "ecdsa-p384-sha384"),
         ("rsa", "rsa-pkcs1v15-sha256"), ("rsa-pss", "rsa-pss-sha256"), ("ed25519", "ed25519")]


def authority(signer: Signer, algorithm: str | None = None, **kw: object) -> KeyAuthority:
    if algorithm is None and signer.kind == "rsa-pss":
        algorithm = "rsa-pss-sha256"
    key = load_public_key(signer.pem().encode(), algorithm=algorithm)
    return KeyAuthority("k", (key,), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind,algorithm", KINDS)
def test_each_key_type_verifies_and_wrong_key_fails(kind: str, algorithm: str) -> None:
    signer = Signer(kind)
    pinned = algorithm if kind == "rsa-pss" else None
    key = load_public_key(signer.pem().encode(), algorithm=pinned)
    assert key.algorithm == algorithm
    message = b"payload bytes"
    sig = signer.sign(message)
    assert key.verify(sig, message)
    assert not key.verify(sig, message + b"!")
    other = load_public_key(Signer(kind).pem().encode(), algorithm=pinned)
    assert not other.verify(sig, message)


def test_pkcs1_rsa_public_key_pem() -> None:
    signer = Signer("rsa")
    pem = signer.pem("pkcs1")
    assert pem.startswith("-----BEGIN RSA PUBLIC KEY-----")
    key = load_public_key(pem.encode())
    assert key.verify(signer.sign(b"m"), b"m")


def test_algorithm_is_pinned() -> None:
    # A PSS signature is refused by a key pinned to PKCS#1 v1.5, and the reverse.
    signer = Signer("rsa")
    pkcs1 = load_public_key(signer.pem().encode())
    pss = load_public_key(signer.pem().encode(), algorithm="rsa-pss-sha256")
    pss_sig = signer.key.sign(b"m", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                salt_length=padding.PSS.DIGEST_LENGTH),
                              hashes.SHA256())
    assert pss.verify(pss_sig, b"m") and not pkcs1.verify(pss_sig, b"m")
    assert pkcs1.verify(signer.sign(b"m"), b"m") and not pss.verify(signer.sign(b"m"), b"m")
    # ECDSA P-256 with SHA-384 is not what the key is pinned to.
    ec_signer = Signer("p256")
    p256 = load_public_key(ec_signer.pem().encode())
    assert not p256.verify(ec_signer.key.sign(b"m", ec.ECDSA(hashes.SHA384())), b"m")


@pytest.mark.parametrize("make,algorithm,needle", [
    (lambda: Signer("p256").pem(), "rsa-pss-sha256", "does not fit"),
    (lambda: Signer("ed25519").pem(), "ecdsa-p256-sha256", "does not fit"),
    (lambda: Signer("rsa").pem(), "ed25519", "does not fit"),
    (lambda: Signer("p256").pem(), "md5", "unknown algorithm"),
    (lambda: "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", None, "not a PEM"),
    (lambda: ec.generate_private_key(ec.SECP521R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
     None, "unsupported curve"),
    (lambda: rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
     None, "too short"),
])
def test_key_errors(make: object, algorithm: str | None, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_public_key(make().encode(), algorithm=algorithm, source="k.pub")  # type: ignore
    assert needle in str(err.value) and str(err.value).startswith("k.pub: ")


def test_dhi_public_keys_load() -> None:
    """The Docker Hardened Images keyring keys (docker-hardened-images/keyring)."""
    k2 = load_public_key_file(ASSETS / "dhi-2.pub")
    k1 = load_public_key_file(ASSETS / "dhi-1.pub")
    assert k2.algorithm == k1.algorithm == "ecdsa-p256-sha256"
    assert k2.fingerprint.startswith("118ba556") and k2.fingerprint.endswith("887c")
    assert k1.fingerprint.startswith("1b431f0d") and k1.fingerprint.endswith("737b")


def test_unreadable_key_file(tmp_path: object) -> None:
    with pytest.raises(ConfigError) as err:
        load_public_key_file("/nonexistent/dhi.pub")
    assert "/nonexistent/dhi.pub" in str(err.value) and "cannot read" in str(err.value)


# --- KeyAuthority ------------------------------------------------------------------------------

def test_sig_layer() -> None:
    signer = Signer()
    payload = simple_signing(D)
    ann = {"dev.cosignproject.cosign/signature": b64(signer.sign(payload))}
    got = authority(signer).verify_cosign_layer(blob=payload, media_type=SIMPLE_SIGNING,
                                                annotations=ann)
    assert got.payload == payload and got.payload_type == SIMPLE_SIGNING
    assert got.signer.authority == "k" and got.signer.kind == "key"
    assert any("no Rekor entry" in c for c in got.signer.checks)
    with pytest.raises(VerificationError) as err:
        authority(Signer()).verify_cosign_layer(blob=payload, media_type=SIMPLE_SIGNING,
                                                annotations=ann)
    assert err.value.reason == "wrong_key"
    with pytest.raises(VerificationError) as err:
        authority(signer).verify_cosign_layer(blob=payload + b" ", media_type=SIMPLE_SIGNING,
                                              annotations=ann)
    assert err.value.reason == "wrong_key"
    with pytest.raises(VerificationError) as err:
        authority(signer).verify_cosign_layer(blob=payload, media_type=SIMPLE_SIGNING,
                                              annotations={})
    assert err.value.reason == "no_signature"


def test_key_rotation_any_key_of_the_authority() -> None:
    old, new = Signer(), Signer("p384")
    keys = tuple(load_public_key(s.pem().encode()) for s in (old, new))
    auth = KeyAuthority("dhi", keys)
    payload = simple_signing(D)
    for s in (old, new):
        ann = {"dev.cosignproject.cosign/signature": b64(s.sign(payload))}
        assert auth.verify_cosign_layer(blob=payload, media_type=SIMPLE_SIGNING,
                                        annotations=ann).payload == payload


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
def test_att_layer_dsse(kind: str) -> None:
    signer = Signer(kind)
    payload = statement(D)
    blob = envelope(signer, payload)
    got = authority(signer).verify_cosign_layer(blob=blob, media_type=DSSE, annotations={})
    assert got.payload == payload and got.payload_type == IN_TOTO
    with pytest.raises(VerificationError) as err:
        authority(Signer(kind)).verify_cosign_layer(blob=blob, media_type=DSSE, annotations={})
    assert err.value.reason == "wrong_key"


def test_tlog_required_needs_trusted_root_and_entry() -> None:
    with pytest.raises(ConfigError):
        authority(Signer(), tlog="required")


def test_tlog_skip_ignores_annotation() -> None:
    signer = Signer()
    payload = simple_signing(D)
    ann = {"dev.cosignproject.cosign/signature": b64(signer.sign(payload)),
           "dev.sigstore.cosign/bundle": "{garbage"}
    got = authority(signer, tlog="skip").verify_cosign_layer(
        blob=payload, media_type=SIMPLE_SIGNING, annotations=ann)
    assert "tlog: skipped by policy" in got.signer.checks


def test_keyed_bundle_locally_dsse_and_message_signature() -> None:
    signer = Signer()
    payload = statement(D, predicate_type="https://sigstore.dev/cosign/sign/v1")
    env = json.loads(envelope(signer, payload))
    bundle = canon({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                    "verificationMaterial": {"publicKey": {"hint": "x"}}, "dsseEnvelope": env})
    got = authority(signer).verify_bundle(bundle)
    assert got.payload == payload and got.payload_type == IN_TOTO
    with pytest.raises(VerificationError):
        authority(Signer()).verify_bundle(bundle)

    manifest_bytes = b'{"schemaVersion":2}'
    digest = hashlib.sha256(manifest_bytes).digest()
    msg = canon({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                 "verificationMaterial": {"publicKey": {"hint": "x"}},
                 "messageSignature": {"messageDigest": {"algorithm": "SHA2_256",
                                                        "digest": b64(digest)},
                                      "signature": b64(signer.sign(manifest_bytes))}})
    got = authority(signer).verify_bundle(msg)
    assert got.payload_type == MESSAGE_DIGEST and got.message_digest == digest
    with pytest.raises(VerificationError) as err:
        authority(Signer()).verify_bundle(msg)
    assert err.value.reason == "wrong_key"


def test_fingerprint_changes_with_keys_and_rules() -> None:
    s = Signer()
    a, b = authority(s), authority(s)
    assert a.fingerprint == b.fingerprint
    assert authority(s, tlog="skip").fingerprint != a.fingerprint
    assert authority(Signer()).fingerprint != a.fingerprint
