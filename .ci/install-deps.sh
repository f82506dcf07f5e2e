#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian 12 machine (run as root; idempotent).
#
# The real parts (tests/realparts/): docker-registry (CNCF distribution 2.8) as the upstream,
# skopeo, containerd (ctr) and podman as clients. Nothing is started here: the tests start each
# daemon themselves on loopback, with a config in a temp dir, and stop it by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker-registry skopeo containerd podman)

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

python3 -m pip install -q --root-user-action=ignore -e '.[test]' </dev/null
