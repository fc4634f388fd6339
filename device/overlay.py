"""Drawing a prediction over the camera view, and the HUD.

Every mode returns a new BGR uint8 image the size of the camera frame (the input frame is never
modified: the journal may still be reading it). Model outputs come at model resolution and are
resized with one ``cv2.resize`` each, straight to the size they are drawn at.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from device.engine import Prediction

MODES: tuple[str, ...] = ("edges", "colour", "denoised", "side-by-side", "class")
# keys in the window: 1..5 pick a mode, m cycles, h toggles the HUD, q / Esc quit
MODE_KEYS = {ord(str(i + 1)): m for i, m in enumerate(MODES)}
EDGE_COLOUR_BGR = np.array([0, 255, 0], np.float32)  # edges are drawn in green
HUD_HEIGHT = 18  # pixels of the top band the HUD covers


@dataclasses.dataclass
class HudInfo:
    fps: float
    p50_ms: float
    p95_ms: float
    version: str
    mode: str
    note: str = ""


def _up(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``img`` resized to ``size`` (h, w): bilinear up, area-averaged down (no aliasing)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    shrink = h < img.shape[0] and w < img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _gray_bgr(gray01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.cvtColor(_up(_to_u8(gray01), size), cv2.COLOR_GRAY2BGR)


def edges_view(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    """The camera view with the edge map blended in green, strength = edge probability."""
    if pred.edges is None:
        return view_bgr.copy()
    alpha = _up(np.clip(pred.edges, 0, 1).astype(np.float32, copy=False), view_bgr.shape[:2])
    green = np.empty_like(view_bgr)
    green[:] = EDGE_COLOUR_BGR.astype(np.uint8)
    # one OpenCV call: view * (1 - alpha) + green * alpha, rounded (a numpy float blend cost
    # 0.4 ms a frame at 128x128, most of the overlay's time)
    return cv2.blendLinear(view_bgr, green, 1.0 - alpha, alpha)


def colour_view(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    if pred.colour is None:
        return view_bgr.copy()
    return cv2.cvtColor(_up(_to_u8(pred.colour), view_bgr.shape[:2]), cv2.COLOR_RGB2BGR)


def denoised_view(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    if pred.denoised is None:
        return view_bgr.copy()
    return _gray_bgr(pred.denoised, view_bgr.shape[:2])


def side_by_side(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    """A 2 x 2 grid at the frame's size: view, edges, colour, denoised. Each tile is drawn at tile
    size (the view shrunk once, the outputs resized straight to it): a quarter of the pixels."""
    h, w = view_bgr.shape[:2]
    hh, hw = h // 2, w // 2
    small = cv2.resize(view_bgr, (hw, hh), interpolation=cv2.INTER_AREA)
    tiles = [small, edges_view(small, pred), colour_view(small, pred), denoised_view(small, pred)]
    out = np.zeros_like(view_bgr)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, 2)
        out[r * hh:(r + 1) * hh, c * hw:(c + 1) * hw] = tile
    return out


def class_view(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    """The view with the scene class and a confidence bar at the bottom."""
    out = view_bgr.copy()
    h, w = out.shape[:2]
    bar_h = max(14, h // 12)
    out[h - bar_h:] = (out[h - bar_h:] * 0.35).astype(np.uint8)
    # the confidence bar: the band's top two rows, confidence x width long
    out[h - bar_h:h - bar_h + 2, :int(round(w * pred.confidence))] = (0, 200, 255)
    cv2.putText(out, f"{pred.class_name} {100 * pred.confidence:.0f}%", (4, h - 3),
                cv2.FONT_HERSHEY_SIMPLEX, max(0.3, bar_h / 40), (255, 255, 255), 1, cv2.LINE_AA)
    return out


RENDERERS = {"edges": edges_view, "colour": colour_view, "denoised": denoised_view,
             "side-by-side": side_by_side, "class": class_view}


def render(frame_rgb: np.ndarray, pred: Prediction | None, mode: str) -> np.ndarray:
    """The overlaid BGR image for ``mode``; the plain view when there is no prediction."""
    view = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    if pred is None:
        return view
    return RENDERERS[mode](view, pred)


def draw_hud(img_bgr: np.ndarray, hud: HudInfo) -> None:
    """FPS, latency p50/p95, model version and mode in a dark band on top (in place)."""
    h, w = img_bgr.shape[:2]
    band = min(HUD_HEIGHT, h)
    img_bgr[:band] = (img_bgr[:band] >> 2)  # darken: cheap and keeps the view visible
    text = f"{hud.fps:4.1f} fps  {hud.p50_ms:.0f}/{hud.p95_ms:.0f} ms p50/p95  {hud.version}  [{hud.mode}]"
    if hud.note:
        text += f"  {hud.note}"
    cv2.putText(img_bgr, text, (3, band - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
