"""Offline sigstore verification: keyless (Fulcio) and keyed bundles, legacy cosign layers.

Everything here runs on ``cryptography`` with no network access: trust comes only from a
sigstore ``trusted_root.json`` (:class:`TrustedRoot`) and, for keyed signatures, a public key.

Public API:

* :class:`TrustedRoot` - parsed trust material (Fulcio CAs, Rekor v1/v2 logs, CT logs, TSAs);
* :class:`IdentityRule`, :class:`KeylessRequirements` - who may sign keyless;
* :func:`verify_bundle` - sigstore bundles v0.1-v0.3 (message signature or DSSE);
* :func:`verify_cosign_keyless_layer` - legacy cosign ``.sig``/``.att`` layers;
* :func:`verify_rekor_set` / :class:`ExpectedEntry` - a cosign Rekor SET annotation and its
  body (reused by keyed authorities);
* :class:`KeylessAuthority` - the :class:`sigil.verify.authority.Authority` for keyless rules.

Failures raise :class:`sigil.errors.VerificationError` with one of the reasons
``malformed``, ``unsupported``, ``signature``, ``digest_mismatch``, ``no_key``, ``tlog``,
``timestamp``, ``chain``, ``expired``, ``sct``, ``identity``. Misuse (bad requirements,
unreadable trust material) raises :class:`sigil.errors.ConfigError`.
"""

from .bundle import Bundle, DSSEEnvelope, parse_dsse_envelope
from .policy import IdentityRule, KeylessRequirements
from .rekor import ExpectedEntry, verify_rekor_set
from .trust import TrustedRoot, load_public_key
from .verifier import KeylessAuthority, verify_bundle, verify_cosign_keyless_layer

REASONS = ("malformed", "unsupported", "signature", "digest_mismatch", "no_key", "tlog",
           "timestamp", "chain", "expired", "sct", "identity")

__all__ = [
    "REASONS",
    "Bundle",
    "DSSEEnvelope",
    "ExpectedEntry",
    "IdentityRule",
    "KeylessAuthority",
    "KeylessRequirements",
    "TrustedRoot",
    "load_public_key",
    "parse_dsse_envelope",
    "verify_bundle",
    "verify_cosign_keyless_layer",
    "verify_rekor_set",
]
