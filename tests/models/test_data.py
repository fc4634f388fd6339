import numpy as np
import pytest
import torch

from models.data import (TaskData, canny_edges, corrupt, load_source, load_source_subset, parse_synthetic,
                         source_length)
from shared.errors import UserError
from shared.manifest import NoiseModel
from shared.worlds import WORLDS, render_scene
from tests.models.fixtures import write_cifar10, write_image_folder, write_video


def test_synthetic_is_deterministic_and_split():
    a = load_source("synthetic:40", "train", 32, seed=3)
    b = load_source("synthetic:40", "train", 32, seed=3)
    c = load_source("synthetic:40", "train", 32, seed=4)
    v = load_source("synthetic:40", "val", 32, seed=3)
    assert a.rgb.shape == (40, 32, 32, 3) and np.array_equal(a.rgb, b.rgb) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.rgb, c.rgb)
    assert len(v) == 64 and not any((v.rgb[0] == x).all() for x in a.rgb)
    assert set(a.labels.tolist()) <= set(range(6)) and len(set(a.labels.tolist())) >= 4


def test_worlds_differ_in_appearance():
    means = {w: np.mean([render_scene(w, 0, i, 32)[0].reshape(-1, 3).mean(0) for i in range(30)], axis=0)
             for w in WORLDS}
    names = list(WORLDS)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(means[names[i]] - means[names[j]]).max() > 15  # mean colour differs by > 15/255


def test_parse_synthetic():
    assert parse_synthetic("synthetic") == (2000, ["studio"])
    assert parse_synthetic("synthetic:100:forest") == (100, ["forest"])
    assert parse_synthetic("synthetic:forest+neon:10") == (10, ["forest", "neon"])
    with pytest.raises(UserError):
        parse_synthetic("synthetic:mars")


def test_noise_model_matches_the_paper():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 1, 200, 200), 0.5)
    y = corrupt(x, g, NoiseModel(salt_pepper=0.04, speckle=0.0))
    assert float((y == 0).float().mean()) == pytest.approx(0.02, abs=0.004)
    assert float((y == 1).float().mean()) == pytest.approx(0.02, abs=0.004)
    z = corrupt(x, g, NoiseModel(salt_pepper=0.0, speckle=0.1))
    assert float((z - 0.5).std()) == pytest.approx(0.05, rel=0.05)  # x * N(0, 0.1) at x = 0.5


def test_targets_from_a_colour_frame():
    fs = load_source("synthetic:8", "train", 32)
    td = TaskData(fs)
    x, t = td.batch(torch.arange(4), torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 32, 32) and t["colour"].shape == (4, 3, 32, 32)
    edges = canny_edges(fs.rgb[0])
    assert set(np.unique(edges).tolist()) <= {0, 255} and edges.any()
    assert torch.equal(t["edges"][0, 0], torch.from_numpy(edges).float() / 255)
    assert not torch.equal(x, t["denoised"])  # the input is the corrupted gray frame


def test_cifar10_batches(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    tr = load_source(f"cifar10:{root}", "train")
    va = load_source(f"cifar10:{root}", "val")
    assert tr.rgb.shape == (40, 32, 32, 3) and len(va) == 20
    assert tr.class_names == [f"c{i}" for i in range(10)]
    with pytest.raises(UserError, match="no CIFAR-10 batches"):
        load_source(f"cifar10:{tmp_path}", "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a CIFAR-10"):
        load_source(f"cifar10:{tmp_path / 'bad'}", "train")


def test_image_folders_labelled_and_flat(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    tr, va = load_source(f"images:{root}", "train", 32), load_source(f"images:{root}", "val", 32)
    assert len(tr) + len(va) == 16 and len(va) >= 1 and tr.class_names == ["a", "b"]
    assert set(tr.labels.tolist()) <= {0, 1}
    flat = write_image_folder(tmp_path / "flat", flat=True)
    f = load_source(f"images:{flat}", "train", 32)
    assert (f.labels == -1).all() and not f.labelled


def test_video_frames_are_unlabelled(tmp_path):
    path = write_video(tmp_path / "v.avi")
    tr, va = load_source(f"video:{path}", "train", 32), load_source(f"video:{path}", "val", 32)
    assert len(tr) + len(va) == 24 and len(va) == 3 and (tr.labels == -1).all()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError):
        load_source(f"video:{bad}", "train", 32)


@pytest.mark.parametrize("source", ["nope:1", "images:/does/not/exist", "video:", "synthetic:abc"])
def test_bad_sources_are_user_errors(source):
    with pytest.raises(UserError):
        load_source(source, "train", 32)


def _photo_dir(tmp_path, n=3):
    import cv2

    rng = np.random.default_rng(0)
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(n):
        im = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3)).astype(np.uint8), (0, 0), 3)
        cv2.imwrite(str(d / f"p{i}.jpg"), im)
    return d


def test_walk_source_gives_camera_aspect_frames_deterministically(tmp_path):
    d = _photo_dir(tmp_path)
    a = load_source(f"walk:{d}:12", "train", (24, 32), seed=1)
    b = load_source(f"walk:{d}:12", "train", (24, 32), seed=1)
    assert a.rgb.shape == (12, 24, 32, 3) and (a.labels == -1).all() and not a.labelled
    assert np.array_equal(a.rgb, b.rgb)
    val = load_source(f"walk:{d}:12", "val", (24, 32), seed=1)
    assert len(val) == 32 and not np.array_equal(val.rgb[:12], a.rgb)  # held-out views of the same photos


def test_a_walk_subset_renders_only_the_chosen_frames_and_equals_the_full_load(tmp_path):
    d = _photo_dir(tmp_path)
    full = load_source(f"walk:{d}:12", "train", (24, 32), seed=2)
    idx = np.array([7, 0, 11, 3])
    part = load_source_subset(f"walk:{d}:12", "train", (24, 32), 2, idx)
    assert np.array_equal(part.rgb, full.rgb[idx]) and part.source == full.source
    assert source_length(f"walk:{d}:12", "train") == 12 and source_length(f"walk:{d}:12", "val") == 32
    assert source_length("synthetic:12", "train") is None  # not known without making the frames
    syn = load_source_subset("synthetic:12", "train", 16, 0, idx)
    assert np.array_equal(syn.rgb, load_source("synthetic:12", "train", 16, 0).rgb[idx])
    with pytest.raises(UserError, match="multiples of 8"):
        load_source_subset(f"walk:{d}:12", "train", (20, 32), 0, idx)


def test_walk_and_size_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="N >= 2"):
        load_source(f"walk:{_photo_dir(tmp_path)}:1", "train", (24, 32))
    with pytest.raises(UserError, match="photo folder not found"):
        load_source(f"walk:{tmp_path / 'nowhere'}", "train", (24, 32))
    with pytest.raises(UserError, match="multiples of 8"):
        load_source("synthetic:4", "train", (20, 32))


def test_images_are_cropped_to_the_aspect_not_squashed(tmp_path):
    import cv2

    d = tmp_path / "imgs"
    d.mkdir()
    im = np.zeros((100, 300, 3), np.uint8)
    im[:, 100:200] = 255  # a white centre third
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), im)
    fs = load_source(f"images:{d}", "train", (24, 32))
    assert fs.rgb.shape[1:] == (24, 32, 3) and fs.rgb.mean() > 150  # squashed, it would be ~85
