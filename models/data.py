"""Data sources (``--data SOURCE``) and the paper's task targets.

SOURCE is one of
  ``synthetic[:N][:WORLD]``  procedurally rendered scenes (default N=2000, world "studio")
  ``cifar10:PATH``          the standard CIFAR-10 python-pickle batches in a local folder
  ``images:DIR``            class sub-folders (labelled) or a flat folder (unlabelled frames)
  ``video:PATH``            frames of a video file (unlabelled)
  ``walk:DIR[:N]``          a simulated head moving over the real photos in DIR (shared/walk.py;
                            unlabelled, default N=2000 frames, held-out views for "val")

Sizes are ``int`` (a square side, the paper's CIFAR-style frames) or ``(height, width)``: the
camera's aspect (e.g. (120, 160)). Photos and video frames are centre-cropped to the target aspect
before resizing, never squashed.

Every colour frame yields its own dense targets (the paper's CIFAR multi-task
supplement): the input is the gray frame with salt-and-pepper noise on 4 % of
the pixels and speckle noise 0.1; targets are the colour frame (colourisation),
Canny edges with sigma 1 of the colour frame, and the clean gray frame
(denoising). Unlabelled frames carry label -1: the class loss is masked for them.
"""
from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

from shared.errors import UserError
from shared.manifest import NoiseModel
from shared.walk import HeadWalk, fit_to, hw, load_photos, parse_walk, walk_seed
from shared.worlds import CLASS_NAMES, DEFAULT_WORLD, WORLDS, render_scene

from models.frames import FrameSet  # noqa: F401 (re-exported: models.data.FrameSet is the public name)

Size = int | tuple[int, int]  # a square side or (height, width)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
SYNTHETIC_VAL_OFFSET = 10_000_000  # validation scenes use indices far from training ones
DEFAULT_SYNTHETIC_N = 2000
WALK_STRIDE = 5  # frames between two kept walk frames (neighbours are near-duplicates)
WALK_CAMERA = (240, 320)  # the simulated camera's resolution (the headset's default capture size)
WALK_VAL_OFFSET = 1_000_003  # held-out views of a walk: far along the same (seeded) walk
VAL_FRACTION = 0.15


# --- sources ---------------------------------------------------------------------------------

def parse_synthetic(spec: str) -> tuple[int, list[str]]:
    """``synthetic[:N][:WORLD[+WORLD...]]`` -> (N, worlds). Several worlds alternate scene by scene."""
    n, worlds = DEFAULT_SYNTHETIC_N, [DEFAULT_WORLD]
    for part in spec.split(":")[1:]:
        if not part:
            continue
        if part.isdigit():
            n = int(part)
            if n < 2:
                raise UserError(f"synthetic source needs N >= 2, got {n}")
        elif all(p in WORLDS for p in part.split("+")):
            worlds = part.split("+")
        else:
            raise UserError(f"bad synthetic source {spec!r}: {part!r} is neither a count nor a world "
                            f"({', '.join(WORLDS)}, or several joined by '+')")
    return n, worlds


def _synthetic(spec: str, split: str, size: Size, seed: int) -> FrameSet:
    n, worlds = parse_synthetic(spec)
    h, w = hw(size)
    if split == "val":
        start, count = SYNTHETIC_VAL_OFFSET, max(64, int(round(n * VAL_FRACTION)))
    else:
        start, count = 0, n
    rgb = np.empty((count, h, w, 3), np.uint8)
    labels = np.empty(count, np.int64)
    for i in range(count):
        scene, labels[i] = render_scene(worlds[i % len(worlds)], seed, start + i, max(h, w))
        rgb[i] = fit_to(scene, (h, w))
    return FrameSet(rgb, labels, list(CLASS_NAMES), f"synthetic:{n}:{'+'.join(worlds)}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any failure means "not a CIFAR batch"
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None


def _cifar10(path: str, split: str, size: Size | None) -> FrameSet:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"CIFAR-10 folder not found: {root}")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = ["test_batch"] if split == "val" else [f"data_batch_{i}" for i in range(1, 6)]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise UserError(f"{root} has no CIFAR-10 batches ({', '.join(names)}): expected the python-pickle "
                        f"version (cifar-10-python.tar.gz, extracted)")
    data, labels = [], []
    for f in files:
        d = _unpickle(f)
        if b"data" not in d or b"labels" not in d:
            raise UserError(f"{f} is not a CIFAR-10 batch (no data/labels)")
        arr = np.asarray(d[b"data"], np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072 or len(d[b"labels"]) != len(arr):
            raise UserError(f"{f} is not a CIFAR-10 batch (data shape {arr.shape})")
        data.append(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(d[b"labels"])
    rgb = np.ascontiguousarray(np.concatenate(data))
    class_names = [f"class{i}" for i in range(10)]
    meta = root / "batches.meta"
    if meta.is_file():
        m = _unpickle(meta)
        if b"label_names" in m:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in m[b"label_names"]]
    if size and hw(size) != (32, 32):
        rgb = np.stack([fit_to(im, size, cv2.INTER_LINEAR) for im in rgb])
    return FrameSet(rgb, np.asarray(labels, np.int64), class_names, f"cifar10:{path}")


def _read_image(path: Path, size: Size) -> np.ndarray:
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise UserError(f"cannot read image {path}")
    return fit_to(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), size)


