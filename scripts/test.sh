#!/usr/bin/env bash
# Set up (venv + editable install, CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
