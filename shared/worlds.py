"""Procedural synthetic worlds: the data source that needs no download.

A *world* fixes a palette, a set of background textures and a lighting regime.
Scenes are rendered deterministically from (world, seed, index): a textured
background, one foreground object whose shape is the scene's class (varied in
colour, size, pose and position), smaller distractor objects of other classes
that may occlude it, and a lighting field. Two worlds differ enough that a model
trained in one does measurably worse in the other, which is what the cloud's
personalisation has to fix.

numpy + OpenCV only: the headset (device/) renders its simulated camera from here.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")


@dataclasses.dataclass(frozen=True)
class World:
    name: str
    bg_hue: tuple[float, float]  # OpenCV hue range 0..180
    bg_sat: tuple[float, float]  # 0..255
    bg_val: tuple[float, float]
    obj_hue: tuple[float, float]
    obj_sat: tuple[float, float]
    obj_val: tuple[float, float]
    textures: tuple[str, ...]
    texture_contrast: tuple[float, float]
    ambient: tuple[float, float]  # multiplicative light level
    light_slope: tuple[float, float]  # strength of the directional light gradient
    tint: tuple[float, float, float]  # RGB multiplier of the light colour
    gamma: float


WORLDS: dict[str, World] = {
    # The base training world: a bright, neutral indoor studio.
    "studio": World("studio", (0, 180), (0, 60), (150, 230), (0, 180), (120, 255), (120, 255),
                    ("stripes", "checker", "gradient"), (0.05, 0.25), (0.85, 1.1), (0.0, 0.25),
                    (1.0, 1.0, 1.0), 1.0),
    # A wearer's surroundings: green-brown, blotchy textures, dim warm light from one side.
    "forest": World("forest", (25, 70), (80, 200), (40, 140), (0, 180), (60, 220), (90, 230),
                    ("blobs", "grain", "stripes"), (0.2, 0.5), (0.7, 1.0), (0.2, 0.6),
                    (1.1, 0.95, 0.75), 1.15),
    # Night city: dark saturated backgrounds, neon objects, hard light.
    "neon": World("neon", (100, 160), (150, 255), (20, 80), (140, 180), (200, 255), (200, 255),
                  ("grid", "blobs", "checker"), (0.3, 0.6), (0.7, 1.2), (0.3, 0.7),
                  (0.85, 0.9, 1.2), 0.8),
}
DEFAULT_WORLD = "studio"


def get_world(name: str) -> World:
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown world {name!r} (choose from {', '.join(WORLDS)})") from None


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.array([[[h % 180, np.clip(s, 0, 255), np.clip(v, 0, 255)]]], dtype=np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A single-channel texture in [-1, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = max(h, w)
    if kind == "stripes":
        ang = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 10) / scale * 2 * math.pi
        return np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * freq + rng.uniform(0, 6.3))
    if kind == "checker":
        cell = rng.uniform(0.08, 0.25) * scale
        return np.where(((xx // cell + yy // cell) % 2) == 0, 1.0, -1.0).astype(np.float32)
    if kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(ang) + yy * math.sin(ang)) / scale
        return (2 * (t - t.min()) / max(1e-6, float(t.max() - t.min())) - 1).astype(np.float32)
    if kind == "blobs":
        cells = int(rng.integers(3, 7))
        small = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)
    if kind == "grain":
        small = rng.uniform(-1, 1, size=(max(2, h // 4), max(2, w // 4))).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "grid":
        cell = rng.uniform(0.1, 0.3) * scale
        lines = (np.minimum(xx % cell, yy % cell) < max(1.0, cell * 0.12))
        return np.where(lines, 1.0, -0.6).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _shape_polygons(cls: int, cx: float, cy: float, r: float, ang: float) -> tuple[list[np.ndarray], bool]:
    """Polygons (float Nx2) of class ``cls``; the flag says the last polygon is a hole."""
    def ngon(n: int, rad: float, phase: float = 0.0) -> np.ndarray:
        t = ang + phase + np.arange(n) * 2 * math.pi / n
        return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)

    name = CLASS_NAMES[cls]
    if name == "circle":
        return [ngon(48, r)], False
    if name == "square":
        return [ngon(4, r * 1.15, math.pi / 4)], False
    if name == "triangle":
        return [ngon(3, r * 1.2, -math.pi / 2)], False
    if name == "star":
        outer, inner = ngon(5, r * 1.25, -math.pi / 2), ngon(5, r * 0.5, -math.pi / 2 + math.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        return [pts], False
    if name == "cross":
        a, b = r * 1.1, r * 0.38
        base = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                         [-a, b], [-a, -b], [-b, -b]])
        c, s = math.cos(ang), math.sin(ang)
        rot = base @ np.array([[c, s], [-s, c]])
        return [rot + np.array([cx, cy])], False
    if name == "ring":
        return [ngon(48, r * 1.05), ngon(48, r * 0.55)], True
    raise ValueError(cls)


def _draw_shape(canvas: np.ndarray, cls: int, cx: float, cy: float, r: float, ang: float,
                colour: np.ndarray, shade: float) -> None:
    """Draw an antialiased, slightly shaded shape onto a float32 HxWx3 canvas in place."""
    h, w = canvas.shape[:2]
    polys, has_hole = _shape_polygons(cls, cx, cy, r, ang)
    sub = 4  # fixed-point sub-pixel bits for smooth edges at small sizes
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(polys[0] * (1 << sub)).astype(np.int32)], 255, cv2.LINE_AA, shift=sub)
    if has_hole:
        cv2.fillPoly(mask, [np.round(polys[1] * (1 << sub)).astype(np.int32)], 0, cv2.LINE_AA, shift=sub)
    x0, x1 = max(0, int(cx - 1.4 * r) - 1), min(w, int(cx + 1.4 * r) + 2)
    y0, y1 = max(0, int(cy - 1.4 * r) - 1), min(h, int(cy + 1.4 * r) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    a = (mask[y0:y1, x0:x1].astype(np.float32) / 255.0)[..., None]
    # a gentle radial shade so objects are not flat (3-D-ish lighting)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.sqrt((xx - cx + 0.3 * r) ** 2 + (yy - cy + 0.3 * r) ** 2) / max(r, 1.0)
    lit = (1.0 - shade * np.clip(d, 0, 1.5) / 1.5)[..., None]
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1 - a) + (colour[None, None, :] * lit) * a


def _lighting(rng: np.random.Generator, world: World, img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)) / max(h, w)
    field = _u(rng, world.ambient) * (1.0 + _u(rng, world.light_slope) * t)
    tint = np.asarray(world.tint, np.float32) * rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    out = np.clip(img * field[..., None] * tint[None, None, :], 0, 1)
    return out ** world.gamma


def _background(rng: np.random.Generator, world: World, h: int, w: int) -> np.ndarray:
    base = _hsv_to_rgb(_u(rng, world.bg_hue), _u(rng, world.bg_sat), _u(rng, world.bg_val))
    other = _hsv_to_rgb(_u(rng, world.bg_hue), _u(rng, world.bg_sat), _u(rng, world.bg_val))
    tex = _texture(rng, world.textures[int(rng.integers(len(world.textures)))], h, w)
    contrast = _u(rng, world.texture_contrast)
    mix = (0.5 + 0.5 * tex)[..., None]
    img = base[None, None, :] * (1 - mix * contrast) + other[None, None, :] * (mix * contrast)
    return img.astype(np.float32)


def _object_colour(rng: np.random.Generator, world: World) -> np.ndarray:
    return _hsv_to_rgb(_u(rng, world.obj_hue), _u(rng, world.obj_sat), _u(rng, world.obj_val))


def scene_rng(world: World | str, seed: int, index: int) -> np.random.Generator:
    name = world if isinstance(world, str) else world.name
    wid = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return np.random.default_rng([int(seed), wid, int(index)])


def render_scene(world: World | str, seed: int, index: int, size: int | tuple[int, int] = 64,
                 num_classes: int = len(CLASS_NAMES)) -> tuple[np.ndarray, int]:
    """Render scene ``index`` of ``world``; returns (RGB uint8 HxWx3, class label)."""
    world = get_world(world) if isinstance(world, str) else world
    h, w = (size, size) if isinstance(size, int) else size
    rng = scene_rng(world, seed, index)
    label = int(rng.integers(num_classes))
    img = _background(rng, world, h, w)
    s = min(h, w)
    r_main = s * rng.uniform(0.2, 0.32)
    cx = w / 2 + rng.uniform(-0.18, 0.18) * w
    cy = h / 2 + rng.uniform(-0.18, 0.18) * h
    n_distract = int(rng.integers(0, 3))
    distractors = []
    for _ in range(n_distract):
        cls = int(rng.integers(num_classes - 1))
        cls = cls + 1 if cls >= label else cls
        distractors.append((cls, rng.uniform(0, w), rng.uniform(0, h), s * rng.uniform(0.06, 0.12),
                            rng.uniform(0, 2 * math.pi), _object_colour(rng, world), rng.uniform(0.0, 0.4),
                            bool(rng.random() < 0.4)))
    for d in distractors:  # behind the main object
        if not d[7]:
            _draw_shape(img, *d[:7])
    _draw_shape(img, label, cx, cy, r_main, rng.uniform(0, 2 * math.pi), _object_colour(rng, world),
                rng.uniform(0.0, 0.45))
    for d in distractors:  # in front: partial occlusion
        if d[7]:
            _draw_shape(img, *d[:7])
    img = _lighting(rng, world, img)
    return (img * 255.0 + 0.5).astype(np.uint8), label


def render_panorama(world: World | str, seed: int, width: int = 1536, height: int = 512,
                    objects: int = 24) -> tuple[np.ndarray, list[dict]]:
    """A wide view of a world for a simulated head-mounted camera to pan over.

    Returns (RGB uint8 HxWx3, objects), each object a dict with class, x, y, r.
    """
    world = get_world(world) if isinstance(world, str) else world
    rng = scene_rng(world, seed, 2**31 + 7)  # apart from the scene indices
    img = _background(rng, world, height, width)
    placed = []
    for i in range(objects):
        cls = int(rng.integers(len(CLASS_NAMES)))
        x = (i + rng.uniform(0.2, 0.8)) * width / objects
        y = rng.uniform(0.25, 0.75) * height
        r = rng.uniform(0.06, 0.14) * height
        _draw_shape(img, cls, x, y, r, rng.uniform(0, 2 * math.pi), _object_colour(rng, world),
                    rng.uniform(0.0, 0.45))
        placed.append({"class": cls, "name": CLASS_NAMES[cls], "x": float(x), "y": float(y), "r": float(r)})
    img = _lighting(rng, world, img)
    return (img * 255.0 + 0.5).astype(np.uint8), placed
