"""OCI primitives: digests, repository names and references, media types, manifest parsing."""
