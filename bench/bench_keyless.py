"""Cold keyless verification, crypto only: sigil vs sigstore-python on the same bundles.

Each run verifies one bundle from its bytes held in memory (no network, no file I/O): parse,
signature, Rekor entry (body, SET, inclusion proof, checkpoint) and/or RFC 3161 timestamp,
Fulcio chain, SCT and identity. "Cold" means no per-bundle cache survives between runs
(sigil's certificate/key parse caches are cleared before each run); the parsed trusted root
is kept, as both tools keep it for a verifier's lifetime.

sigstore-python is used when importable here, or through another interpreter given with
``--sigstore-python /path/to/python`` (it pins its own ``cryptography``, so a separate venv
is the usual way: ``python -m venv /tmp/sp && /tmp/sp/bin/pip install sigstore``).

    python bench/bench_keyless.py [--runs 1000] [--sigstore-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "tests" / "assets" / "sigstore"
GH_ISSUER = "https://token.actions.githubusercontent.com"
BEACON = ("https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/"
          ".github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main")

# (label, bundle, trusted root, artifact, identity, issuer, kind)
CASES = [
    ("v0.3 msg sig, Rekor v1 SET+proof", "bundle-verify/happy-path-v0.3/bundle.sigstore.json",
     "trusted_root/production.json", "bundle-verify/a.txt", BEACON, GH_ISSUER, "artifact"),
    ("v0.3 DSSE attestation, Rekor v1", "cosign/oci-attestation.sigstore.json",
     "trusted_root/production.json", None, "cody@soyland.com", "https://github.com/login/oauth",
     "dsse"),
    ("v0.3 msg sig, Rekor v2 + RFC 3161", "bundle-verify/rekor2-happy-path/bundle.sigstore.json",
     "bundle-verify/rekor2-happy-path/trusted_root.json", "bundle-verify/a.txt", BEACON,
     GH_ISSUER, "artifact"),
]

# Runs inside the sigstore-python interpreter; prints {"label": [seconds, ...], ...}.
SIGSTORE_PYTHON_WORKER = r"""
import json, sys, time
from pathlib import Path
from sigstore.models import Bundle, TrustedRoot
from sigstore.verify import Verifier, policy
spec = json.load(sys.stdin)
assets = Path(spec["assets"])
out = {}
for label, bundle, root, artifact, identity, issuer, kind in spec["cases"]:
    verifier = Verifier(trusted_root=TrustedRoot.from_file(str(assets / root)))
    raw = (assets / bundle).read_text()
    art = (assets / artifact).read_bytes() if artifact else None
    pol = policy.Identity(identity=identity, issuer=issuer)
    def once():
        b = Bundle.from_json(raw)
        if kind == "dsse":
            verifier.verify_dsse(b, pol)
        else:
            verifier.verify_artifact(art, b, pol)
    try:
        once()
    except Exception as exc:
        out[label] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    times = []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    out[label] = times
print(json.dumps(out))
"""


def bench_sigil(runs: int) -> dict[str, list[float] | dict[str, str]]:
    sys.path.insert(0, str(ASSETS.parent.parent.parent / "src"))
    from sigil.verify.sigstore import (
        IdentityRule,
        KeylessRequirements,
        TrustedRoot,
        _common,
        verify_bundle,
    )

    caches = [_common.load_der_certificate, _common.load_pem_certificates,
              _common.load_der_public_key, _common.load_pem_public_key]
    out: dict[str, list[float] | dict[str, str]] = {}
    for label, bundle, root, artifact, identity, issuer, _kind in CASES:
        trusted_root = TrustedRoot.load(ASSETS / root)
        raw = (ASSETS / bundle).read_bytes()
        art = (ASSETS / artifact).read_bytes() if artifact else None
        req = KeylessRequirements((IdentityRule(issuer=issuer, subject=identity),))
        verify_bundle(raw, trusted_root=trusted_root, keyless=req, artifact=art)  # sanity
        times = []
        for _ in range(runs):
            for cache in caches:
                cache.cache_clear()
            t0 = time.perf_counter()
            verify_bundle(raw, trusted_root=trusted_root, keyless=req, artifact=art)
            times.append(time.perf_counter() - t0)
        out[label] = times
    return out


def bench_sigstore_python(runs: int, python: str | None
                          ) -> tuple[str, dict[str, list[float] | dict[str, str]]] | None:
    spec = json.dumps({"assets": str(ASSETS), "runs": runs, "cases": CASES})
    if python is None:
        try:
            import sigstore  # noqa: F401
        except ImportError:
            return None
        python = sys.executable
    proc = subprocess.run([python, "-c", SIGSTORE_PYTHON_WORKER], input=spec, text=True,
                          capture_output=True, timeout=1800, env=dict(os.environ), check=False)
    if proc.returncode != 0:
        print(f"sigstore-python run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    probe = "import sigstore, cryptography; print(sigstore.__version__, cryptography.__version__)"
    version = subprocess.run([python, "-c", probe], text=True, capture_output=True,
                             check=False).stdout.split()
    return f"sigstore-python {version[0]} (cryptography {version[1]})", json.loads(proc.stdout)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--sigstore-python", default=os.environ.get("SIGSTORE_PYTHON"),
                        help="a python interpreter with sigstore installed")
    args = parser.parse_args()

    import cryptography
    results = [(f"sigil (cryptography {cryptography.__version__})", bench_sigil(args.runs))]
    other = bench_sigstore_python(args.runs, args.sigstore_python)
    if other is not None:
        results.append(other)
    else:
        print("sigstore-python not available: only sigil is measured", file=sys.stderr)

    print(f"cold keyless verification, crypto only, {args.runs} runs each "
          f"(Python {sys.version.split()[0]})")
    header = f"{'bundle':36} {'implementation':42} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"
    print(header)
    print("-" * len(header))
    for label, *_ in CASES:
        for impl, data in results:
            times = data.get(label)
            if isinstance(times, dict) or times is None:
                print(f"{label:36} {impl:42} {'error: ' + str((times or {}).get('error'))}")
                continue
            print(f"{label:36} {impl:42} {_pct(times, 50) * 1e3:8.3f} "
                  f"{_pct(times, 99) * 1e3:8.3f} {statistics.fmean(times) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
