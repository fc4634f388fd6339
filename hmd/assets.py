"""Shipped model assets: the small base model and the cloud teacher, with the commands that made them.

Both are plain run folders (checkpoint.pt with weights only, metrics.json). Rebuild with
``scripts/train_assets.sh``.
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_RUN = ASSETS / "base-studio"
TEACHER_RUN = ASSETS / "teacher"
BASE_DATA = "synthetic:2000:studio"
