"""A simulated head over real photographs: ``walk:DIR`` footage for the headset and for training.

A wearer's camera does not see a still photo: it pans, tilts, rolls, zooms and shifts with the
head, blurs along that motion, drifts in exposure and adds sensor noise. :class:`HeadWalk`
turns a folder of photos into such footage, deterministically by ``(seed, frame index)``:

* each photo is looked at for one *shot* (``shot_frames`` frames, then a cut to the next photo,
  as when the wearer turns to another scene); the shot's photo order is a seeded permutation;
* within a shot the view is a homography of the photo at the camera's aspect (default 4:3,
  never squashed): a crop window whose centre, scale and roll follow smooth sums of sinusoids,
  plus a small perspective term (translation of the head relative to the scene);
* motion blur follows the motion: a line kernel along the image-space displacement of the
  frame centre between this frame and the next, times the shutter fraction;
* exposure drifts smoothly (gain 0.75-1.2 and a gamma 0.85-1.15), then sensor noise is added:
  signal-dependent shot noise and a read-noise floor, quantised to uint8.

Pure numpy + OpenCV: the headset (torch-free) and the training data both use it.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import cv2
import numpy as np

from shared.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_SIZE = (240, 320)  # (height, width): 4:3, the camera's aspect
DEFAULT_WALK_N = 2000  # frames of a walk:DIR data source
MAX_PHOTO_SIDE = 1280  # photos are kept at most this large (memory; the camera sees a crop anyway)


def list_photos(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` or one level below (class sub-folders), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"photo folder not found: {root}")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {root}")
    return files


def load_photos(folder: str | Path, max_side: int = MAX_PHOTO_SIDE) -> list[np.ndarray]:
    """Every readable photo of ``folder`` as RGB uint8 (at most ``max_side`` on the long side)."""
    photos, bad = [], []
    for p in list_photos(folder):
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if im is None or min(im.shape[:2]) < 16:
            bad.append(p.name)
            continue
        s = max_side / max(im.shape[:2])
        if s < 1:
            im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        photos.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
    if not photos:
        raise UserError(f"none of the images in {folder} could be read ({', '.join(bad[:5])})")
    return photos


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (height, width)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 8 or int(h) < 8:
        raise UserError(f"bad size {text!r}: expected WIDTHxHEIGHT, e.g. 320x240")
    return int(h), int(w)


def hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An int side or (height, width) -> (height, width)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def fit_to(image: np.ndarray, size: int | tuple[int, int], interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Centre-crop ``image`` to the aspect of ``size``, then resize to it (no squashing)."""
    h, w = hw(size)
    ih, iw = image.shape[:2]
    if ih * w > iw * h:  # too tall: crop rows
        ch = max(1, round(iw * h / w))
        y0 = (ih - ch) // 2
        image = image[y0:y0 + ch]
    elif ih * w < iw * h:  # too wide: crop columns
        cw = max(1, round(ih * w / h))
        x0 = (iw - cw) // 2
        image = image[:, x0:x0 + cw]
    if image.shape[:2] == (h, w):
        return image
    interp = interpolation if image.shape[0] >= h else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)
def parse_walk(spec: str) -> tuple[str, int]:
    """``walk:DIR[:N]`` -> (DIR, N)."""
    rest = spec.partition(":")[2]
    folder, n = rest, DEFAULT_WALK_N
    head, sep, tail = rest.rpartition(":")
    if sep and tail.isdigit():
        folder, n = head, int(tail)
    if not folder:
        raise UserError("walk source needs a photo folder: walk:DIR[:N]")
    if n < 2:
        raise UserError(f"walk source needs N >= 2 frames, got {n}")
    return folder, n


