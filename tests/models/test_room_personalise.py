"""Room personalisation (issue 12, step 5): the teacher's labels, the gate, the cloud job, bad input."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

from models.room_network import RoomNet, RoomNetConfig
from models.room_personalise import judge, personalise_room, teacher_targets
from models.room_tasks import RoomTaskData, pool_targets
from shared.errors import UserError
from shared.rooms import RoomWalk, room_frames

TINY = dict(width=4, decoder_width=8)


def _rendered(n: int, style: str, split: str, side: int = 32) -> RoomTaskData:
    fr = room_frames(n, style, 0, side, split)
    depth, normals = pool_targets(fr)
    return RoomTaskData.from_arrays(fr.rgb, depth, normals, fr.heatmaps, f"rooms:{n}:{style}")


def _shift_depth(model: RoomNet, metres: float) -> RoomNet:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.heads["depth_head"].out.bias += metres
    return out.eval()


def test_the_gate_rejects_a_worse_room_model_and_accepts_a_better_one():
    torch.manual_seed(0)
    base = RoomNet(RoomNetConfig(**TINY)).eval()
    style_set, base_set = _rendered(4, "living", "test"), _rendered(3, "office", "val")
    x, tg = style_set.batch(torch.arange(len(style_set)))
    with torch.no_grad():
        bias = float((tg["depth"] - base(x)["depth"]).mean())  # the least-squares depth offset on the style set
    better, worse = _shift_depth(base, bias), _shift_depth(base, 2.0 * abs(bias) + 1.0)
    ok, reason, ev = judge(base, better, style_set, base_set, tolerance=0.05, style_name="living")
    assert ok, reason
    assert ev["style"]["after"]["rmse_depth"] < ev["style"]["before"]["rmse_depth"]
    assert ev["style"]["after"]["normals_1_minus_cos"] == pytest.approx(ev["style"]["before"]["normals_1_minus_cos"])
    ok, reason, _ = judge(base, worse, style_set, base_set, tolerance=0.05, style_name="living")
    assert not ok and reason.startswith("not better on held-out living rooms")


def test_teacher_targets_are_at_the_students_resolution_with_unit_normals():
    torch.manual_seed(0)
    teacher = RoomNet(RoomNetConfig(width=4, decoder_width=8)).eval()
    frames = room_frames(2, "bare", 0, 32, "val").rgb
    t = teacher_targets(teacher, 48, frames, (8, 8))  # seen at 48 px (12x12 outputs), resampled to 8x8
    assert t["depth"].shape == (2, 1, 8, 8) and t["keypoints"].shape[2:] == (8, 8)
    assert np.allclose(np.linalg.norm(t["normals"], axis=1), 1.0, atol=1e-4)
    with torch.no_grad():
        x = torch.from_numpy(cv2.resize(frames[0], (48, 48), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)[None])
        full = teacher(x.float() / 255.0)["depth"]
    assert t["depth"][0].mean() == pytest.approx(float(full.mean()), rel=1e-4)  # area resampling keeps the mean


@pytest.fixture(scope="module")
def tiny_room_runs(tmp_path_factory):
    """Untrained base (width 4) and teacher (width 8) room run folders, as `hmd train --tasks room` writes
    them (the checkpoint fields personalisation and export read); no training: it is not what is tested."""
    from models.checkpoints import MULTITASK_FORMAT, save_checkpoint
    from models.train import TrainConfig

    root = tmp_path_factory.mktemp("room-runs")
    runs = {}
    for name, width in (("base", 4), ("teacher", 8)):
        torch.manual_seed(width)
        net = RoomNet(RoomNetConfig(width=width, decoder_width=8))
        cfg = TrainConfig(tasks="room", method="great", data="rooms:6", size=32, width=width, decoder_width=8,
                          blocks=net.cfg.blocks)
        (root / name).mkdir()
        save_checkpoint(root / name / "checkpoint.pt", {
            "format": MULTITASK_FORMAT, "arch": net.cfg.to_dict(), "model": net.state_dict(), "method_name": "great",
            "epoch": 1, "config": cfg.to_dict(), "history": [], "class_names": [], "input_size": [32, 32],
            "source": "rooms:6", "task_set": "room", "parent": None, "command": "test"})
        runs[name] = root / name
    return runs


def _walk(n: int, style: str = "living") -> np.ndarray:
    walk = RoomWalk(style, size=(24, 32))
    return np.stack([walk.render(5 * i).rgb for i in range(n)])


def test_room_personalisation_bad_input_is_one_clear_line(tiny_room_runs, tmp_path):
    runs = tiny_room_runs
    with pytest.raises(UserError, match="at least 10 wearer frames"):
        personalise_room(runs["base"], _walk(4), tmp_path / "a", teacher_run=runs["teacher"])
    with pytest.raises(UserError, match="unknown room style 'kitchen'"):
        personalise_room(runs["base"], _walk(10), tmp_path / "b", teacher_run=runs["teacher"], style="kitchen")
    with pytest.raises(UserError, match="not a rooms source"):
        personalise_room(runs["base"], _walk(10), tmp_path / "c", teacher_run=runs["teacher"], base_data="synthetic:8")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written for bad input


def test_hmd_personalise_refuses_a_style_for_a_cifar_model_and_an_unknown_one(tiny_room_runs, tmp_path, capsys):
    from hmd.cli import main

    assert main(["personalise", str(tiny_room_runs["base"]), "--data", "rooms:living:12", "--style", "kitchen",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["personalise", "base", "--data", "rooms:living:12", "--style", "living",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "kitchen" in err[0] and "room model" in err[-1] and not (tmp_path / "o").exists()


def test_the_cloud_job_on_a_room_manifest_produces_a_room_manifest(tiny_room_runs, tmp_path, monkeypatch):
    """The real job runner: a device on a room base model uploads its walk; the job labels the frames
    with the room teacher, trains, gates and signs a room model at the base's camera aspect."""
    from fastapi.testclient import TestClient

    from cloud.app import create_app
    from cloud.personalisation import personalise_job
    from cloud.settings import Settings
    from models.checkpoints import save_checkpoint
    from models.train import read_checkpoint
    from shared.manifest import Manifest
    from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive
    from tests.cloud.conftest import provision, wait_for

    import models.room_personalise as rp
    import models.room_tasks as rt

    import models.room_style as rs

    for module, name in ((rp, "STYLE_FRAMES"), (rs, "DATASET_FRAMES"), (rt, "EXPORT_FRAMES")):
        monkeypatch.setattr(module, name, 4)  # fewer rendered rooms: the flow is tested, not the figures
    monkeypatch.setattr(rs, "TRAIN_WALKS", range(1000, 1001))
    base = tmp_path / "base"
    base.mkdir()
    ck = read_checkpoint(tiny_room_runs["base"])
    save_checkpoint(base / "checkpoint.pt", dict(ck, export_size=[24, 32]))  # a camera-aspect room model
    settings = Settings(data_dir=tmp_path / "data", auto_job_frames=12, base_run=base,
                        teacher_run=tiny_room_runs["teacher"], epochs=1, max_steps_per_epoch=1, batch_size=8)
    frames = []
    for i, rgb in enumerate(_walk(12)):
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames.append(({"seq": i, "width": 32, "height": 24, "reason": "every-k"}, jpg.tobytes()))
    with TestClient(create_app(settings, runner=personalise_job)) as c:
        token = provision(settings.data_dir, "wearer1")
        head = {"Authorization": f"Bearer {token}"}
        r = c.post("/v1/uploads", content=build_upload_archive(frames), headers={**head, "Content-Type": UPLOAD_CONTENT_TYPE})
        job_id = r.json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=head).json())["state"]
                       in ("accepted", "rejected", "failed") and j, timeout=120, what="the room job")
        assert job["state"] == "accepted", job.get("reason")
        ev = job["evaluation"]
        assert ev["task_set"] == "room" and ev["style"]["frames"] == 4 and ev["teacher"] == str(tiny_room_runs["teacher"])
        # trained and judged at the size the headset runs it (its export size), not the square side
        assert "32x24" in ev["style"]["source"] and "32x24" in ev["base"]["source"]
        m = Manifest.from_bytes(c.get(f"/v1/models/{job['result_version']}/manifest", headers=head).content)
    assert m.task_set == "room" and (m.input.height, m.input.width) == (24, 32)
    assert [o.task for o in m.outputs] == ["depth", "normals", "keypoints"]
    assert m.training["role"] == "personalised" and m.parent_version.startswith("base-")


