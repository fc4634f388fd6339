"""The ``room`` task set: rendered rooms as training tensors, the normals loss, the metrics.

Targets are at the network's output resolution, a quarter of the input's (the paper: 320x320 in,
80x80 out; ``--size 128`` keeps the 4:1 ratio at 32x32): depth is the mean z-depth (metres) of each
4x4 input block, normals the renormalised mean normal of the block, keypoints the renderer's
Gaussian heatmaps (already at that resolution). Losses (the paper's supplement): depth MSE,
normals 1 - |cos| on unit vectors, keypoints pixel-wise squared error (MSE); the latter two live
in :func:`models.weighting.task_losses` by task name, so every weighting method trains this set.

Metrics (Table 4's NYUv2 columns and more): ``rmse_depth`` (metres), ``normals_1_minus_cos`` (mean
over pixels), ``normals_mean_angle_deg`` (mean angle between predicted and true normal),
``rmse_keypoints`` (RMSE over every heatmap pixel).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import UserError
from shared.rooms import STRIDE, RoomFrames

from models.room_network import ROOM_TASKS, RoomNet, RoomNetConfig

DEFAULT_ROOM_SIZE = 320  # the paper's input side
GRADNORM_ALPHA = 1.5  # the paper (and GradNorm) on NYUv2
EXPORT_FRAMES = 64  # at most this many rendered frames calibrate (INT8) and check parity of an export
ROOM_METRICS = ("rmse_depth", "normals_1_minus_cos", "normals_mean_angle_deg", "rmse_keypoints")


def normals_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of 1 - |cos(pred, target)| (B x 3 x H x W; both normalised here)."""
    cos = (F.normalize(pred, dim=1, eps=1e-6) * F.normalize(target, dim=1, eps=1e-6)).sum(dim=1)
    return (1.0 - cos.abs()).mean()


def pool_targets(frames: RoomFrames) -> tuple[np.ndarray, np.ndarray]:
    """(depth N x 1 x h x w, normals N x 3 x h x w) at the output resolution (h = H / STRIDE): block means,
    the normals renormalised."""
    n, h, w = frames.depth.shape
    ho, wo = h // STRIDE, w // STRIDE
    depth = frames.depth.reshape(n, ho, STRIDE, wo, STRIDE).mean(axis=(2, 4))[:, None]
    normals = frames.normals.reshape(n, ho, STRIDE, wo, STRIDE, 3).mean(axis=(2, 4))
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
    return depth.astype(np.float32), np.ascontiguousarray(normals.transpose(0, 3, 1, 2), dtype=np.float32)


class RoomTaskData:
    """RoomFrames as tensors: the clean RGB input (NYUv2's input is clean colour) and fixed targets."""

    class_names: list[str] = []

    def __init__(self, frames: RoomFrames, source: str):
        self.source = source
        self.rgb = torch.from_numpy(np.ascontiguousarray(frames.rgb.transpose(0, 3, 1, 2)))
        depth, normals = pool_targets(frames)
        self.depth, self.normals = torch.from_numpy(depth), torch.from_numpy(normals)
        self.keypoints = torch.from_numpy(np.ascontiguousarray(frames.heatmaps, dtype=np.float32))

    @classmethod
    def from_arrays(cls, rgb: np.ndarray | torch.Tensor, depth: np.ndarray | torch.Tensor,
                    normals: np.ndarray | torch.Tensor, keypoints: np.ndarray | torch.Tensor,
                    source: str) -> "RoomTaskData":
        """From targets already at the output resolution (``rgb`` N x H x W x 3 uint8, or N x 3 x H x W
        as a tensor; depth N x 1, normals N x 3, keypoints N x K at H/4 x W/4): a teacher's labels."""
        self = cls.__new__(cls)
        self.source = source
        if isinstance(rgb, np.ndarray):
            rgb = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
        self.rgb = rgb
        self.depth, self.normals, self.keypoints = (
            t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
            for t in (depth, normals, keypoints))
        return self

    def subset(self, idx: np.ndarray | torch.Tensor) -> "RoomTaskData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return RoomTaskData.from_arrays(self.rgb[idx], self.depth[idx], self.normals[idx], self.keypoints[idx],
                                        self.source)

    @staticmethod
    def concat(parts: list["RoomTaskData"], source: str) -> "RoomTaskData":
        return RoomTaskData.from_arrays(*(torch.cat([getattr(p, k) for p in parts])
                                          for k in ("rgb", "depth", "normals", "keypoints")), source=source)

    def __len__(self) -> int:
        return len(self.rgb)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.rgb.shape[2:])  # type: ignore[return-value]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              clean: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.rgb[idx].float() / 255.0
        return x, {"depth": self.depth[idx], "normals": self.normals[idx], "keypoints": self.keypoints[idx]}


def room_size(size: Any) -> int:
    """The square input side (default the paper's 320): a multiple of 8 (the encoder's stride)."""
    if size is None:
        return DEFAULT_ROOM_SIZE
    if isinstance(size, (tuple, list)):
        h, w = (int(s) for s in size)
        if h != w:
            raise UserError(f"the room model trains on square frames (the paper's 320x320), got {w}x{h}")
        size = h
    size = int(size)
    if size < 16 or size % 8:
        raise UserError(f"room input size {size}: a multiple of 8, at least 16")
    return size


