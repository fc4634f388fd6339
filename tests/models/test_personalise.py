import numpy as np
import pytest

import cv2
import torch

from models.personalise import (_resize, base_regressions, gate, personalise, split_wearer, teacher_labels,
                              wearer_score)
from models.train import TrainConfig, load_model, train
from shared.errors import UserError
from shared.worlds import render_scene

B = {"class_error_pct": 20.0, "rmse_colour": 0.2, "rmse_edges": 0.3, "rmse_denoised": 0.1}


def test_wearer_score_is_the_mean_relative_change():
    after = {"class_error_pct": 10.0, "rmse_colour": 0.1, "rmse_edges": 0.3, "rmse_denoised": 0.12}
    # (-0.5 + 0 + 0.2 - 0.10) / 4
    assert wearer_score(B, after) == pytest.approx((-0.5 + 0.0 + 0.2 - 0.1) / 4)
    no_class = {**B, "class_error_pct": None}
    assert wearer_score(no_class, {**after, "class_error_pct": None}) == pytest.approx((-0.5 + 0.0 + 0.2) / 3)


def test_base_regressions_use_relative_rmse_and_class_points():
    assert base_regressions(B, {**B, "rmse_colour": 0.203}, 0.02) == []
    assert base_regressions(B, {**B, "rmse_colour": 0.205}, 0.02) == ["rmse_colour 0.2000 -> 0.2050"]
    assert base_regressions(B, {**B, "class_error_pct": 21.9}, 0.02) == []
    assert len(base_regressions(B, {**B, "class_error_pct": 22.5}, 0.02)) == 1


def test_gate_needs_a_wearer_gain_and_no_base_loss():
    better = {**B, "rmse_colour": 0.15}
    ok, why = gate({"wearer": {"before": B, "after": better}, "base": {"before": B, "after": B}}, 0.02)
    assert ok and "better" in why
    ok, why = gate({"wearer": {"before": B, "after": B}, "base": {"before": B, "after": B}}, 0.02)
    assert not ok and "not better" in why
    ok, why = gate({"wearer": {"before": B, "after": better}, "base": {"before": B, "after": {**B, "rmse_edges": 0.4}}},
                   0.02)
    assert not ok and "rmse_edges" in why


def test_split_wearer_holds_out_the_later_frames_by_default():
    tr, va = split_wearer(20, 0.2)
    assert list(tr) == list(range(16)) and list(va) == [16, 17, 18, 19]  # judged on what comes later
    tr, va = split_wearer(20, 0.2, "interleaved")
    assert list(va) == [4, 9, 14, 19] and len(tr) == 16 and not set(tr) & set(va)
    with pytest.raises(UserError, match="unknown split"):
        split_wearer(20, 0.2, "random")


def test_personalise_records_both_evaluations_and_keeps_lineage(tmp_path):
    train(TrainConfig(method="equal", data="synthetic:64", epochs=1, batch_size=8, size=32, width=4,
                      decoder_width=8, max_steps_per_epoch=3), tmp_path / "base", log=lambda s: None)
    frames = np.stack([render_scene("forest", 3, i, 48)[0] for i in range(30)])  # resized to the model's 32
    res = personalise(tmp_path / "base", frames, tmp_path / "cand", base_data="synthetic:64", epochs=1,
                      max_steps_per_epoch=2, batch_size=8, log=lambda s: None)
    ev = res.evaluation
    assert set(ev) >= {"wearer", "base", "tolerance", "wearer_score"}
    assert ev["wearer"]["frames"] == 6 and ev["wearer"]["before"]["class_error_pct"] is None
    assert ev["base"]["before"]["class_error_pct"] is not None
    assert ev["tolerance"] == 0.05 and ev["split"] == "time"
    # the recorded decision is the gate's on the recorded evaluation (not a re-implementation of it)
    assert (res.accepted, res.reason) == gate(ev, ev["tolerance"])
    _, ck = load_model(res.run_dir)
    assert ck["parent"] == str(tmp_path / "base") and (tmp_path / "cand" / "personalise.json").is_file()
    with pytest.raises(UserError, match="at least 10"):
        personalise(tmp_path / "base", frames[:5], tmp_path / "x", base_data="synthetic:64")


def test_teacher_labels_are_the_teachers_confident_argmax(tmp_path):
    train(TrainConfig(method="equal", data="synthetic:16", epochs=1, batch_size=8, size=16, width=4,
                      decoder_width=8, max_steps_per_epoch=1), tmp_path / "t", log=lambda s: None)
    frames = np.stack([render_scene("studio", 5, i, 24)[0] for i in range(6)])  # resized to the teacher's 16
    model, _ = load_model(tmp_path / "t")
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in _resize(frames, 16, 16)])
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(gray[:, None].astype(np.float32) / 255.0))["class"], 1)
    assert teacher_labels(tmp_path / "t", frames, threshold=0.0).tolist() == probs.argmax(1).tolist()
    cut = float(probs.max(1).values.median())
    expect = [int(a) if c >= cut else -1 for a, c in zip(probs.argmax(1), probs.max(1).values)]
    assert teacher_labels(tmp_path / "t", frames, threshold=cut).tolist() == expect
    assert (teacher_labels(tmp_path / "t", frames, threshold=1.01) == -1).all()
