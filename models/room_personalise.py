"""Personalising a room model: the wearer's frames have no depth, normals or layout labels, so a
larger room teacher labels them, and the candidate is judged on rendered rooms with exact labels.

The same loop as :mod:`models.personalise` (the cifar set), for the ``room`` task set:

1. the wearer's frames (in time order) are fitted (centre crop, resize) to the size the headset runs
   the model at (its ``export_size``, e.g. 120x160 for a 4:3 camera; the square training side when
   it has none): the model is fine-tuned and judged on the view the headset gives it;
2. the teacher (a wider :class:`models.room_network.RoomNet` trained on rendered rooms, shipped as
   ``room-teacher``) predicts depth, normals and keypoint heatmaps on them at that aspect, scaled to
   its own training side (fully convolutional); its outputs are resampled to the student's output
   resolution and become the targets (as the teacher labels the class head for the cifar set);
3. GREAT fine-tuning from the wearer's model (frozen BatchNorm, warm-up, lr 3e-4, batch 16, every
   layer; ``trainable`` = ``FINE_TUNED["last"]`` trains the heads and the last encoder stage only) on
   the wearer's earlier frames and their mirror images (``mirror``; the teacher labels each view as it
   sees it) with those targets, plus ``replay_ratio`` (4) rendered frames per wearer frame with their
   exact labels, rendered at the same size: half (``style_replay``) from training rooms of the
   wearer's style, half from the base model's own training data (against forgetting). Measured (README, "Personalising a room model"):
   the old defaults (lr 1e-3, batch 32, replay 1 of the base data, no mirror) were rejected, these
   gain 4.5-10.6 % on held-out rooms of the wearer's style (three seeds) and 5.5-9 % on the base
   rooms; that gain on held-out rooms comes from the replayed rendered rooms, the wearer's frames add
   theirs on the wearer's own room;
4. the gate, on frames rendered at the same size: the candidate must be better than the wearer's
   model on **held-out rendered rooms of the wearer's style** (the ``test`` split: rooms neither model trained on; mean relative change of
   depth RMSE, normals 1 - |cos| and keypoint RMSE below zero) and not worse beyond ``tolerance``
   (relative) on any of those metrics on the **base validation set** (the base run's held-out rooms).

The wearer's style (``office``, ``living``, ``bare``) is given, or inferred (:mod:`models.room_style`). The teacher's agreement on the wearer's later
frames (held out of training) is reported too, but does not decide: the teacher is not ground truth.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from shared.atomic import atomic_write_json
from shared.errors import UserError
from shared.rooms import STYLES, RoomFrames, room_frame, room_frames
from shared.walk import fit_to

from models.personalise import PersonaliseResult, gate, split_wearer
from models.room_network import ROOM_TASKS, RoomNet
from models.room_style import infer_style
from models.room_tasks import RoomTaskData, evaluate_room, pool_targets

GATE_METRICS = ("rmse_depth", "normals_1_minus_cos", "rmse_keypoints")
STYLE_SPLIT = "test"  # held-out rooms of the wearer's style: neither train nor val rooms of any run
STYLE_FRAMES = 48  # rendered frames (12 rooms) of the wearer's style the gate judges on
MIN_FRAMES = 10
# which parameters fine-tuning trains (``--fine-tune``): every one, or the heads and the last encoder stage
FINE_TUNED: dict[str, tuple[str, ...]] = {"all": (), "last": ("heads", "encoder.stages.4")}


def room_score(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean relative change of the gate's metrics (negative = better)."""
    return float(np.mean([after[k] / before[k] - 1.0 for k in GATE_METRICS if before.get(k)]))


def room_regressions(before: dict[str, float], after: dict[str, float], tolerance: float) -> list[str]:
    """The gate's metrics that got worse than ``before * (1 + tolerance)``."""
    return [f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in GATE_METRICS
            if after[k] > before[k] * (1.0 + tolerance)]


def room_gate(evaluation: dict[str, Any], tolerance: float, min_gain: float = 0.0) -> tuple[bool, str]:
    """Accept when better on the style set and within ``tolerance`` on the base set."""
    return gate(evaluation, tolerance, min_gain, judged="style",
                where=f"held-out {evaluation.get('style_name', 'style')} rooms",
                score_fn=room_score, regressions_fn=room_regressions)


