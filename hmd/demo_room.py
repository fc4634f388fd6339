"""`hmd demo --base-run room`: the demo's loop with the room model (depth, normals, layout keypoints).

The wearer walks a rendered room (``--scene rooms:STYLE``, default ``rooms:living``); the cloud's job
runner sees a room manifest and personalises with the room teacher's labels
(:mod:`models.room_personalise`). The rendered frames have exact labels, so every served version is
scored here, through its exported ONNX model as the headset runs it, on held-out rendered rooms of
the wearer's style (the gate's set) and on the base run's held-out rooms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import UserError

METRICS = ("rmse_depth", "normals_1_minus_cos", "rmse_keypoints")
DEFAULT_SCENE = "rooms:living"


def scene_style(scene: str) -> str:
    """``rooms[:STYLE]`` -> STYLE (default living); anything else is one clear line."""
    from shared.rooms import STYLES

    kind, _, style = scene.partition(":")
    if kind != "rooms":
        raise UserError(f"--scene {scene!r}: a room model walks a rendered room: use rooms[:STYLE]")
    style = style or "living"
    if style not in STYLES:
        raise UserError(f"--scene {scene!r}: unknown room style (choose from {', '.join(STYLES)})")
    return style


def evaluation_sets(scene: str, base_run: Path, n: int, hw: tuple[int, int]) -> dict[str, object]:
    """Rendered frames with exact labels at the model's input size ``hw``: held-out rooms of the
    wearer's style (the gate's ``test`` split) and the base run's held-out rooms."""
    from models.room_data import parse_rooms
    from models.room_personalise import STYLE_SPLIT
    from models.train import read_checkpoint
    from shared.rooms import room_frames

    ck = read_checkpoint(base_run)
    style = scene_style(scene)
    seed = ck.get("config", {}).get("seed", 0)
    base_spec = ck.get("config", {}).get("base_data") or ck.get("source") or "rooms"
    _, base_style = parse_rooms(base_spec)
    n = max(2, n)  # the first n frames of a split are the same frames however many a run rendered
    return {f"held-out {style} rooms": room_frames(n, style, seed, hw, STYLE_SPLIT),
            f"base validation ({base_spec})": room_frames(n, base_style, seed, hw, "val")}


def evaluate(folder: Path, frames) -> dict[str, float]:
    """The room metrics of the exported model in ``folder`` (ONNX Runtime, as the headset runs it)."""
    from device.engine import load_model
    from models.room_tasks import output_quality, pool_targets

    engine = load_model(folder, threads=1, warm_runs=1)
    outs: list[list[np.ndarray]] = [[], [], []]
    for rgb in frames.rgb:
        for k, o in enumerate(engine.infer(engine.preprocess(rgb).copy())):
            outs[k].append(o[0])
    depth, normals = pool_targets(frames)
    q = output_quality([np.stack(o) for o in outs], {"depth": depth, "normals": normals, "keypoints": frames.heatmaps})
    return {m: q[m] for m in METRICS}
