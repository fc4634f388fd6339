"""Frame sources and the capture thread.

A source yields RGB uint8 frames. :class:`CaptureThread` reads it on its own thread and keeps
only the newest frame (flow limiting, as live pipelines do): the frame loop never works on a
stale queue, and every frame the loop did not take before the next one arrived is counted as
dropped. ``lockstep=True`` turns dropping off (the reader waits for the loop) for offline runs
and tests that must see every frame.

Sources: ``webcam:N``, ``video:PATH`` (``loop``), ``images:DIR`` (``loop``), ``synthetic[:WORLD]``
(a head-mounted camera panning and turning over a rendered panorama of a synthetic world),
``walk:DIR`` (a simulated head moving over the real photos in DIR: shared/walk.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from shared.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class Frame:
    """One camera frame. ``image`` is RGB uint8 HxWx3 and must not be modified after capture."""

    index: int  # the source's frame counter (gaps = frames dropped by flow limiting)
    image: np.ndarray
    t_capture: float  # time.perf_counter() when the source delivered it


class SourceEnded(Exception):
    """The source has no more frames (end of file, or it failed for good)."""


class FrameSource:
    """A blocking frame reader; ``read()`` returns RGB uint8 or raises :class:`SourceEnded`."""

    name = "source"
    fps: float = 0.0  # the rate the capture thread paces reads at; 0 = as fast as it comes

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def info(self) -> dict:
        return {"source": self.name}


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class SyntheticSource(FrameSource):
    """A wearer's camera over a synthetic world: a steady pan with head turns (roll) and a bob.

    The panorama is rendered once; each frame is one affine warp of it (BORDER_WRAP makes the
    world wrap around horizontally), so frames are cheap and arrive at a steady ``fps``.
    """

    def __init__(self, world: str = "studio", size: tuple[int, int] = (240, 320), fps: float = 30.0,
                 seed: int = 0, pan_px_per_frame: float = 4.0):
        from shared.worlds import WORLDS, render_panorama

        if world not in WORLDS:
            raise UserError(f"unknown synthetic world {world!r} (choose from {', '.join(WORLDS)})")
        self.name, self.fps, self.size = f"synthetic:{world}", float(fps), size
        h, w = size
        self.panorama, self.objects = render_panorama(world, seed, width=max(4 * w, 256), height=max(int(1.5 * h), 64))
        self._pan = pan_px_per_frame
        self._i = 0

    def read(self) -> np.ndarray:
        h, w = self.size
        ph, pw = self.panorama.shape[:2]
        i = self._i
        self._i += 1
        cx = (pw / 2 + i * self._pan) % pw  # steady pan
        cy = ph / 2 + 0.12 * ph * math.sin(i / 23.0)  # looking up and down
        roll = 6.0 * math.sin(i / 37.0)  # head tilt, degrees
        zoom = 1.0 + 0.08 * math.sin(i / 53.0)  # walking closer and away
        m = cv2.getRotationMatrix2D((cx, cy), roll, zoom)
        m[0, 2] += w / 2 - cx
        m[1, 2] += h / 2 - cy
        return cv2.warpAffine(self.panorama, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)

    def info(self) -> dict:
        return {"source": self.name, "size": list(self.size), "fps": self.fps}


class WalkSource(FrameSource):
    """A wearer's head moving over real photos (shared/walk.py): pan, tilt, roll, zoom, motion blur,
    exposure drift and sensor noise, at the camera's aspect; endless (cuts to the next photo)."""

    def __init__(self, folder: str, size: tuple[int, int] = (240, 320), fps: float = 30.0, seed: int = 0):
        from shared.walk import HeadWalk, load_photos, walk_seed

        self.name, self.fps, self.size = f"walk:{folder}", float(fps), size
        self.walk = HeadWalk(load_photos(folder), size=size, seed=walk_seed(folder, seed))
        self._i = 0

    def read(self) -> np.ndarray:
        frame = self.walk.frame(self._i)
        self._i += 1
        return frame

    def info(self) -> dict:
        return {"source": self.name, "size": list(self.size), "fps": self.fps, "photos": len(self.walk.photos)}


class ArraySource(FrameSource):
    """Frames from memory (tests, benchmarks); ``loop`` repeats them."""

    def __init__(self, frames: list[np.ndarray], fps: float = 0.0, loop: bool = False, name: str = "array"):
        if not frames:
            raise UserError("no frames given")
        self.frames, self.fps, self.loop, self.name = frames, float(fps), loop, name
        self._i = 0

    def read(self) -> np.ndarray:
        if self._i >= len(self.frames):
            if not self.loop:
                raise SourceEnded("end of frames")
            self._i = 0
        frame = self.frames[self._i]
        self._i += 1
        return frame


