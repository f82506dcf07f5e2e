"""Signed checkpoints: the C2SP ``signed-note`` and ``tlog-checkpoint`` formats.

A checkpoint is a note (``origin\\nsize\\nbase64(root)\\n[extension lines\\n]``), a blank
line, then one or more signature lines ``— <name> base64(keyhint[4] || signature)\\n``.
Rekor v1 signs with ECDSA (key hint = first 4 bytes of the log ID, SHA-256 of the DER key);
Rekor v2 signs with Ed25519 (key hint = first 4 bytes of ``SHA-256(name\\n\\x01 || key)``).
Witness cosignatures (other names or hints) are ignored: at least one line must be a valid
signature by the log's key under the log's name (the host of its ``baseUrl``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from sigil.errors import VerificationError

from ._common import fail, verify_signature
from .trust import TransparencyLog

_SIG_LINE = re.compile(r"\u2014 (\S+) ([A-Za-z0-9+/]+={0,2})")
_MAX_NOTE = 1 << 16


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a signed note."""

    name: str
    key_hint: bytes
    signature: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A parsed signed checkpoint."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...]
    note: bytes                        # the signed text, through its final newline
    signatures: tuple[NoteSignature, ...]

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a signed checkpoint; raises ``VerificationError(reason="tlog")``."""
        if not isinstance(text, str) or len(text) > _MAX_NOTE:
            fail("checkpoint missing or too large", "tlog")
        # signed-note: the note text and signature block are separated by the first blank line.
        sep = text.find("\n\n")
        if sep < 0:
            fail("checkpoint has no signature block", "tlog")
        note, block = text[:sep + 1], text[sep + 2:]
        if not block.endswith("\n"):
            fail("checkpoint signature block must end with a newline", "tlog")
        signatures = []
        for line in block[:-1].split("\n"):
            m = _SIG_LINE.fullmatch(line)
            if not m:
                fail("malformed checkpoint signature line", "tlog")
            try:
                raw = base64.b64decode(m.group(2), validate=True)
            except (binascii.Error, ValueError):
                fail("checkpoint signature is not base64", "tlog")
            if len(raw) < 5:
                fail("checkpoint signature too short", "tlog")
            signatures.append(NoteSignature(m.group(1), raw[:4], raw[4:]))
        if not signatures:
            fail("checkpoint has no signatures", "tlog")
        # tlog-checkpoint: origin, decimal tree size, base64 root hash, optional extensions.
        lines = note[:-1].split("\n")
        if len(lines) < 3:
            fail("checkpoint note needs origin, size and root hash", "tlog")
        origin, size_text, root_text, *extensions = lines
        if not origin or origin != origin.strip():
            fail("checkpoint origin line is empty or padded", "tlog")
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_text):
            fail("checkpoint tree size is not a decimal number", "tlog")
        try:
            root = base64.b64decode(root_text, validate=True)
        except (binascii.Error, ValueError):
            fail("checkpoint root hash is not base64", "tlog")
        if len(root) != 32:
            fail("checkpoint root hash is not 32 bytes", "tlog")
        if any(not e for e in extensions):
            fail("checkpoint has an empty extension line", "tlog")
        return cls(origin=origin, tree_size=int(size_text), root_hash=root,
                   extensions=tuple(extensions), note=note.encode("utf-8"),
                   signatures=tuple(signatures))

    def verify(self, log: TransparencyLog) -> NoteSignature:
        """Return the first signature line made by ``log``'s key; raise if there is none.

        A line counts when it names the log (C2SP signed-note: a verifier is its name *and*
        key; sigstore logs sign as the host of their ``baseUrl``), its key hint is the log's
        checkpoint key ID prefix, and its signature verifies over the note with the log's key.
        Lines from other signers (witness cosignatures, unknown keys) are skipped, not failed.
        """
        hint = log.checkpoint_key_id[:4]
        for sig in self.signatures:
            if sig.name != log.name or sig.key_hint != hint:
                continue
            try:
                verify_signature(log.public_key, sig.signature, self.note,
                                 hash_alg=log.hash_alg, what="checkpoint signature",
                                 reason="tlog")
            except VerificationError:  # try the next line; fail below if none verifies
                continue
            return sig
        fail(f"checkpoint has no valid signature from log {log.description}", "tlog")
