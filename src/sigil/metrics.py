"""Every Prometheus metric sigil exports, defined once (namespace ``sigil_``).

Labels are small bounded enums or configured names (upstream names, policy names): never
digests or repository names, which would make the series count unbounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# --- server ---
REQUESTS = Counter("sigil_http_requests_total", "HTTP requests served",
                   ["route", "method", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("sigil_http_request_duration_seconds",
                            "Time to the end of the response", ["route", "method"],
                            registry=REGISTRY,
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                     2.5, 5, 10, 30, 60, 120))
CACHE = Counter("sigil_cache_requests_total", "Cache lookups",
                ["kind", "result"], registry=REGISTRY)  # kind: manifest|blob|tag; result: hit|miss
BYTES_SERVED = Counter("sigil_bytes_served_total", "Body bytes sent to clients",
                       ["source"], registry=REGISTRY)  # source: cache|upstream
STALE_SERVES = Counter("sigil_stale_serves_total",
                       "Tags served from cache past tag_ttl because the upstream failed",
                       ["upstream"], registry=REGISTRY)

# --- upstream ---
UPSTREAM_REQUESTS = Counter("sigil_upstream_requests_total", "Requests sent upstream",
                            ["upstream", "kind", "status"], registry=REGISTRY)
UPSTREAM_ERRORS = Counter("sigil_upstream_errors_total",
                          "Upstream failures (connection, timeout, 5xx, 429, bad data)",
                          ["upstream", "reason"], registry=REGISTRY)
UPSTREAM_SECONDS = Histogram("sigil_upstream_request_duration_seconds",
                             "Upstream response time (to headers)", ["upstream", "kind"],
                             registry=REGISTRY)
RATELIMIT_REMAINING = Gauge("sigil_upstream_ratelimit_remaining",
                            "Last ratelimit-remaining reported by the upstream (Docker Hub)",
                            ["upstream"], registry=REGISTRY)

# --- single-flight downloads ---
INFLIGHT_DOWNLOADS = Gauge("sigil_inflight_downloads", "Blob downloads in progress",
                           registry=REGISTRY)
COALESCED_WAITERS = Counter("sigil_coalesced_waiters_total",
                            "Requests that joined a download already in flight",
                            registry=REGISTRY)

# --- storage ---
STORE_BYTES = Gauge("sigil_store_bytes", "Bytes in the content store", registry=REGISTRY)
STORE_OBJECTS = Gauge("sigil_store_objects", "Objects in the content store", registry=REGISTRY)
EVICTIONS = Counter("sigil_evictions_total", "Objects removed by eviction",
                    ["kind"], registry=REGISTRY)  # kind: manifest|blob

# --- verification ---
VERIFICATIONS = Counter("sigil_verifications_total", "Policy decisions",
                        ["policy", "result", "reason"], registry=REGISTRY)
VERIFY_SECONDS = Histogram("sigil_verification_duration_seconds",
                           "Time to a policy decision (discovery + crypto)", registry=REGISTRY,
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                    2.5, 5, 10, 30))
VERDICT_CACHE = Counter("sigil_verdict_cache_total", "Verdict cache lookups",
                        ["result"], registry=REGISTRY)

# --- client authentication and TLS (server/auth.py, server/tls.py) ---
AUTH_FAILURES = Counter("sigil_auth_failures_total",
                        "Client credentials refused (htpasswd or token), by reason",
                        ["reason"], registry=REGISTRY)
# reason: malformed|wrong_scheme|unknown_user|wrong_password|invalid_token|bad_signature|
#         expired|not_yet_valid|wrong_issuer|wrong_audience|insufficient_scope
AUTH_RATE_LIMITED = Counter("sigil_auth_rate_limited_total",
                            "Requests answered 429 because their address failed to "
                            "authenticate too often", registry=REGISTRY)
TLS_RELOADS = Counter("sigil_tls_reloads_total",
                      "Certificate reloads (SIGHUP or changed files), by result",
                      ["result"], registry=REGISTRY)  # result: success|failure
TLS_CERT_EXPIRY = Gauge("sigil_tls_certificate_expiry_timestamp_seconds",
                        "notAfter of the certificate being served (Unix time)",
                        registry=REGISTRY)
