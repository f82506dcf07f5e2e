"""RFC 6962 / RFC 9162 Merkle tree hashing and inclusion proof verification.

Rekor (v1 and v2) builds its log as an RFC 6962 tree over the canonicalized entry bodies:
``leaf = SHA-256(0x00 || body)``, ``node = SHA-256(0x01 || left || right)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ._common import fail


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 §2.1 leaf hash: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 §2.1 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion_proof(index: int, tree_size: int, leaf: bytes,
                              proof: Sequence[bytes]) -> bytes:
    """The root hash implied by an audit path (RFC 9162 §2.1.3.2); raises if malformed.

    ``index`` is the leaf's position in *this* tree (for Rekor v1 the tree-local index of a
    shard, not the global ``logIndex``).
    """
    if tree_size < 1 or not 0 <= index < tree_size:
        fail(f"inclusion proof index {index} outside tree of size {tree_size}", "tlog")
    if len(leaf) != 32 or any(len(p) != 32 for p in proof):
        fail("inclusion proof hashes must be 32 bytes", "tlog")
    # RFC 9162 §2.1.3.2, steps 1-4.
    fn, sn = index, tree_size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            fail("inclusion proof is longer than the tree is deep", "tlog")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        fail("inclusion proof is shorter than the tree is deep", "tlog")
    return r


def verify_inclusion(index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    """Raise ``VerificationError(reason="tlog")`` unless the audit path leads to ``root``."""
    if root_from_inclusion_proof(index, tree_size, leaf, proof) != root:
        fail("inclusion proof does not lead to the root hash", "tlog")
