#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a working shoal: installs everything,
# builds the default image (Debian bookworm + Python, from Debian's packages; about a minute the
# first time, cached after), then runs the three examples from Modal's sandbox file-access guide.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
.venv/bin/shoal image build-default >/dev/null
for example in examples/ephemeral_volume.py examples/named_volume.py examples/network_file_system.py; do
  echo "== $example"
  .venv/bin/python "$example"
done
echo
echo "shoal is ready. Use it from .venv/bin/python (import shoal), or: source .venv/bin/activate"
