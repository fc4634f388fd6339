#!/usr/bin/env bash
# Rebuild the shipped models in hmd/assets/ (what `hmd demo` starts from). ~30 min on 2 cores.
#   base-studio: the headset's base model, GREAT on the studio world only.
#   teacher:     the cloud's larger teacher, trained on all three worlds.
set -euo pipefail
cd "$(dirname "$0")/.."
HMD=.venv/bin/hmd
$HMD train --method great --data synthetic:2000:studio --epochs 12 --out runs/base-studio
$HMD train --method great --data synthetic:3000:studio+forest+neon --width 24 --epochs 10 --out runs/teacher
.venv/bin/python - <<'PY'
from models.train import slim_checkpoint
slim_checkpoint("runs/base-studio", "hmd/assets/base-studio")
slim_checkpoint("runs/teacher", "hmd/assets/teacher")
PY
