"""Rendered indoor rooms with exact labels: the room model's data, and a headset camera source.

numpy + OpenCV only (no torch: the headset renders its simulated camera from here).

A room is an axis-aligned box (world frame: x and z horizontal, y up, metres; the floor is y = 0,
the room spans [0, W] x [0, H] x [0, D]) with furniture made of axis-aligned boxes and slabs, and
flush *decals* on its six planes (doors, windows, ceiling lights, rugs, pictures, whiteboards,
skirting boards). A pinhole camera at head height walks through it. Every frame is ray-cast: one
ray per pixel, intersected with the room's planes and the furniture boxes, vectorised over pixels.

Labels (exact, no estimation):

* ``depth``: **z-depth** in metres (distance along the camera's optical axis, not along the ray),
  float32 HxW, always positive and finite (the camera is inside a closed room).
* ``normals``: unit surface normals in the **camera frame** (OpenCV convention: x right, y down,
  z forward), float32 HxWx3, oriented towards the camera (their dot product with the viewing ray
  is negative).
* ``surface``: int32 HxW plane id: 0 floor, 1 ceiling, 2..5 the walls x=0, x=W, z=0, z=D (decals
  keep the id of their plane), ``6 + 3 * box + axis`` for a furniture box face (axis 0/1/2 = x/y/z;
  a convex box shows at most one face per axis, so each id is one plane).
* ``keypoints``: float32 (32, 3) rows (u, v, state) in input pixels (pixel centres at integer
  coordinates), state 0 = absent, 1 = in the image but hidden by furniture, 2 = in the image and
  visible; absent rows are (0, 0, 0). Layout keypoints are labelled whether visible or not.
* ``heatmaps``: float32 (32, H/stride, W/stride), one Gaussian (peak 1, ``sigma`` output pixels) per
  present keypoint; with the paper's 320x320 input and stride 4 that is 80x80.

Keypoint channels (``KEYPOINT_NAMES``), typed relative to the view so that one channel always
means one kind of point. The four vertical corners of the room are named by their direction from
the camera, clockwise from straight ahead: FR (the first corner right of the view direction), BR,
BL, FL (the first corner left of it); the front wall runs FL-FR, the right wall FR-BR, the back
wall BR-BL, the left wall BL-FL.

* 0-3   floor corners FL, FR, BR, BL         (where two walls and the floor meet)
* 4-7   ceiling corners FL, FR, BR, BL       (where two walls and the ceiling meet)
* 8-15  floor edges front, right, back, left: the left end, then the right end, of the part of the
        edge inside the image, where that end is on the image border (an end that is a corner is
        the corner's channel)
* 16-23 ceiling edges front, right, back, left: left end, right end (as above)
* 24-31 vertical edges FL, FR, BR, BL: upper end, lower end where it is on the image border

The paper's NYUv2 setting has 48 heatmaps: RoomNet's keypoints of LSUN's 11 room types, a channel
being (room type, k-th point of that type), with 8, 6, 6, 4, 4, 6, 4, 4, 2, 2, 2 points for types
0-10. Those 48 are not 48 kinds of point: they are 11 orderings of at most 8 points of one view (the
front wall's 4 corners and 4 edge ends), re-indexed by the view's type (which a type classifier
predicts). The geometry of a box room has 32 kinds of layout point relative to the view, typed here
(8 corners + 24 border ends), enough to draw the wireframe (``LAYOUT_EDGES``) in every view, including
views with roll and yaw that match no LSUN type. The 48 would be the per-type re-indexing of these
points plus a room-type head (README, "Paper vs this implementation").

The camera: square pixels, principal point at the centre, horizontal field of view 55-75 deg
(drawn per room; 66 deg for the headset's walk), eyes 1.5-1.75 m above the floor, pitch -23 to
+8 deg, roll within 4 deg. ``walk_camera`` is a smooth walk (0.6 m/s along a closed path clear of
furniture, the head turning and nodding); training frames (``room_frame``) take poses anywhere on
that path, facing any way.

Styles (``STYLES``): ``office``, ``living``, ``bare``; ``mixed`` draws one per room. Everything is
deterministic by (style, seed, split, index). Real photo textures are optional
(``texture_dir``: a folder of images used for walls and floors).

Speed: at training sizes (64x64: 4096 pixels) a frame's cost is numpy's per-call overhead, not
arithmetic, so ``render_batch`` ray-casts several frames of one room in one pass (``room_frames``
renders each room's FRAMES_PER_ROOM frames together; frame n equals ``render`` of its camera alone),
textures are coloured through a per-material LUT (no per-room coloured atlas), and the renderer
avoids numpy's slow paths (``where`` chains, fancy indexing on a length-3 axis, float -> int64 casts,
``log2``, ``pow``). ``python -m shared.rooms [FRAMES]`` prints milliseconds per frame (JSON) for the
walk and for labelled training frames at 320x240, 160x120 and 320x320; ``hmd bench train --tasks
room`` compares generation with training (README, "Room benchmarks").
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from pathlib import Path

import cv2
import numpy as np

from shared.errors import UserError

STYLES: tuple[str, ...] = ("office", "living", "bare")
MIXED = "mixed"
SPLITS: tuple[str, ...] = ("train", "val", "test")
STRIDE = 4  # input pixels per heatmap pixel (paper: 320x320 in, 80x80 out)
SIGMA = 1.5  # Gaussian sigma of a keypoint heatmap, in output pixels
NEAR = 0.05  # metres: the camera's near plane for keypoint projection
FLOOR, CEILING, WALL_X0, WALL_X1, WALL_Z0, WALL_Z1 = range(6)
FIRST_FURNITURE = 6

CORNERS = ("FL", "FR", "BR", "BL")
WALLS = ("front", "right", "back", "left")
KEYPOINT_NAMES: tuple[str, ...] = (
    tuple(f"floor_corner_{c}" for c in CORNERS) + tuple(f"ceiling_corner_{c}" for c in CORNERS)
    + tuple(f"floor_edge_{w}_{e}" for w in WALLS for e in ("left_end", "right_end"))
    + tuple(f"ceiling_edge_{w}_{e}" for w in WALLS for e in ("left_end", "right_end"))
    + tuple(f"vertical_edge_{c}_{e}" for c in CORNERS for e in ("upper_end", "lower_end")))
NUM_KEYPOINTS = len(KEYPOINT_NAMES)  # 32
# wall k (front, right, back, left) spans corners (left corner, right corner) as seen from inside
_WALL_CORNERS = ((0, 1), (1, 2), (2, 3), (3, 0))  # indices into CORNERS
# The room's 12 edges: (name, channel of end A, channel of end B, border channels (first, second),
# how the two border ends are ordered: "u" = left/right, "v" = upper/lower).
LAYOUT_EDGES: tuple[tuple[str, int, int, tuple[int, int], str], ...] = tuple(
    [(f"floor_{w}", _WALL_CORNERS[k][0], _WALL_CORNERS[k][1], (8 + 2 * k, 9 + 2 * k), "u")
     for k, w in enumerate(WALLS)]
    + [(f"ceiling_{w}", 4 + _WALL_CORNERS[k][0], 4 + _WALL_CORNERS[k][1], (16 + 2 * k, 17 + 2 * k), "u")
       for k, w in enumerate(WALLS)]
    + [(f"vertical_{c}", 4 + k, k, (24 + 2 * k, 25 + 2 * k), "v") for k, c in enumerate(CORNERS)])


# --- materials and textures ------------------------------------------------------------------

TEX = 128  # texels per texture side
MIP_LEVELS = 5


@dataclasses.dataclass(frozen=True)
class Material:
    texture: str  # a procedural kind (``_TEXTURE_KINDS``) or "photo:N"
    colour: tuple[float, float, float]  # linear RGB multiplier of the texture
    tile_m: float = 1.0  # metres one texture tile covers
    emissive: bool = False  # a light source or a window: shown as is, not lit
    gloss: float = 0.0  # strength of a Blinn-Phong highlight


def _fft_noise(rng: np.random.Generator, beta: float, n: int = TEX) -> np.ndarray:
    """Periodic 1/f^beta noise in [-1, 1] (tiles seamlessly)."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) / f ** beta
    spec[0, 0] = 0.0
    img = np.real(np.fft.ifft2(spec))
    return (img / (np.abs(img).max() + 1e-9)).astype(np.float32)


