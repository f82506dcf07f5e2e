#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian 12 machine (run as root; idempotent).
#
# The real parts (tests/realparts/): docker-registry (CNCF distribution 2.8) as the upstream,
# skopeo, containerd (ctr) and podman as clients. Nothing is started here: the tests start each
# daemon themselves on loopback, with a config in a temp dir, and stop it by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

# curl and apache2-utils (ab) drive the bench smoke test and bench/. prometheus (with promtool)
# checks the metrics, the alert rules and the dashboard queries (tests/test_observability.py).
# postgresql: the fleet index's real server (tests/realparts/postgres.py runs initdb and the
# server itself, as the package's postgres user); util-linux brings setpriv for that.
packages=(docker-registry skopeo containerd podman curl apache2-utils prometheus postgresql
          util-linux)

# docker-compose (1.29, the Compose Specification) validates deploy/compose/compose.yaml
# (`docker-compose config`, no daemon needed); its recommended docker.io is not installed.
packages+=(docker-compose)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: need root to apt-get install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Rootful podman pulling into vfs storage needs none of podman's recommends (uidmap,
  # fuse-overlayfs, slirp4netns are for rootless use and running containers).
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

# Python packages go into .venv: Debian's own python3 refuses system-wide pip installs
# (PEP 668), and a venv keeps the test run independent of what the machine has.
if [[ ! -x .venv/bin/python ]]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv </dev/null
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip </dev/null
.venv/bin/python -m pip install -q -e '.[test]' </dev/null
