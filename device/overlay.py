"""Drawing a prediction over the camera view, and the HUD.

Every mode returns a new BGR uint8 image the size of the camera frame (the input frame is never
modified: the journal may still be reading it). Model outputs come at model resolution and are
resized with one ``cv2.resize`` each, straight to the size they are drawn at.

Text is sized from the frame height (:func:`text_style`), so the HUD and the tile labels read the
same at 320x240 and at 1280x720. The HUD is a band *above* the view (:func:`with_hud`): it never
covers what the camera or the model shows, and its height depends only on the frame size, so a
recording keeps one size for the whole run.

Which modes a model has depends on its task set (its manifest's ``task_set``): the cifar set's
edges / colour / denoised / side-by-side / class, the room set's depth / normals / layout /
side-by-side (device/overlay_room.py draws them). :func:`mode_for` maps a requested mode to one the
running model has (its first mode otherwise), so a hot-swap to a model of the other set keeps drawing.
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from device import overlay_room
from device.engine import Prediction

CIFAR_MODES: tuple[str, ...] = ("edges", "colour", "denoised", "side-by-side", "class")
ROOM_MODES: tuple[str, ...] = ("depth", "normals", "layout", "side-by-side")
TASK_SET_MODES = {"cifar": CIFAR_MODES, "room": ROOM_MODES}
MODES: tuple[str, ...] = CIFAR_MODES + tuple(m for m in ROOM_MODES if m not in CIFAR_MODES)
# keys in the window: 1..5 pick one of the running model's modes, m cycles, h toggles the HUD, q / Esc quit
MODE_KEYS = {ord(str(i + 1)): m for i, m in enumerate(CIFAR_MODES)}  # a cifar model's (see mode_key)
EDGE_COLOUR_BGR = np.array([0, 255, 0], np.float32)  # edges are drawn in green
TILE_LABELS: tuple[str, ...] = ("camera", "edges", "colour", "denoised")  # side-by-side, row by row
ROOM_TILE_LABELS: tuple[str, ...] = ("camera", "depth", "normals", "layout")


def modes_for(task_set: str) -> tuple[str, ...]:
    """The overlay modes of a model of ``task_set`` (an unknown set: the cifar set's)."""
    return TASK_SET_MODES.get(task_set, CIFAR_MODES)


def mode_for(mode: str, task_set: str) -> str:
    """``mode`` if a model of ``task_set`` has it, else that set's first mode."""
    modes = modes_for(task_set)
    return mode if mode in modes else modes[0]


def mode_key(key: int, task_set: str) -> str | None:
    """The mode key ``key`` (1, 2, ...) picks for a model of ``task_set``; None for another key."""
    modes = modes_for(task_set)
    i = key - ord("1")
    return modes[i] if 0 <= i < len(modes) else None
FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_TEXT_SCALE = 0.5  # 10 px capitals: the smallest that stays legible in a 320x240 window
WHITE, AMBER = (255, 255, 255), (0, 200, 255)
HUD_BACKGROUND = 24  # gray level of the HUD band
# the widest the HUD's statistics get: the one-line layout keeps room for them whatever the numbers
WIDEST_STATS = "999.9 fps  9999/9999 ms p50/p95"
MIN_MODEL_FIELD = "model 0123456789ab  [side-by-side]"


@dataclasses.dataclass(frozen=True)
class HudInfo:
    """What the HUD says (hashable: :func:`with_hud` draws each distinct one once)."""

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


def _plain(view_bgr: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """The view unchanged: a new copy, or copied into ``out``."""
    if out is None:
        return view_bgr.copy()
    out[...] = view_bgr
    return out


@functools.lru_cache(maxsize=8)
def _solid(shape: tuple[int, ...], bgr: tuple[int, int, int]) -> np.ndarray:
    """A read-only image of one colour (made once per size, not once per frame)."""
    img = np.empty(shape, np.uint8)
    img[:] = bgr
    img.flags.writeable = False
    return img


def edges_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    """The camera view with the edge map blended in green, strength = edge probability."""
    if pred.edges is None:
        return _plain(view_bgr, out)
    alpha = _up(np.clip(pred.edges, 0, 1).astype(np.float32, copy=False), view_bgr.shape[:2])
    green = _solid(view_bgr.shape, tuple(int(v) for v in EDGE_COLOUR_BGR))
    # one OpenCV call: view * (1 - alpha) + green * alpha, rounded (a numpy float blend cost
    # 0.4 ms a frame at 128x128, most of the overlay's time)
    return cv2.blendLinear(view_bgr, green, 1.0 - alpha, alpha, dst=out)


def colour_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    if pred.colour is None:
        return _plain(view_bgr, out)
    return cv2.cvtColor(_up(_to_u8(pred.colour), view_bgr.shape[:2]), cv2.COLOR_RGB2BGR, dst=out)


def denoised_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    if pred.denoised is None:
        return _plain(view_bgr, out)
    return cv2.cvtColor(_up(_to_u8(pred.denoised), view_bgr.shape[:2]), cv2.COLOR_GRAY2BGR, dst=out)


def side_by_side(view_bgr: np.ndarray, pred: Prediction) -> np.ndarray:
    """A 2 x 2 grid at the frame's size: view, edges, colour, denoised (a room model: view, depth,
    normals, layout), each labelled in its top-left corner (:data:`TILE_LABELS`,
    :data:`ROOM_TILE_LABELS`) when the tile has room for it (from ~200x150 frames up). Each tile is
    drawn at tile size straight into its quarter of the grid (the view shrunk once, the outputs
    resized straight to it; no tile is drawn elsewhere and copied): a quarter of the pixels."""
    h, w = view_bgr.shape[:2]
    hh, hw = h // 2, w // 2
    # an odd side leaves a last row / column outside the tiles: black
    out = np.empty_like(view_bgr) if h % 2 == 0 and w % 2 == 0 else np.zeros_like(view_bgr)
    quarters = [out[r * hh:(r + 1) * hh, c * hw:(c + 1) * hw] for r in (0, 1) for c in (0, 1)]
    small = cv2.resize(view_bgr, (hw, hh), dst=quarters[0], interpolation=cv2.INTER_AREA)
    room = pred.task_set == "room"
    modes, labels = (ROOM_MODES, ROOM_TILE_LABELS) if room else (TILE_LABELS[1:], TILE_LABELS)
    for mode, quarter in zip(modes[:3], quarters[1:]):
        RENDERERS[mode](small, pred, out=quarter)
    style = text_style(h)
    for label, x, y in _tile_labels(labels, h, w):  # after every tile: the camera tile is the others' input
        draw_label(out, label, x, y, style)
    return out


@functools.lru_cache(maxsize=16)
def _tile_labels(labels: tuple[str, ...], h: int, w: int) -> tuple[tuple[str, int, int], ...]:
    """(label, x, y) of the tile labels that fit a ``w`` x ``h`` grid (a tile too small for its
    label keeps all its pixels)."""
    hh, hw = h // 2, w // 2
    style = text_style(h)
    fits = []
    for k, label in enumerate(labels):
        r, c = divmod(k, 2)
        bw, bh = label_box(label, style)
        if bw <= 0.6 * hw and bh <= hh / 3:
            fits.append((label, c * hw, r * hh))
    return tuple(fits)


@functools.lru_cache(maxsize=64)
def label_box(label: str, style: "TextStyle") -> tuple[int, int]:
    """(width, height) of the dark box :func:`draw_label` draws for ``label``."""
    return style.width(label) + 2 * style.pad, style.line_height


def draw_label(img_bgr: np.ndarray, label: str, x: int, y: int, style: "TextStyle") -> None:
    """``label`` in white on a darkened box whose top-left corner is (x, y) (in place)."""
    bw, bh = label_box(label, style)
    box = img_bgr[y:y + bh, x:x + bw]
    np.right_shift(box, 2, out=box)  # darkened, not blacked out: the tile stays visible under it
    style.put(img_bgr, label, x + style.pad, y + style.pad // 2)


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


def depth_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    """The predicted depth on the fixed near-to-far colour scale of device/overlay_room.py."""
    if pred.depth is None:
        return _plain(view_bgr, out)
    return overlay_room.depth_view(view_bgr, pred.depth, out=out)


def normals_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    if pred.normals is None:
        return _plain(view_bgr, out)
    return overlay_room.normals_view(view_bgr, pred.normals, out=out)


def layout_view(view_bgr: np.ndarray, pred: Prediction, out: np.ndarray | None = None) -> np.ndarray:
    """The room's wireframe, read from the predicted keypoint heatmaps, over the view."""
    if pred.keypoints is None:
        return _plain(view_bgr, out)
    return overlay_room.layout_view(view_bgr, heatmaps=pred.keypoints, thickness=max(1, view_bgr.shape[0] // 160),
                                    out=out)


ROOM_RENDERERS = {"depth": depth_view, "normals": normals_view, "layout": layout_view}
RENDERERS = {"edges": edges_view, "colour": colour_view, "denoised": denoised_view,
             "side-by-side": side_by_side, "class": class_view, **ROOM_RENDERERS}


def render(frame_rgb: np.ndarray, pred: Prediction | None, mode: str) -> np.ndarray:
    """The overlaid BGR image for ``mode`` (one of the prediction's task set's: :func:`mode_for`);
    the plain view when there is no prediction."""
    view = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    if pred is None:
        return view
    return RENDERERS[mode_for(mode, pred.task_set)](view, pred)




@dataclasses.dataclass(frozen=True)
class TextStyle:
    """OpenCV text sized for one frame height: ``height`` pixels above the baseline, ``descent`` below."""

    scale: float
    thickness: int
    height: int
    descent: int
    pad: int

    @property
    def line_height(self) -> int:
        return self.height + self.descent + self.pad

    def width(self, text: str) -> int:
        return cv2.getTextSize(text, FONT, self.scale, self.thickness)[0][0]

    def put(self, img_bgr: np.ndarray, text: str, x: int, y_top: int, colour=WHITE) -> None:
        cv2.putText(img_bgr, text, (x, y_top + self.height), FONT, self.scale, colour, self.thickness, cv2.LINE_AA)


@functools.lru_cache(maxsize=32)
def text_style(frame_height: int) -> TextStyle:
    """Text for a frame ``frame_height`` pixels high: scale 0.5 up to 320 px, then in proportion (1.125 at 720)."""
    scale = max(MIN_TEXT_SCALE, frame_height / 640)
    thickness = 1 if scale < 1.0 else 2
    (_, height), descent = cv2.getTextSize("Hg", FONT, scale, thickness)
    return TextStyle(scale, thickness, height, descent, pad=max(3, round(height * 0.35)))


@functools.lru_cache(maxsize=256)
def elide(text: str, max_width: int, style: TextStyle) -> str:
    """``text`` if it fits in ``max_width`` pixels, else its start and end around "..." (a version
    name's distinguishing part is often at its end)."""
    if style.width(text) <= max_width:
        return text
    for keep in range(len(text) - 1, 0, -1):
        head = (keep + 1) // 2
        shorter = text[:head] + "..." + text[len(text) - (keep - head):]
        if style.width(shorter) <= max_width:
            return shorter
    return "..." if style.width("...") <= max_width else ""


@functools.lru_cache(maxsize=32)
def hud_lines(width: int, height: int) -> int:
    """1 when the statistics and the model field fit side by side on one line, else 2: decided by
    the frame size alone, so the band never changes height during a run."""
    style = text_style(height)
    need = style.width(WIDEST_STATS) + 3 * style.pad + style.width(MIN_MODEL_FIELD)
    return 1 if need <= width - 2 * style.pad else 2


def hud_height(width: int, height: int) -> int:
    """Rows :func:`with_hud` adds above a ``width`` x ``height`` frame (one more when that keeps an
    even frame's height even: video encoders drop an odd last row)."""
    style = text_style(height)
    band = hud_lines(width, height) * style.line_height + style.pad
    return band + (band + height) % 2


def _model_field(hud: HudInfo, max_width: int, style: TextStyle) -> str:
    tail = f"  [{hud.mode}]"
    return "model " + elide(hud.version, max_width - style.width("model " + tail), style) + tail


def with_hud(img_bgr: np.ndarray, hud: HudInfo) -> np.ndarray:
    """A new image: a band with FPS, latency p50/p95, the model version and the mode (and a note
    first, in amber) above ``img_bgr``, which is copied untouched below it. A version name too long
    for the band is shortened in the middle, never cut off. The band is drawn once per distinct
    ``hud`` (the frame loop refreshes its figures every few frames: most frames copy a cached band)."""
    h, w = img_bgr.shape[:2]
    band = _hud_band(w, h, hud)
    out = np.empty((band.shape[0] + h, w, 3), np.uint8)
    out[:band.shape[0]] = band
    out[band.shape[0]:] = img_bgr
    return out


@functools.lru_cache(maxsize=8)
def _hud_band(w: int, h: int, hud: HudInfo) -> np.ndarray:
    """The HUD band (read-only) above a ``w`` x ``h`` frame."""
    style = text_style(h)
    out = np.full((hud_height(w, h), w, 3), HUD_BACKGROUND, np.uint8)
    avail = w - 2 * style.pad
    stats = f"{hud.fps:.1f} fps  {hud.p50_ms:.0f}/{hud.p95_ms:.0f} ms p50/p95"
    y = style.pad
    if hud_lines(w, h) == 1:
        field = _model_field(hud, avail - style.width(WIDEST_STATS) - 3 * style.pad, style)
        style.put(out, field, w - style.pad - style.width(field), y)
        left_room = avail - style.width(field) - 3 * style.pad
    else:
        style.put(out, _model_field(hud, avail, style), style.pad, y + style.line_height)
        left_room = avail
    x = style.pad
    if hud.note:  # first, in amber: when there is one it matters more than the statistics
        note = elide(hud.note + "  ", left_room, style)
        style.put(out, note, x, y, AMBER)
        x += style.width(note)
    style.put(out, elide(stats, left_room - (x - style.pad), style), x, y)
    out.flags.writeable = False
    return out