def _procedural(kind: str, variant: int) -> np.ndarray:
    """A TEXxTEXx3 float32 texture around 1.0 (it multiplies the material colour); periodic."""
    rng = np.random.default_rng([zlib_crc(kind), variant])
    n = TEX
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n  # 0..1 over the tile
    one = np.ones((n, n), np.float32)
    if kind == "paint":
        g = 1.0 + 0.05 * _fft_noise(rng, 1.6) + 0.02 * _fft_noise(rng, 0.3)
    elif kind == "wallpaper":
        stripes = int(rng.integers(6, 14))
        g = 1.0 + 0.12 * np.sign(np.sin(2 * math.pi * stripes * xx)) + 0.03 * _fft_noise(rng, 1.0)
        if variant % 2:
            dots = (np.sin(2 * math.pi * 8 * xx) * np.sin(2 * math.pi * 8 * yy)) > 0.85
            g = g - 0.2 * dots
    elif kind == "wood_floor":
        planks = 8
        row = np.floor(yy * planks)
        tone = rng.uniform(0.8, 1.15, size=planks + 1).astype(np.float32)[row.astype(int)]
        offs = rng.uniform(0, 1, size=planks + 1).astype(np.float32)[row.astype(int)]
        grain = np.sin(2 * math.pi * (yy * planks * 6 + 0.6 * _fft_noise(rng, 1.8)))
        seam = ((yy * planks) % 1.0 < 0.05) | (((xx + offs) * 2) % 1.0 < 0.012)
        g = tone * (1.0 + 0.07 * grain) - 0.35 * seam
    elif kind == "wood":
        g = 1.0 + 0.1 * np.sin(2 * math.pi * (yy * 10 + 1.2 * _fft_noise(rng, 1.8))) + 0.04 * _fft_noise(rng, 0.8)
    elif kind == "carpet":
        g = 1.0 + 0.12 * _fft_noise(rng, 0.2) + 0.06 * _fft_noise(rng, 1.5)
    elif kind == "tiles":
        cells = 2 if variant % 2 else 4
        grout = ((xx * cells) % 1.0 < 0.03) | ((yy * cells) % 1.0 < 0.03)
        g = 1.0 + 0.04 * _fft_noise(rng, 1.2) - 0.4 * grout
    elif kind == "ceiling_tiles":
        grout = ((xx * 2) % 1.0 < 0.015) | ((yy * 2) % 1.0 < 0.015)
        g = 1.0 + 0.06 * _fft_noise(rng, 0.1) - 0.25 * grout
    elif kind == "concrete":
        g = 1.0 + 0.12 * _fft_noise(rng, 1.4) + 0.05 * _fft_noise(rng, 0.2)
    elif kind == "fabric":
        weave = np.sin(2 * math.pi * 24 * xx) * np.sin(2 * math.pi * 24 * yy)
        g = 1.0 + 0.08 * weave + 0.05 * _fft_noise(rng, 1.2)
    elif kind == "plain":
        g = 1.0 + 0.02 * _fft_noise(rng, 1.0)
    elif kind == "books":  # coloured spines on three shelves
        out = np.empty((n, n, 3), np.float32)
        for shelf in range(3):
            y0, y1 = shelf * n // 3, (shelf + 1) * n // 3
            x = 0
            while x < n:
                w = int(rng.integers(3, 9))
                top = y0 + int(rng.integers(2, (y1 - y0) // 3))
                out[y0:y1, x:x + w] = 0.25
                out[top:y1 - 2, x:x + w] = rng.uniform(0.25, 1.6, size=3)
                x += w
            out[y1 - 2:y1] = 0.5
        return out
    elif kind == "sky":  # what a window shows: sky, a tree line, ground
        out = np.empty((n, n, 3), np.float32)
        t = yy[..., None]
        sky = np.array([1.2, 1.5, 2.2], np.float32) * (1.0 - 0.4 * t) + np.array([1.8, 1.8, 1.8]) * 0.3 * t
        trees = np.array([0.35, 0.6, 0.3], np.float32) * (1.0 + 0.25 * _fft_noise(rng, 1.0))[..., None]
        line = 0.6 + 0.04 * _fft_noise(rng, 2.0)[0][None, :]
        out[:] = np.where((yy > line)[..., None], trees, sky)
        return out.astype(np.float32)
    elif kind == "screen":
        g = 0.15 + 0.03 * _fft_noise(rng, 1.5)
    elif kind == "light":
        g = 1.0 - 0.05 * _fft_noise(rng, 2.0)
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    g = np.asarray(g, np.float32) * one
    return np.repeat(g[..., None], 3, axis=2)


def zlib_crc(text: str) -> int:
    """A stable number for a name (Python's hash() changes between processes)."""
    return zlib.crc32(text.encode())


def _mip_stack(tex: np.ndarray) -> np.ndarray:
    """(MIP_LEVELS, TEX, TEX, 3) uint8: level l is the texture averaged over 2^l texels (wrapped)."""
    pad = TEX // 2
    big = np.pad(np.asarray(tex, np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    side = big.shape[0]
    levels = [tex]
    for lvl in range(1, MIP_LEVELS):
        small = cv2.resize(big, (side >> lvl, side >> lvl), interpolation=cv2.INTER_AREA)
        levels.append(cv2.resize(small, (side, side), interpolation=cv2.INTER_LINEAR)[pad:pad + TEX, pad:pad + TEX])
    return np.clip(np.stack(levels) * 100.0 + 0.5, 0, 255).astype(np.uint8)  # 1.0 -> 100


_TEXTURE_KINDS = ("paint", "wallpaper", "wood_floor", "wood", "carpet", "tiles", "ceiling_tiles", "concrete",
                  "fabric", "plain", "books", "sky", "screen", "light")
_VARIANTS = 3


_PROCEDURAL_KEYS = tuple((kind, variant) for kind in _TEXTURE_KINDS for variant in range(_VARIANTS))


@functools.lru_cache(maxsize=4)
def _texture_atlas(texture_dir: str | None) -> np.ndarray:
    """(textures, MIP_LEVELS, TEX, TEX, 4) uint8 (RGB, 0): every procedural mip stack (``_PROCEDURAL_KEYS``
    order), then the photos of ``texture_dir``. Made once per process; every room indexes into it."""
    stacks = [_mip_stack(_procedural(*key)) for key in _PROCEDURAL_KEYS]  # kept only in the atlas
    stacks += list(_photo_mips(texture_dir)) if texture_dir else []
    atlas = np.zeros((len(stacks), MIP_LEVELS, TEX, TEX, 4), np.uint8)  # RGB and a pad byte: one uint32 a texel
    atlas[..., :3] = stacks
    return atlas


def warm_texture_cache() -> int:
    """Make every procedural texture now (a process makes each once, the first time a room is made);
    returns how many there are."""
    _texture_atlas(None)
    return len(_PROCEDURAL_KEYS)


@functools.lru_cache(maxsize=8)
def _photo_mips(folder: str) -> tuple[np.ndarray, ...]:
    """Every image in ``folder`` as a seamless (mirror-tiled) texture, normalised to mean 1.0."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        s = min(img.shape[:2])
        img = cv2.resize(img[:s, :s], (TEX // 2, TEX // 2), interpolation=cv2.INTER_AREA)
        tiled = np.concatenate([img, img[:, ::-1]], axis=1)
        tiled = np.concatenate([tiled, tiled[::-1]], axis=0)  # mirrored: periodic without seams
        out.append(_mip_stack(tiled / max(float(tiled.mean()), 1e-3)))
    if not out:
        raise UserError(f"no readable images (png, jpg, bmp) in texture folder {folder}")
    return tuple(out)


# --- the room --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    material: int


@dataclasses.dataclass(frozen=True)
class Decal:
    """A flush rectangle (or ellipse) on room plane ``plane``, in that plane's (u, v) coordinates:
    floor/ceiling (x, z), walls x=const (z, y), walls z=const (x, y)."""
    plane: int
    u: tuple[float, float]
    v: tuple[float, float]
    material: int
    ellipse: bool = False
    anchored: bool = False  # its texture starts at its top-left corner (a window's view, a door)


@dataclasses.dataclass(frozen=True)
class Light:
    position: tuple[float, float, float]
    colour: tuple[float, float, float]
    power: float


@dataclasses.dataclass
class Room:
    style: str
    size: tuple[float, float, float]  # W (x), H (y), D (z)
    materials: list[Material]
    plane_material: tuple[int, ...]  # one per room plane
    boxes: list[Box]
    decals: list[Decal]
    lights: list[Light]
    ambient: float
    eye_height: float
    hfov_deg: float
    pitch0_deg: float
    walk: np.ndarray  # (K, 2) dense closed polyline of (x, z) the camera walks along
    walk_s: np.ndarray  # cumulative arc length along ``walk`` (K + 1 values, closed)
    phases: tuple[float, ...]
    floor_shadow: np.ndarray  # occlusion under furniture on a (z, x) grid of SHADOW_CELL metres
    textures: np.ndarray  # (T, MIP_LEVELS, TEX, TEX, 4) uint8 mip stacks (RGB, pad), 100 = 1.0; shared
    material_table: dict[str, np.ndarray]  # per material: tile, gain (emissive), gloss, emissive, texture, colour_lut


SHADOW_CELL = 0.05


@dataclasses.dataclass(frozen=True)
class Camera:
    position: np.ndarray  # (3,) world
    rotation: np.ndarray  # (3, 3) camera -> world; columns are the camera's x (right), y (down), z (forward)
    hfov_deg: float

    @staticmethod
    def looking(position, yaw: float, pitch: float, roll: float, hfov_deg: float) -> "Camera":
        """yaw about the vertical (0 looks along +z), pitch up positive, roll (radians)."""
        cy, sy = math.cos(yaw), math.sin(yaw)
        fwd = (sy, 0.0, cy)
        right = (-cy, 0.0, sy)  # fwd x up: the frame is right-handed
        down = (0.0, -1.0, 0.0)
        cp, sp = math.cos(pitch), math.sin(pitch)
        fwd, down = [cp * f - sp * g for f, g in zip(fwd, down)], [cp * g + sp * f for f, g in zip(fwd, down)]
        cr, sr = math.cos(roll), math.sin(roll)
        right, down = [cr * r + sr * g for r, g in zip(right, down)], [cr * g - sr * r for r, g in zip(right, down)]
        rot = np.array([right, down, fwd], np.float64).T  # columns: right, down, forward
        return Camera(np.asarray(position, np.float64), np.ascontiguousarray(rot), float(hfov_deg))

    def intrinsics(self, h: int, w: int) -> tuple[float, float, float]:
        """(f, cx, cy) in pixels: square pixels, principal point at the image centre."""
        f = (w / 2.0) / math.tan(math.radians(self.hfov_deg) / 2.0)
        return f, (w - 1) / 2.0, (h - 1) / 2.0

    def to_camera(self, points_world: np.ndarray) -> np.ndarray:
        return (np.asarray(points_world, np.float64) - self.position) @ self.rotation


def check_style(style: str) -> str:
    if style not in STYLES and style != MIXED:
        raise UserError(f"unknown room style {style!r} (choose from {', '.join(STYLES + (MIXED,))})")
    return style


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) if not isinstance(k, str) else zlib_crc(k)
                                                         for k in key]))


def _hsv(rng: np.random.Generator, h: tuple[float, float], s: tuple[float, float], v: tuple[float, float]):
    px = np.array([[[rng.uniform(*h) % 180, rng.uniform(*s), rng.uniform(*v)]]], np.uint8)
    rgb = cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0
    return tuple(float(c) ** 2.2 for c in rgb)  # to linear light


class _Builder:
    """Collects materials, boxes and decals of one room while it is laid out."""

    def __init__(self, rng: np.random.Generator, size: tuple[float, float, float], photos: int):
        self.rng, self.size, self.photos = rng, size, photos
        self.materials: list[Material] = []
        self.boxes: list[Box] = []
        self.decals: list[Decal] = []
        self.footprints: list[tuple[float, float, float, float]] = []  # x0, x1, z0, z1 (incl. keep-clear)
        self.openings: list[tuple[int, float, float]] = []  # doors and windows: wall, from, to

    def material(self, texture: str, colour, tile_m: float = 1.0, emissive: bool = False, gloss: float = 0.0,
                 photo_ok: bool = False) -> int:
        if photo_ok and self.photos and self.rng.random() < 0.7:
            texture = f"photo:{int(self.rng.integers(self.photos))}"
            colour = tuple(float(c) for c in self.rng.uniform(0.75, 1.0, size=3))
            tile_m = float(self.rng.uniform(0.8, 2.0))
        self.materials.append(Material(texture, tuple(float(c) for c in colour), tile_m, emissive, gloss))
        return len(self.materials) - 1

    def box(self, lo, hi, material: int) -> None:
        self.boxes.append(Box(tuple(map(float, lo)), tuple(map(float, hi)), material))

    def free(self, x0: float, x1: float, z0: float, z1: float, gap: float = 0.08) -> bool:
        w, _, d = self.size
        if x0 < 0 or z0 < 0 or x1 > w or z1 > d:
            return False
        return all(x1 + gap <= a0 or x0 - gap >= a1 or z1 + gap <= b0 or z0 - gap >= b1
                   for a0, a1, b0, b1 in self.footprints)

    def against_wall(self, width: float, depth: float, tries: int = 12):
        """A free footprint (x0, x1, z0, z1) of ``width`` along a random wall and ``depth`` into the
        room, and the wall's inward direction; None when no place is found."""
        w, _, d = self.size
        for _ in range(tries):
            wall = int(self.rng.integers(4))
            along = w if wall >= 2 else d
            if width > along - 0.2:
                continue
            a = float(self.rng.uniform(0.05, along - width - 0.05))
            if wall == 0:
                fp = (0.0, depth, a, a + width)
            elif wall == 1:
                fp = (w - depth, w, a, a + width)
            elif wall == 2:
                fp = (a, a + width, 0.0, depth)
            else:
                fp = (a, a + width, d - depth, d)
            if self.free(*fp):
                return fp, wall
        return None

    def clear_of_openings(self, wall: int, a0: float, a1: float) -> bool:
        """No door or window on this stretch of the wall."""
        return not any(w == wall and a0 < o1 and a1 > o0 for w, o0, o1 in self.openings)

    def claim_wall(self, width: float, depth: float):
        """``against_wall``, and the footprint is taken."""
        got = self.against_wall(width, depth)
        if got is not None:
            self.footprints.append(got[0])
        return got

    def in_room(self, width: float, depth: float, tries: int = 12):
        w, _, d = self.size
        for _ in range(tries):
            x0 = float(self.rng.uniform(0.5, max(0.6, w - width - 0.5)))
            z0 = float(self.rng.uniform(0.5, max(0.6, d - depth - 0.5)))
            fp = (x0, x0 + width, z0, z0 + depth)
            if self.free(*fp):
                return fp
        return None

    def wall_decal(self, wall: int, a0: float, a1: float, y0: float, y1: float, material: int,
                   ellipse: bool = False, anchored: bool = False) -> None:
        """A decal on wall ``wall`` (0: x=0, 1: x=W, 2: z=0, 3: z=D) from a0 to a1 along it."""
        self.decals.append(Decal(WALL_X0 + wall, (a0, a1), (y0, y1), material, ellipse, anchored))

    def wall_span_free(self, wall: int, a0: float, a1: float) -> bool:
        """No furniture footprint touches this stretch of the wall."""
        w, _, d = self.size
        for x0, x1, z0, z1 in self.footprints:
            if wall == 0 and x0 < 0.05 and z1 > a0 and z0 < a1:
                return False
            if wall == 1 and x1 > w - 0.05 and z1 > a0 and z0 < a1:
                return False
            if wall == 2 and z0 < 0.05 and x1 > a0 and x0 < a1:
                return False
            if wall == 3 and z1 > d - 0.05 and x1 > a0 and x0 < a1:
                return False
        return True


def _wall_length(size, wall: int) -> float:
    return size[2] if wall < 2 else size[0]


def _keep_clear(b: _Builder, wall: int, a0: float, a1: float, reach: float) -> None:
    """Reserve floor in front of a door so no furniture blocks it."""
    w, _, d = b.size
    fp = {0: (0.0, reach, a0, a1), 1: (w - reach, w, a0, a1), 2: (a0, a1, 0.0, reach),
          3: (a0, a1, d - reach, d)}[wall]
    b.footprints.append(fp)


def _openings(b: _Builder, style: str) -> None:
    rng = b.rng
    _, h, _ = b.size
    trim = b.material("plain", (0.8, 0.8, 0.78) if rng.random() < 0.7 else (0.25, 0.18, 0.12))
    # a door
    door_wall = int(rng.integers(4))
    length = _wall_length(b.size, door_wall)
    dw = float(rng.uniform(0.8, 0.95))
    a0 = float(rng.uniform(0.2, length - dw - 0.2))
    dh = float(min(rng.uniform(2.0, 2.15), h - 0.2))
    door = b.material("wood" if rng.random() < 0.6 else "plain",
                      _hsv(rng, (5, 25), (40, 140), (90, 200)) if rng.random() < 0.6 else (0.7, 0.7, 0.68))
    b.wall_decal(door_wall, a0 - 0.06, a0 + dw + 0.06, 0.0, dh + 0.06, trim)
    b.wall_decal(door_wall, a0, a0 + dw, 0.0, dh, door, anchored=True)
    _keep_clear(b, door_wall, a0 - 0.1, a0 + dw + 0.1, 0.9)
    b.openings.append((door_wall, a0 - 0.1, a0 + dw + 0.1))
    # windows (not in bare rooms always; never on the door's wall stretch)
    n_win = int(rng.integers(0, 3)) if style == "bare" else int(rng.integers(1, 3))
    windows = []
    for _ in range(n_win):
        wall = int(rng.integers(4))
        length = _wall_length(b.size, wall)
        ww = float(rng.uniform(0.8, min(2.2, length - 0.6)))
        a = float(rng.uniform(0.3, length - ww - 0.3))
        if not b.clear_of_openings(wall, a - 0.2, a + ww + 0.2):
            continue
        sill = float(rng.uniform(0.75, 1.0))
        top = float(min(sill + rng.uniform(1.0, 1.5), h - 0.25))
        b.wall_decal(wall, a - 0.07, a + ww + 0.07, sill - 0.07, top + 0.07, trim)
        # the view out: sky over a tree line at about three quarters of the window's height
        sky = b.material("sky", (1.0, 1.0, 1.0), tile_m=(top - sill) / 0.8, emissive=True)
        b.wall_decal(wall, a, a + ww, sill, top, sky, anchored=True)
        mid = b.material("plain", (0.85, 0.85, 0.85))
        b.wall_decal(wall, a + ww / 2 - 0.03, a + ww / 2 + 0.03, sill, top, mid)  # the window's mullion
        windows.append((wall, a, a + ww, sill, top))
        b.openings.append((wall, a - 0.1, a + ww + 0.1))
    return windows


def _skirting(b: _Builder) -> None:
    mat = b.material("plain", (0.85, 0.85, 0.82) if b.rng.random() < 0.7 else (0.3, 0.22, 0.15))
    for wall in range(4):
        b.decals.insert(0, Decal(WALL_X0 + wall, (-1.0, 1e3), (0.0, 0.08), mat))  # under doors/windows


def _table(b: _Builder, fp, top_y: float, top_mat: int, leg_mat: int, thick: float = 0.03, leg: float = 0.05,
           panels: bool = False) -> None:
    x0, x1, z0, z1 = fp
    b.box((x0, top_y - thick, z0), (x1, top_y, z1), top_mat)
    if panels:  # desk: two side panels
        b.box((x0 + 0.02, 0.0, z0 + 0.03), (x0 + 0.045, top_y - thick, z1 - 0.03), leg_mat)
        b.box((x1 - 0.045, 0.0, z0 + 0.03), (x1 - 0.02, top_y - thick, z1 - 0.03), leg_mat)
        return
    for lx, lz in ((x0 + 0.04, z0 + 0.04), (x1 - 0.04 - leg, z0 + 0.04), (x0 + 0.04, z1 - 0.04 - leg),
                   (x1 - 0.04 - leg, z1 - 0.04 - leg)):
        b.box((lx, 0.0, lz), (lx + leg, top_y - thick, lz + leg), leg_mat)


def _oriented(fp, wall: int):
    """(x0, x1, z0, z1) and a function splitting it along the wall's inward axis: returns the
    back part (against the wall) of thickness t as another footprint."""
    x0, x1, z0, z1 = fp

    def back(t: float):
        return {0: (x0, x0 + t, z0, z1), 1: (x1 - t, x1, z0, z1), 2: (x0, x1, z0, z0 + t),
                3: (x0, x1, z1 - t, z1)}[wall]

    return back


def _box_fp(b: _Builder, fp, y0: float, y1: float, mat: int) -> None:
    b.box((fp[0], y0, fp[2]), (fp[1], y1, fp[3]), mat)


def _ends(fp, wall: int, t: float):
    """The two end pieces, ``t`` thick, of a footprint standing against ``wall``."""
    x0, x1, z0, z1 = fp
    if wall >= 2:  # the wall runs along x
        return (x0, x0 + t, z0, z1), (x1 - t, x1, z0, z1)
    return (x0, x1, z0, z0 + t), (x0, x1, z1 - t, z1)


def _bookshelf(b: _Builder, wood: int, books: int, width: float, height: float) -> None:
    got = b.claim_wall(width, 0.32)
    if got is None:
        return
    fp, wall = got
    _box_fp(b, _oriented(fp, wall)(0.02), 0.0, height, books)  # the back shows the books
    for side in _ends(fp, wall, 0.025):
        _box_fp(b, side, 0.0, height, wood)
    for k in range(5):
        y = 0.05 + k * (height - 0.08) / 4
        _box_fp(b, fp, y, y + 0.025, wood)


def _sofa(b: _Builder, fabric: int, width: float) -> None:
    got = b.claim_wall(width, 0.9)
    if got is None:
        return
    fp, wall = got
    _box_fp(b, fp, 0.1, 0.45, fabric)
    _box_fp(b, _oriented(fp, wall)(0.22), 0.45, 0.85, fabric)
    for arm in _ends(fp, wall, 0.18):
        _box_fp(b, arm, 0.45, 0.62, fabric)
    x0, x1, z0, z1 = fp
    legs = b.material("plain", (0.05, 0.05, 0.05))
    _box_fp(b, (x0 + 0.05, x1 - 0.05, z0 + 0.05, z1 - 0.05), 0.0, 0.1, legs)


def _furnish(b: _Builder, style: str, windows) -> None:
    rng = b.rng
    w, h, d = b.size
    if style == "office":
        wood = b.material("wood", _hsv(rng, (10, 25), (30, 120), (120, 220)), tile_m=1.5)
        metal = b.material("plain", _hsv(rng, (0, 180), (0, 30), (60, 200)))
        for _ in range(int(rng.integers(2, 5))):
            got = b.claim_wall(float(rng.uniform(1.2, 1.7)), float(rng.uniform(0.65, 0.8)))
            if got is None:
                continue
            fp, wall = got
            _table(b, fp, 0.74, wood, metal, panels=True)
            # a monitor on the desk
            back = _oriented(fp, wall)(0.2)
            cx, cz = (back[0] + back[1]) / 2, (back[2] + back[3]) / 2
            hw = 0.28
            mon = (cx - hw, cx + hw, cz - 0.02, cz + 0.02) if wall >= 2 else (cx - 0.02, cx + 0.02, cz - hw, cz + hw)
            _box_fp(b, mon, 0.9, 1.22, b.material("screen", (1.0, 1.0, 1.0), gloss=0.6))
            _box_fp(b, (cx - 0.03, cx + 0.03, cz - 0.03, cz + 0.03), 0.74, 0.9, metal)
        for _ in range(int(rng.integers(1, 4))):
            got = b.claim_wall(0.45, 0.6)
            if got is not None:
                _box_fp(b, got[0], 0.0, float(rng.uniform(0.7, 1.35)), metal)
        for _ in range(int(rng.integers(1, 4))):  # chairs
            fp = b.in_room(0.5, 0.5)
            if fp is None:
                continue
            b.footprints.append(fp)
            chair = b.material("fabric", _hsv(rng, (0, 180), (40, 200), (30, 140)), tile_m=0.3)
            _box_fp(b, fp, 0.42, 0.5, chair)
            side = int(rng.integers(4))
            back = _oriented(fp, side)(0.06)
            _box_fp(b, back, 0.5, 0.95, chair)
            _box_fp(b, (fp[0] + 0.22, fp[1] - 0.22, fp[2] + 0.22, fp[3] - 0.22), 0.05, 0.42, metal)
        if rng.random() < 0.7:  # whiteboard
            wall = int(rng.integers(4))
            length = _wall_length(b.size, wall)
            a = float(rng.uniform(0.3, max(0.35, length - 2.0)))
            if b.wall_span_free(wall, a, a + 1.5) and b.clear_of_openings(wall, a, a + 1.5):
                b.wall_decal(wall, a, a + 1.5, 1.0, 2.0, b.material("plain", (0.9, 0.9, 0.92), gloss=0.5))
    elif style == "living":
        wood = b.material("wood", _hsv(rng, (8, 22), (60, 170), (60, 190)), tile_m=1.2)
        fabric = b.material("fabric", _hsv(rng, (0, 180), (30, 170), (50, 190)), tile_m=0.4)
        _sofa(b, fabric, float(rng.uniform(1.6, 2.3)))
        if rng.random() < 0.8:
            _bookshelf(b, wood, b.material("books", (1.0, 1.0, 1.0), tile_m=float(rng.uniform(0.7, 1.1))),
                       float(rng.uniform(0.8, 1.6)), float(rng.uniform(1.6, 2.1)))
        got = b.claim_wall(float(rng.uniform(1.2, 1.8)), 0.45)  # tv unit + tv
        if got is not None:
            fp, wall = got
            _box_fp(b, fp, 0.0, 0.5, wood)
            back = _oriented(fp, wall)(0.06)
            x0, x1, z0, z1 = back
            inset = 0.15
            tv = (x0 + inset, x1 - inset, z0, z1) if wall >= 2 else (x0, x1, z0 + inset, z1 - inset)
            _box_fp(b, tv, 0.55, 1.2, b.material("screen", (1.0, 1.0, 1.0), gloss=0.7))
        fp = b.in_room(float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.5, 0.7)))
        if fp is not None:
            b.footprints.append(fp)
            _table(b, fp, 0.42, wood, wood, thick=0.04)
            pad = 0.5
            rug = b.material("carpet", _hsv(rng, (0, 180), (40, 200), (60, 200)), tile_m=0.6)
            b.decals.append(Decal(FLOOR, (fp[0] - pad, fp[1] + pad), (fp[2] - pad, fp[3] + pad), rug,
                                  ellipse=bool(rng.random() < 0.3)))
        for _ in range(int(rng.integers(0, 3))):  # an armchair
            fp = b.in_room(0.8, 0.8)
            if fp is None:
                continue
            b.footprints.append(fp)
            _box_fp(b, fp, 0.1, 0.45, fabric)
            _box_fp(b, _oriented(fp, int(rng.integers(4)))(0.2), 0.45, 0.85, fabric)
        for _ in range(int(rng.integers(1, 4))):  # pictures
            wall = int(rng.integers(4))
            length = _wall_length(b.size, wall)
            pw, ph = float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.3, 0.7))
            a = float(rng.uniform(0.2, length - pw - 0.2))
            y = float(rng.uniform(1.3, 1.7))
            if not b.clear_of_openings(wall, a, a + pw):
                continue
            frame = b.material("plain", (0.1, 0.08, 0.06))
            art = b.material(str(rng.choice(["wallpaper", "concrete", "fabric", "carpet", "sky"])),
                             _hsv(rng, (0, 180), (60, 255), (80, 230)), tile_m=float(rng.uniform(0.3, 1.0)))
            b.wall_decal(wall, a - 0.03, a + pw + 0.03, y - 0.03, y + ph + 0.03, frame)
            b.wall_decal(wall, a, a + pw, y, y + ph, art, anchored=True)
    else:  # bare: a few boxes, maybe a radiator under a window
        card = b.material("plain", _hsv(rng, (10, 20), (80, 140), (120, 190)))
        for _ in range(int(rng.integers(0, 4))):
            s = float(rng.uniform(0.3, 0.7))
            got = b.claim_wall(s, s * float(rng.uniform(0.7, 1.2)))
            if got is not None:
                _box_fp(b, got[0], 0.0, s * float(rng.uniform(0.6, 1.3)), card)
        for win in windows[:1]:
            wall, a0, a1, sill, _ = win
            fp = {0: (0.0, 0.1, a0, a1), 1: (w - 0.1, w, a0, a1), 2: (a0, a1, 0.0, 0.1), 3: (a0, a1, d - 0.1, d)}[wall]
            if b.free(*fp, gap=0.0):
                b.footprints.append(fp)
                _box_fp(b, fp, 0.15, min(0.7, sill - 0.05), b.material("plain", (0.8, 0.8, 0.8)))


