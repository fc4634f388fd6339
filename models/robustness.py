"""Robustness evaluation of a trained run (`hmd attack`, the reduced Table 1): the paper's
Table 1 columns for one model, plus PGD with random start and (with ``transfer_from``) a
transfer attack from another model.

The run is a classifier (`hmd defend` / `hmd distill`) or a multi-task run (`hmd train`), whose
class head is attacked through an RGB -> gray front (gray = BT.601 of the RGB input, so an
RGB perturbation of max-norm eps moves the gray input by at most eps too).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.errors import UserError

from models.attacks import robustness_report
from models.checkpoints import (MULTITASK_FORMAT, check_classifier_checkpoint, classifier_from_checkpoint,
                                read_checkpoint_file)
from models.labelled import load_labelled
from models.train import model_from_checkpoint

BT601 = (0.299, 0.587, 0.114)


class GrayClassLogits(nn.Module):
    """RGB [0, 1] in, the multi-task network's class logits out (encoder + class head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("weights", torch.tensor(BT601).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = (x * self.weights).sum(1, keepdim=True)
        return self.net.head("class")(self.net.encode(gray))


def load_attack_target(run_dir: str | Path, what: str = "DIR") -> tuple[nn.Module, dict]:
    """(logits model on RGB [0, 1], checkpoint) for a classifier or multi-task run folder."""
    ckpt = read_checkpoint_file(run_dir, None, what)
    if ckpt["format"] == MULTITASK_FORMAT:
        return GrayClassLogits(model_from_checkpoint(ckpt)).eval(), ckpt
    return classifier_from_checkpoint(check_classifier_checkpoint(ckpt, run_dir, what), what), ckpt


def run_method(ckpt: dict) -> str:
    """The method a run was trained with, for a classifier (``method``) or a multi-task run (whose
    ``method`` is the weighting method's state; its name is ``method_name``), plus its defence."""
    if ckpt.get("format") == MULTITASK_FORMAT:
        name = str(ckpt.get("method_name") or ckpt.get("config", {}).get("method") or "multi-task")
        defence = ckpt.get("config", {}).get("defence")
        return f"{name} (class head{', defence ' + defence if defence else ''})"
    return str(ckpt.get("method"))


def attack_run(run_dir: str | Path, eps: float, steps: int = 10, step_size: float | None = None,
               pgd_step_size: float | None = None, transfer_from: str | Path | None = None,
               data: str | None = None, limit: int = 1000, train_limit: int = 2000, seed: int = 0,
               test_set=None, train_set=None, autoattack: dict | None = None) -> dict:
    """The robustness report of the run in ``run_dir`` (see :func:`models.attacks.robustness_report`);
    ``autoattack`` (options of :func:`models.autoattack.evaluate`, e.g. ``{"steps": 100}``) adds the
    standard AutoAttack, its masking checks and a verdict under ``"autoattack"``."""
    if not 0.0 <= eps <= 1.0:
        raise UserError(f"--eps {eps}: must be in [0, 1] (pixels are in [0, 1])")
    if steps < 1:
        raise UserError("--steps must be >= 1")
    if limit < 1:
        raise UserError("--limit must be >= 1")
    model, ckpt = load_attack_target(run_dir)
    source = data or ckpt.get("data") or ckpt.get("config", {}).get("data")
    if not source:
        raise UserError(f"{run_dir}: the checkpoint does not name its data source; pass --data")
    size = int(ckpt.get("input_size", [32])[0])
    test_set = test_set or load_labelled(source, "val", size, seed, limit=limit)
    train_set = train_set or load_labelled(source, "train", size, seed, limit=train_limit)
    if len(ckpt.get("class_names", test_set.class_names)) != len(test_set.class_names):
        raise UserError(f"{run_dir} predicts {len(ckpt['class_names'])} classes, {source} has "
                        f"{len(test_set.class_names)}")
    source_model = None
    if transfer_from:
        source_model, sckpt = load_attack_target(transfer_from, "--transfer-from")
        if int(sckpt.get("input_size", [size])[0]) != size:
            raise UserError(f"--transfer-from {transfer_from}: trained at another input size than {run_dir}")
    report = robustness_report(model, test_set.x, test_set.y, eps, steps, step_size, pgd_step_size,
                               train=(train_set.x, train_set.y), transfer_from=source_model, seed=seed)
    report.update({"run": str(run_dir), "method": run_method(ckpt), "data": test_set.source,
                   "transfer_from": str(transfer_from) if transfer_from else None})
    if autoattack is not None:
        from models.autoattack import evaluate

        report["autoattack"] = evaluate(model, test_set.x, test_set.y, eps, len(test_set.class_names),
                                        table1=report["accuracy_pct"], seed=seed, **autoattack)
    return report
