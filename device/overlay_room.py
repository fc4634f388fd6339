"""Room overlays: depth, surface normals and the room's layout wireframe, as pure functions.

Like device/overlay.py, every view returns a new BGR uint8 image the size of the camera view
and never modifies its inputs. Model outputs at another resolution are resized once.

* ``depth``: metres, colour-mapped on a fixed log scale from DEPTH_NEAR_M (red end of OpenCV's
  TURBO map) to DEPTH_FAR_M (blue end); nearer or farther values clip to the ends, invalid
  depth (NaN, inf, <= 0) is black. Fixed, not per-frame: one colour means one distance always.
* ``normals``: camera-frame unit normals (x right, y down, z forward, shared/rooms.py) shown as
  RGB = ((1 + x) / 2, (1 - y) / 2, (1 - z) / 2): red = facing right, green = facing up, blue =
  facing the camera (a wall seen head-on is lavender, (128, 128, 255)).
* ``layout``: the room's wireframe (LAYOUT_EDGES of shared/rooms.py) drawn from typed keypoints
  (exact labels) or read from keypoint heatmaps (a model's output), with corners as dots.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from shared.rooms import heatmap_keypoints, layout_segments

DEPTH_NEAR_M = 0.5
DEPTH_FAR_M = 10.0
LAYOUT_COLOUR_BGR = (0, 255, 255)  # yellow lines
CORNER_COLOUR_BGR = (0, 0, 255)  # red dots: visible corners
HIDDEN_COLOUR_BGR = (255, 128, 0)  # blue dots: corners behind furniture
_TURBO = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]  # (256, 3) BGR
_TURBO_LUT = np.ascontiguousarray(_TURBO[:, None, :])  # cv2.LUT's form (applyColorMap rebuilds its map each call)


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    shrink = h < img.shape[0] and w < img.shape[1]
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.resize(img, (w, h), interpolation=interp)


def depth_index(depth: np.ndarray) -> np.ndarray:
    """Depth (metres) -> colour-map index 0..255 (255 = DEPTH_NEAR_M or nearer), -1 where invalid."""
    d = np.asarray(depth, np.float32)
    valid = np.isfinite(d) & (d > 0)
    lo, hi = math.log(DEPTH_NEAR_M), math.log(DEPTH_FAR_M)
    frac = (np.log(np.where(valid, d, 1.0)) - lo) / (hi - lo)
    idx = np.rint(255.0 * (1.0 - np.clip(frac, 0.0, 1.0))).astype(np.int16)
    return np.where(valid, idx, -1)


def depth_colours(depth: np.ndarray) -> np.ndarray:
    """HxW depth in metres -> HxWx3 BGR uint8 on the fixed scale (module docstring)."""
    idx = depth_index(depth)
    out = _TURBO[np.maximum(idx, 0)]
    out[idx < 0] = 0
    return out


def depth_view(view_bgr: np.ndarray, depth: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The depth map coloured (``alpha`` = 1) or blended over the camera view (0 < alpha < 1).

    The colour-map index is computed at the depth map's own resolution (a model's is a quarter of
    its input's) and resized as uint8 (the log and the map at the view's size cost ~10x more)."""
    idx = depth_index(depth)
    valid = idx >= 0
    index = _resize(np.where(valid, idx, 0).astype(np.uint8), view_bgr.shape[:2])
    coloured = cv2.LUT(cv2.cvtColor(index, cv2.COLOR_GRAY2BGR), _TURBO_LUT)
    if not valid.all():
        coloured[_resize(valid.astype(np.uint8), view_bgr.shape[:2], nearest=True) == 0] = 0
    if alpha >= 1.0:
        return coloured
    return cv2.addWeighted(view_bgr, 1.0 - alpha, coloured, alpha, 0.0)


def normals_colours(normals: np.ndarray) -> np.ndarray:
    """HxWx3 camera-frame normals -> HxWx3 BGR uint8 (module docstring); non-finite -> black."""
    n = np.asarray(normals, np.float32)
    rgb = np.stack([(1.0 + n[..., 0]) * 0.5, (1.0 - n[..., 1]) * 0.5, (1.0 - n[..., 2]) * 0.5], axis=-1)
    out = np.clip(rgb * 255.0 + 0.5, 0, 255)
    out[~np.isfinite(n).all(axis=-1)] = 0
    return np.ascontiguousarray(out[..., ::-1]).astype(np.uint8)


def normals_view(view_bgr: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Normals (any resolution; a model's need not be unit length) as colours at the view's size:
    normalised and coloured at their own resolution, the colours resized (10x cheaper than the normals)."""
    n = np.asarray(normals, np.float32)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return _resize(normals_colours(n / np.maximum(norm, 1e-6)), view_bgr.shape[:2])


def layout_view(view_bgr: np.ndarray, keypoints: np.ndarray | None = None, size: tuple[int, int] | None = None,
                heatmaps: np.ndarray | None = None, threshold: float = 0.3, thickness: int = 2) -> np.ndarray:
    """The camera view with the room's wireframe drawn over it.

    Either ``keypoints`` (K, 3) in pixels of an image of ``size`` (h, w; default: the view's),
    or ``heatmaps`` (K, h', w') covering the whole frame (peaks under ``threshold`` are absent).
    """
    h, w = view_bgr.shape[:2]
    if heatmaps is not None:
        kps = heatmap_keypoints(np.asarray(heatmaps, np.float32), h, w, threshold)
    elif keypoints is not None:
        kps = np.array(keypoints, np.float32, copy=True)
        sh, sw = size if size is not None else (h, w)
        kps[:, 0] = (kps[:, 0] + 0.5) * (w / sw) - 0.5
        kps[:, 1] = (kps[:, 1] + 0.5) * (h / sh) - 0.5
    else:
        raise ValueError("layout_view needs keypoints or heatmaps")
    out = view_bgr.copy()
    shift = 4  # sub-pixel line ends
    scale = 1 << shift
    for _, a, b in layout_segments(kps):
        cv2.line(out, (int(round(a[0] * scale)), int(round(a[1] * scale))),
                 (int(round(b[0] * scale)), int(round(b[1] * scale))), LAYOUT_COLOUR_BGR, thickness,
                 cv2.LINE_AA, shift)
    for u, v, state in kps[:8]:  # the corners
        if state > 0:
            colour = CORNER_COLOUR_BGR if state >= 2 else HIDDEN_COLOUR_BGR
            cv2.circle(out, (int(round(u)), int(round(v))), thickness + 2, colour, -1, cv2.LINE_AA)
    return out
