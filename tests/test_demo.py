"""The whole loop, shortened: cloud + headset + personalisation + push + hot-swap + summary."""
import json
import subprocess
import sys

import cv2
import pytest


@pytest.mark.slow(seconds=150)
def test_quick_demo_trains_pushes_verifies_and_swaps(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "hmd", "demo", "--quick", "--teacher-run", "", "--out", str(out)],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    versions = summary["versions_served"]
    # a new version was trained by the cloud, pushed, verified (signed, hashed) and swapped in live
    assert len(versions) >= 2 and versions[0] == summary["base_version"] and summary["new_version"] in versions
    assert summary["job"]["state"] == "accepted" and summary["job"]["result_version"] == summary["new_version"]
    assert summary["swapped_at_frame"] is not None and summary["swapped_at_frame"] > 0
    assert summary["headset"]["frames_without_overlay"] == 0 and summary["headset"]["inference_errors"] == 0
    headset = json.loads((out / "headset.json").read_text())
    assert summary["new_version"] in headset["model_versions"]
    # the before/after table holds real values for both versions and the classical tools on the wearer's
    # later views of real photos and on the base model's real validation set
    assert summary["scene"].startswith("walk:") and set(summary["table"]) == {
        "wearer, later views", "base validation (real photos)"}
    for name, rows in summary["table"].items():
        for v in (summary["base_version"], summary["new_version"], "classical tools"):
            assert 0 < rows[v]["rmse_colour"] < 1 and 0 < rows[v]["rmse_denoised"] < 1
        ratio = summary["ratio_to_classical"][name][summary["base_version"]]["rmse_edges"]
        assert abs(ratio - rows[summary["base_version"]]["rmse_edges"] / rows["classical tools"]["rmse_edges"]) < 1e-9
    assert isinstance(summary["improved"], bool) and summary["verdict"]
    # the recording has the frames the headset showed, and the plot is a real PNG
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert frames == summary["headset"]["frames_shown"] > 0
    plot = cv2.imread(str(out / "metrics.png"))
    assert plot is not None and plot.shape[0] > 200 and plot.std() > 5
    assert "versions served" in r.stdout and "classical tools" in r.stdout


def test_demo_refuses_a_foreign_out_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "hmd", "demo", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is not a demo folder" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
