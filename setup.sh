#!/usr/bin/env bash
# Set up cove on Debian 12 as root (system packages, a venv, the default template), then start the
# server with a short demo against it. `./setup.sh --no-serve` only sets up (used by ./test.sh).
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root (cove creates namespaces, cgroups and mounts)" >&2; exit 1; fi

APT_PACKAGES=(python3 python3-venv python3-dev build-essential iproute2 nftables util-linux bubblewrap runc runsc hyperfine e2fsprogs btrfs-progs procps rclone fuse3 curl dnsutils debootstrap postgresql chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
scripts/install-criu.sh || echo "setup: CRIU >= 4.1 could not be installed; hibernate and memory snapshots will be unavailable" >&2
scripts/kube/build.sh || echo "setup: the Kubernetes control plane for the tests could not be built; Kubernetes tests will be skipped" >&2

# A venv on the system interpreter (a real binary: no pyenv shim on hot paths).
if [ ! -x .venv/bin/python ]; then /usr/bin/python3 -m venv .venv; fi
stamp=.venv/.cove-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  # playwright drives Debian's chromium (tests/test_console.py): it downloads no browser of its own.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

export COVE_HOME="${COVE_HOME:-/var/lib/cove}"
.venv/bin/cove doctor
# The Python environment of code contexts (pip, once; instant when built), so that the first run_code
# does not wait for the server to build it. Without a package index the server retries at its start.
.venv/bin/cove kernel build >/dev/null || echo "setup: the kernel environment could not be built now; the server builds it at its first start" >&2

if [ "${1:-}" != "--no-serve" ]; then
  exec .venv/bin/cove serve --demo --host "${COVE_HOST:-127.0.0.1}" --port "${COVE_PORT:-7770}"
fi