class RoomsSource(FrameSource):
    """``rooms[:STYLE]``: a wearer walking through a ray-cast room (shared/rooms.py); frame i is the
    view at i / fps seconds."""

    def __init__(self, style: str = "living", size: tuple[int, int] = (240, 320), fps: float = 30.0, seed: int = 0):
        from shared.rooms import RoomWalk

        # fps 0 = unpaced (as fast as frames come): the walk still advances 1/30 s a frame
        self.walk = RoomWalk(style, seed=seed, size=size, fps=fps or 30.0)
        self.name, self.fps, self.size = f"rooms:{style}", float(fps), size
        self._i = 0

    def read(self) -> np.ndarray:
        self._i += 1
        return self.walk.render(self._i - 1).rgb

    def info(self) -> dict:
        return {"source": self.name, "size": list(self.size), "fps": self.fps}


class ImageFolderSource(FrameSource):
    """Every image file under DIR (sorted by path), decoded lazily, paced at ``fps``."""

    def __init__(self, folder: str | Path, fps: float = 30.0, loop: bool = False):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"image folder not found: {folder}")
        self.paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.name, self.fps, self.loop = f"images:{folder}", float(fps), loop
        self._i = 0
        self.unreadable = 0
        # a small looping folder is decoded once and kept, like a camera that hands over raw frames
        small = loop and sum(p.stat().st_size for p in self.paths) <= self.PRELOAD_BYTES
        self._decoded: dict[int, np.ndarray | None] | None = {} if small else None

    PRELOAD_BYTES = 32 * 1024 * 1024

    def _decode(self, i: int) -> np.ndarray | None:
        if self._decoded is not None and i in self._decoded:
            return self._decoded[i]
        img = cv2.imread(str(self.paths[i]), cv2.IMREAD_COLOR)
        img = _to_rgb(img) if img is not None else None
        if self._decoded is not None:
            self._decoded[i] = img
        return img

    def read(self) -> np.ndarray:
        for _ in range(len(self.paths)):
            if self._i >= len(self.paths):
                if not self.loop:
                    raise SourceEnded("end of image folder")
                self._i = 0
            i = self._i
            self._i += 1
            img = self._decode(i)
            if img is not None:
                return img
            self.unreadable += 1
        raise SourceEnded("no readable image left in the folder")

    def info(self) -> dict:
        return {"source": self.name, "images": len(self.paths), "unreadable": self.unreadable}


def quiet_video_backend() -> None:
    """Silence FFmpeg's own log lines (e.g. "moov atom not found" for a truncated MP4): a file that
    does not decode gets our one-line error instead. OpenCV reads OPENCV_FFMPEG_LOGLEVEL (-8 is
    AV_LOG_QUIET) when its FFmpeg backend first opens a file, so this must run before that; a value
    the user set is kept."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


class VideoSource(FrameSource):
    """A video file, paced at its own frame rate (or ``fps``); ``loop`` rewinds at the end."""

    def __init__(self, path: str | Path, fps: float | None = None, loop: bool = False):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"video not found: {path}")
        self.path, self.loop, self.name = path, loop, f"video:{path}"
        self._cap = cv2.VideoCapture(str(path))
        ok, first = (self._cap.read() if self._cap.isOpened() else (False, None))
        if not ok or first is None:
            self._cap.release()
            raise UserError(f"cannot read video {path}: not a video OpenCV can decode")
        self._first: np.ndarray | None = first
        native = self._cap.get(cv2.CAP_PROP_FPS) or 0.0
        self.fps = float(fps if fps is not None else (native if 0 < native < 1000 else 30.0))

    def read(self) -> np.ndarray:
        if self._first is not None:
            img, self._first = self._first, None
            return _to_rgb(img)
        ok, img = self._cap.read()
        if not ok and self.loop:
            self._cap.release()
            self._cap = cv2.VideoCapture(str(self.path))
            ok, img = self._cap.read()
        if not ok or img is None:
            raise SourceEnded("end of video")
        return _to_rgb(img)

    def close(self) -> None:
        self._cap.release()


def _open_camera_quietly(index: int) -> "cv2.VideoCapture":
    """OpenCV logs several backend warnings for a missing camera; we report it in one line instead."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return cv2.VideoCapture(index)
    finally:
        cv2.utils.logging.setLogLevel(level)


