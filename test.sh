#!/usr/bin/env bash
# Run cove's whole test suite (sets up first; needs root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --no-serve
.venv/bin/ruff check .
set +e
.venv/bin/pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests: that is a failure" >&2; exit 1; fi
exit $rc
