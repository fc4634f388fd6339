"""Export a training run folder to ONNX + manifest (`hmd export`, the cloud registry, on-device
retraining): parity and calibration frames are real frames of the run's own data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.errors import UserError
from shared.paths import resolve_source
from shared.walk import parse_walk

from models.data import TaskData, load_source
from models.export import export_onnx
from models.train import load_model


def export_run(run_dir: str | Path, out: str | Path, *, int8: bool = False, size: int | tuple[int, int] | None = None,
               version: str | None = None, frames: int = 64, parent_version: str | None = None,
               extra_training: dict | None = None, manifest_path: str | Path | None = None):
    """Export a run folder; parity frames and calibration frames are real frames of its data."""
    model, ckpt = load_model(run_dir)
    if ckpt.get("task_set") == "room":
        return _export_room_run(model, ckpt, run_dir, out, int8=int8, size=size, version=version, frames=frames,
                                parent_version=parent_version, extra_training=extra_training,
                                manifest_path=manifest_path)
    h, w = ckpt["input_size"]
    if isinstance(size, tuple):
        raise UserError(f"--size {size[1]}x{size[0]}: a square side for this model (N)")
    if size is not None:
        if size % 8 or size < 8:
            raise UserError(f"--size {size}: must be a positive multiple of 8")
        h = w = size
    source = resolve_source(ckpt.get("source", "synthetic"))
    val_source = resolve_source(ckpt["config"].get("val_data") or source)
    if source.startswith("walk:"):  # a walk is generated frame by frame: make only what is needed
        source = f"walk:{parse_walk(source)[0]}:{max(frames, 2)}"
    if val_source.startswith("walk:"):
        val_source = f"walk:{parse_walk(val_source)[0]}:{max(frames * 7, 14)}"
    try:
        calib = load_source(source, "train", (h, w), ckpt["config"].get("seed", 0))
        held = load_source(val_source, "val", (h, w), ckpt["config"].get("seed", 0))
    except UserError:  # the training data moved: fall back to synthetic frames
        calib = load_source("synthetic:256", "train", (h, w))
        held = load_source("synthetic:256", "val", (h, w))
    g = torch.Generator().manual_seed(0)
    calib_td, held_td = TaskData(calib), TaskData(held)
    n_cal = min(frames, len(calib_td))
    cal_x, _ = calib_td.batch(torch.arange(n_cal), g)
    n_held = min(frames, len(held_td))
    held_x, held_t = held_td.batch(torch.arange(n_held), g)
    eval_targets = {"input": held_x.numpy(), "label": held_t["class"].numpy(),
                    **{k: held_t[k].numpy() for k in ("colour", "edges", "denoised")}}
    return _export(model, ckpt, run_dir, out, source, (h, w), int8, version, held_x.numpy(), cal_x.numpy(),
                   eval_targets, parent_version, extra_training, manifest_path)


def _export_room_run(model, ckpt, run_dir, out, *, int8, size, version, frames, parent_version, extra_training,
                     manifest_path):
    """A room run: parity and calibration frames are rendered rooms of its own source and style."""
    from models.room_tasks import export_frames

    hw, cal_x, held_x, eval_targets = export_frames(ckpt, frames, size)
    return _export(model, ckpt, run_dir, out, ckpt.get("source"), hw, int8, version, held_x, cal_x,
                   eval_targets, parent_version, extra_training, manifest_path)


def _export(model, ckpt, run_dir, out, source, hw, int8, version, held_x, cal_x, eval_targets, parent_version,
            extra_training, manifest_path):
    cfg = ckpt["config"]
    version = version or f"{Path(run_dir).resolve().name}-e{ckpt['epoch']}{'-int8' if int8 else ''}"
    training = {"command": ckpt.get("command"), "method": ckpt.get("method_name"), "data": source,
                "epochs": ckpt["epoch"], "config": cfg, **(extra_training or {})}
    last = ckpt["history"][-1]["val"] if ckpt.get("history") else {}
    return export_onnx(model, out, height=hw[0], width=hw[1], class_names=ckpt["class_names"], version=version,
                       parity_frames=held_x.astype(np.float32), int8=int8,
                       calib_frames=cal_x.astype(np.float32), eval_targets=eval_targets,
                       metrics={"held_out": last}, training=training, parent_version=parent_version,
                       manifest_path=manifest_path)
