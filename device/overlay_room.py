"""Room overlays: depth, surface normals and the room's layout wireframe, as pure functions.

Like device/overlay.py, every view returns a new BGR uint8 image the size of the camera view (or
draws into ``out``, a tile of a larger image, when given) and never modifies its inputs. Model
outputs at another resolution are resized once.

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
_TURBO_LUT = np.ascontiguousarray(_TURBO[:, None, :])  # a user map (a map's name rebuilds its table each call)


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False,
            out: np.ndarray | None = None) -> np.ndarray:
    """``img`` at ``size`` (h, w), written into ``out`` when given (a tile of a larger image)."""
    h, w = size
    if img.shape[:2] == (h, w):
        if out is None:
            return img
        out[...] = img
        return out
    shrink = h < img.shape[0] and w < img.shape[1]
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.resize(img, (w, h), dst=out, interpolation=interp)


_LOG_NEAR = math.log(DEPTH_NEAR_M)
_LOG_SPAN = math.log(DEPTH_FAR_M) - _LOG_NEAR


def depth_index(depth: np.ndarray) -> np.ndarray:
    """Depth (metres) -> colour-map index 0..255 (255 = DEPTH_NEAR_M or nearer), -1 where invalid."""
    d = np.asarray(depth, np.float32)
    valid = np.isfinite(d) & (d > 0)
    frac = (np.log(np.where(valid, d, 1.0)) - _LOG_NEAR) / _LOG_SPAN
    idx = np.rint(255.0 * (1.0 - np.clip(frac, 0.0, 1.0))).astype(np.int16)
    return np.where(valid, idx, -1)


def _depth_index_u8(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`depth_index` as uint8 (invalid -> 0) and the validity mask, None when all is valid
    (a model's depth always is: it takes the short path, six array operations on the small map)."""
    d = np.asarray(depth, np.float32)
    if np.isfinite(d).all() and d.min() > 0:
        frac = np.log(d)  # the same float32 operations as depth_index, in place: the same indices
        frac -= _LOG_NEAR
        frac /= _LOG_SPAN
        np.clip(frac, 0.0, 1.0, out=frac)
        np.subtract(1.0, frac, out=frac)
        frac *= 255.0
        return np.rint(frac, out=frac).astype(np.uint8), None
    idx = depth_index(d)
    valid = idx >= 0
    return np.where(valid, idx, 0).astype(np.uint8), valid


def depth_colours(depth: np.ndarray) -> np.ndarray:
    """HxW depth in metres -> HxWx3 BGR uint8 on the fixed scale (module docstring)."""
    idx = depth_index(depth)
    out = _TURBO[np.maximum(idx, 0)]
    out[idx < 0] = 0
    return out


def depth_view(view_bgr: np.ndarray, depth: np.ndarray, alpha: float = 1.0,
               out: np.ndarray | None = None) -> np.ndarray:
    """The depth map coloured (``alpha`` = 1) or blended over the camera view (0 < alpha < 1),
    written into ``out`` (the view's shape) when given.

    The colour-map index is computed at the depth map's own resolution (a model's is a quarter of
    its input's), resized as uint8 (one channel: the log and the map at the view's size cost ~10x
    more) and coloured with one 256-entry lookup (``cv2.applyColorMap`` with TURBO as a user map:
    the built-in map name rebuilds its table on every call)."""
    size = view_bgr.shape[:2]
    index, valid = _depth_index_u8(depth)
    coloured = cv2.applyColorMap(_resize(index, size), _TURBO_LUT,
                                 dst=out if alpha >= 1.0 else None)
    if valid is not None:
        coloured[_resize(valid.astype(np.uint8), size, nearest=True) == 0] = 0
    if alpha >= 1.0:
        return coloured
    return cv2.addWeighted(view_bgr, 1.0 - alpha, coloured, alpha, 0.0, dst=out)


# camera-frame normal (x, y, z) -> BGR levels: B = (1 - z) / 2, G = (1 - y) / 2, R = (1 + x) / 2, x 255,
# with the rounding's + 0.5 in the offset column (cv2.transform: dst = M[:, :3] @ src + M[:, 3])
_NORMALS_TO_BGR = np.array([[0.0, 0.0, -127.5, 128.0],
                            [0.0, -127.5, 0.0, 128.0],
                            [127.5, 0.0, 0.0, 128.0]], np.float32)


def normals_colours(normals: np.ndarray) -> np.ndarray:
    """HxWx3 camera-frame normals -> HxWx3 BGR uint8 (module docstring); non-finite -> black."""
    n = np.ascontiguousarray(normals, np.float32)
    finite = np.isfinite(n).all()
    levels = cv2.transform(n if finite else np.nan_to_num(n), _NORMALS_TO_BGR)
    np.clip(levels, 0, 255, out=levels)
    out = levels.astype(np.uint8)  # truncation after the + 0.5: rounded
    if not finite:
        out[~np.isfinite(n).all(axis=-1)] = 0
    return out


def normals_view(view_bgr: np.ndarray, normals: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Normals (any resolution; a model's need not be unit length) as colours at the view's size
    (into ``out`` when given): normalised and coloured at their own resolution, the colours resized
    (10x cheaper than the normals)."""
    n = np.asarray(normals, np.float32)
    norm = np.sqrt(np.einsum("...i,...i->...", n, n))[..., None]
    return _resize(normals_colours(n / np.maximum(norm, 1e-6)), view_bgr.shape[:2], out=out)


def heatmap_peaks(heatmaps: np.ndarray, h: int, w: int, threshold: float = 0.3) -> np.ndarray:
    """:func:`shared.rooms.heatmap_keypoints`, asked only about the channels whose peak reaches
    ``threshold`` (one vectorised max finds them): the same keypoints, without a Python pass over
    the channels that are absent (most of a model's 32, most frames)."""
    hm = np.asarray(heatmaps, np.float32)
    k = hm.shape[0]
    kps = np.zeros((k, 3), np.float32)
    present = np.flatnonzero(hm.reshape(k, -1).max(axis=1) >= threshold)
    if present.size:
        kps[present] = heatmap_keypoints(hm[present], h, w, threshold)
    return kps


def layout_view(view_bgr: np.ndarray, keypoints: np.ndarray | None = None, size: tuple[int, int] | None = None,
                heatmaps: np.ndarray | None = None, threshold: float = 0.3, thickness: int = 2,
                out: np.ndarray | None = None) -> np.ndarray:
    """The camera view with the room's wireframe drawn over it (into ``out`` when given: the view
    is copied there and the lines drawn on it).

    Either ``keypoints`` (K, 3) in pixels of an image of ``size`` (h, w; default: the view's),
    or ``heatmaps`` (K, h', w') covering the whole frame (peaks under ``threshold`` are absent).
    """
    h, w = view_bgr.shape[:2]
    if heatmaps is not None:
        kps = heatmap_peaks(heatmaps, h, w, threshold)
    elif keypoints is not None:
        kps = np.array(keypoints, np.float32, copy=True)
        sh, sw = size if size is not None else (h, w)
        kps[:, 0] = (kps[:, 0] + 0.5) * (w / sw) - 0.5
        kps[:, 1] = (kps[:, 1] + 0.5) * (h / sh) - 0.5
    else:
        raise ValueError("layout_view needs keypoints or heatmaps")
    if out is None:
        out = view_bgr.copy()
    elif out is not view_bgr:
        out[...] = view_bgr
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
