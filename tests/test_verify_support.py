"""Shared helpers for the verify tests: keys made at run time, real OCI manifests and blobs in
an in-memory :class:`ArtifactSource`, and cosign / DHI / BuildKit shaped signatures.

No test lives here; the bytes are real and so is the crypto (only the registry is a double).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from sigil.oci.digest import Digest
from sigil.oci.manifest import OCI_INDEX, OCI_MANIFEST, Manifest, parse_manifest
from sigil.verify.dsse import pae
from sigil.verify.policy import Policy, load_policy

SIMPLE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE = "application/vnd.dsse.envelope.v1+json"
INTOTO = "application/vnd.in-toto+json"
SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
SLSA_V02 = "https://slsa.dev/provenance/v0.2"
SLSA_V1 = "https://slsa.dev/provenance/v1"
ASSETS = Path(__file__).parent / "assets" / "verify"


# --- keys ------------------------------------------------------------------------------------

class Signer:
    """A private key made at test time and the algorithm it signs with."""

    def __init__(self, kind: str = "p256") -> None:
        self.kind = kind
        if kind == "p256":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
        elif kind == "p384":
            self.key = ec.generate_private_key(ec.SECP384R1())
        elif kind.startswith("rsa"):
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ed25519":
            self.key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(kind)

    def sign(self, data: bytes) -> bytes:
        if self.kind == "p256":
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[no-any-return]
        if self.kind == "p384":
            return self.key.sign(data, ec.ECDSA(hashes.SHA384()))  # type: ignore[no-any-return]
        if self.kind == "rsa":  # PKCS#1 v1.5 SHA-256
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore
        if self.kind == "rsa-pss":
            return self.key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),  # type: ignore
                                                   salt_length=32), hashes.SHA256())
        return self.key.sign(data)  # type: ignore[no-any-return]

    def pem(self, fmt: str = "spki") -> str:
        public = self.key.public_key()
        if fmt == "pkcs1":
            return public.public_bytes(serialization.Encoding.PEM,  # type: ignore[no-any-return]
                                       serialization.PublicFormat.PKCS1).decode()
        return public.public_bytes(serialization.Encoding.PEM,  # type: ignore[no-any-return]
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- OCI content -----------------------------------------------------------------------------

def canon(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(data)),
                           "size": len(data)}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def subject_desc(m: Manifest) -> dict[str, Any]:
    return {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw)}


class MemorySource:
    """An in-memory registry: manifests by tag and digest, blobs, an optional referrers API."""

    def __init__(self, referrers_api: bool = True) -> None:
        self.referrers_api = referrers_api
        self.manifests: dict[tuple[str, str], Manifest] = {}
        self.blobs: dict[tuple[str, Digest], bytes] = {}
        self.calls: list[tuple[str, str, str]] = []

    # ArtifactSource
    async def get_manifest(self, repo: str, reference: str) -> Manifest | None:
        self.calls.append(("manifest", repo, reference))
        return self.manifests.get((repo, reference))

    async def get_blob(self, repo: str, digest: Digest, max_bytes: int) -> bytes:
        self.calls.append(("blob", repo, str(digest)))
        data = self.blobs[(repo, digest)]
        assert len(data) <= max_bytes
        return data

    async def get_referrers(self, repo: str, digest: Digest) -> Manifest | None:
        self.calls.append(("referrers", repo, str(digest)))
        if not self.referrers_api:
            return None
        entries = []
        for (r, ref), m in self.manifests.items():
            if r == repo and ref == str(m.digest) and m.subject and m.subject.digest == digest:
                d = {"mediaType": m.media_type, "digest": str(m.digest), "size": len(m.raw)}
                if m.artifact_type:
                    d["artifactType"] = m.artifact_type
                entries.append(d)
        raw = canon({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        return parse_manifest(raw)

    # building
    def blob(self, repo: str, data: bytes) -> Digest:
        d = Digest.of(data)
        self.blobs[(repo, d)] = data
        return d

    def put(self, repo: str, obj: dict[str, Any], *tags: str) -> Manifest:
        raw = canon(obj)
        m = parse_manifest(raw)
        self.manifests[(repo, str(m.digest))] = m
        for tag in tags:
            self.manifests[(repo, tag)] = m
        return m

    def image(self, repo: str, name: str = "app", tag: str | None = None) -> Manifest:
        config = self.blob_obj(repo, {"architecture": "amd64", "os": "linux", "name": name})
        layer = self.blob(repo, f"layer of {name}".encode())
        obj = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": str(config), "size": len(self.blobs[(repo, config)])},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": str(layer), "size": len(self.blobs[(repo, layer)])}]}
        return self.put(repo, obj, *([tag] if tag else []))

    def blob_obj(self, repo: str, obj: Any) -> Digest:
        return self.blob(repo, canon(obj))

    def index(self, repo: str, children: list[dict[str, Any]], tag: str | None = None) -> Manifest:
        return self.put(repo, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children},
                        *([tag] if tag else []))

    def artifact(self, repo: str, layers: list[tuple[str, bytes, dict[str, str] | None]], *,
                 subject: Manifest | dict[str, Any] | None = None,
                 artifact_type: str | None = None, tags: tuple[str, ...] = (),
                 config_type: str = EMPTY_CONFIG) -> Manifest:
        """An artifact manifest (signature/attestation) whose layers are stored as blobs."""
        config = b"{}"
        self.blob(repo, config)
        layer_descs = []
        for media_type, data, layer_annotations in layers:
            self.blob(repo, data)
            layer_descs.append(desc(media_type, data, annotations=layer_annotations or None))
        obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": desc(config_type, config), "layers": layer_descs}
        if artifact_type:
            obj["artifactType"] = artifact_type
        if subject is not None:
            obj["subject"] = subject_desc(subject) if isinstance(subject, Manifest) else subject
        return self.put(repo, obj, *tags)


# --- cosign shapes ---------------------------------------------------------------------------

def simple_signing(digest: Digest, reference: str = "registry.test/app",
                   optional: dict[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"critical": {"identity": {"docker-reference": reference},
                                        "image": {"docker-manifest-digest": str(digest)},
                                        "type": "cosign container image signature"},
                           "optional": optional}
    return canon(obj)


def sig_layer(signer: Signer, digest: Digest, **kw: Any) -> tuple[str, bytes, dict[str, str]]:
    payload = simple_signing(digest, **kw)
    return (SIMPLE, payload, {"dev.cosignproject.cosign/signature": b64(signer.sign(payload))})


def push_sig_tag(src: MemorySource, repo: str, subject: Manifest, signer: Signer,
                 payload_digest: Digest | None = None) -> Manifest:
    """A legacy cosign `sha256-<hex>.sig` signature."""
    return src.artifact(repo, [sig_layer(signer, payload_digest or subject.digest)],
                        tags=(subject.digest.tag_form + ".sig",),
                        config_type="application/vnd.oci.image.config.v1+json")


def push_sig_referrer(src: MemorySource, repo: str, subject: Manifest, signer: Signer,
                      payload_digest: Digest | None = None) -> Manifest:
    """An OCI 1.1 simple-signing referrer (what Docker Hardened Images publish)."""
    return src.artifact(repo, [sig_layer(signer, payload_digest or subject.digest)],
                        subject=subject, artifact_type=SIG_ARTIFACT)


def statement(digest: Digest, predicate_type: str = SLSA_V02, predicate: Any = None,
              version: str = "v0.1") -> bytes:
    return canon({"_type": f"https://in-toto.io/Statement/{version}",
                  "predicateType": predicate_type,
                  "subject": [{"name": "registry.test/app", "digest": {"sha256": digest.hex}}],
                  "predicate": predicate if predicate is not None else provenance()})


def provenance(builder: str = "https://github.com/docker/buildkit@v1") -> dict[str, Any]:
    return {"builder": {"id": builder}, "buildType": "https://mobyproject.org/buildkit@v1",
            "invocation": {"configSource": {"uri": "https://github.com/acme/app"}},
            "metadata": {"reproducible": False}}


def envelope(signer: Signer, payload: bytes, payload_type: str = INTOTO) -> bytes:
    sig = signer.sign(pae(payload_type, payload))
    return canon({"payloadType": payload_type, "payload": b64(payload),
                  "signatures": [{"keyid": "", "sig": b64(sig)}]})


def push_att_tag(src: MemorySource, repo: str, subject: Manifest, signer: Signer,
                 payload: bytes, annotations: dict[str, str] | None = None) -> Manifest:
    """A legacy cosign `sha256-<hex>.att` attestation (DSSE layer)."""
    return src.artifact(repo, [(DSSE, envelope(signer, payload), annotations)],
                        tags=(subject.digest.tag_form + ".att",),
                        config_type="application/vnd.oci.image.config.v1+json")


def push_dhi_attestation(src: MemorySource, repo: str, platform: Manifest, signer: Signer | None,
                         payload: bytes, *, annotations: dict[str, str] | None = None,
                         dsse_signer: Signer | None = None,
                         subject: Manifest | dict[str, Any] | None = None) -> Manifest:
    """A DHI attestation referrer (raw statement layer, or DSSE when ``dsse_signer``) and, when
    ``signer``, its own simple-signing signature referrer on the attestation manifest."""
    ann = annotations if annotations is not None else {"in-toto.io/predicate-type": SLSA_V02}
    data = envelope(dsse_signer, payload) if dsse_signer else payload
    att = src.artifact(repo, [(INTOTO, data, ann)], subject=subject or platform,
                       artifact_type=INTOTO)
    if signer is not None:
        push_sig_referrer(src, repo, att, signer)
    return att


def write_policy(tmp_path: Path, doc: dict[str, Any], keys: dict[str, Signer] | None = None
                 ) -> Policy:
    """Write key files and the policy YAML under ``tmp_path`` and load it."""
    for name, signer in (keys or {}).items():
        (tmp_path / f"{name}.pub").write_text(signer.pem())
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_policy(path)


def key_policy(tmp_path: Path, signer: Signer, *, images: str = "registry.test/**",
               name: str = "hardened-images", **extra: Any) -> Policy:
    doc = {"policies": [{"name": name, "images": [images],
                         "authorities": [{"name": "dhi-key", "key": {"path": "dhi.pub"},
                                          **extra.pop("authority", {})}],
                         **extra}]}
    return write_policy(tmp_path, doc, {"dhi": signer})


def descriptor_of(m: Manifest, **extra: Any) -> dict[str, Any]:
    d = subject_desc(m)
    d.update(extra)
    return d

