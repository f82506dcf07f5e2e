"""sigil: a verifying OCI registry mirror."""

__version__ = "0.1.0"
