#!/usr/bin/env bash
# Runs the test suite; installs what it needs first, so it works on a fresh machine by itself.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k volumes -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
.venv/bin/shoal image build-default >/dev/null
exec .venv/bin/pytest -q "$@"
