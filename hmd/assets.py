"""Shipped models, by name: wherever a command takes a run folder or a model file, a shipped name works.

==============  ==========================================================================
``base``        the headset's base model: GREAT, camera decoder, 160x120, real photos (walks)
                (run folder + exported ``model.onnx`` / ``model.manifest.json``)
``base-studio`` the previous base model (64x64, the synthetic studio world only)
``teacher``     the cloud's larger teacher for class targets (width 24, three synthetic worlds)
``room``        the room model: depth, normals, layout keypoints (GREAT, 1920 rendered rooms at 160x160,
                exported at 160x120; ``hmd device --model room --source rooms``)
``room-teacher`` the cloud's larger room teacher (width 24, the same 1920 rooms at 160x160): labels a
                wearer's frames when a room model is personalised
==============  ==========================================================================

Each run folder holds a weights-only ``checkpoint.pt`` and ``metrics.json``; every checkpoint's
``command`` field records the exact command that trained it. Rebuild with ``scripts/train_assets.sh``.
"""
from __future__ import annotations

from pathlib import Path

from shared.paths import ASSETS, SHIPPED, resolve_source
from shared.walk import parse_walk

BASE_RUN = SHIPPED["base"]
BASE_STUDIO_RUN = SHIPPED["base-studio"]
TEACHER_RUN = SHIPPED["teacher"]
PHOTOS = ASSETS / "photos"  # the real photos, small: train/ val/ (the base model's) and test/ (never trained on)
BASE_DATA = "synthetic:2000:studio"  # base-studio's training data


def shipped_photos(spec: str) -> str:
    """``walk:data/real/SPLIT[:N]`` (the fetched photos, scripts/fetch_real_data.py) -> the same photos
    shipped small in hmd/assets/photos/SPLIT, where the fetched folder is not on this machine."""
    if not spec.startswith("walk:"):
        return spec
    folder, n = parse_walk(spec)
    if Path(folder).is_dir():
        return spec
    split = Path(folder).name
    if Path(folder).parent.name == "real" and (PHOTOS / split).is_dir():
        return f"walk:{PHOTOS / split}:{n}"
    return spec


def default_base_sources(run_dir: Path, ckpt: dict) -> tuple[str, str | None]:
    """(replay data, base validation data) recorded in a run's checkpoint, resolved for this machine."""
    cfg = ckpt.get("config", {})
    data = shipped_photos(resolve_source(cfg.get("base_data") or cfg.get("data") or ckpt.get("source") or BASE_DATA))
    val = cfg.get("val_data")
    return data, (shipped_photos(resolve_source(val)) if val else None)