def judge(base: RoomNet, candidate: RoomNet, style_set: RoomTaskData, base_set: RoomTaskData,
          tolerance: float, style_name: str = "style") -> tuple[bool, str, dict[str, Any]]:
    """(accepted, reason, evaluation) of ``candidate`` against ``base`` on both held-out sets."""
    evaluation: dict[str, Any] = {
        "style": {"before": evaluate_room(base, style_set), "after": evaluate_room(candidate, style_set),
                  "frames": len(style_set), "source": style_set.source},
        "base": {"before": evaluate_room(base, base_set), "after": evaluate_room(candidate, base_set),
                 "frames": len(base_set), "source": base_set.source},
        "style_name": style_name, "tolerance": tolerance,
    }
    accepted, reason = room_gate(evaluation, tolerance)
    return accepted, reason, evaluation


def _fit(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if frames.shape[1:3] == tuple(hw):
        return frames
    return np.stack([fit_to(f, hw) for f in frames])


@torch.no_grad()
def teacher_targets(teacher: RoomNet, teacher_side: int, frames: np.ndarray, out_hw: tuple[int, int],
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """The teacher's depth (N x 1), normals (N x 3, unit) and keypoints (N x K, in [0, 1]) on
    ``frames`` (N x H x W x 3 uint8), seen at their aspect with the short side at the teacher's own
    training side (sides rounded to multiples of 8), resampled to ``out_hw``."""
    teacher.eval()
    h, w = frames.shape[1:3]
    scale = teacher_side / min(h, w)
    x_all = _fit(frames, (max(8, int(round(h * scale / 8)) * 8), max(8, int(round(w * scale / 8)) * 8)))
    outs: dict[str, list[np.ndarray]] = {t: [] for t in ROOM_TASKS}
    for s in range(0, len(x_all), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(x_all[s:s + batch_size].transpose(0, 3, 1, 2))).float() / 255.0
        out = teacher(x)
        for t in ROOM_TASKS:
            y = out[t]
            if tuple(y.shape[2:]) != tuple(out_hw):
                y = F.interpolate(y, size=out_hw, mode="area" if y.shape[2] > out_hw[0] else "bilinear")
            if t == "normals":
                y = F.normalize(y, dim=1, eps=1e-6)
            outs[t].append(y.numpy().astype(np.float32))
    return {t: np.concatenate(v) for t, v in outs.items()}


def _labelled_set(rgb: np.ndarray, targets: dict[str, np.ndarray], source: str) -> RoomTaskData:
    return RoomTaskData.from_arrays(rgb, targets["depth"], targets["normals"], targets["keypoints"], source)


def _render_frames(style: str, seed: int, hw: tuple[int, int], split: str, indices: np.ndarray) -> RoomFrames:
    """Frames ``indices`` of the (style, seed, split) stream, as ``room_frames`` would render them."""
    fr = [room_frame(style, seed, int(i), hw, split) for i in indices]
    return RoomFrames(*(np.stack([getattr(f, k) for f in fr]) for k in ("rgb", "depth", "normals", "keypoints",
                                                                         "heatmaps")), style=style, split=split)


def _rendered_set(spec_frames, source: str) -> RoomTaskData:
    depth, normals = pool_targets(spec_frames)
    return RoomTaskData.from_arrays(spec_frames.rgb, depth, normals, spec_frames.heatmaps, source)


def load_teacher(teacher_run: str | Path, student: RoomNet) -> tuple[RoomNet, int]:
    """The room teacher and its square input side; one clear line when it is not a matching room model."""
    from models.train import load_model

    teacher, ck = load_model(teacher_run)
    if ck.get("task_set") != "room":
        raise UserError(f"teacher {teacher_run}: not a room model (task set {ck.get('task_set') or 'cifar'}); "
                        f"use room-teacher or a `hmd train --tasks room` run")
    if teacher.cfg.num_keypoints != student.cfg.num_keypoints:
        raise UserError(f"teacher {teacher_run}: {teacher.cfg.num_keypoints} keypoint channels, the model has "
                        f"{student.cfg.num_keypoints}")
    return teacher, int(ck["input_size"][0])


def room_teacher(configured: str | Path | None) -> Path:
    """The room teacher a job uses: ``configured`` when it is a room run (a service's ``--teacher-run``
    may name the cifar class teacher), else the shipped ``room-teacher``."""
    from models.train import read_checkpoint
    from shared.paths import resolve_model

    if configured:
        path = resolve_model(configured)
        if read_checkpoint(path).get("task_set") == "room":
            return path
    return resolve_model("room-teacher")


def decode_size(export_hw: tuple[int, int], ckpt: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of the camera's aspect ``export_hw`` whose short side is the model's training side: the
    wearer's frames keep their aspect, and the centre square is then cropped at the training side."""
    side = int(ckpt["input_size"][0])
    h, w = export_hw
    scale = side / min(h, w)
    return max(side, int(round(h * scale))), max(side, int(round(w * scale)))


def personalise_room(base_run: str | Path, wearer_frames: np.ndarray, out_dir: str | Path, *,
                     teacher_run: str | Path, base_data: str | None = None, base_val_data: str | None = None,
                     style: str | None = None, style_frames: int | None = None, export_hw: tuple[int, int] | None = None,
                     method: str = "great", epochs: int = 8, max_steps_per_epoch: int | None = None,
                     holdout_fraction: float = 0.2, tolerance: float = 0.05, seed: int = 0, lr: float = 3e-4,
                     warmup_steps: int = 20, batch_size: int = 16, replay_ratio: float = 4.0, freeze_bn: bool = True,
                     style_replay: float = 0.5, mirror: bool = True, trainable: tuple[str, ...] = (),
                     log: Callable[[str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> PersonaliseResult:
    """Fine-tune the room model ``base_run`` on ``wearer_frames`` (N x H x W x 3 uint8 RGB, time order)
    with ``teacher_run``'s labels into ``out_dir``; gated as the module docstring says.

    ``base_data`` / ``base_val_data``: the base run's training rooms (replayed) and validation rooms
    (default: its recorded ``rooms`` source and that source's held-out split), rendered at the base
    run's seed (``seed`` draws the replayed frames and the batches). ``export_hw``: the (height, width)
    the candidate is exported at (default: the base run's, else square). ``freeze_bn`` (default on):
    BatchNorm keeps its running statistics; ``mirror``, ``replay_ratio``, ``style_replay`` and
    ``trainable``: the module docstring, step 3.
    """
    from models.room_data import load_rooms, parse_rooms
    from models.checkpoints import save_checkpoint
    from models.train import TrainConfig, load_model, train

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    out = Path(out_dir)
    base_model, ck = load_model(base_run)
    if ck.get("task_set") != "room":
        raise UserError(f"{base_run}: not a room model; personalise it with models.personalise")
    frames = np.asarray(wearer_frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise UserError(f"wearer frames must be N x H x W x 3 uint8, got {frames.shape} {frames.dtype}")
    if len(frames) < MIN_FRAMES:
        raise UserError(f"personalisation needs at least {MIN_FRAMES} wearer frames, got {len(frames)}")
    if style is not None and style not in STYLES:
        raise UserError(f"unknown room style {style!r} (choose from {', '.join(STYLES)})")
    if not 0.0 <= style_replay <= 1.0 or replay_ratio < 0:
        raise UserError(f"style replay {style_replay} must be in [0, 1] and replay ratio {replay_ratio} >= 0")
    side = int(ck["input_size"][0])
    cfg0 = ck.get("config", {})
    base_data = base_data or cfg0.get("base_data") or ck.get("source") or "rooms"
    base_val_data = base_val_data or cfg0.get("val_data") or base_data
    parse_rooms(base_data), parse_rooms(base_val_data)  # one clear line for a non-rooms source
    teacher, teacher_side = load_teacher(teacher_run, base_model)

    hw = tuple(int(v) for v in (export_hw or ck.get("export_size") or (side, side)))  # what the headset runs
    frames = _fit(frames, hw)
    tr_idx, va_idx = split_wearer(len(frames), holdout_fraction, "time")
    out_hw = (hw[0] // 4, hw[1] // 4)
    labels = teacher_targets(teacher, teacher_side, frames, out_hw)
    style = style or infer_style(frames)
    log(f"personalise room: teacher {teacher_run} ({teacher.cfg.width} wide, {teacher_side}px) labelled "
        f"{len(frames)} wearer frames at {hw[1]}x{hw[0]}; wearer style {style}")

    wearer_train = _labelled_set(frames[tr_idx], {t: v[tr_idx] for t, v in labels.items()}, "wearer")
    if mirror:  # the mirrored views, labelled by the teacher as it sees them
        mirrored = np.ascontiguousarray(frames[tr_idx][:, :, ::-1])
        wearer_train = RoomTaskData.concat([wearer_train, _labelled_set(
            mirrored, teacher_targets(teacher, teacher_side, mirrored, out_hw), "wearer-mirrored")], "wearer")
    wearer_val = _labelled_set(frames[va_idx], {t: v[va_idx] for t, v in labels.items()}, "wearer-later")
    n_base, base_style = parse_rooms(base_data)
    rng = np.random.default_rng(seed)
    rooms_seed = int(cfg0.get("seed", 0))  # the base run's rooms (replayed, its held-out set) are those of its seed
    n_wanted = max(1, int(round(len(wearer_train) * replay_ratio)))
    # each part at most the base run's N frames: a long journal does not render (and train on) thousands
    styled_wanted = int(round(n_wanted * style_replay))
    n_styled, n_plain = min(n_base, styled_wanted), min(n_base, n_wanted - styled_wanted)
    # only the picked frames are rendered: the base run's rooms, and training rooms of the wearer's style
    # (the training split: never the gate's test rooms)
    picks = ((base_style, np.sort(rng.choice(n_base, n_plain, replace=False)), base_data),
             (style, np.sort(rng.choice(n_base, n_styled, replace=False)), f"rooms:{style}"))
    replay = RoomTaskData.concat([_rendered_set(_render_frames(s, rooms_seed, hw, "train", idx), src)
                                  for s, idx, src in picks if len(idx)], base_data)
    n_replay = n_plain + n_styled
    mixed = RoomTaskData.concat([wearer_train, replay],
                                f"wearer({len(tr_idx)} frames{' + mirrored' if mirror else ''}, teacher labels)+"
                                f"replay({n_plain} of {base_data}, {n_styled} of rooms:{style})")
    n_style = max(2, style_frames or STYLE_FRAMES)
    style_set = _rendered_set(room_frames(n_style, style, rooms_seed, hw, STYLE_SPLIT),
                              f"rooms:{n_style}:{style} ({STYLE_SPLIT} split, {hw[1]}x{hw[0]})")
    base_set = _rendered_set(load_rooms(base_val_data, "val", hw, rooms_seed),
                             f"{base_val_data} (held-out split, {hw[1]}x{hw[0]})")
    log(f"personalise room: {len(wearer_train)} wearer frames (+{n_replay} replay), {len(wearer_val)} later "
        f"frames held out; gate on {len(style_set)} {style} rooms and {len(base_set)} base frames")

    arch = base_model.cfg
    steps_per_epoch = max(1, len(mixed) // min(batch_size, len(mixed)))
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    warmup_steps = min(warmup_steps, max(1, steps_per_epoch * epochs // 4))
    method_options = dict(cfg0.get("method_options") or {}) if cfg0.get("method") == method else {}
    cfg = TrainConfig(method=method, tasks="room", data=mixed.source, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed, size=side, width=arch.width, blocks=tuple(arch.blocks),
                      decoder_width=arch.decoder_width, base_data=base_data, val_data=base_val_data,
                      max_steps_per_epoch=max_steps_per_epoch, init_from=str(base_run), freeze_bn=freeze_bn,
                      warmup_steps=warmup_steps, method_options=method_options, trainable=tuple(trainable))
    metrics = train(cfg, out, log=log, data=(mixed, style_set, mixed), should_stop=should_stop,  # type: ignore[arg-type]
                    command=f"personalise({base_run}, teacher {teacher_run})")
    if metrics["stopped"] or not metrics["history"]:
        return PersonaliseResult(False, "stopped before an epoch finished", out, {}, time.perf_counter() - t0)
    cand, cand_ck = load_model(out)
    # the candidate trained at the headset's size; it keeps its parent's training side (the next
    # personalisation decodes frames as this one did) and is exported as its parent was
    cand_ck = dict(cand_ck, input_size=list(ck["input_size"]))
    if export_hw or ck.get("export_size"):
        cand_ck["export_size"] = [hw[0], hw[1]]
    save_checkpoint(out / "checkpoint.pt", cand_ck)
    accepted, reason, evaluation = judge(base_model, cand, style_set, base_set, tolerance, style)
    evaluation.update({
        "wearer_teacher_agreement": {"before": evaluate_room(base_model, wearer_val),
                                     "after": evaluate_room(cand, wearer_val), "frames": len(wearer_val),
                                     "note": "against the teacher's labels on the wearer's later frames"},
        "method": method, "teacher": str(teacher_run), "replay_ratio": replay_ratio, "task_set": "room",
    })
    result = PersonaliseResult(accepted, reason, out, evaluation, time.perf_counter() - t0)
    atomic_write_json(out / "personalise.json", result.to_dict())
    log(f"personalise room: {'ACCEPTED' if accepted else 'REJECTED'}: {reason}")
    return result


def describe_change(evaluation: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {metric: {before, after}}} for the gate's sets (what `hmd personalise` prints)."""
    return {s: {k: {w: evaluation[s][w][k] for w in ("before", "after")} for k in GATE_METRICS}
            for s in ("style", "base") if s in evaluation}


__all__ = ["GATE_METRICS", "describe_change", "infer_style", "judge", "load_teacher", "personalise_room",
           "room_gate", "room_regressions", "room_score", "teacher_targets"]
