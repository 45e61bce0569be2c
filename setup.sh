#!/usr/bin/env bash
# Set up cove on Debian 12 as root (system packages, a venv, the default template), then start the
# server with a short demo against it. `./setup.sh --no-serve` only sets up (used by ./test.sh).
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root (cove creates namespaces, cgroups and mounts)" >&2; exit 1; fi

APT_PACKAGES=(python3 python3-venv python3-dev build-essential iproute2 nftables util-linux bubblewrap runc runsc hyperfine e2fsprogs btrfs-progs procps rclone fuse3 curl dnsutils debootstrap postgresql chromium nodejs)
# Code contexts' other languages (nodejs above: JavaScript), without their recommends (compilers, docs).
APT_BARE=(r-base-core r-cran-irkernel openjdk-17-jdk-headless)  # Java: jshell
missing=()
bare=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
for p in "${APT_BARE[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || bare+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#bare[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} ${bare[*]}"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; fi
  if [ ${#bare[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null; fi
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
# The Claude Code CLI for tests/test_harness_inside.py (a native binary inside its npm package, ~370 MB);
# the test skips without it.
claude_dir=/var/cache/cove-test-claude
claude_bin=$claude_dir/node_modules/@anthropic-ai/claude-code/bin/claude.exe
if [ "$(stat -c %s "$claude_bin" 2>/dev/null || echo 0)" -lt 10000000 ] && command -v npm >/dev/null; then
  npm install -s --no-audit --no-fund --prefix "$claude_dir" @anthropic-ai/claude-code@2.1.328 >/dev/null \
    || echo "setup: the Claude Code CLI could not be installed; its test in tests/test_harness_inside.py will be skipped" >&2
fi

if [ "${1:-}" != "--no-serve" ]; then
  exec .venv/bin/cove serve --demo --host "${COVE_HOST:-127.0.0.1}" --port "${COVE_PORT:-7770}"
fi
