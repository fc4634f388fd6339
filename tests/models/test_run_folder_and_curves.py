"""What a training run leaves in its folder and how it treats one already there (issue 16, items 8
and 9): the curves file and plot of every run, `--out EXISTING` refused without `--resume` or
`--force` (one line, exit 2), no folder left by a run that fails its checks, `-q` silences the
progress lines, the ETA as h:mm:ss."""
from __future__ import annotations

import json

import pytest

from hmd.cli import main
from models.curves import CURVES_NAME, PLOT_NAME, hms, read_curves
from models.metrics import MetricLogger
from shared.console import set_verbosity

@pytest.fixture(autouse=True)
def _verbosity_back():
    yield
    set_verbosity()  # -q in an in-process `hmd` call must not silence later tests


TINY = ["--data", "synthetic:32", "--size", "8", "--epochs", "2", "--batch-size", "8", "--max-steps", "2",
        "--threads", "1"]


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_defend_writes_curves_and_plot_and_q_silences_progress(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["defend", "--method", "none", *TINY, "--out", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert "epoch" not in captured.err and "eta" not in captured.err  # -q: no progress lines
    assert "held-out" in captured.out  # the result line stays
    lines = read_curves(out)
    steps = [line for line in lines if line["kind"] == "step"]
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [(s["epoch"], s["step"], s["global_step"]) for s in steps] == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    assert all(s["ce"] > 0 and s["lr"] > 0 and s["eta_s"] >= 0 for s in steps)
    assert steps[2]["lr"] < steps[0]["lr"]  # the poly schedule, as trained
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [e["val_accuracy"] for e in epochs] == [h["val_accuracy"] for h in history]
    assert [e["train/ce"] for e in epochs] == [h["train"]["ce"] for h in history]
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # again into the same folder: refused, one line, the run untouched
    before = (out / "metrics.json").read_text()
    line = _one_error_line(capsys, ["defend", "--method", "none", *TINY, "--out", str(out)])
    assert line == f"hmd defend: error: --out {out} holds a run already: give --force to overwrite it, or another --out"
    assert (out / "metrics.json").read_text() == before
    # --force writes over it; without -q the progress lines (ETA as h:mm:ss) are on stderr
    assert main(["defend", "--method", "none", *TINY, "--out", str(out), "--force", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "[none] epoch 2/2 step 2/2" in err and "eta 0:00:00" in err
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1
    assert len([line for line in read_curves(out) if line["kind"] == "epoch"]) == 2  # a new file, not appended


def test_train_out_existing_needs_resume_or_force_and_a_failed_start_leaves_no_folder(tmp_path, capsys):
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "checkpoint.pt").write_bytes(b"an earlier run")
    line = _one_error_line(capsys, ["train", *TINY, "--out", str(existing)])
    assert line == (f"hmd train: error: --out {existing} holds a run already: give --resume to continue it or "
                    f"--force to overwrite it, or another --out")
    assert (existing / "checkpoint.pt").read_bytes() == b"an earlier run"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert _one_error_line(capsys, ["distill", "--method", "kd", "--teacher", str(existing), *TINY, "--out", str(a_file)]) == (
        f"hmd distill: error: --out {a_file} is a file, not a run folder")

    new = tmp_path / "new"
    line = _one_error_line(capsys, ["train", "--data", "images:" + str(tmp_path / "nowhere"), "--out", str(new)])
    assert line.startswith("hmd train: error: ")
    assert not new.exists()  # the failed start made no folder
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is not a run: used as it is
    assert main(["train", "--method", "equal", *TINY, "--size", "16", "--out", str(empty), "-q"]) == 0
    assert capsys.readouterr().err == ""
    epochs = [line for line in read_curves(empty) if line["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("val/rmse_colour" in e for e in epochs)
    assert (empty / PLOT_NAME).is_file() and (empty / CURVES_NAME).is_file()


def test_eta_is_hours_minutes_seconds():
    assert [hms(s) for s in (0, 59.6, 61, 3725, 36000 + 5)] == ["0:00:00", "0:01:00", "0:01:01", "1:02:05",
                                                                "10:00:05"]
    meters = MetricLogger()
    meters.update({"loss": 1.0}, 2.0)
    assert meters.line(["loss"], 1800).endswith("eta 1:00:00")


@pytest.mark.parametrize("argv", [["train", "--help"], ["defend", "--help"], ["distill", "--help"]])
def test_force_is_offered(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "--force" in capsys.readouterr().out
