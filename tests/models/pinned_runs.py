"""The short seeded runs of the pinned-results test (tests/models/test_pinned_results.py), run
once per session (the ``pinned_runs`` fixture) and reused by the command tests that need a
trained run folder."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from hmd.cli import main

TINY = ["--data", "synthetic:24", "--epochs", "2", "--max-steps", "2", "--threads", "1", "--seed", "3"]

RUNS: dict[str, list[str]] = {
    # Deliberate changes of the defaults after the numbers were pinned are pinned through their flags:
    # --greace literal (the default became "reweight", issue 17); issue 14 made the paper's choices the
    # defaults, so the former fast defaults are spelled out: --aux-norm rms (multi-task GREAT, the
    # defences), --aux-width 2 (half of --width 4; now the full copy), --grad-bn detached (now "batch"),
    # and the former discriminator --disc-arch resnet --disc-width 8 --disc-norm rms --disc-bn joint
    # (now the student's architecture and width, no normalisation, two BN batches).
    "train-great": ["train", "--method", "great", "--aux-norm", "rms", "--size", "16", "--width", "4",
                    "--batch-size", "4", *TINY],
    "train-equal-defence": ["train", "--method", "equal", "--defence", "great+ce", "--defence-aux-width", "2",
                            "--defence-greace", "literal", "--defence-aux-norm", "rms", "--defence-grad-bn",
                            "detached", "--size", "16", "--width", "4", "--batch-size", "4", *TINY],
    "defend-great+ce": ["defend", "--method", "great+ce", "--greace", "literal", "--aux-width", "2", "--aux-norm",
                        "rms", "--grad-bn", "detached", "--size", "16", "--width", "4", "--batch-size", "4", *TINY],
    "distill-great": ["distill", "--teacher", "{defend-great+ce}", "--method", "great", "--disc-arch", "resnet",
                      "--disc-width", "8", "--disc-norm", "rms", "--disc-bn", "joint", "--grad-bn", "detached",
                      "--width", "4", "--batch-size", "4", *TINY],
}


def _numbers(metrics: dict) -> dict[str, float | None]:
    """The numeric results of a run: every epoch's train-loss averages and held-out metrics."""
    out: dict[str, float | None] = {}
    for h in metrics["history"]:
        e = h["epoch"]
        for k, v in sorted(h["train"].items()):
            out[f"e{e}/train/{k}"] = v
        if "val" in h:
            for k, v in sorted(h["val"].items()):
                out[f"e{e}/val/{k}"] = v
            out[f"e{e}/lr"] = h["lr"]
        else:
            out[f"e{e}/val_accuracy"] = h["val_accuracy"]
            out[f"e{e}/lr_multiplier"] = h["lr_multiplier"]
        for k, v in sorted(h.get("task_weights", {}).items()):
            out[f"e{e}/weight/{k}"] = v
    for k in ("train_accuracy_pct", "val_accuracy_pct", "teacher_val_accuracy_pct", "final_alpha", "final_beta"):
        if k in metrics:
            out[k] = metrics[k]
    return out


def _weights_abs_sum(run: Path) -> float:
    """Sum of |w| over the final weights: every parameter and BN statistic of the trained model."""
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    return float(sum(v.double().abs().sum() for v in state.values() if v.is_floating_point()))


def run_all(root: Path) -> dict[str, str]:
    """Run every command of :data:`RUNS` into ``root/NAME`` (threads restored afterwards);
    returns what each printed."""
    threads = torch.get_num_threads()
    printed = {}
    try:
        for name, argv in RUNS.items():
            argv = [a.format(**{k: str(root / k) for k in RUNS}) for a in argv] + ["--out", str(root / name)]
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(argv) == 0, name
            printed[name] = out.getvalue()
    finally:
        torch.set_num_threads(threads)
    return printed


def numbers_of(run: Path) -> dict[str, float | None]:
    numbers = _numbers(json.loads((run / "metrics.json").read_text()))
    numbers["weights_abs_sum"] = _weights_abs_sum(run)
    return numbers