class _Smooth:
    """A smooth random signal in [-1, 1]: a normalised sum of three sinusoids."""

    def __init__(self, rng: np.random.Generator, period_frames: float):
        self.freq = 2 * math.pi / (period_frames * rng.uniform(0.6, 1.6, 3))
        self.phase = rng.uniform(0, 2 * math.pi, 3)
        self.amp = rng.uniform(0.3, 1.0, 3)
        self.amp /= self.amp.sum()

    def __call__(self, t: float) -> float:
        return float((self.amp * np.sin(self.freq * t + self.phase)).sum())


class HeadWalk:
    """Footage of a head moving over ``photos`` (RGB uint8 arrays); see the module docstring.

    ``frame(i)`` is a pure function of ``(seed, i)``; ``size`` is (height, width).
    """

    def __init__(self, photos: list[np.ndarray], size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
                 shot_frames: int = 240, blur: bool = True, exposure: bool = True, noise: bool = True,
                 shutter: float = 0.5, speed: float = 1.0):
        if not photos:
            raise UserError("a walk needs at least one photo")
        h, w = size
        if h < 8 or w < 8:
            raise UserError(f"walk frame size {w}x{h} is too small")
        if shot_frames < 2:
            raise UserError(f"shot_frames must be >= 2, got {shot_frames}")
        self.photos, self.size, self.seed = photos, (int(h), int(w)), int(seed)
        self.shot_frames, self.blur, self.exposure, self.noise = int(shot_frames), blur, exposure, noise
        self.shutter, self.speed = float(shutter), float(speed)
        self._order = np.random.default_rng([self.seed, 7]).permutation(len(photos))
        self._shots: dict[int, dict] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "HeadWalk":
        return cls(load_photos(folder), **kwargs)

    # -- motion ----------------------------------------------------------------------------
    def _shot(self, k: int) -> dict:
        shot = self._shots.get(k)
        if shot is None:
            if len(self._shots) > 64:
                self._shots.clear()
            rng = np.random.default_rng([self.seed, 11, k])
            cycle, pos = divmod(k, len(self.photos))
            order = self._order if cycle == 0 else np.random.default_rng([self.seed, 7, cycle]).permutation(
                len(self.photos))
            period = 90.0 / max(self.speed, 1e-3)
            shot = {"photo": int(order[pos]),
                    "x": _Smooth(rng, 2.0 * period), "y": _Smooth(rng, 1.6 * period),
                    "zoom": _Smooth(rng, 2.5 * period), "roll": _Smooth(rng, 1.3 * period),
                    "px": _Smooth(rng, 3.0 * period), "py": _Smooth(rng, 3.0 * period),
                    "gain": _Smooth(rng, 4.0 * period), "gamma": _Smooth(rng, 5.0 * period),
                    "zoom_mid": rng.uniform(0.5, 0.8), "roll_amp": rng.uniform(2.0, 8.0),
                    "t0": rng.uniform(0, 1000)}
            self._shots[k] = shot
        return shot

    def homography(self, i: int, dt: float = 0.0) -> tuple[np.ndarray, int]:
        """(3x3 map from output pixels to photo pixels, photo index) at frame ``i + dt``."""
        k, j = divmod(i, self.shot_frames)
        shot = self._shot(k)
        photo = self.photos[shot["photo"]]
        ph, pw = photo.shape[:2]
        h, w = self.size
        t = shot["t0"] + j + dt
        # the largest window of the camera's aspect that fits the photo, scaled by the zoom
        fit = min(pw / w, ph / h)
        scale = fit * float(np.clip(shot["zoom_mid"] + 0.15 * shot["zoom"](t), 0.35, 0.95))
        ww, wh = w * scale, h * scale
        roll = math.radians(shot["roll_amp"] * shot["roll"](t))
        # keep the rotated window inside the photo: its half-extent along each axis at the shot's
        # largest roll (a bound that does not change with the roll's sign, so the motion stays smooth)
        rmax = math.radians(shot["roll_amp"])
        ex = 0.5 * (ww * math.cos(rmax) + wh * math.sin(rmax))
        ey = 0.5 * (ww * math.sin(rmax) + wh * math.cos(rmax))
        cx = pw / 2 + max(pw / 2 - ex, 0.0) * shot["x"](t)
        cy = ph / 2 + max(ph / 2 - ey, 0.0) * shot["y"](t)
        c, s = math.cos(roll), math.sin(roll)
        # output pixel (u, v) -> centred, scaled, rotated, translated photo pixel
        a = np.array([[scale * c, -scale * s, cx], [scale * s, scale * c, cy], [0.0, 0.0, 1.0]])
        centre = np.array([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
        # a small perspective term: the head moving relative to the scene (<= ~4 % keystone)
        persp = np.eye(3)
        persp[2, 0] = 0.04 * shot["px"](t) / w
        persp[2, 1] = 0.04 * shot["py"](t) / h
        return a @ persp @ centre, shot["photo"]

    # -- rendering -------------------------------------------------------------------------
    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as RGB uint8 of ``size``."""
        if i < 0:
            raise ValueError(i)
        h, w = self.size
        hom, p = self.homography(i)
        photo = self.photos[p]
        img = cv2.warpPerspective(photo, hom, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT)
        if self.blur:
            img = self._motion_blur(img, i, hom)
        rng = np.random.default_rng([self.seed, 13, i])
        if self.exposure:  # gain and gamma as one 256-entry lookup table
            shot = self._shot(i // self.shot_frames)
            t = shot["t0"] + i % self.shot_frames
            gain = 0.975 + 0.225 * shot["gain"](t)
            gamma = 1.0 + 0.15 * shot["gamma"](t)
            lut = np.clip(np.power(np.clip(np.arange(256) / 255.0 * gain, 0.0, 1.0), gamma) * 255.0 + 0.5, 0, 255)
            img = cv2.LUT(img, lut.astype(np.uint8))
        if self.noise:  # shot noise (signal-dependent) and a read-noise floor
            x = img.astype(np.float32) * np.float32(1.0 / 255.0)
            shot_sigma, read_sigma = rng.uniform(0.01, 0.03), rng.uniform(0.003, 0.01)
            sigma = np.sqrt(np.float32(shot_sigma ** 2) * x + np.float32(read_sigma ** 2))
            x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
            img = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return img

    def _motion_blur(self, img: np.ndarray, i: int, hom: np.ndarray) -> np.ndarray:
        """Blur along the displacement of the frame centre over the shutter time."""
        h, w = self.size
        if (i + 1) % self.shot_frames == 0:  # the last frame of a shot: no next frame to move to
            return img
        nxt, _ = self.homography(i + 1)
        centre = np.array([w / 2, h / 2, 1.0])
        b = nxt @ centre
        # the motion in *output* pixels: map the next frame's photo point back through this frame
        back = np.linalg.solve(hom, b)
        du, dv = back[0] / back[2] - centre[0], back[1] / back[2] - centre[1]
        length = math.hypot(du, dv) * self.shutter
        if length < 1.0:
            return img
        n = int(min(math.ceil(length), 15)) | 1  # odd kernel side, capped
        kernel = np.zeros((n, n), np.float32)
        ang = math.atan2(dv, du)
        c = n // 2
        for t in np.linspace(-length / 2, length / 2, 2 * n):
            x, y = int(round(c + t * math.cos(ang))), int(round(c + t * math.sin(ang)))
            if 0 <= x < n and 0 <= y < n:
                kernel[y, x] = 1.0
        kernel /= kernel.sum()
        return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)

    def frames(self, start: int, count: int, stride: int = 1) -> np.ndarray:
        return np.stack([self.frame(start + k * stride) for k in range(count)])


def walk_seed(folder: str | Path, seed: int) -> int:
    """A seed that differs between photo sets (by their file names, not where they lie), so walks
    over two different folders differ while a copied folder gives the same walk."""
    names = "\n".join(p.name for p in list_photos(folder))
    return (zlib.crc32(names.encode()) ^ seed) & 0x7FFFFFFF
