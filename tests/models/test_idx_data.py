"""``mnist:PATH`` / ``fashion-mnist:PATH``: the standard idx files, gzipped or not."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from models.idx_data import load_idx, read_idx
from shared.errors import UserError


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx layout: two zero bytes, type 0x08 (ubyte), ndim, big-endian u32 dims, the data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_folder(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, dotted: bool = False) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        data[prefix] = (images, labels)
        for stem, arr, dims in ((f"{prefix}-images", images, 3), (f"{prefix}-labels", labels, 1)):
            name = f"{stem}.idx{dims}-ubyte" if dotted else f"{stem}-idx{dims}-ubyte"
            raw = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_reads_both_splits_at_native_size(tmp_path, gz, dotted):
    data = write_idx_folder(tmp_path / "m", gz=gz, dotted=dotted)
    train = load_idx("mnist", str(tmp_path / "m"), "train", 28)
    val = load_idx("mnist", str(tmp_path / "m"), "val", 28)
    assert train.rgb.shape == (12, 28, 28, 3) and val.rgb.shape == (5, 28, 28, 3)
    assert np.array_equal(train.rgb[..., 0], data["train"][0]) and np.array_equal(train.rgb[..., 2], data["train"][0])
    assert np.array_equal(val.labels, data["t10k"][1]) and val.labels.dtype == np.int64
    assert train.class_names == [str(d) for d in range(10)] and train.source == f"mnist:{tmp_path / 'm'}"


def test_resizes_and_names_fashion_classes(tmp_path):
    write_idx_folder(tmp_path / "f")
    frames = load_idx("fashion-mnist", str(tmp_path / "f"), "train", 16)
    assert frames.rgb.shape == (12, 16, 16, 3) and frames.rgb.dtype == np.uint8
    assert frames.class_names[0] == "T-shirt/top" and frames.class_names[9] == "Ankle boot"
    assert load_idx("fashion-mnist", str(tmp_path / "f"), "val").rgb.shape[1:3] == (32, 32)  # default size
    assert load_idx("fashion-mnist", str(tmp_path / "f"), "val", (24, 40)).rgb.shape == (5, 24, 40, 3)  # (h, w)


def test_read_idx_checks_the_header(tmp_path):
    good = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))
    (tmp_path / "ok").write_bytes(good)
    assert read_idx(tmp_path / "ok").tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "float").write_bytes(good[:2] + b"\x0d" + good[3:])
    for name, words in (("magic", "magic"), ("short", "declares"), ("float", "unsigned bytes")):
        with pytest.raises(UserError, match=words):
            read_idx(tmp_path / name)


def test_bad_folders_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_idx("mnist", str(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_idx("mnist", str(tmp_path / "empty"), "train")
    with pytest.raises(UserError, match="needs a folder"):
        load_idx("fashion-mnist", "", "train")
    root = tmp_path / "mismatch"
    write_idx_folder(root, gz=False)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(UserError, match="12 images but 3 labels"):
        load_idx("mnist", str(root), "train")
