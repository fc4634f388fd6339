"""``mnist:PATH`` and ``fashion-mnist:PATH``: the standard idx files in a folder, gzipped or not.

PATH holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; the ``train-images.idx3-ubyte`` spelling
some mirrors use works too), as shipped by yann.lecun.com, zalandoresearch/fashion-mnist and
Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). ``train`` reads the
60,000 training images, ``val`` the 10,000 test images. The 28 x 28 gray images are resized to
``size`` (a side, default 32, or (height, width)) and repeated to three channels: the classifiers
take RGB.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import cv2
import numpy as np

from shared.errors import UserError

IDX_KINDS = ("mnist", "fashion-mnist")
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
_PREFIX = {"train": "train", "val": "t10k"}
_UBYTE = 0x08  # the idx type code of unsigned bytes
DEFAULT_IDX_SIZE = 32


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzipped or not) of unsigned bytes as an array of its declared shape."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"{p}: not a readable gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{p}: not an idx file (bad magic number)")
    if raw[2] != _UBYTE:
        raise UserError(f"{p}: idx data type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{p}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise UserError(f"{p}: idx header declares {shape} ({count} bytes) but the file holds "
                        f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, np.uint8, count, header).reshape(shape)


def _find(root: Path, stem: str, dims: int) -> Path:
    names = [f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"]
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise UserError(f"{root}: no {names[0]}[.gz] (the standard idx files: train-images-idx3-ubyte, "
                    f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")


def load_idx(kind: str, path: str, split: str, size: int | tuple[int, int] | None = None):
    """``split`` ("train" / "val") of the ``kind`` ("mnist" / "fashion-mnist") idx files in ``path``,
    as a :class:`models.data.FrameSet` of RGB frames of ``size`` (a side, or (height, width))."""
    from models.frames import FrameSet

    if kind not in IDX_KINDS:
        raise ValueError(kind)
    if split not in _PREFIX:
        raise ValueError(split)
    if not path:
        raise UserError(f"{kind} source needs a folder: {kind}:PATH")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{kind} folder not found: {root}")
    images = read_idx(_find(root, f"{_PREFIX[split]}-images", 3))
    labels = read_idx(_find(root, f"{_PREFIX[split]}-labels", 1))
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"{root}: expected N x H x W images and N labels, got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} images but {len(labels)} labels ({split})")
    if labels.size and int(labels.max()) >= 10:
        raise UserError(f"{root}: label {int(labels.max())} out of range for the 10 {kind} classes")
    size = size or DEFAULT_IDX_SIZE
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if images.shape[1:] != (h, w):
        interp = cv2.INTER_AREA if h * w < images.shape[1] * images.shape[2] else cv2.INTER_LINEAR
        images = np.stack([cv2.resize(im, (w, h), interpolation=interp) for im in images]) if len(images) \
            else np.zeros((0, h, w), np.uint8)
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=3))
    return FrameSet(rgb, labels.astype(np.int64), list(CLASS_NAMES[kind]), f"{kind}:{path}")