_STYLE_PARAMS = {
    # room size ranges (W, H, D), light colour, ambient
    "office": dict(w=(3.5, 7.0), h=(2.6, 3.1), d=(3.5, 8.0), light=(0.95, 1.0, 1.08), ambient=(0.2, 0.35)),
    "living": dict(w=(3.0, 6.0), h=(2.4, 2.9), d=(3.2, 6.5), light=(1.1, 0.97, 0.8), ambient=(0.12, 0.28)),
    "bare": dict(w=(2.6, 5.0), h=(2.4, 3.0), d=(2.8, 5.5), light=(1.0, 1.0, 1.0), ambient=(0.2, 0.4)),
}


def make_room(style: str, seed: int, index: int = 0, split: str = "train", texture_dir: str | None = None,
              hfov_deg: float | None = None) -> Room:
    """Room ``index`` of ``style`` (``mixed``: one style drawn per room), deterministic."""
    check_style(style)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    rng = _rng("room", style, seed, split, index)
    if style == MIXED:
        style = STYLES[int(rng.integers(len(STYLES)))]
    p = _STYLE_PARAMS[style]
    size = (float(rng.uniform(*p["w"])), float(rng.uniform(*p["h"])), float(rng.uniform(*p["d"])))
    photos = _photo_mips(str(texture_dir)) if texture_dir else ()
    b = _Builder(rng, size, len(photos))
    if style == "office":
        walls = b.material("paint", _hsv(rng, (0, 180), (0, 40), (170, 240)), tile_m=2.0, photo_ok=True)
        floor = b.material("carpet" if rng.random() < 0.6 else "tiles", _hsv(rng, (90, 130), (10, 80), (60, 150)),
                           tile_m=1.2, photo_ok=True)
        ceiling = b.material("ceiling_tiles", (0.85, 0.85, 0.85), tile_m=1.2)
    elif style == "living":
        walls = b.material("wallpaper" if rng.random() < 0.5 else "paint", _hsv(rng, (0, 180), (10, 90), (150, 240)),
                           tile_m=float(rng.uniform(0.8, 1.5)), photo_ok=True)
        floor = b.material("wood_floor", _hsv(rng, (8, 22), (70, 170), (70, 200)), tile_m=float(rng.uniform(1.4, 2.0)),
                           gloss=0.25, photo_ok=True)
        ceiling = b.material("paint", (0.88, 0.88, 0.86), tile_m=2.0)
    else:
        walls = b.material("paint" if rng.random() < 0.6 else "concrete", _hsv(rng, (0, 180), (0, 30), (140, 230)),
                           tile_m=2.0, photo_ok=True)
        floor = b.material("concrete" if rng.random() < 0.5 else "tiles", _hsv(rng, (0, 180), (0, 40), (90, 180)),
                           tile_m=1.6, photo_ok=True)
        ceiling = b.material("paint", (0.85, 0.85, 0.85), tile_m=2.0)
    w, h, d = size
    b.footprints.append((w / 2 - 0.6, w / 2 + 0.6, d / 2 - 0.6, d / 2 + 0.6))  # keep the middle free to walk
    windows = _openings(b, style)
    if style != "bare" or rng.random() < 0.5:
        _skirting(b)
    _furnish(b, style, windows)
    # ceiling lights: flush panels (office) or round fittings, and a point light under each
    lights = []
    lc = tuple(float(c) * float(rng.uniform(0.95, 1.05)) for c in p["light"])
    nx, nz = min(2, max(1, round(w / 2.5))), min(2, max(1, round(d / 2.5)))
    lamp = b.material("light", (3.0, 3.0, 3.0), emissive=True)
    for i in range(nx):
        for j in range(nz):
            lx, lz = (i + 0.5) * w / nx, (j + 0.5) * d / nz
            if style == "office":
                b.decals.append(Decal(CEILING, (lx - 0.3, lx + 0.3), (lz - 0.6, lz + 0.6), lamp))
            else:
                b.decals.append(Decal(CEILING, (lx - 0.15, lx + 0.15), (lz - 0.15, lz + 0.15), lamp, ellipse=True))
            lights.append(Light((lx, h - 0.3, lz), lc, float(rng.uniform(1.2, 2.2))))
    for wall, a0, a1, sill, top in windows:  # daylight from each window, a little inside the room
        a, y = (a0 + a1) / 2, (sill + top) / 2
        pos = {0: (0.4, y, a), 1: (w - 0.4, y, a), 2: (a, y, 0.4), 3: (a, y, d - 0.4)}[wall]
        lights.append(Light(pos, (0.9, 0.95, 1.1), float(rng.uniform(0.5, 1.5)) * (a1 - a0)))
    # textures: each material names one mip stack of the process's texture atlas
    tex_index = []
    for m in b.materials:
        key = m.texture if m.texture.startswith("photo:") else (m.texture, int(rng.integers(_VARIANTS)))
        tex_index.append(len(_PROCEDURAL_KEYS) + int(key[6:]) if isinstance(key, str) else _PROCEDURAL_KEYS.index(key))
    shadow = _floor_shadow(size, b.boxes)
    walk, walk_s = _walk_path(rng, size, _solid_footprints(b))
    return Room(style=style, size=size, materials=b.materials, plane_material=(floor, ceiling) + (walls,) * 4,
                boxes=b.boxes, decals=b.decals, lights=lights, ambient=float(rng.uniform(*p["ambient"])),
                eye_height=float(rng.uniform(1.5, 1.75)),
                hfov_deg=float(hfov_deg if hfov_deg is not None else rng.uniform(55.0, 75.0)),
                pitch0_deg=float(rng.uniform(-15.0, 0.0)), walk=walk, walk_s=walk_s,
                phases=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, size=6)), floor_shadow=shadow,
                textures=_texture_atlas(str(texture_dir) if texture_dir else None),
                material_table=_material_table(b.materials, tex_index))


