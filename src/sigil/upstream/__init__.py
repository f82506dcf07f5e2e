"""The one HTTP client to upstream registries: session, authentication, retries, and
translation of transport errors into :mod:`sigil.errors` classes (DESIGN section 4.2)."""

from sigil.upstream.auth import (
    Authenticator,
    BasicCredentials,
    Challenge,
    load_docker_config,
    parse_www_authenticate,
    resolve_credentials,
)
from sigil.upstream.client import (
    FetchedManifest,
    ManifestHead,
    UpstreamBlob,
    UpstreamClient,
    parse_next_link,
    parse_ratelimit_remaining,
    parse_retry_after,
)

__all__ = [
    "Authenticator",
    "BasicCredentials",
    "Challenge",
    "FetchedManifest",
    "ManifestHead",
    "UpstreamBlob",
    "UpstreamClient",
    "load_docker_config",
    "parse_next_link",
    "parse_ratelimit_remaining",
    "parse_retry_after",
    "parse_www_authenticate",
    "resolve_credentials",
]