def test_a_room_fine_tune_keeps_batchnorm_statistics_and_the_layers_it_does_not_train(tiny_room_runs, tmp_path,
                                                                                      monkeypatch):
    """Frozen BatchNorm: the candidate's running statistics are its parent's (a narrow batch of one room's
    frames would otherwise re-normalise the network); ``--fine-tune last`` leaves the stem and the early
    stages as they were and moves the heads; the mirrored wearer frames and the styled replay are trained on."""
    import json

    import models.room_personalise as rp
    from models.train import read_checkpoint

    monkeypatch.setattr(rp, "STYLE_FRAMES", 4)
    res = personalise_room(tiny_room_runs["base"], _walk(10), tmp_path / "run", teacher_run=tiny_room_runs["teacher"],
                           style="living", epochs=1, max_steps_per_epoch=2, batch_size=8, lr=1e-2, warmup_steps=0,
                           replay_ratio=0.5, style_replay=0.5, mirror=True, trainable=rp.FINE_TUNED["last"])
    before, after = read_checkpoint(tiny_room_runs["base"])["model"], read_checkpoint(res.run_dir)["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10 and all(torch.equal(before[k], after[k]) for k in stats)
    assert torch.equal(before["encoder.stem.0.weight"], after["encoder.stem.0.weight"])
    assert torch.equal(before["encoder.stages.3.0.conv1.weight"], after["encoder.stages.3.0.conv1.weight"])
    assert not torch.equal(before["heads.depth_head.out.weight"], after["heads.depth_head.out.weight"])
    assert not torch.equal(before["encoder.stages.4.0.conv1.weight"], after["encoder.stages.4.0.conv1.weight"])
    # 8 earlier frames + their 8 mirrors; 8 replayed, half of them rendered living rooms
    data = json.loads((res.run_dir / "metrics.json").read_text())["data"]
    assert data == "wearer(8 frames + mirrored, teacher labels)+replay(4 of rooms:6, 4 of rooms:living)"
    with pytest.raises(UserError, match="style replay 1.5 must be in"):
        personalise_room(tiny_room_runs["base"], _walk(10), tmp_path / "bad", teacher_run=tiny_room_runs["teacher"],
                         style="living", style_replay=1.5)


def test_style_inference_names_the_style_of_frames_like_its_training_frames(monkeypatch):
    """The style classifier (a small one here: 24 dataset views and 3 walks per style) names each
    style from frames of its own rooms, and the log-likelihoods rank that style first."""
    import models.room_style as rs
    from shared.rooms import STYLES, room_frames

    monkeypatch.setattr(rs, "DATASET_FRAMES", 24)
    monkeypatch.setattr(rs, "TRAIN_WALKS", range(1000, 1003))
    for style in STYLES:
        frames = room_frames(8, style, 0, rs.SIDE, "train").rgb
        ll = rs.style_log_likelihoods(frames)
        assert set(ll) == set(STYLES) and rs.infer_style(frames) == style == max(ll, key=ll.get)


def test_logistic_regression_fits_separable_classes():
    import models.room_style as rs

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    y = np.repeat(np.arange(3), 50)
    x = centres[y] + rng.normal(0, 0.5, (150, 2))
    mu, sd, w, b = rs.fit_logistic(x, y, 3)
    assert ((((x - mu) / sd) @ w + b).argmax(1) == y).mean() > 0.97
