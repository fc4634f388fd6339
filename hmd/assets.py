"""Shipped models, by name: wherever a command takes a run folder or a model file, a shipped name works.

==============  ==========================================================================
``base``        the headset's base model: GREAT, camera decoder, 160x120, real photos (walks)
                (run folder + exported ``model.onnx`` / ``model.manifest.json``)
``base-studio`` the previous base model (64x64, the synthetic studio world only)
``teacher``     the cloud's larger teacher for class targets (width 24, three synthetic worlds)
==============  ==========================================================================

Each run folder holds a weights-only ``checkpoint.pt`` and ``metrics.json``; every checkpoint's
``command`` field records the exact command that trained it. Rebuild with ``scripts/train_assets.sh``.
"""
from __future__ import annotations

from pathlib import Path

from shared.errors import UserError
from shared.paths import resolve_source

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_RUN = ASSETS / "base"
BASE_STUDIO_RUN = ASSETS / "base-studio"
TEACHER_RUN = ASSETS / "teacher"
PHOTOS = ASSETS / "photos"  # a few real photos the base model never saw (the demo walks them)
BASE_DATA = "synthetic:2000:studio"
SHIPPED = {"base": BASE_RUN, "base-studio": BASE_STUDIO_RUN, "teacher": TEACHER_RUN}


def shipped_names() -> list[str]:
    return [n for n, p in SHIPPED.items() if p.is_dir()]


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped model's name -> its folder; an existing path -> itself; else one clear error."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if p.exists():
        return p
    if text in SHIPPED and SHIPPED[text].is_dir():
        return SHIPPED[text]
    raise UserError(f"{text!r} is neither a file or folder nor a shipped model "
                    f"(shipped: {', '.join(shipped_names()) or 'none'})")



def shipped_photos(spec: str) -> str:
    """``walk:data/real/SPLIT[:N]`` (the fetched photos, scripts/fetch_real_data.py) -> the same photos
    shipped small in hmd/assets/photos/SPLIT, where the fetched folder is not on this machine."""
    from models.data import parse_walk

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
    data = shipped_photos(resolve_source(cfg.get("data") or ckpt.get("source") or BASE_DATA))
    val = cfg.get("val_data")
    return data, (shipped_photos(resolve_source(val)) if val else None)
