#!/usr/bin/env bash
# Runs the test suite; installs what it needs first, so it works on a fresh machine by itself.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k volumes -x`).
# Without arguments: the whole suite once (runc, the default runtime), then the sandbox, exec,
# file-API, volume and isolation modules again with gVisor as the server's default runtime
# (SHOAL_TEST_RUNTIME=gvisor, docs/gvisor.md). With arguments: one run, on $SHOAL_TEST_RUNTIME.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
.venv/bin/shoal image build-default >/dev/null
if [ $# -gt 0 ]; then
  exec .venv/bin/pytest -q "$@"
fi
.venv/bin/pytest -q
# --- runtimes (issue 10)
GVISOR_MODULES=(tests/test_sandbox.py tests/test_file_api.py tests/test_volumes.py
  tests/test_volume_api.py tests/test_isolation.py tests/test_network.py tests/test_runtimes.py)
SHOAL_TEST_RUNTIME=gvisor .venv/bin/pytest -q "${GVISOR_MODULES[@]}"