def _colour_lut(materials: list[Material]) -> np.ndarray:
    """(materials * 3 * 256,) float32: entry (k * 3 + c) * 256 + v is texel value v of channel c times
    material k's colour, saturated and rounded to uint8 as cv2.multiply does, then / 100 (1.0). The
    renderer colours texels through it instead of keeping a coloured copy of every texture per room."""
    colour = np.array([m.colour for m in materials], np.float64).reshape(-1, 3)
    colour = colour / np.maximum(colour.max(axis=1), 1.0)[:, None]  # gains above 1: see "gain"
    # in float64, rounded half to even and saturated: what cv2.multiply(uint8, scalar) gives, bit for bit
    out = np.clip(np.rint(np.arange(256.0)[None, None, :] * colour[:, :, None]), 0, 255).astype(np.uint8)
    return out.reshape(-1).astype(np.float32) * np.float32(1 / 100.0)


def _material_table(materials: list[Material], tex_index: list[int]) -> dict[str, np.ndarray]:
    return {"tile": np.array([m.tile_m for m in materials], np.float32),
            "gain": np.array([max(max(m.colour), 1.0) for m in materials], np.float32),
            "gloss": np.array([m.gloss for m in materials], np.float32),
            "emissive": np.array([m.emissive for m in materials], bool),
            "texture": np.array(tex_index, np.int32),
            "colour_lut": _colour_lut(materials)}