def _split_mask(keys: list[str], split: str) -> np.ndarray:
    """Deterministic split by a hash of each item's name: ~15 % validation."""
    v = np.array([(zlib.crc32(k.encode()) % 1000) < VAL_FRACTION * 1000 for k in keys], bool)
    if len(keys) >= 2 and (v.all() or not v.any()):  # tiny folders: keep both splits non-empty
        v[:] = False
        v[-1] = True
    return v if split == "val" else ~v


def _images(path: str, split: str, size: Size) -> FrameSet:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[tuple[Path, int]] = []
    class_names: list[str] = []
    if subdirs:
        class_names = [d.name for d in subdirs]
        for ci, d in enumerate(subdirs):
            items += [(p, ci) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    else:
        items = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {root}")
    mask = _split_mask([str(p.relative_to(root)) for p, _ in items], split)
    chosen = [it for it, m in zip(items, mask) if m]
    rgb = np.stack([_read_image(p, size) for p, _ in chosen]) if chosen else np.zeros((0, *hw(size), 3), np.uint8)
    labels = np.array([c for _, c in chosen], np.int64)
    return FrameSet(rgb, labels, class_names or list(CLASS_NAMES), f"images:{path}")


def read_video_frames(path: str, size: Size, max_frames: int = 5000, stride: int = 1) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"video not found: {p}")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise UserError(f"cannot open video {p} (unsupported or corrupt)")
    frames = []
    i = 0
    try:
        while len(frames) < max_frames:
            ok, im = cap.read()
            if not ok:
                break
            if i % stride == 0:
                frames.append(fit_to(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), size))
            i += 1
    finally:
        cap.release()
    if not frames:
        raise UserError(f"video {p} has no readable frames")
    return np.stack(frames)


def _video(path: str, split: str, size: Size) -> FrameSet:
    frames = read_video_frames(path, size)
    val = (np.arange(len(frames)) % 7) == 6  # every 7th frame held out (neighbours are similar)
    idx = np.nonzero(val if split == "val" else ~val)[0]
    if len(frames) >= 2 and len(idx) == 0:
        idx = np.array([len(frames) - 1])
    return FrameSet(frames[idx], np.full(len(idx), -1, np.int64), list(CLASS_NAMES), f"video:{path}")


def _walk_count(n: int, split: str) -> int:
    return max(32, int(round(n * VAL_FRACTION))) if split == "val" else n


def _walk(spec: str, split: str, size: Size, seed: int, only: np.ndarray | None = None) -> FrameSet:
    folder, n = parse_walk(spec)
    h, w = hw(size)
    # the camera films at its own resolution (blur and sensor noise happen there); the model sees the
    # frame resized, as on the headset
    camera = (max(h, WALK_CAMERA[0]), max(w, WALK_CAMERA[1]))
    walk = HeadWalk(load_photos(folder), size=camera, seed=walk_seed(folder, seed))
    start = WALK_VAL_OFFSET if split == "val" else 0
    ks = np.arange(_walk_count(n, split)) if only is None else np.asarray(only, np.int64)
    rgb = np.stack([fit_to(walk.frame(start + int(k) * WALK_STRIDE), (h, w)) for k in ks])
    return FrameSet(rgb, np.full(len(ks), -1, np.int64), list(CLASS_NAMES), f"walk:{folder}:{n}")


def source_length(source: str, split: str = "train") -> int | None:
    """How many frames ``load_source(source, split)`` gives, where that is known without making
    them (a walk is rendered frame by frame); None otherwise."""
    if source.startswith("walk:"):
        return _walk_count(parse_walk(source)[1], split)
    return None


def load_source_subset(source: str, split: str, size: Size, seed: int, idx: np.ndarray) -> FrameSet:
    """``load_source(source, split, size, seed).subset(idx)``, rendering only those frames of a walk."""
    if source.startswith("walk:"):
        _check_split_and_size(split, size)
        return _walk(source, split, size, seed, only=idx)
    return load_source(source, split, size, seed).subset(idx)


def _check_split_and_size(split: str, size: Size | None) -> None:
    if split not in ("train", "val"):
        raise ValueError(split)
    if size is not None:
        h, w = hw(size)
        if min(h, w) < 8 or h % 8 or w % 8:
            raise UserError(f"image size {w}x{h}: both sides must be positive multiples of 8")


