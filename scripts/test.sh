#!/usr/bin/env bash
# Set up (venv + editable install, CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# two workers (pytest-xdist): CI has 2 cores and many tests wait on servers and subprocesses;
# HMD_TEST_WORKERS=0 runs everything in one process
exec .venv/bin/python -m pytest -n "${HMD_TEST_WORKERS:-2}" "$@"
