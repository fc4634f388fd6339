"""`hmd device` end to end: bad input gives one clear line and a non-zero exit; a good run prints a
start line on stderr and a short summary on stdout (the JSON with --json), and writes the metrics
file, the recording and the snapshot."""
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
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("OPENCV_FFMPEG_LOGLEVEL", None)  # set by the in-process runs of `hmd device` in this session
    return subprocess.run([sys.executable, "-m", "hmd", "device", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(capsys, argv, match):
    assert main(["device", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hmd device: error: ") and match in err, err


def test_missing_model(capsys, tmp_path):
    _one_error_line(capsys, ["--model", tmp_path / "none.onnx", "--headless"], "model not found")
    _one_error_line(capsys, ["--model", "no-such-shipped-model", "--headless"], "shipped models: base")


def test_without_a_model_the_shipped_base_model_runs(capsys, tmp_path):
    metrics = tmp_path / "m.json"
    assert main(["device", "--headless", "--source", "synthetic", "--fps", "0", "--max-frames", "3",
                 "--metrics", str(metrics)]) == 0
    summary = json.loads(metrics.read_text())
    assert summary["frames_shown"] == 3 and summary["model_versions"] == ["base-v1"]
    assert "model base-v1" in capsys.readouterr().err  # the start line names it


def test_corrupt_model_and_mismatching_manifest(capsys, toy):
    folder = toy("v1")
    (folder / "model.onnx").write_bytes(b"not onnx")
    _one_error_line(capsys, ["--model", folder / "model.onnx", "--headless"], "does not match its manifest")
    folder = toy("v2")
    m = Manifest.load(folder / "manifest.json")
    m.outputs[0].name = "logits"
    m.save(folder / "manifest.json")
    _one_error_line(capsys, ["--model", folder, "--headless"], "'logits' declared in the manifest is not in the graph")


def test_a_training_run_folder_points_at_hmd_export(capsys, tmp_path):
    run = tmp_path / "runs" / "base"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"a torch checkpoint")
    (run / "metrics.json").write_text("{}")
    _one_error_line(capsys, ["--model", run, "--headless"],
                    f"{run} is a training run folder (checkpoint.pt), not an exported model: "
                    f"run `hmd export {run} --out model.onnx`, then --model model.onnx")


def test_a_truncated_mp4_gives_only_our_line_not_ffmpegs(toy, tmp_path):
    """An MP4 without its index: FFmpeg itself logs "moov atom not found" unless silenced (in a
    subprocess: OpenCV reads the FFmpeg log level once per process)."""
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + os.urandom(3000))
    proc = _hmd("--model", toy("v1"), "--source", f"video:{bad}", "--headless")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"hmd device: error: cannot read video {bad}: not a video OpenCV can decode"]
    assert proc.stdout == ""
    loud = _hmd("-v", "--model", toy("v1"), "--source", f"video:{bad}", "--headless")  # -v lets FFmpeg speak
    assert loud.returncode == 2 and "moov atom not found" in loud.stderr


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
                "--headless", "--json")
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
    proc = _hmd("--model", toy("v1"), "--source", f"images:{images}", "--lockstep", "--fps", "0", "--headless",
                "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["frames_shown"] == 4 and summary["exit_reason"].startswith("source ended")


def test_headless_run_says_what_runs_and_how_to_stop_then_a_short_summary(toy, tmp_path):
    """No display and no --headless: the start line says it fell back to headless; stdout gets a
    few human lines, not the JSON; --snapshot writes the last frame with the HUD band above it."""
    model = toy("v1")
    snap, video = tmp_path / "last.png", tmp_path / "run.mp4"
    proc = _hmd("--model", model, "--source", "synthetic:studio", "--size", "96x64", "--fps", "0",
                "--max-frames", 5, "--mode", "side-by-side", "--snapshot", snap, "--record", video)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"hmd device: model v1 ({model / 'model.onnx'}) on synthetic:studio 96x64, side-by-side view, headless "
        f"(no display: DISPLAY and WAYLAND_DISPLAY are not set); ends after 5 frames; Ctrl+C stops it"]
    lines = proc.stdout.splitlines()
    assert 3 <= len(lines) <= 5, proc.stdout
    assert lines[0].startswith("hmd device: 5 frames in ") and lines[0].endswith("ended: max frames")
    assert lines[1].startswith("  latency p50/p95 ms: total ")
    assert lines[2] == "  model v1 (used: v1; 0 swaps, 0 rollbacks); headless"
    assert lines[-1] == f"  recorded {video} (5 frames); snapshot {snap}"
    image = cv2.imread(str(snap))
    from device import overlay
    assert image.shape == (64 + overlay.hud_height(96, 64), 96, 3)
    ok, first = cv2.VideoCapture(str(video)).read()  # the HUD band is in the recording, no row lost
    assert ok and first.shape == image.shape


def test_quiet_prints_nothing_but_metrics_still_written(toy, tmp_path):
    metrics = tmp_path / "m.json"
    proc = _hmd("-q", "--model", toy("v1"), "--source", "synthetic", "--size", "64x48", "--fps", "0",
                "--max-frames", 3, "--metrics", metrics)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    summary = json.loads(metrics.read_text())
    assert summary["frames_shown"] == 3 and summary["display"] == "headless"
    assert summary["headless_reason"].startswith("no display")


def test_the_human_summary_shows_the_sync_section():
    from device.cli import human_summary

    summary = {"frames_shown": 3, "duration_s": 1.0, "fps": 3.0, "camera_frames_dropped": 0,
               "camera_frames_captured": 3, "exit_reason": "max frames", "latency_ms": {},
               "model": {"events": [], "active": "v1"}, "model_versions": ["v1"], "inference_errors": 0,
               "display": "headless",
               "sync": {"cloud": "http://127.0.0.1:9", "token_rejected": False, "uploads": 2, "frames": 10,
                        "bytes": 2_000_000, "versions_received": ["v2"], "refused_batches": 0}}
    assert human_summary(summary)[-1] == ("  cloud http://127.0.0.1:9: 2 uploads, 10 frames (2.0 MB), "
                                          "1 versions received, 0 batches refused")
    summary["sync"]["token_rejected"] = True
    assert "token rejected" in human_summary(summary)[-1]
