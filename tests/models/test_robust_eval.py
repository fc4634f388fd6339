"""Issue 14/16: AutoAttack and the masking checks, `hmd attack` on both kinds of run, the
mnist / fashion-mnist sources, `hmd bench table5`, the defence-schedule warning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hmd.cli import main
from models.autoattack import autoattack_report, masking_checks, verdict
from models.data import load_source
from models.labelled import load_labelled
from tests.models.test_idx_data import write_idx_folder

torch.set_num_threads(1)
FASHION = Path("/usr/share/datasets/fashion-mnist")


def linear_net(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, classes)).eval()


def test_autoattack_is_the_worst_case_of_its_parts_and_beats_clean():
    pytest.importorskip("torchattacks")
    model = linear_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10, 3, 6, 6, generator=g)
    y = model(x).argmax(1).detach()  # every sample clean-correct
    y[:2] = (y[:2] + 1) % 5  # two that are not
    rep = autoattack_report(model, x, y, 0.1, 5, steps=3, queries=10)
    acc = rep["accuracy_pct"]
    assert acc["clean"] == 80.0 and rep["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert acc["autoattack"] <= min(acc["apgd-ce"], acc["square"]) <= acc["clean"]
    assert acc["apgd-ce"] < acc["clean"]  # a linear model at eps 0.1 falls to the white-box attack
    assert acc["apgd-ce-eps0.5"] == 0.0  # the masking check's unbounded budget breaks everything
    with pytest.raises(Exception, match="aa-steps"):
        autoattack_report(model, x, y, 0.1, 5, steps=0)


def test_masking_checks_flag_what_the_field_flags():
    honest = {"clean": 90.0, "apgd-ce": 30.0, "square": 45.0, "autoattack": 28.0, "apgd-ce-4x": 29.0,
              "apgd-ce-eps0.5": 0.0}
    checks = masking_checks(honest, {"fgsm": 40.0, "pgd": 31.0, "transfer": 60.0})
    assert all(c["ok"] for c in checks.values()) and len(checks) == 4
    assert verdict(honest, checks).startswith("survives AutoAttack at 28.0 %")
    masked = {**honest, "square": 10.0, "apgd-ce-4x": 40.0, "apgd-ce-eps0.5": 35.0}
    bad = masking_checks(masked, {"fgsm": 20.0, "pgd": 31.0, "transfer": 60.0})
    assert {k for k, c in bad.items() if not c["ok"]} == {"eps_to_zero", "blackbox_not_better",
                                                           "more_steps_not_worse", "iterative_beats_single_step"}
    assert verdict(masked, bad).startswith("gradient masking suspected (APGD-CE at eps 0.5: 35.0 %")
    transfer_wins = masking_checks({**honest, "square": None}, {"transfer": 20.0})
    assert not transfer_wins["blackbox_not_better"]["ok"]  # transfer (black-box) beat the white-box attack
    gone = {**honest, "autoattack": 1.0}
    assert verdict(gone, masking_checks(gone)) == "does not survive AutoAttack (1.0 %); no masking signs"


def test_hmd_attack_on_a_multitask_run_attacks_its_class_head(pinned_runs, capsys, tmp_path):
    run = pinned_runs / "train-great"  # a multi-task run of `hmd train`
    args = ["attack", str(run), "--eps", "0.1", "--steps", "1", "--limit", "6", "--train-limit", "6"]
    assert main(args + ["--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "great (class head)" in out and "tensor" not in out and len(out.splitlines()) <= 4
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == "great (class head)" and rep["samples"] == 6
    assert main(args + ["--json"]) == 0  # alone: the JSON and nothing else on stdout
    assert json.loads(capsys.readouterr().out)["accuracy_pct"]["clean"] == rep["accuracy_pct"]["clean"]


def test_hmd_attack_autoattack_columns_and_verdict(pinned_runs, capsys, tmp_path):
    pytest.importorskip("torchattacks")
    run = pinned_runs / "defend-great+ce"
    assert main(["attack", str(run), "--eps", "0.1", "--steps", "1", "--limit", "4", "--train-limit", "4",
                 "--autoattack", "--aa-steps", "1", "--aa-queries", "4", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "AutoAttack" in out and "verdict:" in out and "eps_to_zero" in out
    aa = json.loads((tmp_path / "r.json").read_text())["autoattack"]
    assert set(aa["accuracy_pct"]) >= {"clean", "apgd-ce", "square", "autoattack"} and aa["verdict"]
    assert aa["steps"] == 1 and aa["queries"] == 4


def test_mnist_and_fashion_mnist_sources(tmp_path):
    data = write_idx_folder(tmp_path / "m", n_train=12, n_test=5)
    frames = load_source(f"mnist:{tmp_path / 'm'}", "val", 16)
    assert frames.rgb.shape == (5, 16, 16, 3) and frames.labels.tolist() == data["t10k"][1].tolist()
    assert frames.class_names[3] == "3" and frames.source == f"mnist:{tmp_path / 'm'}"
    fashion = load_labelled(f"fashion-mnist:{tmp_path / 'm'}", "train", 8)
    assert fashion.x.shape == (12, 3, 8, 8) and fashion.class_names[0] == "T-shirt/top"
    assert torch.equal(fashion.x[:, 0], fashion.x[:, 2])  # gray repeated to RGB


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_fashion_mnist_reads_as_the_standard_test_set():
    frames = load_source(f"fashion-mnist:{FASHION}", "val", 32)
    assert frames.rgb.shape == (10000, 32, 32, 3) and np.bincount(frames.labels).tolist() == [1000] * 10


def test_bench_table5_runs_beside_the_patents_numbers(tmp_path, capsys):
    write_idx_folder(tmp_path / "m", n_train=40, n_test=10)
    rc = main(["bench", "table5", "--data", f"mnist:{tmp_path / 'm'}", "--size", "8", "--train-images", "20",
               "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--width", "2", "--limit", "6",
               "--train-limit", "6", "--steps", "1", "--methods", "none,great+ce", "--no-autoattack", "--threads",
               "1", "--out", str(tmp_path / "t5")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "patent great+ce" in out and "82.14" in out and "beta_max 20.0" in out
    res = json.loads((tmp_path / "t5" / "table5.json").read_text())
    assert res["eps"] == 0.2 and res["options"]["beta_max"] == 20.0 and res["train_images"] == 20
    assert set(res["accuracy_pct"]) == {"none", "great+ce"} and res["test_images"] == 6


def test_defend_warns_when_the_defence_is_off_the_whole_run(tmp_path, capsys):
    from models.cli_defend import schedule_note

    assert "alpha = beta = 0 the whole run" in schedule_note("great+ce", 1)
    assert "0.87 x their max" in schedule_note("great", 10)  # 1 - (1/10)^0.9 = 0.874
    assert schedule_note("fgsm-at", 1) is None and schedule_note("none", 5) is None
    rc = main(["defend", "--method", "great", "--epochs", "1", "--max-steps", "1", "--data", "synthetic:16",
               "--size", "8", "--width", "2", "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / "d")])
    assert rc == 0 and "the defence is off" in capsys.readouterr().err
