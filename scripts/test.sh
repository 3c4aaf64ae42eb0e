#!/usr/bin/env bash
# Run the test suite (installs first on a clean clone). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
{ [ -x .venv/bin/lmi-compile ] && .venv/bin/python -c "import xdist" 2>/dev/null; } || bash scripts/setup.sh --no-example
set +e
# Two workers (CI has 2 cores): most tests wait on subprocesses and servers. A module stays on one worker
# (--dist loadfile), so its servers and Ray cluster start once.
.venv/bin/python -m pytest -q -n "${LMI_COMPILE_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