def _solid_footprints(b: _Builder) -> list[tuple[float, float, float, float]]:
    """Footprints of the boxes actually standing in the room (not the keep-clear reservations)."""
    return [(bx.lo[0], bx.hi[0], bx.lo[2], bx.hi[2]) for bx in b.boxes]


def _floor_shadow(size, boxes: list[Box]) -> np.ndarray:
    """Soft contact shadows: how much of the sky above each floor cell furniture covers (0..1)."""
    w, _, d = size
    gx, gz = int(math.ceil(w / SHADOW_CELL)) + 1, int(math.ceil(d / SHADOW_CELL)) + 1
    occ = np.zeros((gz, gx), np.float32)
    for bx in boxes:
        x0, x1 = int(bx.lo[0] / SHADOW_CELL), int(math.ceil(bx.hi[0] / SHADOW_CELL))
        z0, z1 = int(bx.lo[2] / SHADOW_CELL), int(math.ceil(bx.hi[2] / SHADOW_CELL))
        strength = 0.8 if bx.lo[1] < 0.2 else 0.45  # low pieces shade more than table tops
        occ[z0:z1, x0:x1] = np.maximum(occ[z0:z1, x0:x1], strength)
    return cv2.GaussianBlur(occ, (0, 0), 0.12 / SHADOW_CELL)


# --- the walk --------------------------------------------------------------------------------

WALK_SPEED = 0.6  # metres per second


def _free_grid(size, footprints, margin: float = 0.45, cell: float = 0.1):
    """Cells (z, x) of a ``cell`` grid at least ``margin`` from the walls and from every footprint.
    Footprints are rectangles, so a cell is blocked when its column and its row both fall in one."""
    w, _, d = size
    xs = np.arange(cell / 2, w, cell)
    zs = np.arange(cell / 2, d, cell)
    free = ((zs > margin) & (zs < d - margin))[:, None] & ((xs > margin) & (xs < w - margin))[None, :]
    if footprints:
        fp = np.array(footprints, np.float64)  # (F, 4): x0, x1, z0, z1
        in_x = (xs > fp[:, 0:1] - margin) & (xs < fp[:, 1:2] + margin)  # (F, columns)
        in_z = (zs > fp[:, 2:3] - margin) & (zs < fp[:, 3:4] + margin)  # (F, rows)
        free &= (in_z.T.astype(np.float32) @ in_x.astype(np.float32)) == 0  # no footprint holds both
    return free, xs, zs


def _catmull_rom_closed(points: np.ndarray, per_segment: int = 40) -> np.ndarray:
    """A closed Catmull-Rom spline through ``points``: ``per_segment`` samples from each point to the next."""
    neighbours, t, t2, t3 = _spline_tables(len(points), per_segment)
    p0, p1, p2, p3 = points[neighbours]  # each (n, 1, dims): the points before, at, after and after next
    out = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)
    return out.reshape(-1, points.shape[1])


@functools.lru_cache(maxsize=16)
def _spline_tables(n: int, per_segment: int):
    neighbours = ((np.arange(n) + np.array([-1, 0, 1, 2])[:, None]) % n)[:, :, None]  # (4, n, 1)
    t = np.linspace(0, 1, per_segment, endpoint=False)[None, :, None]
    return neighbours, t, t ** 2, t ** 3


def _walk_path(rng: np.random.Generator, size, footprints) -> tuple[np.ndarray, np.ndarray]:
    """A smooth closed path over free floor (away from walls and furniture)."""
    w, _, d = size
    free, xs, zs = _free_grid(size, footprints)
    cells = np.argwhere(free)

    def ok(path: np.ndarray) -> bool:
        ix = np.minimum(np.maximum(((path[:, 0] - xs[0]) / 0.1).round().astype(np.intp), 0), len(xs) - 1)
        iz = np.minimum(np.maximum(((path[:, 1] - zs[0]) / 0.1).round().astype(np.intp), 0), len(zs) - 1)
        return bool(free.reshape(-1)[iz * len(xs) + ix].all())

    path = None
    if len(cells):
        for attempt in range(40):
            k = int(rng.integers(3, 6)) if attempt < 30 else 3
            pick = cells[rng.integers(len(cells), size=k)]
            pts = np.empty((k, 2))
            pts[:, 0], pts[:, 1] = xs[pick[:, 1]], zs[pick[:, 0]]
            # order around the centroid (the mean, as ndarray.mean computes it) so the loop does not cross itself
            c = np.add.reduce(pts, axis=0) / k
            pts = pts[np.argsort(np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0]))]
            cand = _catmull_rom_closed(pts)
            if ok(cand):
                path = cand
                break
    if path is None:  # a small circle around the freest spot (the middle is kept clear)
        centre = np.array([w / 2, d / 2])
        ang = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        path = centre + 0.3 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    seg = np.linalg.norm(np.diff(np.concatenate([path, path[:1]]), axis=0), axis=1)
    return path.astype(np.float64), np.concatenate([[0.0], np.cumsum(seg)])


def walk_camera(room: Room, t: float) -> Camera:
    """Where the wearer is and looks at time ``t`` seconds: walking the room's loop at
    WALK_SPEED, turning the head slowly round and looking about, a nod, a small roll, a step bob."""
    total = float(room.walk_s[-1])
    n = len(room.walk)

    def at(s: float) -> np.ndarray:
        s = s % total
        i = int(np.searchsorted(room.walk_s, s, side="right") - 1)
        i = min(max(i, 0), n - 1)
        a, b = room.walk[i], room.walk[(i + 1) % n]
        seg = room.walk_s[i + 1] - room.walk_s[i]
        f = (s - room.walk_s[i]) / seg if seg > 0 else 0.0
        return a + f * (b - a)

    xz = at(WALK_SPEED * t)
    ph = room.phases
    # the head turns on its own: a slow full turn every 40 s plus looking around (at most ~55 deg/s)
    yaw = ph[0] + 2 * math.pi * t / 40.0 + math.radians(35.0) * math.sin(2 * math.pi * t / 9.0 + ph[0]) \
        + math.radians(12.0) * math.sin(2 * math.pi * t / 3.7 + ph[1])
    pitch = math.radians(room.pitch0_deg + 7.0 * math.sin(2 * math.pi * t / 6.3 + ph[2]))
    roll = math.radians(3.0 * math.sin(2 * math.pi * t / 5.1 + ph[3]) + 1.0 * math.sin(2 * math.pi * t / 1.7 + ph[4]))
    y = room.eye_height + 0.02 * math.sin(2 * math.pi * t * 1.8 + ph[5])
    return Camera.looking((xz[0], y, xz[1]), yaw, pitch, roll, room.hfov_deg)


# --- rendering -------------------------------------------------------------------------------

@dataclasses.dataclass
class RoomFrame:
    rgb: np.ndarray  # HxWx3 uint8
    depth: np.ndarray  # HxW float32, z-depth in metres
    normals: np.ndarray  # HxWx3 float32, camera frame (x right, y down, z forward), unit
    surface: np.ndarray  # HxW int32 plane ids (module docstring)
    keypoints: np.ndarray  # (32, 3) float32 u, v, state
    heatmaps: np.ndarray  # (32, H/stride, W/stride) float32
    corners_camera: np.ndarray  # (8, 3) float64: floor FL FR BR BL, ceiling FL FR BR BL, camera frame
    intrinsics: tuple[float, float, float]  # f, cx, cy (pixels)


