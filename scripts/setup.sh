#!/usr/bin/env bash
# Create .venv and install great-hmd with its test extras. Idempotent; torch is the pinned CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import models, device, cloud, shared, hmd, torch, onnxruntime, cv2, fastapi, pytest, torchattacks, psycopg, boto3, moto" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[test,scale]" 2>&1 | grep -v "^WARNING: Location" || true
  # AutoAttack for `hmd attack --autoattack` (README, "AutoAttack"): --no-deps, because its metadata asks for
  # torchvision (never imported; it would pull another torch build) and pins requests~=2.25.1
  .venv/bin/python -m pip install -q --no-deps "torchattacks==3.5.1" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, onnxruntime, cv2, fastapi, pytest, torchattacks" 
  touch .venv/.installed
fi
