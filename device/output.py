"""Where overlaid frames go: an OpenCV window (when a display is there) and/or an MP4 file."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from shared.errors import UserError

WINDOW_TITLE = "great-hmd"


def display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class Window:
    """opencv-python's highgui window; ``show`` returns the key pressed (or -1)."""

    def __init__(self, title: str = WINDOW_TITLE):
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    def show(self, img_bgr: np.ndarray) -> int:
        cv2.imshow(self.title, img_bgr)
        key = cv2.waitKey(1)
        return -1 if key < 0 else key & 0xFF

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass


class Recorder:
    """``--record OUT.mp4``: every shown frame, at the source's nominal rate, at the first frame's size."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.is_dir():
            raise UserError(f"cannot record to {self.path}: folder {self.path.parent} does not exist")
        self.fps = fps if fps and fps > 0 else 30.0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, img_bgr: np.ndarray) -> None:
        if self._writer is None:
            h, w = img_bgr.shape[:2]
            self._size = (w, h)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise UserError(f"cannot record to {self.path}: OpenCV could not open an mp4v writer")
        if (img_bgr.shape[1], img_bgr.shape[0]) != self._size:
            img_bgr = cv2.resize(img_bgr, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(img_bgr)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
