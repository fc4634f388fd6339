"""The room model's data: the ``rooms[:N][:STYLE]`` source, and ordinal depth on real stereo.

``load_rooms`` renders labelled frames with :mod:`shared.rooms` (numpy only; nothing here needs
torch). ``ordinal_depth_agreement`` and ``lower_is_nearer`` are the metric and the naive baseline
of ``hmd bench room-real``: the share of random pixel pairs a depth map orders as the ground truth
does, on the Middlebury motorcycle pair that scikit-image bundles (``motorcycle_depth_order``).
"""
from __future__ import annotations

import numpy as np

from shared.errors import UserError
from shared.rooms import MIXED, STYLES, RoomFrames, room_frames

DEFAULT_ROOMS_N = 1000
VAL_FRACTION = 0.15


def parse_rooms(spec: str) -> tuple[int, str]:
    """``rooms[:N][:STYLE]`` -> (N, style); STYLE is one of STYLES or ``mixed`` (the default)."""
    kind, *parts = spec.split(":")
    if kind != "rooms":
        raise UserError(f"not a rooms source: {spec!r} (use rooms[:N][:STYLE])")
    n, style = DEFAULT_ROOMS_N, MIXED
    for part in parts:
        if not part:
            continue
        if part.lstrip("-").isdigit():
            n = int(part)
            if n < 2:
                raise UserError(f"rooms source needs N >= 2, got {n}")
        elif part in STYLES or part == MIXED:
            style = part
        else:
            raise UserError(f"bad rooms source {spec!r}: {part!r} is neither a count nor a style "
                            f"({', '.join(STYLES + (MIXED,))})")
    return n, style


def load_rooms(spec: str, split: str = "train", size: int = 320, seed: int = 0,
               texture_dir: str | None = None) -> RoomFrames:
    """SPEC's frames of ``split`` ("train": N frames; "val": 15% of N, at least 2, from other rooms).

    Memory per 320x320 frame: ~2.7 MB (rgb 0.3, depth 0.4, normals 1.2, heatmaps 0.8).
    """
    n, style = parse_rooms(spec)
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r} (train or val)")
    count = n if split == "train" else max(2, int(round(n * VAL_FRACTION)))
    return room_frames(count, style, seed, size, split, texture_dir)


# --- ordinal depth on real geometry ----------------------------------------------------------

def random_pairs(shape: tuple[int, int], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random pixel pairs (flat indices a, b) of an image of ``shape``, a != b."""
    rng = np.random.default_rng(seed)
    total = int(shape[0] * shape[1])
    a = rng.integers(total, size=n)
    b = (a + rng.integers(1, total, size=n)) % total
    return a, b


def ordinal_depth_agreement(pred: np.ndarray, truth: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                            valid: np.ndarray | None = None, min_ratio: float = 1.02) -> float:
    """Share of pixel pairs that ``pred`` orders (nearer / farther) as ``truth`` does.

    Both are depth-like (larger = farther). Pairs are counted only where both pixels are valid
    and the ground truth clearly orders them (depth ratio >= ``min_ratio``: equal depths have no
    order). A prediction tie counts as wrong (a constant map scores 0).
    """
    a, b = pairs
    pred, truth = np.asarray(pred, np.float64).ravel(), np.asarray(truth, np.float64).ravel()
    if pred.shape != truth.shape:
        raise UserError(f"prediction has {pred.size} pixels, ground truth {truth.size}")
    keep = np.isfinite(truth[a]) & np.isfinite(truth[b]) & (truth[a] > 0) & (truth[b] > 0)
    if valid is not None:
        v = np.asarray(valid, bool).ravel()
        keep &= v[a] & v[b]
    a, b = a[keep], b[keep]
    ta, tb = truth[a], truth[b]
    clear = np.maximum(ta, tb) >= min_ratio * np.minimum(ta, tb)
    if not clear.any():
        raise UserError("no pixel pair with a clear ground-truth order")
    want = np.sign(ta[clear] - tb[clear])
    got = np.sign(pred[a[clear]] - pred[b[clear]])
    return float((want == got).mean())


def lower_is_nearer(shape: tuple[int, int]) -> np.ndarray:
    """The naive prior: depth falls with the row (the bottom of the image is nearest)."""
    h, w = shape
    return np.repeat((h - np.arange(h, dtype=np.float32))[:, None], w, axis=1)


def motorcycle_depth_order() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left image RGB uint8, depth-like ground truth, valid mask) of Middlebury's motorcycle pair.

    The data ships inside scikit-image (``skimage.data.stereo_motorcycle``; no download). Depth is
    inversely proportional to disparity, so 1 / disparity orders pixels as metric depth does;
    pixels without a ground-truth disparity (inf) are invalid.
    """
    try:
        from skimage import data as skdata
    except ImportError:
        raise UserError("the motorcycle stereo pair needs scikit-image: pip install scikit-image") from None
    left, _, disparity = skdata.stereo_motorcycle()
    valid = np.isfinite(disparity) & (disparity > 0)
    depth = np.where(valid, 1.0 / np.where(valid, disparity, 1.0), np.inf).astype(np.float32)
    return left, depth, valid