@functools.lru_cache(maxsize=16)
def _pixel_rays(h: int, w: int, hfov_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame rays (x, y) as two HxW float32 arrays, z = 1: a hit's ray parameter is its z-depth."""
    f = (w / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    return (u - np.float32((w - 1) / 2.0)) / np.float32(f), (v - np.float32((h - 1) / 2.0)) / np.float32(f)


@functools.lru_cache(maxsize=16)
def _vignette(h: int, w: int) -> np.ndarray:
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((u - (w - 1) / 2) ** 2 + (v - (h - 1) / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    return (1.0 - 0.35 * r2).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _noise_field(h: int, w: int) -> np.ndarray:
    field = np.random.default_rng(12345).standard_normal((2 * h, 2 * w, 3), np.float32) * np.float32(0.004)
    return np.ascontiguousarray(field.transpose(2, 0, 1))  # channels first, as the renderer adds it


_GAMMA_LUT = np.clip((np.linspace(0, 1, 4096) ** (1 / 2.2)) * 255 + 0.5, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _RoomTables:
    """What every frame of one room needs, made once per room (``_room_tables``)."""
    size: np.ndarray  # (3, 1, 1, 1) float32 W, H, D
    surface_material: np.ndarray  # (6 + 3 * boxes,) int32: material per surface id
    box_lo: np.ndarray  # (boxes, 3, 1, 1, 1) float32
    box_hi: np.ndarray  # (boxes, 3, 1, 1, 1) float32
    box_corners: np.ndarray  # (boxes, 8, 3) float64 world
    decals: tuple[tuple[int, tuple[Decal, ...]], ...]  # (plane, its decals in drawing order)
    lights: tuple[tuple[np.ndarray, tuple[float, float, float], np.float32], ...]  # position (3,) f32, colour, power


def _room_tables(room: Room) -> _RoomTables:
    tables = getattr(room, "_tables", None)
    if tables is None:
        boxes = room.boxes
        lo = np.array([bx.lo for bx in boxes], np.float32).reshape(-1, 3, 1, 1, 1)
        hi = np.array([bx.hi for bx in boxes], np.float32).reshape(-1, 3, 1, 1, 1)
        corners = np.array([[[x, y, z] for x in (bx.lo[0], bx.hi[0]) for y in (bx.lo[1], bx.hi[1])
                             for z in (bx.lo[2], bx.hi[2])] for bx in boxes], np.float64).reshape(-1, 8, 3)
        box_mat = np.repeat(np.array([bx.material for bx in boxes], np.int32), 3)
        planes: dict[int, list[Decal]] = {}
        for dc in room.decals:  # drawing order kept within a plane (a plane's decals cover only it)
            planes.setdefault(dc.plane, []).append(dc)
        tables = _RoomTables(
            size=np.array(room.size, np.float32).reshape(3, 1, 1, 1),
            surface_material=np.concatenate([np.array(room.plane_material, np.int32), box_mat]),
            box_lo=lo, box_hi=hi, box_corners=corners,
            decals=tuple((plane, tuple(ds)) for plane, ds in planes.items()),
            lights=tuple((np.asarray(lt.position, np.float32), lt.colour, np.float32(lt.power)) for lt in room.lights))
        room._tables = tables  # a Room is not changed after make_room
    return tables


def _box_windows(tables: _RoomTables, cams: list[Camera], h: int, w: int, f: float, cx: float, cy: float):
    """For each box some camera can see: (box, n0, n1, r0, r1, c0, c1, every frame in n0..n1 sees it), the
    frames n0:n1 and the union of the pixel rectangles it can cover in them. A box partly behind the
    near plane may cover the whole frame."""
    rot = np.stack([c.rotation for c in cams])  # (N, 3, 3)
    pos = np.stack([c.position for c in cams])[:, None, :]  # (N, 1, 3)
    boxes = len(tables.box_corners)
    pc = ((tables.box_corners.reshape(1, -1, 3) - pos) @ rot).reshape(len(cams), boxes, 8, 3)  # camera frame
    z = pc[..., 2]
    behind = z <= NEAR
    z = np.maximum(z, NEAR)  # a corner behind the near plane makes its box's window the whole frame
    u = f * pc[..., 0] / z + cx
    v = f * pc[..., 1] / z + cy
    partial = behind.any(-1)
    c0 = np.where(partial, 0, np.maximum(0, np.floor(u.min(-1)) - 1)).astype(np.int64)
    c1 = np.where(partial, w, np.minimum(w, np.ceil(u.max(-1)) + 2)).astype(np.int64)
    r0 = np.where(partial, 0, np.maximum(0, np.floor(v.min(-1)) - 1)).astype(np.int64)
    r1 = np.where(partial, h, np.minimum(h, np.ceil(v.max(-1)) + 2)).astype(np.int64)
    visible = ~behind.all(-1) & (c0 < c1) & (r0 < r1)  # (N, B)
    n = len(cams)
    n0 = np.argmax(visible, axis=0)
    n1 = n - np.argmax(visible[::-1], axis=0)
    big = max(h, w) + 1
    windows = (np.where(visible, r0, big).min(0), np.where(visible, r1, -1).max(0),
               np.where(visible, c0, big).min(0), np.where(visible, c1, -1).max(0))
    every = visible.sum(axis=0) == n1 - n0
    seen = np.flatnonzero(visible.any(axis=0))
    return list(zip(seen.tolist(), *(a[seen].tolist() for a in (n0, n1) + windows + (every,)))), visible


def render(room: Room, cam: Camera, size: tuple[int, int], noise_seed: int | None = 0,
           stride: int = STRIDE, sigma: float = SIGMA) -> RoomFrame:
    """Ray-cast one frame of ``room`` seen by ``cam`` at ``size`` (h, w), with all labels."""
    return render_batch(room, [cam], size, [noise_seed], stride, sigma)[0]


def render_batch(room: Room, cams: list[Camera], size: tuple[int, int], noise_seeds=None,
                 stride: int = STRIDE, sigma: float = SIGMA) -> list[RoomFrame]:
    """Ray-cast frames of one ``room``, one per camera (all of one field of view), together: each
    numpy step runs once over every frame's pixels, which at small sizes (64x64: 4096 pixels) is what
    a frame costs. Frame n is exactly ``render(room, cams[n], size, noise_seeds[n])``: every step is
    per pixel, and the per-frame ones (furniture windows, exposure, noise, keypoints) are per frame.

    Arrays are (3, N, h, w) for vectors (x, y, z first: numpy combines three arrays ~10x faster than
    it reduces over a length-3 last axis) and (N, h, w) for scalars.
    """
    h, w = size
    n = len(cams)
    noise_seeds = [0] * n if noise_seeds is None else list(noise_seeds)
    if n == 0 or len(noise_seeds) != n:
        raise ValueError(f"render_batch: {n} cameras, {len(noise_seeds)} noise seeds")
    hfov = cams[0].hfov_deg
    if any(c.hfov_deg != hfov for c in cams):
        raise ValueError("render_batch: every camera must have the same field of view")
    tables = _room_tables(room)
    f, cx, cy = cams[0].intrinsics(h, w)
    rx, ry = _pixel_rays(h, w, hfov)
    rot = np.stack([c.rotation for c in cams]).astype(np.float32)  # (N, 3, 3)
    p = np.stack([c.position for c in cams]).astype(np.float32).T.reshape(3, n, 1, 1)
    # world directions (z-depth parameterised: the camera-frame ray has z = 1)
    rc = rot[:, :, :, None, None]  # (N, 3, 3, 1, 1)
    d = np.stack([rc[:, i, 0] * rx + rc[:, i, 1] * ry + rc[:, i, 2] for i in range(3)])  # (3, N, h, w)
    # a component within 1e-9 of zero (a ray parallel to a plane: exactly 0 on the middle row or column of
    # an odd-sized view looking along an axis) gets +-1e-9 with the sign the plane choice below assumes
    # (d > 0: the far plane, else the near one), so the parallel plane's t is huge and positive, never
    # huge and negative
    positive = d > 0
    inv = np.float32(1.0) / np.copysign(np.maximum(np.abs(d), np.float32(1e-9)), positive - np.float32(0.5))
    # the room's planes: along each axis the ray leaves through the plane it moves towards
    ta = (positive * tables.size - p) * inv
    t = np.minimum(np.minimum(ta[0], ta[1]), ta[2])
    not_x, not_y = ta[0] != t, ta[1] != t  # the first smallest: x before y before z on ties
    is_y = not_x & ~not_y
    is_z = not_x & not_y
    axis = not_x.view(np.int8) + is_z.view(np.int8)
    # the near plane of the axis (WALL_X0 = 2, FLOOR = 0, WALL_Z0 = 4), or the far one (+1)
    pos8 = positive.view(np.int8)
    surface = ((~not_x).view(np.int8) * (pos8[0] + np.int8(WALL_X0)) + is_y.view(np.int8) * pos8[1]
               + is_z.view(np.int8) * (pos8[2] + np.int8(WALL_Z0))).astype(np.int32)
    # furniture: slab test, limited to the pixel rectangle each box can cover in each frame (the union
    # of a box's rectangles over the batch: a pixel outside its own frame's rectangle cannot hit the box)
    if room.boxes:
        windows, visible = _box_windows(tables, cams, h, w, f, cx, cy)
        for k, n0, n1, r0, r1, c0, c1, every in windows:
            sl = np.s_[n0:n1, r0:r1, c0:c1]
            pk = p[:, n0:n1]
            inv_k = inv[(slice(None),) + sl]
            a = (tables.box_lo[k] - pk) * inv_k
            b = (tables.box_hi[k] - pk) * inv_k
            lo_t = np.minimum(a, b)
            tenter = lo_t.max(axis=0)
            texit = np.maximum(a, b, out=b).min(axis=0)
            tcur = t[sl]
            hit = (tenter <= texit) & (tenter > 0) & (tenter < tcur)
            if not every:
                hit &= visible[n0:n1, k, None, None]
            if not hit.any():
                continue
            te = tenter[hit]
            not_x = lo_t[0][hit] != te  # the entering slab: the first largest of lo_t
            ax = not_x.view(np.int8) + (not_x & (lo_t[1][hit] != te)).view(np.int8)
            tcur[hit] = te
            surface[sl][hit] = FIRST_FURNITURE + 3 * k + ax
            axis[sl][hit] = ax
    hit_p = p + d * t  # (3, N, h, w)
    # one-hot of the hit axis as 0/1 floats: v[axis] is v0 * on0 + v1 * on1 + v2 * on2, exactly (two
    # terms are 0), without numpy's slow where or fancy indexing
    on = np.stack([axis == 0, axis == 1, axis == 2]).astype(np.float32)  # (3, N, h, w)

    def pick(v: np.ndarray) -> np.ndarray:
        return v[0] * on[0] + v[1] * on[1] + v[2] * on[2]

    # normals: against the ray along the hit axis (true for the room's inside and a box's outside);
    # in camera frame the world normal s * e_axis is s * row ``axis`` of the rotation
    d_ax = pick(d)
    sign = np.float32(1.0) - np.float32(2.0) * (d_ax > 0)
    signed_on = on * sign  # (3, N, h, w): the world normal's components
    rs = rot[:, :, :, None, None]
    normals = cv2.merge([(rs[:, 0, j] * signed_on[0] + rs[:, 1, j] * signed_on[1] + rs[:, 2, j] * signed_on[2])
                         .reshape(n * h, w) for j in range(3)]).reshape(n, h, w, 3)

    # materials: the plane's or box's, then decals on the room's planes
    # int32 indices and np.take throughout: numpy's fancy indexing and float -> int64 casts are slow
    mat = np.take(tables.surface_material, surface)
    u_coord = hit_p[2] * on[0] + hit_p[0] * (on[1] + on[2])
    v_coord = hit_p[2] * on[1] + hit_p[1] * (on[0] + on[2])
    tex_u, tex_v = u_coord, v_coord  # texture coordinates: the plane's, or a decal's own
    if tables.decals:
        tex_u, tex_v = u_coord.copy(), v_coord.copy()
        mat_flat, tu_flat, tv_flat = mat.reshape(-1), tex_u.reshape(-1), tex_v.reshape(-1)
        surface_flat = surface.reshape(-1)
        for plane, decals in tables.decals:
            idx = np.flatnonzero(surface_flat == plane)  # the plane's pixels and their (u, v), once
            if not len(idx):
                continue
            uu, vv = u_coord.reshape(-1)[idx], v_coord.reshape(-1)[idx]
            for dc in decals:
                if dc.ellipse:
                    cu, cv = (dc.u[0] + dc.u[1]) / 2, (dc.v[0] + dc.v[1]) / 2
                    ru, rv = (dc.u[1] - dc.u[0]) / 2, (dc.v[1] - dc.v[0]) / 2
                    inside = ((uu - cu) / ru) ** 2 + ((vv - cv) / rv) ** 2 <= 1.0
                else:
                    inside = (uu >= dc.u[0]) & (uu <= dc.u[1]) & (vv >= dc.v[0]) & (vv <= dc.v[1])
                sel = idx[inside]
                if not len(sel):
                    continue
                mat_flat[sel] = dc.material
                tu_flat[sel] = uu[inside] - (dc.u[0] if dc.anchored else 0.0)
                tv_flat[sel] = vv[inside] - (dc.v[1] if dc.anchored else 0.0)

    # texture lookup, with a mip level from the pixel's footprint on the surface
    table = room.material_table
    texel_m = np.take(table["tile"], mat) / np.float32(TEX)
    ray_len = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    cos_view = np.abs(d_ax) / ray_len
    footprint = t / np.float32(f) / np.maximum(cos_view, np.float32(0.2))
    # the mip level: floor(log2(footprint in texels)), 0 .. MIP_LEVELS - 1, by comparisons (no log)
    ratio = footprint / texel_m
    level = (ratio >= np.float32(2.0)).view(np.int8).astype(np.int32)
    for lvl in range(2, MIP_LEVELS):
        level += ratio >= np.float32(2.0 ** lvl)
    tu = np.floor(tex_u / texel_m).astype(np.int32) & (TEX - 1)  # % TEX (a power of two)
    tv = np.floor(-tex_v / texel_m).astype(np.int32) & (TEX - 1)
    flat = ((np.take(table["texture"], mat) * MIP_LEVELS + level) * TEX + tv) * TEX + tu
    texel = np.take(room.textures.view(np.uint32).reshape(-1), flat)  # RGB and a pad byte in one word
    texel_rgb = texel.view(np.uint8).reshape(n, h, w, 4)
    # colour channels first from here on, (3, N, h, w): numpy is slow on a length-3 last axis
    lut_base = mat * 768
    albedo = np.stack([np.take(table["colour_lut"], texel_rgb[..., c] + (lut_base + 256 * c)) for c in range(3)])

    # lighting: ambient, darker near the room's edges and under furniture, plus point lights
    room_on = on * (surface < FIRST_FURNITURE)  # a room plane's own axis: no edge along it
    gap = np.minimum(hit_p, tables.size - hit_p)
    far = np.float32(9.0)
    near_edge = [gap[i] * (np.float32(1.0) - room_on[i]) + far * room_on[i] for i in range(3)]
    dist = np.minimum(np.minimum(near_edge[0], near_edge[1]), near_edge[2])
    occl = np.float32(1.0) - np.float32(0.45) * np.exp(dist * np.float32(-1 / 0.35))
    on_floor = np.flatnonzero(surface == FLOOR)
    if len(on_floor):
        sh = room.floor_shadow
        gx = np.clip((np.take(hit_p[0], on_floor) / SHADOW_CELL).astype(np.int32), 0, sh.shape[1] - 1)
        gz = np.clip((np.take(hit_p[2], on_floor) / SHADOW_CELL).astype(np.int32), 0, sh.shape[0] - 1)
        occl.reshape(-1)[on_floor] *= np.float32(1.0) - np.float32(0.7) * np.take(sh, gz * sh.shape[1] + gx)
    irradiance: dict[tuple[float, float, float], np.ndarray] = {}  # per light colour
    gloss = np.take(table["gloss"], mat)
    spec = None
    for li, (lpos, colour, power) in enumerate(tables.lights):
        to_l = lpos.reshape(3, 1, 1, 1) - hit_p
        d2l = to_l[0] * to_l[0]
        d2l += to_l[1] * to_l[1]
        d2l += to_l[2] * to_l[2]
        inv_d = np.sqrt(d2l)
        np.divide(np.float32(1.0), inv_d, out=inv_d)
        # n . l / |l| with n = sign * e_axis: the light's offset along the hit axis, signed
        e = to_l[0] * signed_on[0]
        e += to_l[1] * signed_on[1]
        e += to_l[2] * signed_on[2]
        e *= inv_d
        np.maximum(e, np.float32(0.0), out=e)
        d2l += np.float32(0.5)
        e *= power
        e /= d2l
        if colour in irradiance:
            irradiance[colour] += e
        else:
            irradiance[colour] = e
        if li == 0 and gloss.any():  # one Blinn-Phong highlight, from the first light, on glossy pixels
            g = np.flatnonzero(gloss)
            half = [to_l[i].reshape(-1)[g] * inv_d.reshape(-1)[g] - d[i].reshape(-1)[g] / ray_len.reshape(-1)[g]
                    for i in range(3)]
            hn = np.sqrt(half[0] * half[0] + half[1] * half[1] + half[2] * half[2]) + np.float32(1e-6)
            half_n = (half[0] * signed_on[0].reshape(-1)[g] + half[1] * signed_on[1].reshape(-1)[g]
                      + half[2] * signed_on[2].reshape(-1)[g]) / hn
            x = np.maximum(half_n, np.float32(0.0))
            x8 = x * x
            x8 *= x8
            x8 *= x8
            x32 = x8 * x8
            x32 *= x32
            spec = np.zeros(gloss.shape, np.float32)
            spec.reshape(-1)[g] = gloss.reshape(-1)[g] * (x32 * x8) * np.float32(0.5 * power)  # x ** 40
    ambient = np.float32(room.ambient) * occl
    emissive = np.take(table["emissive"], mat)
    lit = None
    if emissive.any():  # a light or a window shows its texture times its gain, unlit (and never glossy)
        lit = np.float32(1.0) - emissive
        gain = np.take(table["gain"], mat) * emissive
    radiance = np.empty((3, n, h, w), np.float32)
    for c in range(3):
        light = ambient.copy()
        for colour, e in irradiance.items():
            light += e * np.float32(colour[c])
        if lit is not None:
            light *= lit
            light += gain
        np.multiply(albedo[c], light, out=radiance[c])
        if spec is not None:
            radiance[c] += spec
    # per frame: auto exposure (a camera's), vignetting, sensor noise
    exposure = np.empty((n, 1, 1), np.float32)
    for i in range(n):
        # the mean of a contiguous copy: numpy sums a strided view in an order that depends on its strides
        # (here on the batch's size), and a frame must not depend on the frames rendered with it
        sample = np.ascontiguousarray(radiance[:, i, ::5, ::5])
        lum = float(np.add.reduce(sample, axis=None) / sample.size)
        exposure[i] = np.float32(0.42 / max(lum, 1e-4))
    radiance *= exposure * _vignette(h, w)
    for i in range(n):
        if noise_seeds[i] is not None:  # sensor noise: a window of a fixed noise field, at a seeded offset
            field = _noise_field(h, w)
            oy, ox = divmod(int(np.random.default_rng(noise_seeds[i]).integers(h * w)), w)
            radiance[:, i] += field[:, oy:oy + h, ox:ox + w]
    radiance *= np.float32(4095.0)
    q = np.clip(radiance, np.float32(0.0), np.float32(4095.0), out=radiance).astype(np.int32)
    rgb = cv2.merge([np.take(_GAMMA_LUT, q[c]).reshape(n * h, w) for c in range(3)]).reshape(n, h, w, 3)

    layouts = [layout_keypoints(room, cam, h, w, surface[i]) for i, cam in enumerate(cams)]
    kps = np.stack([kp for kp, _ in layouts])
    heatmaps = keypoint_heatmaps(kps.reshape(-1, 3), h, w, stride, sigma)
    heatmaps = heatmaps.reshape(n, NUM_KEYPOINTS, h // stride, w // stride)
    return [RoomFrame(rgb=rgb[i], depth=t[i], normals=normals[i], surface=surface[i], keypoints=kps[i],
                      heatmaps=heatmaps[i], corners_camera=layouts[i][1], intrinsics=(f, cx, cy)) for i in range(n)]


# --- layout keypoints ------------------------------------------------------------------------

def _view_corners(room: Room, cam: Camera) -> np.ndarray:
    """The room's 4 vertical corners (x, z) ordered FL, FR, BR, BL as seen from the camera, (4, 2)."""
    return np.array(_view_corner_list(room, cam))


def _view_corner_list(room: Room, cam: Camera) -> list[tuple[float, float]]:
    """``_view_corners`` as a list of (x, z) floats."""
    w, _, d = room.size
    corners = [(0.0, 0.0), (float(w), 0.0), (float(w), float(d)), (0.0, float(d))]
    rot = cam.rotation
    fx, fz = float(rot[0, 2]), float(rot[2, 2])
    yaw = math.atan2(fx, fz)
    if abs(fx) < 1e-9 and abs(fz) < 1e-9:  # looking straight up or down: use the camera's up
        yaw = math.atan2(-float(rot[0, 1]), -float(rot[2, 1]))
    sy, cy = math.sin(yaw), math.cos(yaw)
    px, pz = float(cam.position[0]), float(cam.position[2])
    two_pi = 2 * math.pi
    # 0 straight ahead, increasing to the right (clockwise seen from above)
    clockwise = [math.atan2((x - px) * -cy + (z - pz) * sy, (x - px) * sy + (z - pz) * cy) % two_pi for x, z in corners]
    order = sorted(range(4), key=clockwise.__getitem__)  # FR, BR, BL, FL
    return [corners[order[k]] for k in (3, 0, 1, 2)]


def _clip_segment(p0, p1, h: int, w: int):
    """Liang-Barsky: the part of 2-D segment p0-p1 inside the image rectangle (pixel edges), as
    (q0, q1, clipped0, clipped1), or None."""
    x0, y0 = p0
    dx, dy = p1[0] - x0, p1[1] - y0
    lo, hi = 0.0, 1.0
    for pk, qk in ((-dx, x0 + 0.5), (dx, w - 0.5 - x0), (-dy, y0 + 0.5), (dy, h - 0.5 - y0)):
        if pk == 0:
            if qk < 0:
                return None
            continue
        r = qk / pk
        if pk < 0:
            lo = max(lo, r)
        else:
            hi = min(hi, r)
        if lo > hi:
            return None
    q0 = (x0 + lo * dx, y0 + lo * dy)
    q1 = (x0 + hi * dx, y0 + hi * dy)
    return q0, q1, lo > 0, hi < 1


def _visible_state(surface: np.ndarray, u: float, v: float, planes: set[int]) -> float:
    """2 when the pixel at (u, v) shows one of ``planes``, else 1 (hidden by furniture)."""
    h, w = surface.shape
    c, r = min(max(int(round(u)), 0), w - 1), min(max(int(round(v)), 0), h - 1)
    return 2.0 if int(surface[r, c]) in planes else 1.0


def _walls_at(x: float, z: float) -> set[int]:
    """The two walls meeting at the vertical corner (x, z)."""
    return {WALL_X0 if x == 0 else WALL_X1, WALL_Z0 if z == 0 else WALL_Z1}


def layout_keypoints(room: Room, cam: Camera, h: int, w: int, surface: np.ndarray):
    """(32, 3) keypoints (channel layout in the module docstring) and the 8 corners in camera frame."""
    rh = room.size[1]
    vc = _view_corner_list(room, cam)
    corners_c = cam.to_camera(np.array([[x, 0.0, z] for x, z in vc] + [[x, rh, z] for x, z in vc]))
    cc = corners_c.tolist()  # plain floats: a few dozen scalar steps, far cheaper than numpy's
    f, cx, cy = cam.intrinsics(h, w)
    kps = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    corner_planes = [_walls_at(*vc[ci % 4]) | {FLOOR if ci < 4 else CEILING} for ci in range(8)]

    for ci in range(8):
        x, y, z = cc[ci]
        if z <= NEAR:
            continue
        u, v = f * x / z + cx, f * y / z + cy
        if -0.5 <= u <= w - 0.5 and -0.5 <= v <= h - 0.5:
            kps[ci] = (u, v, _visible_state(surface, u, v, corner_planes[ci]))
    for _, ca, cb, border, order in LAYOUT_EDGES:
        a, b = cc[ca], cc[cb]
        if a[2] <= NEAR and b[2] <= NEAR:
            continue
        if a[2] <= NEAR:  # the end behind the near plane moves onto it, along the edge
            k1, k2 = b[2] - NEAR, b[2] - a[2]
            a = [bi + (ai - bi) * k1 / k2 for ai, bi in zip(a, b)]
        elif b[2] <= NEAR:
            k1, k2 = a[2] - NEAR, a[2] - b[2]
            b = [ai + (bi - ai) * k1 / k2 for ai, bi in zip(a, b)]
        pa = (f * a[0] / a[2] + cx, f * a[1] / a[2] + cy)
        pb = (f * b[0] / b[2] + cx, f * b[1] / b[2] + cy)
        clipped = _clip_segment(pa, pb, h, w)
        if clipped is None:
            continue
        q0, q1, cut0, cut1 = clipped
        planes = corner_planes[ca] & corner_planes[cb]  # the two planes meeting along this edge
        ends = [(q0, cut0), (q1, cut1)]
        key = 0 if order == "u" else 1
        ends.sort(key=lambda e: e[0][key])  # left end first (u), or upper end first (v)
        for slot, (q, on_border) in enumerate(ends):
            if on_border:
                kps[border[slot]] = (q[0], q[1], _visible_state(surface, q[0], q[1], planes))
    return kps, corners_c


def keypoint_heatmaps(keypoints: np.ndarray, h: int, w: int, stride: int = STRIDE, sigma: float = SIGMA) -> np.ndarray:
    """(K, h/stride, w/stride) float32: a Gaussian (peak 1) at every present keypoint, else zeros.
    Output pixel j covers input pixels [j*stride, (j+1)*stride): its centre is input (j + 0.5) * stride - 0.5."""
    ho, wo = h // stride, w // stride
    keypoints = np.asarray(keypoints)
    out = np.zeros((len(keypoints), ho, wo), np.float32)
    present = np.flatnonzero(keypoints[:, 2] > 0)
    if len(present):
        xs = np.arange(wo, dtype=np.float32)
        ys = np.arange(ho, dtype=np.float32)
        u, v = keypoints[present, 0:1], keypoints[present, 1:2]  # (P, 1)
        uo, vo = (u + 0.5) / stride - 0.5, (v + 0.5) / stride - 0.5
        gx = np.exp(-((xs - uo) ** 2) / (2 * sigma * sigma))
        gy = np.exp(-((ys - vo) ** 2) / (2 * sigma * sigma))
        out[present] = gy[:, :, None] * gx[:, None, :]
    return out


def heatmap_keypoints(heatmaps: np.ndarray, h: int, w: int, threshold: float = 0.3) -> np.ndarray:
    """Keypoints (K, 3) read back from heatmaps at input size (h, w): each channel's peak, refined
    by a parabola through the log of its neighbours (exact for a Gaussian), state 2 where the peak
    reaches ``threshold``, else an absent row."""
    k, ho, wo = heatmaps.shape
    stride_y, stride_x = h / ho, w / wo
    out = np.zeros((k, 3), np.float32)

    def offset(lm: float, l0: float, lp: float) -> float:
        curv = lm - 2 * l0 + lp
        return min(0.5, max(-0.5, 0.5 * (lm - lp) / curv)) if curv < 0 else 0.0  # floats: no numpy call

    for c in range(k):
        hm = heatmaps[c]
        r, q = divmod(int(np.argmax(hm)), wo)
        if hm[r, q] < threshold:
            continue
        lg = lambda rr, qq: math.log(max(float(hm[rr, qq]), 1e-6))  # noqa: E731
        dq = offset(lg(r, q - 1), lg(r, q), lg(r, q + 1)) if 0 < q < wo - 1 else 0.0
        dr = offset(lg(r - 1, q), lg(r, q), lg(r + 1, q)) if 0 < r < ho - 1 else 0.0
        out[c] = ((q + dq + 0.5) * stride_x - 0.5, (r + dr + 0.5) * stride_y - 0.5, 2.0)
    return out


def layout_segments(keypoints: np.ndarray) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """The room's wireframe in the image: for each edge with two present ends (corners or border
    ends), (name, end, end) in input pixels."""
    segs = []
    for name, ca, cb, border, _ in LAYOUT_EDGES:
        pts = [tuple(keypoints[i, :2]) for i in (ca, cb) + border if keypoints[i, 2] > 0]
        if len(pts) >= 2:
            segs.append((name, (float(pts[0][0]), float(pts[0][1])), (float(pts[-1][0]), float(pts[-1][1]))))
    return segs


# --- data ------------------------------------------------------------------------------------

FRAMES_PER_ROOM = 4  # frames rendered from one room (far apart on its walk) before the next room


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise UserError(f"room frame size {size!r}: give an int or (height, width)") from None
    if h < STRIDE or w < STRIDE or h % STRIDE or w % STRIDE:
        raise UserError(f"room frame size {h}x{w}: sides must be positive multiples of {STRIDE}")
    return h, w


@functools.lru_cache(maxsize=4)
def _cached_room(style: str, seed: int, index: int, split: str, texture_dir: str | None) -> Room:
    return make_room(style, seed, index, split, texture_dir)


def room_frame(style: str, seed: int, index: int, size=(240, 320), split: str = "train",
               texture_dir: str | None = None) -> RoomFrame:
    """Frame ``index`` of the (style, seed, split) stream: room ``index // FRAMES_PER_ROOM``, seen from
    a random pose on its walk (``_dataset_camera``). Depends only on these arguments."""
    check_style(style)
    return _room_frames_of_one_room(style, seed, [index], _parse_size(size), split, texture_dir)[0]


def _room_frames_of_one_room(style: str, seed: int, indices, size: tuple[int, int], split: str,
                             texture_dir: str | None) -> list[RoomFrame]:
    """``room_frame`` for several indices of one room (``index // FRAMES_PER_ROOM`` the same), rendered together."""
    room = _cached_room(style, int(seed), indices[0] // FRAMES_PER_ROOM, split, texture_dir)
    cams, noise_seeds = [], []
    for index in indices:
        rng = _rng("frame", style, seed, split, index)
        cams.append(_dataset_camera(room, rng))
        noise_seeds.append(int(rng.integers(2**31)))
    return render_batch(room, cams, size, noise_seeds)


def _dataset_camera(room: Room, rng: np.random.Generator, min_view_m: float = 1.5) -> Camera:
    """A wearer's pose for a training frame: anywhere on the room's walk, facing any way, with the
    walk's head height, pitch and roll ranges. A pose looking at a wall closer than ``min_view_m``
    is redrawn (up to 4 draws, else the one seeing furthest): fewer frames of nothing but a wall."""
    best, best_dist = None, -1.0
    for _ in range(4):
        s = float(rng.uniform(0, room.walk_s[-1]))
        i = int(np.searchsorted(room.walk_s, s, side="right") - 1) % len(room.walk)
        x, z = room.walk[i]
        cam = Camera.looking((x, room.eye_height + float(rng.uniform(-0.03, 0.03)), z),
                             float(rng.uniform(0, 2 * math.pi)),
                             math.radians(room.pitch0_deg + float(rng.uniform(-8.0, 8.0))),
                             math.radians(float(rng.uniform(-4.0, 4.0))), room.hfov_deg)
        dist = _room_distance(room, cam.position, cam.rotation[:, 2])
        if dist >= min_view_m:
            return cam
        if dist > best_dist:
            best, best_dist = cam, dist
    return best


def _room_distance(room: Room, origin: np.ndarray, direction: np.ndarray) -> float:
    """How far a ray from inside the room travels before it meets a wall, the floor or the ceiling."""
    best = math.inf
    for i in range(3):
        if abs(direction[i]) > 1e-12:
            bound = room.size[i] if direction[i] > 0 else 0.0
            best = min(best, (bound - origin[i]) / direction[i])
    return best


@dataclasses.dataclass
class RoomFrames:
    rgb: np.ndarray  # (N, H, W, 3) uint8
    depth: np.ndarray  # (N, H, W) float32 metres (z-depth)
    normals: np.ndarray  # (N, H, W, 3) float32 camera frame
    keypoints: np.ndarray  # (N, 32, 3) float32
    heatmaps: np.ndarray  # (N, 32, H/4, W/4) float32
    style: str
    split: str


def room_frames(n: int, style: str = MIXED, seed: int = 0, size=320, split: str = "train",
                texture_dir: str | None = None) -> RoomFrames:
    """``n`` rendered frames with labels (``size``: an int for square frames, or (h, w)).

    Frame i is ``room_frame(style, seed, i, size, split)``: the first k frames of a longer set are
    the same frames. train, val and test draw disjoint rooms (the split is part of every seed).
    """
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise UserError(f"rooms: N must be a whole number, got {n!r}") from None
    if n < 2:
        raise UserError(f"rooms: N must be at least 2, got {n}")
    check_style(style)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    h, w = _parse_size(size)
    rgb = np.empty((n, h, w, 3), np.uint8)
    depth = np.empty((n, h, w), np.float32)
    normals = np.empty((n, h, w, 3), np.float32)
    kps = np.empty((n, NUM_KEYPOINTS, 3), np.float32)
    hms = np.empty((n, NUM_KEYPOINTS, h // STRIDE, w // STRIDE), np.float32)
    for first in range(0, n, FRAMES_PER_ROOM):  # one room's frames rendered together
        indices = list(range(first, min(n, first + FRAMES_PER_ROOM)))
        for i, fr in zip(indices, _room_frames_of_one_room(style, seed, indices, (h, w), split, texture_dir)):
            rgb[i], depth[i], normals[i], kps[i], hms[i] = fr.rgb, fr.depth, fr.normals, fr.keypoints, fr.heatmaps
    return RoomFrames(rgb, depth, normals, kps, hms, style, split)


class RoomWalk:
    """A wearer walking through one room: ``frame(i)`` is the view at i / fps seconds (RGB uint8)."""

    def __init__(self, style: str = "living", seed: int = 0, size=(240, 320), fps: float = 30.0,
                 texture_dir: str | None = None, hfov_deg: float = 66.0):
        check_style(style)
        h, w = (int(s) for s in size)
        if h < 8 or w < 8:
            raise UserError(f"room camera size {h}x{w}: at least 8x8")
        self.size = (h, w)
        self.fps = float(fps)
        self.room = make_room(style, seed, 0, "train", texture_dir, hfov_deg=hfov_deg)

    def render(self, i: int) -> RoomFrame:
        return render(self.room, walk_camera(self.room, i / self.fps), self.size, noise_seed=i)


# --- speed -----------------------------------------------------------------------------------

def bench(frames: int = 24, sizes=((240, 320), (120, 160), (320, 320)), seed: int = 0) -> dict:
    """Milliseconds per frame (wall and CPU, one thread): ``walk`` renders a wearer's walk through
    one room (the headset source), ``data`` renders ``room_frames`` (all labels, a new room every
    FRAMES_PER_ROOM frames, its building included). Each style, then their mean."""
    import time

    def timed(fn) -> tuple[float, float]:
        fn(0)  # warm caches (rays, textures)
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(1, frames + 1):
            fn(i)
        return (time.perf_counter() - w0) * 1e3 / frames, (time.process_time() - c0) * 1e3 / frames

    out: dict = {"frames": frames, "frames_per_room": FRAMES_PER_ROOM, "results": []}
    for h, w in sizes:
        for style in STYLES:
            walk = RoomWalk(style, seed=seed, size=(h, w))
            ww, wc = timed(lambda i: walk.render(i))
            dw, dc = timed(lambda i: room_frame(style, seed + 1, 1000 + i, (h, w)))
            out["results"].append({"size": f"{w}x{h}", "style": style, "walk_ms": round(ww, 2), "walk_cpu_ms": round(wc, 2),
                                   "data_ms": round(dw, 2), "data_cpu_ms": round(dc, 2)})
        rows = [r for r in out["results"] if r["size"] == f"{w}x{h}"]
        out["results"].append({"size": f"{w}x{h}", "style": "mean", **{k: round(float(np.mean([r[k] for r in rows])), 2)
                               for k in ("walk_ms", "walk_cpu_ms", "data_ms", "data_cpu_ms")}})
    return out


if __name__ == "__main__":  # python -m shared.rooms [frames]: the speed figures as JSON
    import json
    import sys

    print(json.dumps(bench(int(sys.argv[1]) if len(sys.argv) > 1 else 24), indent=1))