def load_source(source: str, split: str = "train", size: Size | None = None, seed: int = 0) -> FrameSet:
    """Load ``split`` ("train" or "val") of SOURCE at ``size`` (a side or (height, width); sides
    divisible by 8)."""
    _check_split_and_size(split, size)
    kind, _, rest = source.partition(":")
    if kind == "synthetic":
        return _synthetic(source, split, size or 64, seed)
    if kind == "cifar10":
        if not rest:
            raise UserError("cifar10 source needs a path: cifar10:PATH")
        return _cifar10(rest, split, size)
    if kind == "images":
        if not rest:
            raise UserError("images source needs a folder: images:DIR")
        return _images(rest, split, size or 64)
    if kind == "video":
        if not rest:
            raise UserError("video source needs a file: video:PATH")
        return _video(rest, split, size or 64)
    if kind == "walk":
        return _walk(source, split, size or (120, 160), seed)
    if kind in ("mnist", "fashion-mnist"):  # the standard idx files (models.idx_data)
        from models.idx_data import load_idx

        return load_idx(kind, rest, split, size)
    if kind == "rooms":  # depth, normals and layout targets: models.room_data.load_rooms (the room task set)
        raise UserError("rooms[:N][:STYLE] has depth, normals and layout targets, not the cifar task set's: "
                        "train on it with --tasks room")
    raise UserError(f"unknown data source {source!r}: use synthetic[:N][:WORLD], cifar10:PATH, images:DIR, "
                    f"video:PATH, walk:DIR[:N], mnist:DIR, fashion-mnist:DIR or rooms[:N][:STYLE]")


# --- targets ---------------------------------------------------------------------------------

def canny_edges(rgb: np.ndarray, sigma: float = 1.0, low: int = 50, high: int = 100) -> np.ndarray:
    """Canny edges (0/255) of a colour frame after a Gaussian blur with ``sigma`` (the paper's sigma 1)."""
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
    return cv2.Canny(blurred, low, high, L2gradient=True)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 -> gray uint8 with OpenCV's BT.601 weights (the headset uses the same)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def corrupt(gray: torch.Tensor, generator: torch.Generator | None = None,
            noise: NoiseModel | None = None) -> torch.Tensor:
    """The paper's input noise: speckle (x + x * N(0, s)) then salt-and-pepper on a fraction of pixels."""
    noise = noise or NoiseModel()
    x = gray
    if noise.speckle > 0:
        x = x + x * torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise.speckle
    if noise.salt_pepper > 0:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        x = torch.where(u < noise.salt_pepper / 2, torch.zeros_like(x), x)
        x = torch.where((u >= noise.salt_pepper / 2) & (u < noise.salt_pepper), torch.ones_like(x), x)
    return x.clamp(0.0, 1.0)


class TaskData:
    """A FrameSet turned into tensors: inputs are corrupted per batch, targets are fixed.

    Everything is kept as uint8 tensors (a 2000-frame 64x64 set is ~40 MB) and
    converted to float per batch.
    """

    def __init__(self, frames: FrameSet, noise: NoiseModel | None = None, clean_fraction: float = 0.0):
        self.frames = frames
        self.noise = noise or NoiseModel()
        # the share of training samples fed the clean gray frame instead of the paper's noisy input
        # (0 = the paper; the headset feeds clean camera frames: see the README's deviations table)
        self.clean_fraction = float(clean_fraction)
        rgb = frames.rgb
        self.colour = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
        self.gray = torch.from_numpy(np.stack([to_gray(im) for im in rgb])[:, None]) if len(rgb) else \
            torch.zeros((0, 1) + rgb.shape[1:3], dtype=torch.uint8)
        self.edges = torch.from_numpy(np.stack([canny_edges(im) for im in rgb])[:, None]) if len(rgb) else \
            torch.zeros_like(self.gray)
        self.labels = torch.from_numpy(frames.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.colour.shape[2:])  # type: ignore[return-value]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              clean: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gray = self.gray[idx].float() / 255.0
        x = gray if clean else corrupt(gray, generator, self.noise)
        if self.clean_fraction > 0 and not clean:
            keep = torch.rand(len(idx), generator=generator) < self.clean_fraction
            x = torch.where(keep[:, None, None, None], gray, x)
        targets = {
            "class": self.labels[idx],
            "colour": self.colour[idx].float() / 255.0,
            "edges": self.edges[idx].float() / 255.0,
            "denoised": gray,
        }
        return x, targets

    def fixed_inputs(self, seed: int = 1234) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole set with a fixed noise draw: what evaluation uses, identical across runs."""
        g = torch.Generator().manual_seed(seed)
        return self.batch(torch.arange(len(self)), g)
