"""The room task set: its loss, every weighting on both task sets, training, export parity, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hmd import cli
from models.network import MultiTaskNet, NetConfig
from models.registry import TASK_SETS, WEIGHTINGS, create_weighting, get_task_set
from models.room_network import RoomNet, RoomNetConfig
from models.room_tasks import normals_loss

torch.set_num_threads(1)


def test_normals_loss_is_one_minus_abs_cos_by_hand():
    target = torch.tensor([0.6, 0.8, 0.0]).view(1, 3, 1, 1)
    along_x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # cos = 0.6
    assert float(normals_loss(along_x, target)) == pytest.approx(0.4, abs=1e-6)
    assert float(normals_loss(-3.0 * along_x, target)) == pytest.approx(0.4, abs=1e-6)  # |cos|, any length
    assert float(normals_loss(target * 2, target)) == pytest.approx(0.0, abs=1e-6)
    two = torch.cat([along_x, torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)], dim=3)  # cos 0.6 and 0
    assert float(normals_loss(two, torch.cat([target, target], dim=3))) == pytest.approx((0.4 + 1.0) / 2, abs=1e-6)


def _batch(task_set: str, n: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(0)
    if task_set == "cifar":
        x = torch.rand(n, 1, size, size, generator=g)
        return MultiTaskNet(NetConfig(num_classes=3, width=4, decoder_width=8)), x, {
            "class": torch.randint(0, 3, (n,), generator=g), "colour": torch.rand(n, 3, size, size, generator=g),
            "edges": (torch.rand(n, 1, size, size, generator=g) > 0.8).float(), "denoised": x.clone()}
    net = RoomNet(RoomNetConfig(width=4, decoder_width=8, num_keypoints=5))
    o = size // 4
    normals = torch.nn.functional.normalize(torch.randn(n, 3, o, o, generator=g), dim=1)
    return net, torch.rand(n, 3, size, size, generator=g), {
        "depth": 1 + 4 * torch.rand(n, 1, o, o, generator=g), "normals": normals,
        "keypoints": torch.rand(n, 5, o, o, generator=g)}


@pytest.mark.parametrize("task_set", TASK_SETS.names())
@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_method_steps_on_every_task_set(name, task_set):
    torch.manual_seed(0)
    model, x, targets = _batch(task_set)
    model.train()
    method = create_weighting(name, get_task_set(task_set))
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    opt = torch.optim.Adam(list(model.parameters()) + method.main_parameters(), lr=1e-2)
    logs = method.step(model, x, targets)
    opt.step()
    assert {k for k in logs if k.startswith("loss_")} == {f"loss_{t}" for t in model.tasks}
    assert all(np.isfinite(v) for v in logs.values())
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.state_dict().items()
               if k in before and not torch.equal(v, before[k])}
    assert {f"heads.{t}_head" for t in model.tasks} <= changed and "encoder.stem" in changed


def test_room_training_exports_with_parity_and_the_manifest_names_the_task_set(tmp_path):
    from models.export_run import export_run
    from models.train import TrainConfig, train
    from shared.manifest import Manifest

    cfg = TrainConfig(method="great", tasks="room", data="rooms:4:bare", size=32, width=4, decoder_width=8,
                      epochs=1, batch_size=2, threads=1)
    metrics = train(cfg, tmp_path / "run", log=lambda s: None)
    final = metrics["final"]
    assert set(final) == {"rmse_depth", "normals_1_minus_cos", "normals_mean_angle_deg", "rmse_keypoints"}
    assert 0 < final["rmse_depth"] < 10 and 0 <= final["normals_1_minus_cos"] <= 1
    manifest = export_run(tmp_path / "run", tmp_path / "room.onnx", frames=2)
    assert manifest.metrics["export_parity_max_abs"] <= 1e-4
    saved = Manifest.load(tmp_path / "room.manifest.json")
    assert saved.task_set == "room" and saved.input.channels == 3 and saved.input.colour == "rgb"
    assert [(o.task, o.shape) for o in saved.outputs] == [
        ("depth", [1, 1, 8, 8]), ("normals", [1, 3, 8, 8]), ("keypoints", [1, 32, 8, 8])]
    assert saved.input.noise.salt_pepper == 0 and saved.input.noise.speckle == 0  # clean RGB input


@pytest.mark.parametrize("data, message", [
    ("rooms:1", "rooms source needs N >= 2, got 1"),
    ("rooms:10:castle", "'castle' is neither a count nor a style"),
    ("synthetic:10", "the room task set trains on rooms[:N][:STYLE], got 'synthetic:10'"),
])
def test_bad_room_sources_are_one_clear_line(tmp_path, capsys, data, message):
    code = cli.main(["train", "--tasks", "room", "--data", data, "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_cifar_sources_point_a_rooms_user_to_the_room_task_set(tmp_path, capsys):
    code = cli.main(["train", "--data", "rooms:10", "--out", str(tmp_path / "run")])
    assert code == 2 and "--tasks room" in capsys.readouterr().err


def test_room_metrics_json_names_its_task_set(tmp_path):
    from models.train import TrainConfig, train

    cfg = TrainConfig(method="gradnorm", tasks="room", data="rooms:2:bare", size=16, width=4, decoder_width=8,
                      epochs=1, batch_size=2, threads=1)
    train(cfg, tmp_path, log=lambda s: None)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tasks"] == "room" and saved["task_weights"].keys() == {"depth", "normals", "keypoints"}
    assert saved["method_options"] == {"alpha": 1.5}  # GradNorm's alpha on NYUv2 (the paper)


def test_room_real_refuses_a_model_that_is_not_a_room_model(capsys):
    assert cli.main(["bench", "room-real", "--model", "base"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base is not a room model (task set cifar)" in err
