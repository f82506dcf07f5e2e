"""Every Prometheus metric sigil exports, defined once (namespace ``sigil_``).

Labels are small bounded enums or configured names (upstream names, policy names): never
digests or repository names, which would make the series count unbounded.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sigil import __version__

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

# --- offline serving (server.offline / serve --offline) ---
OFFLINE = Gauge("sigil_offline", "1 while sigil serves offline (store only, no upstream)",
                registry=REGISTRY)
OFFLINE_MISSES = Counter("sigil_offline_misses_total",
                         "Requests for content the offline store does not hold, answered "
                         "not-found at once instead of asking the upstream",
                         ["upstream", "kind"], registry=REGISTRY)  # kind: tag|manifest|blob|...
# --- operations: what the alerts and the dashboard need (deploy/prometheus, deploy/grafana) ---
GC_SECONDS = Histogram("sigil_gc_duration_seconds",
                       "Time one gc pass took (mark and sweep, or the budget check alone)",
                       registry=REGISTRY,
                       buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800))
GC_FAILURES = Counter("sigil_gc_failures_total", "gc passes that raised an error",
                      registry=REGISTRY)
GC_LAST_SUCCESS = Gauge("sigil_gc_last_success_timestamp_seconds",
                        "Unix time the last gc pass finished without an error",
                        registry=REGISTRY)
GC_OVER_BUDGET = Gauge("sigil_gc_over_budget",
                       "1 if the last gc pass left the store above storage.max_bytes "
                       "(everything left is recent or referenced), else 0", registry=REGISTRY)
GC_FREED_BYTES = Counter("sigil_gc_freed_bytes_total", "Bytes of objects deleted by gc",
                         registry=REGISTRY)
STORE_MAX_BYTES = Gauge("sigil_store_max_bytes", "The configured storage.max_bytes budget",
                        registry=REGISTRY)
BUILD_INFO = Gauge("sigil_build_info", "Always 1; the labels say which sigil is running",
                   ["version", "python_version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__, python_version=platform.python_version()).set(1)
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
# --- peer stream between replicas (server/peer.py, upstream/peer.py) ---
PEER_REQUESTS = Counter("sigil_peer_requests_total",
                        "Peer blob requests this replica answered, by result",
                        ["result"], registry=REGISTRY)
# result: streamed|cut|abandoned|unauthorized|invalid|not_found|failed
PEER_BYTES_SENT = Counter("sigil_peer_bytes_sent_total",
                          "Body bytes this replica streamed to other replicas",
                          registry=REGISTRY)
PEER_CLIENT_FAILURES = Counter("sigil_peer_client_failures_total",
                               "Peer streams this replica could not read from another "
                               "replica, by reason", ["reason"], registry=REGISTRY)
# reason: connect|timeout|refused|unknown|status|cut|short|protocol
