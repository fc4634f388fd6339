"""`hmd personalise`: the cloud job offline, end to end on a short clip."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hmd.cli import main
from models.train import load_model
from shared.hashing import read_key, verify
from shared.manifest import Manifest


def _clip(path, n=40, size=(96, 128)):
    """A strongly coloured clip (the untrained camera decoder shows it gray): easy to personalise to."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    for i in range(n):
        im = np.zeros((*size, 3), np.uint8)
        im[:] = (200, 90, 30)  # BGR: a blue scene
        cv2.rectangle(im, (10 + i, 20), (50 + i, 60), (20, 180, 240), -1)  # an orange box moving right
        vw.write(im)
    vw.release()
    return path


def _photos(tmp_path):
    d = tmp_path / "base-photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(d / f"{i}.jpg"), cv2.GaussianBlur(rng.integers(0, 255, (96, 128, 3)).astype(np.uint8), (0, 0), 2))
    return d


@pytest.mark.slow(seconds=30)
def test_personalise_trains_on_the_start_judges_on_the_end_and_signs_the_export(tmp_path, capsys, tiny_camera_run):
    clip, photos, out = _clip(tmp_path / "wearer.avi"), _photos(tmp_path), tmp_path / "out"
    code = main(["personalise", str(tiny_camera_run), "--data", f"video:{clip}", "--out", str(out),
                 "--stride", "1", "--epochs", "2", "--max-steps", "4", "--batch-size", "8", "--lr", "5e-3",
                 "--base-data", f"walk:{photos}:16", "--base-val-data", f"walk:{photos}:16", "--tolerance", "10"])
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "personalise.json").read_text())
    ev = saved["evaluation"]
    assert ev["split"] == "time" and ev["wearer"]["frames"] == 8  # the last 20 % of 40 frames
    assert ev["base_set"] == f"walk:{photos}:16"  # the gate's guard: the base model's own validation set
    assert code == 0 and report["accepted"] and saved["accepted"]
    assert ev["wearer"]["after"]["rmse_colour"] < ev["wearer"]["before"]["rmse_colour"]
    manifest = Manifest.load(out / "model.manifest.json")
    assert manifest.input.height == 48 and manifest.input.width == 64  # the model's camera aspect
    manifest.check_file(out / "model.onnx")
    unsigned = manifest.model_copy(update={"signature": None})
    assert verify(read_key(out / "signing.pub"), unsigned.canonical_bytes(), manifest.signature)
    _, ck = load_model(out / "run")
    assert ck["config"]["base_data"] == f"walk:{photos}:16"  # a later personalisation replays the same base data


def test_personalise_refuses_a_clip_shorter_than_the_split(tmp_path, capsys, tiny_camera_run):
    clip = _clip(tmp_path / "short.avi", n=6)
    assert main(["personalise", str(tiny_camera_run), "--data", f"video:{clip}", "--out", str(tmp_path / "o"),
                 "--stride", "1"]) == 2
    assert "shorter than the split" in capsys.readouterr().err
    (tmp_path / "empty.avi").write_bytes(b"")
    assert main(["personalise", str(tiny_camera_run), "--data", f"video:{tmp_path / 'empty.avi'}",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["personalise", "no-such-model", "--data", f"video:{clip}", "--out", str(tmp_path / "o")]) == 2
    assert "shipped model" in capsys.readouterr().err
