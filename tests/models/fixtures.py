"""Small on-disk data in the exact formats users bring: CIFAR-10 batches, image folders, a video."""
import pickle
from pathlib import Path

import cv2
import numpy as np

from shared.worlds import render_scene


def write_cifar10(root: Path, per_batch: int = 20, batches: int = 2) -> Path:
    """The python-pickle layout of cifar-10-batches-py: data (N x 3072 uint8, channel-major), labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]
    for name in names:
        imgs = np.stack([render_scene("studio", 0, int(rng.integers(1e6)), 32)[0] for _ in range(per_batch)])
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                         b"data": data, b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072,
                     b"num_cases_per_batch": per_batch}, fh)
    return root


def write_image_folder(root: Path, classes=("a", "b"), per_class: int = 8, flat: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for ci, c in enumerate(classes):
        folder = root if flat else root / c
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            im, _ = render_scene("forest", 1, k, 48)
            cv2.imwrite(str(folder / f"{c}_{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
            k += 1
    return root


def write_video(path: Path, frames: int = 24, size: int = 64) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    assert writer.isOpened()
    for i in range(frames):
        im, _ = render_scene("neon", 2, i, size)
        writer.write(cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
