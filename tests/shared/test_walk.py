"""The simulated head over real photos (shared/walk.py)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from shared.errors import UserError
from shared.walk import HeadWalk, fit_to, list_photos, load_photos, walk_seed


def _photos(tmp_path, n=3, size=(300, 400)):
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth colourful gradients + a few rectangles: texture the motion can be measured on
        yy, xx = np.mgrid[0:size[0], 0:size[1]]
        im = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, ((xx + yy) * (3 - i)) % 256], -1).astype(np.uint8)
        for _ in range(6):
            x0, y0 = rng.integers(0, size[1] - 60), rng.integers(0, size[0] - 60)
            im[y0:y0 + 50, x0:x0 + 50] = rng.integers(0, 255, 3)
        cv2.imwrite(str(tmp_path / f"p{i}.jpg"), im)
    return tmp_path


def test_frames_have_the_camera_size_and_aspect(tmp_path):
    walk = HeadWalk.from_folder(_photos(tmp_path), size=(120, 160), seed=1)
    f = walk.frame(0)
    assert f.shape == (120, 160, 3) and f.dtype == np.uint8


def test_deterministic_by_seed_and_index(tmp_path):
    photos = load_photos(_photos(tmp_path))
    a, b = HeadWalk(photos, size=(60, 80), seed=3), HeadWalk(photos, size=(60, 80), seed=3)
    assert np.array_equal(a.frame(17), b.frame(17))
    assert np.array_equal(a.frame(5), HeadWalk(photos, size=(60, 80), seed=3).frame(5))  # no hidden state
    assert not np.array_equal(a.frame(17), HeadWalk(photos, size=(60, 80), seed=4).frame(17))


def test_motion_is_smooth_within_a_shot_and_cuts_between_shots(tmp_path):
    photos = load_photos(_photos(tmp_path))
    walk = HeadWalk(photos, size=(60, 80), seed=0, shot_frames=50, blur=False, exposure=False, noise=False)
    centre = np.array([40.0, 30.0, 1.0])
    pts = []
    for i in range(50):
        hom, p = walk.homography(i)
        q = hom @ centre
        pts.append(q[:2] / q[2])
    steps = np.linalg.norm(np.diff(np.array(pts), axis=0), axis=1)
    photo_side = max(photos[0].shape[:2])
    assert steps.max() < 0.03 * photo_side  # no jumps: a few photo pixels a frame
    accel = np.linalg.norm(np.diff(np.array(pts), n=2, axis=0), axis=1)
    assert accel.max() < 0.25 * max(steps.max(), 1e-6) + 0.5  # velocity changes slowly
    # consecutive frames look alike; a cut to the next shot shows another photo
    same = np.abs(walk.frame(10).astype(int) - walk.frame(11).astype(int)).mean()
    cut = np.abs(walk.frame(49).astype(int) - walk.frame(50).astype(int)).mean()
    assert walk.homography(49)[1] != walk.homography(50)[1]
    assert same < cut


def test_noise_and_exposure_change_the_frame(tmp_path):
    photos = load_photos(_photos(tmp_path))
    plain = HeadWalk(photos, size=(60, 80), seed=0, blur=False, exposure=False, noise=False).frame(3)
    noisy = HeadWalk(photos, size=(60, 80), seed=0, blur=False, exposure=False, noise=True).frame(3)
    diff = noisy.astype(int) - plain.astype(int)
    assert 0.5 < np.abs(diff).mean() < 15  # sensor noise: present, small
    assert abs(diff.mean()) < 1.5  # zero-mean


def test_fit_to_crops_to_the_aspect_instead_of_squashing():
    im = np.zeros((100, 300, 3), np.uint8)
    im[:, 100:200] = 255  # a white centre third
    out = fit_to(im, (60, 80))
    assert out.shape == (60, 80, 3)
    # a 3:1 frame cropped to 4:3 keeps only the centre 133 columns: mostly the white band
    assert out[:, 20:60].min() == 255 and out.mean() > 150
    assert fit_to(np.zeros((480, 640), np.uint8), (120, 160)).shape == (120, 160)


def test_bad_folders_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        list_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_photos(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="could be read"):
        load_photos(tmp_path / "bad")


def test_walk_seed_depends_on_the_photos_not_the_path(tmp_path):
    a = _photos(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    b = tmp_path / "b"
    b.mkdir()
    for p in a.glob("*.jpg"):
        (b / p.name).write_bytes(p.read_bytes())
    assert walk_seed(a, 0) == walk_seed(b, 0)
    (b / "extra.jpg").write_bytes((a / "p0.jpg").read_bytes())
    assert walk_seed(a, 0) != walk_seed(b, 0)
