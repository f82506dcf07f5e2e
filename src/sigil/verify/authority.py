"""The contract between the policy engine and the things that check signatures.

An *authority* (a policy's ``authorities[]`` entry) is either a set of public keys
(:mod:`sigil.verify.keys`) or a keyless identity rule over a sigstore trusted root
(:mod:`sigil.verify.sigstore`). Both implement :class:`Authority`. An authority only answers
"is this signature cryptographically valid, and who made it?" and returns the exact bytes that
were signed; what those bytes must *say* (the digest they name, the predicate type, the
subject) is checked by the engine, once, for every kind of authority.

Every method raises :class:`sigil.errors.VerificationError` (with a short ``reason``) on any
doubt: fail closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# Payload types an authority may return.
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
IN_TOTO = "application/vnd.in-toto+json"
MESSAGE_DIGEST = "sigil/message-digest"  # bundle messageSignature: only a digest was signed


@dataclass(frozen=True)
class SignerInfo:
    """Who signed, as established by the authority."""

    authority: str
    kind: str                         # "key" | "keyless"
    identity: str | None = None       # certificate SAN for keyless
    issuer: str | None = None         # OIDC issuer for keyless
    checks: tuple[str, ...] = ()      # human-readable checks that passed, for `sigil verify`


@dataclass(frozen=True)
class VerifiedPayload:
    """A signature that verified, with the exact signed content.

    ``payload`` holds the simple-signing JSON or the DSSE payload (an in-toto statement) exactly
    as signed; ``message_digest`` holds the sha256 a bundle message signature covers.
    """

    payload_type: str
    payload: bytes | None
    message_digest: bytes | None
    signer: SignerInfo


class Authority(Protocol):
    """One policy authority: verifies signatures, never interprets their content."""

    name: str

    @property
    def fingerprint(self) -> str:
        """A stable hash of the trust material and rules; changes when either changes."""
        ...

    def verify_cosign_layer(self, *, blob: bytes, media_type: str,
                            annotations: Mapping[str, str]) -> VerifiedPayload:
        """Verify one legacy cosign layer.

        ``.sig`` layers (media type ``application/vnd.dev.cosign.simplesigning.v1+json``): ``blob``
        is the simple-signing payload, the base64 signature is the annotation
        ``dev.cosignproject.cosign/signature``. ``.att`` layers
        (``application/vnd.dsse.envelope.v1+json``): ``blob`` is a DSSE envelope.
        Keyless layers also carry ``dev.sigstore.cosign/certificate``, ``.../chain``,
        ``.../bundle`` (Rekor SET) and ``.../rfc3161timestamp`` annotations.
        """
        ...

    def verify_bundle(self, bundle: bytes) -> VerifiedPayload:
        """Verify a sigstore bundle (v0.1 to v0.3): message signature or DSSE envelope."""
        ...
