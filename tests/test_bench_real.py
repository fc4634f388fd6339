"""`hmd bench real`: classical baselines by hand, the ratios, bad input."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hmd.bench_real import canny_edges, classical, corrupt, median3, read_footage, targets
from hmd.cli import main
from shared.errors import UserError


def _clip(path, n=6, size=(48, 64)):
    rng = np.random.default_rng(1)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    for i in range(n):
        im = np.zeros((*size, 3), np.uint8)
        im[:, : 20 + 3 * i] = (40, 160, 220)
        im[10:30, 30:50] = rng.integers(0, 255, 3)
        vw.write(im)
    vw.release()
    return path


def test_classical_tools_match_a_hand_computation():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = (200, 100, 50)  # a vertical step: gray 0 | 0.299*200 + 0.587*100 + 0.114*50 = 124.2
    noisy = np.full((8, 8), 0.5, np.float32)
    noisy[3, 3] = 1.0  # one salt pixel: the 3x3 median removes it
    out = classical(rgb, noisy)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    assert np.allclose(out["colour"], np.stack([gray] * 3))  # gray in three channels
    assert abs(out["colour"][0, 0, 7] - 124 / 255) < 1e-6
    assert np.allclose(out["denoised"][0], 0.5, atol=1 / 255)  # the salt pixel is gone
    assert out["edges"].shape == (1, 8, 8) and set(np.unique(out["edges"])) <= {0.0, 1.0}
    assert out["edges"][0, :, 3:5].any() and not out["edges"][0, :, :2].any()  # edges only at the step
    t = targets(rgb)
    assert np.allclose(t["colour"][:, 0, 7], np.array([200, 100, 50]) / 255)
    assert np.array_equal(t["edges"][0] * 255, canny_edges(rgb).astype(np.float32))
    assert np.allclose(median3(np.full((5, 5), 0.25, np.float32)), 64 / 255, atol=1e-6)


def test_corrupt_is_the_papers_noise():
    rng = np.random.default_rng(0)
    x = corrupt(np.full((200, 200), 0.5, np.float32), rng)
    sp = ((x == 0) | (x == 1)).mean()
    assert 0.03 < sp < 0.05  # 4 % salt and pepper
    rest = x[(x > 0) & (x < 1)]
    assert abs(rest.std() - 0.05) < 0.01  # speckle 0.1 on 0.5: x + x N(0, 0.1)


def test_bench_real_on_a_tiny_clip_writes_ratios_and_a_picture(tmp_path, capsys, tiny_camera_model):
    clip = _clip(tmp_path / "clip.avi")
    code = main(["bench", "real", "--video", str(clip), "--model", str(tiny_camera_model), "--max-frames", "4",
                 "--stride", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 4
    for t in ("colour", "edges", "denoised"):
        r = result[f"{t}/classical"]
        assert np.isclose(r, result["rmse"]["network"][t] / result["rmse"]["classical"][t])
    # an untrained camera decoder starts as "the gray frame": its colour equals the classical tool's
    assert abs(result["colour/classical"] - 1.0) < 0.05
    assert (tmp_path / "out" / "real.png").is_file() and (tmp_path / "out" / "real.json").is_file()


def test_bad_footage_is_one_clear_error(tmp_path):
    (tmp_path / "empty.avi").write_bytes(b"")
    with pytest.raises(UserError):
        read_footage(str(tmp_path / "empty.avi"), None, 10, 1, 0, 0)
    with pytest.raises(UserError, match="not found"):
        read_footage(str(tmp_path / "missing.mp4"), None, 10, 1, 0, 0)
    (tmp_path / "photos").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_footage(None, str(tmp_path / "photos"), 10, 1, 0, 0)
    assert main(["bench", "real", "--video", str(tmp_path / "missing.mp4")]) == 2
