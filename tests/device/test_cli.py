"""`hmd device` end to end: bad input gives one clear line and a non-zero exit; a good run writes
the summary, the metrics file and the recording."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from hmd.cli import main
from shared.manifest import Manifest
from tests.device.conftest import ROOT


def _hmd(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DISPLAY", None)
    return subprocess.run([sys.executable, "-m", "hmd", "device", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(capsys, argv, match):
    assert main(["device", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hmd device: error: ") and match in err, err


def test_missing_model(capsys, tmp_path):
    _one_error_line(capsys, ["--model", tmp_path / "none.onnx", "--headless"], "model not found")
    _one_error_line(capsys, ["--headless"], "--model FILE.onnx is required")


def test_corrupt_model_and_mismatching_manifest(capsys, toy):
    folder = toy("v1")
    (folder / "model.onnx").write_bytes(b"not onnx")
    _one_error_line(capsys, ["--model", folder / "model.onnx", "--headless"], "does not match its manifest")
    folder = toy("v2")
    m = Manifest.load(folder / "manifest.json")
    m.outputs[0].name = "logits"
    m.save(folder / "manifest.json")
    _one_error_line(capsys, ["--model", folder, "--headless"], "'logits' declared in the manifest is not in the graph")


def test_unreadable_video_missing_folder_bad_source(capsys, toy, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(os.urandom(3000))
    model = toy("v1")
    _one_error_line(capsys, ["--model", model, "--source", f"video:{bad}"], "cannot read video")
    _one_error_line(capsys, ["--model", model, "--source", f"images:{tmp_path / 'no'}"], "image folder not found")
    _one_error_line(capsys, ["--model", model, "--source", "kinect"], "unknown source")
    _one_error_line(capsys, ["--model", model, "--watch", tmp_path / "nowhere"], "watch folder not found")


def test_nonexistent_webcam_in_a_subprocess(toy):
    proc = _hmd("--model", toy("v1"), "--source", "webcam:57", "--headless", "--max-frames", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["hmd device: error: webcam 57 could not be opened "
                                                "(no such camera, or it is in use)"]
    assert proc.stdout == ""


def test_a_full_run_prints_the_summary_and_writes_metrics_and_video(toy, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, v in enumerate([40, 120, 200]):
        cv2.imwrite(str(images / f"{i}.png"), np.full((48, 64, 3), v, np.uint8))
    out, metrics = tmp_path / "out.mp4", tmp_path / "metrics.json"
    proc = _hmd("--model", toy("v1"), "--source", f"images:{images}", "--loop", "--lockstep", "--fps", "0",
                "--mode", "denoised", "--no-hud", "--max-frames", 12, "--record", out, "--metrics", metrics,
                "--headless")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads(metrics.read_text())
    assert summary["frames_shown"] == 12 and summary["camera_frames_dropped"] == 0
    assert summary["exit_reason"] == "max frames" and summary["model_versions"] == ["v1"]
    for stage in ("capture_wait", "preprocess", "inference", "overlay"):
        lat = summary["latency_ms"][stage]
        assert lat["n"] == 12 and 0 <= lat["p50"] <= lat["p95"] <= lat["max"]
    assert summary["record"] == {"path": str(out), "frames": 12}
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3)
    # denoised = 1 - x: the recording shows the inverted gray levels 215, 135, 55 in turn
    assert [round(float(f[16:32, 16:48].mean())) for f in frames[:3]] == pytest.approx([215, 135, 55], abs=4)


def test_a_source_that_ends_ends_the_run_cleanly(toy, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    proc = _hmd("--model", toy("v1"), "--source", f"images:{images}", "--lockstep", "--fps", "0", "--headless")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["frames_shown"] == 4 and summary["exit_reason"].startswith("source ended")