def load_room_data(data: str, val_data: str | None, size: Any, seed: int) -> tuple[RoomTaskData, RoomTaskData]:
    """(train, held-out) of ``rooms[:N][:STYLE]`` sources: held-out rooms are never trained on."""
    from models.room_data import load_rooms

    side = room_size(size)
    for spec in (data, val_data):
        if spec is not None and spec.split(":")[0] != "rooms":
            raise UserError(f"the room task set trains on rooms[:N][:STYLE], got {spec!r}")
    train = load_rooms(data, "train", side, seed)
    val = load_rooms(val_data or data, "val", side, seed)
    return RoomTaskData(train, data), RoomTaskData(val, val_data or data)


def net_config(width: int, decoder_width: int, blocks: tuple[int, ...] | None = None) -> RoomNetConfig:
    defaults = RoomNetConfig()
    return RoomNetConfig(width=width, decoder_width=decoder_width,
                         blocks=tuple(blocks) if blocks and len(blocks) == len(defaults.blocks) else defaults.blocks)


@torch.no_grad()
def evaluate_room(model: RoomNet, data: RoomTaskData, batch_size: int = 32) -> dict[str, float]:
    """The room metrics (module docstring) of ``model`` on every frame of ``data``."""
    model.eval()
    sq_depth = sq_kp = one_minus_cos = angle = 0.0
    pixels = kp_values = 0
    for start in range(0, len(data), batch_size):
        x, tg = data.batch(torch.arange(start, min(len(data), start + batch_size)))
        out = model(x)
        sq_depth += float(((out["depth"] - tg["depth"]) ** 2).sum())
        cos = (F.normalize(out["normals"], dim=1) * tg["normals"]).sum(dim=1).clamp(-1.0, 1.0)
        one_minus_cos += float((1.0 - cos.abs()).sum())
        angle += float(torch.rad2deg(torch.acos(cos)).sum())
        pixels += cos.numel()
        sq_kp += float(((out["keypoints"] - tg["keypoints"]) ** 2).sum())
        kp_values += tg["keypoints"].numel()
    return {"rmse_depth": math.sqrt(sq_depth / max(1, pixels)),
            "normals_1_minus_cos": one_minus_cos / max(1, pixels),
            "normals_mean_angle_deg": angle / max(1, pixels),
            "rmse_keypoints": math.sqrt(sq_kp / max(1, kp_values))}


def describe(val: dict[str, float]) -> str:
    return (f"rmse depth {val['rmse_depth']:.4f} m, normals 1-|cos| {val['normals_1_minus_cos']:.4f} "
            f"({val['normals_mean_angle_deg']:.1f} deg), rmse keypoints {val['rmse_keypoints']:.4f}")


@dataclasses.dataclass
class RoomTaskSet:
    """What training needs to know about the ``room`` set (the ``cifar`` set is train.py's default)."""

    name: str = "room"
    tasks: tuple[str, ...] = ROOM_TASKS
    method_defaults: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: {"gradnorm": {"alpha": GRADNORM_ALPHA}})


ROOM = RoomTaskSet()


def output_quality(outs: list[np.ndarray], targets: dict[str, np.ndarray]) -> dict[str, float]:
    """The room metrics of stacked exported outputs (depth, normals, keypoints) against ``targets``
    (the export's INT8 quality report)."""
    depth, normals, keypoints = outs
    n = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-6)
    cos = np.clip((n * targets["normals"]).sum(axis=1), -1.0, 1.0)
    return {"rmse_depth": float(np.sqrt(((depth - targets["depth"]) ** 2).mean())),
            "normals_1_minus_cos": float((1.0 - np.abs(cos)).mean()),
            "normals_mean_angle_deg": float(np.degrees(np.arccos(cos)).mean()),
            "rmse_keypoints": float(np.sqrt(((keypoints - targets["keypoints"]) ** 2).mean()))}


def export_frames(ckpt: dict[str, Any], frames: int, size: int | tuple[int, int] | None = None
                  ) -> tuple[tuple[int, int], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """((height, width), calibration inputs, parity inputs, held-out targets) for exporting a room run:
    rendered frames of its own ``rooms`` source (training split for calibration, held-out rooms for
    parity) at the export size (default the training side; the network is fully convolutional, so
    (h, w) may be the camera's aspect)."""
    from models.room_data import parse_rooms
    from shared.rooms import room_frames

    size = size or (tuple(ckpt["export_size"]) if ckpt.get("export_size") else None)  # a personalised run: its parent's
    hw = size if isinstance(size, tuple) else (room_size(size or ckpt["input_size"][0]),) * 2
    if min(hw) < 16 or hw[0] % 8 or hw[1] % 8:
        raise UserError(f"export size {hw[1]}x{hw[0]}: sides must be multiples of 8, at least 16")
    cfg = ckpt.get("config", {})
    seed = cfg.get("seed", 0)
    # a personalised run trained on wearer frames too: its rendered data is the base run's (base_data)
    _, style = parse_rooms(cfg.get("base_data") or ckpt.get("source") or "rooms")
    count = max(2, min(frames, EXPORT_FRAMES))
    calib = RoomTaskData(room_frames(count, style, seed, hw, "train"), "calibration")
    val_spec = cfg.get("val_data") or ckpt.get("source") or "rooms"
    _, val_style = parse_rooms(val_spec)
    # the held-out split has 15 % of N frames: ask for enough of them
    held = RoomTaskData(room_frames(count, val_style, seed, hw, "val"), "held-out")
    held_x, held_t = held.batch(torch.arange(len(held)))
    cal_x, _ = calib.batch(torch.arange(len(calib)))
    targets = {"input": held_x.numpy(), **{k: v.numpy() for k, v in held_t.items()}}
    return hw, cal_x.numpy(), held_x.numpy(), targets
