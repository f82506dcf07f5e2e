"""Verification: policy, signature discovery, signatures, attestations, trust material."""
