import json
import subprocess
import sys

import pytest
import torch

from models.train import CHECKPOINT_NAME, TrainConfig, load_model, read_checkpoint, train
from tests.models.fixtures import write_image_folder, write_video

QUIET = lambda s: None  # noqa: E731


def cfg(**kw):
    base = dict(method="great", data="synthetic:48", epochs=2, batch_size=8, size=32, width=4, decoder_width=8,
                max_steps_per_epoch=2)
    base.update(kw)
    return TrainConfig(**base)


def test_metrics_have_the_table4_columns_and_history(tmp_path):
    m = train(cfg(), tmp_path, log=QUIET)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"] == m["final"]
    assert set(m["final"]) == {"class_error_pct", "rmse_colour", "rmse_edges", "rmse_denoised"}
    assert 0 <= m["final"]["class_error_pct"] <= 100 and 0 < m["final"]["rmse_colour"] < 1
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert all(v is not None and v > 0 for v in m["normalisers"].values())


def test_seeded_runs_are_identical(tmp_path):
    a = train(cfg(method="gradnorm"), tmp_path / "a", log=QUIET)
    b = train(cfg(method="gradnorm"), tmp_path / "b", log=QUIET)
    assert a["final"] == b["final"]
    c = train(cfg(method="gradnorm", seed=1), tmp_path / "c", log=QUIET)
    assert c["final"] != a["final"]


def test_resume_equals_an_uninterrupted_run_and_keeps_the_normalisers(tmp_path):
    full = train(cfg(epochs=2), tmp_path / "full", log=QUIET)
    train(cfg(epochs=1), tmp_path / "part", log=QUIET)
    first = read_checkpoint(tmp_path / "part")
    j0 = first["method"]["normalisers.initial"].clone()
    # a resumed run may extend the schedule only if the config matches; epochs is the target
    resumed = train(cfg(epochs=2), tmp_path / "part", resume=True, log=QUIET)
    # epoch 1 of "part" ran with the 1-epoch schedule (lr multiplier 1 either way at e=0)
    assert resumed["final"] == full["final"]
    after = read_checkpoint(tmp_path / "part")
    assert torch.equal(after["method"]["normalisers.initial"], j0)
    assert after["epoch"] == 2


def test_unlabelled_frames_train_the_dense_tasks(tmp_path):
    video = write_video(tmp_path / "v.avi", frames=40)
    m = train(cfg(data=f"video:{video}", method="great"), tmp_path / "run", log=QUIET)
    assert m["final"]["class_error_pct"] is None
    assert m["normalisers"]["class"] is None and m["normalisers"]["colour"] > 0
    assert m["history"][-1]["train"]["loss_colour"] > 0


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    train(cfg(epochs=1), tmp_path / "base", log=QUIET)
    base, _ = load_model(tmp_path / "base")
    m = train(cfg(epochs=1, max_steps_per_epoch=1, init_from=str(tmp_path / "base"), lr=1e-9), tmp_path / "ft",
              log=QUIET)
    ft, ck = load_model(tmp_path / "ft")
    assert ck["parent"] == str(tmp_path / "base")
    for a, b in zip(base.parameters(), ft.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hmd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["train", "--method", "magic", "--out", "X"], "invalid choice: 'magic'"),
    (["train", "--data", "cifar10:/no/such/dir", "--out", "X"], "CIFAR-10 folder not found"),
    (["train", "--data", "images:/no/such", "--out", "X"], "image folder not found"),
    (["train", "--epochs", "0", "--out", "X"], "--epochs must be >= 1"),
    (["export", "/no/run", "--out", "m.onnx"], "no checkpoint"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, needle):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_rejects_a_checkpoint_of_another_architecture(tmp_path):
    torch.save({"format": "great-hmd-checkpoint/1", "arch": {"num_classes": 6, "widht": 3}, "model": {}},
               tmp_path / CHECKPOINT_NAME)
    r = run_cli("export", str(tmp_path), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "does not match the multi-task architecture" in r.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CHECKPOINT_NAME).write_bytes(b"junk")
    r = run_cli("train", "--out", str(tmp_path / "junk"), "--resume")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr


def test_cli_trains_from_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    r = run_cli("train", "--method", "uncertainty", "--data", f"images:{root}", "--epochs", "1", "--size", "32",
                "--width", "4", "--batch-size", "4", "--max-steps", "2", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr  # progress output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["class_names"] == ["a", "b"] and m["final"]["class_error_pct"] is not None


def test_freeze_bn_keeps_running_statistics(tmp_path):
    train(cfg(epochs=1), tmp_path / "base", log=QUIET)
    base, _ = load_model(tmp_path / "base")
    train(cfg(epochs=1, init_from=str(tmp_path / "base"), freeze_bn=True, data="synthetic:48:forest"),
          tmp_path / "ft", log=QUIET)
    ft, _ = load_model(tmp_path / "ft")
    bn = [(n, b) for n, b in base.named_buffers() if "running_mean" in n]
    ft_buffers = dict(ft.named_buffers())
    assert bn and all(torch.equal(b, ft_buffers[n]) for n, b in bn)
    weights_moved = any(not torch.equal(a, b) for a, b in zip(base.parameters(), ft.parameters()))
    assert weights_moved