class WebcamSource(FrameSource):
    """A camera by index. A camera that drops out is reopened with exponential backoff; after
    ``give_up_s`` without a frame the source ends (reported in the summary)."""

    def __init__(self, index: int, opener: Callable[[int], "cv2.VideoCapture"] | None = None,
                 backoff: tuple[float, float] = (0.05, 2.0), give_up_s: float = 15.0):
        self.index, self.name, self.fps = index, f"webcam:{index}", 0.0  # the camera paces itself
        self._open = opener or _open_camera_quietly
        self._backoff, self._give_up_s = backoff, give_up_s
        self.reopens = 0
        self._cap = self._open(index)
        if not self._cap.isOpened():
            raise UserError(f"webcam {index} could not be opened (no such camera, or it is in use)")
        self._stop = threading.Event()

    def read(self) -> np.ndarray:
        ok, img = self._cap.read()
        if ok and img is not None:
            return _to_rgb(img)
        delay, deadline = self._backoff[0], time.monotonic() + self._give_up_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._cap.release()
            self._stop.wait(delay)
            delay = min(delay * 2, self._backoff[1])
            self.reopens += 1
            self._cap = self._open(self.index)
            if self._cap.isOpened():
                ok, img = self._cap.read()
                if ok and img is not None:
                    return _to_rgb(img)
        raise SourceEnded(f"webcam {self.index} stopped delivering frames and did not come back "
                          f"within {self._give_up_s:g} s")

    def close(self) -> None:
        self._stop.set()
        self._cap.release()

    def info(self) -> dict:
        return {"source": self.name, "reopens": self.reopens}


def open_source(spec: str, *, size: tuple[int, int] = (240, 320), fps: float | None = None,
                loop: bool = False, seed: int = 0) -> FrameSource:
    """``webcam:N`` | ``video:PATH`` | ``images:DIR`` | ``synthetic[:WORLD]`` | ``walk:DIR`` -> a source."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return SyntheticSource(arg or "studio", size=size, fps=30.0 if fps is None else fps, seed=seed)
    if kind == "walk":
        if not arg:
            raise UserError("walk: needs a photo folder (walk:DIR)")
        return WalkSource(arg, size=size, fps=30.0 if fps is None else fps, seed=seed)
    if kind == "webcam":
        try:
            index = int(arg or "0")
        except ValueError:
            raise UserError(f"webcam index must be a number: {spec!r}") from None
        return WebcamSource(index)
    if kind == "video":
        if not arg:
            raise UserError("video: needs a path (video:PATH)")
        return VideoSource(arg, fps=fps, loop=loop)
    if kind == "rooms":
        return RoomsSource(arg or "living", size=size, fps=30.0 if fps is None else fps, seed=seed)
    if kind == "images":
        if not arg:
            raise UserError("images: needs a folder (images:DIR)")
        return ImageFolderSource(arg, fps=30.0 if fps is None else fps, loop=loop)
    raise UserError(f"unknown source {spec!r} (use webcam:N, video:PATH, images:DIR, synthetic[:WORLD], walk:DIR "
                    f"or rooms[:STYLE])")


class CaptureThread:
    """Reads ``source`` on a background thread into a one-frame slot (newest wins).

    ``get()`` returns the newest frame not yet taken, waiting for one if needed, or ``None``
    once the source has ended (``end_reason`` says why). ``dropped`` counts frames overwritten
    before the loop took them.
    """

    def __init__(self, source: FrameSource, lockstep: bool = False):
        self.source, self.lockstep = source, lockstep
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._stop = threading.Event()
        self.captured = 0
        self.dropped = 0
        self.ended = False
        self.end_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> "CaptureThread":
        self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.source.fps if self.source.fps > 0 else 0.0
        next_t = time.perf_counter()
        try:
            while not self._stop.is_set():
                if period:
                    now = time.perf_counter()
                    if next_t > now:
                        self._stop.wait(next_t - now)
                    # a steady rate: schedule from the ideal time, but never burst to catch up
                    next_t = max(next_t + period, time.perf_counter())
                image = self.source.read()
                frame = Frame(self.captured, image, time.perf_counter())
                with self._cond:
                    if self.lockstep:
                        while self._slot is not None and not self._stop.is_set():
                            self._cond.wait(0.1)
                    elif self._slot is not None:
                        self.dropped += 1
                    self._slot = frame
                    self.captured += 1
                    self._cond.notify_all()
        except SourceEnded as exc:
            self.end_reason = str(exc)
        except Exception as exc:  # a broken source must end the run cleanly, not hang it
            self.end_reason = f"source failed: {type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                self.ended = True
                if self.end_reason is None:
                    self.end_reason = "stopped"
                self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Frame | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._slot is None and not self.ended:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining if remaining is not None else 0.5)
            frame, self._slot = self._slot, None
            self._cond.notify_all()
            return frame

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if isinstance(self.source, WebcamSource):
            self.source._stop.set()
        self._thread.join(timeout=5)
        self.source.close()
