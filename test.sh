#!/usr/bin/env bash
# Run cove's whole test suite (sets up first; needs root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --no-serve
.venv/bin/ruff check .
# The scratch servers share one kernel environment (src/cove/devserver.py); building it here, once,
# keeps code-context tests from racing its background build on a clean machine.
COVE_KERNEL_CACHE="${COVE_KERNEL_CACHE:-/var/cache/cove-test-kernel}" .venv/bin/cove kernel build >/dev/null \
  || echo "test.sh: the kernel environment could not be built; code-context tests will skip" >&2
set +e
.venv/bin/pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests: that is a failure" >&2; exit 1; fi
exit $rc
