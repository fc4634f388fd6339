"""`hmd attack DIR --eps E`: the paper's Table 1 columns for one trained model, plus PGD
with random start and (with --transfer-from) a transfer attack from another model.

DIR is a classifier (`hmd defend` / `hmd distill`) or a multi-task run (`hmd train`), whose
class head is attacked through an RGB -> gray front (gray = BT.601 of the RGB input, so an
RGB perturbation of max-norm eps moves the gray input by at most eps too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from shared.atomic import atomic_write_json
from shared.errors import UserError

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
    from models.classifier import CHECKPOINT_NAME, load_classifier

    p = Path(run_dir)
    path = p / CHECKPOINT_NAME if p.is_dir() else p
    if path.is_file():
        try:
            fmt = torch.load(path, map_location="cpu", weights_only=False).get("format")
        except Exception:  # noqa: BLE001 - reported by the loaders below
            fmt = None
        if fmt == "great-hmd-checkpoint/1":
            from models.train import load_model
            net, ckpt = load_model(p)
            return GrayClassLogits(net).eval(), ckpt
    model, ckpt = load_classifier(p, what)
    return model, ckpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="DIR", help="run folder of the model to attack")
    parser.add_argument("--eps", type=float, required=True, help="L-inf budget, pixels in [0, 1] (paper 0.1 CIFAR)")
    parser.add_argument("--steps", type=int, default=10, help="iFGSM / PGD iterations k (paper 10)")
    parser.add_argument("--step-size", type=float, default=None, help="iFGSM step (default eps / k)")
    parser.add_argument("--pgd-step-size", type=float, default=None, help="PGD step (default 2.5 eps / k)")
    parser.add_argument("--transfer-from", default=None, metavar="DIR",
                        help="an undefended model's run folder: iFGSM examples crafted on it")
    parser.add_argument("--data", default=None, metavar="SOURCE", help="default: the run's own data source")
    parser.add_argument("--limit", type=int, default=1000, help="held-out images attacked (default 1000)")
    parser.add_argument("--train-limit", type=int, default=2000, help="train images for the Train column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="default: DIR/attack-eps<E>.json")
    parser.add_argument("--threads", type=int, default=None)


def attack_run(run_dir: str | Path, eps: float, steps: int = 10, step_size: float | None = None,
               pgd_step_size: float | None = None, transfer_from: str | Path | None = None,
               data: str | None = None, limit: int = 1000, train_limit: int = 2000, seed: int = 0,
               test_set=None, train_set=None) -> dict:
    from models.attacks import robustness_report
    from models.classifier import load_labelled

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
    report.update({"run": str(run_dir), "method": ckpt.get("method") or ckpt.get("method_name"),
                   "data": test_set.source, "transfer_from": str(transfer_from) if transfer_from else None})
    return report


def run(args: argparse.Namespace) -> int:
    from models.attacks import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    report = attack_run(args.run, args.eps, args.steps, args.step_size, args.pgd_step_size, args.transfer_from,
                        args.data, args.limit, args.train_limit, args.seed)
    print(f"{report['run']} ({report['method']}): accuracy % on {report['samples']} held-out images of "
          f"{report['data']}, eps {args.eps}, iFGSM {args.steps} steps of {report['ifgsm_step_size']:.4g}, "
          f"PGD random start, {args.steps} steps of {report['pgd_step_size']:.4g}"
          + (f", transfer: iFGSM crafted on {args.transfer_from}" if args.transfer_from else ""))
    print(format_table({str(report["method"]): report["accuracy_pct"]}))
    out = Path(args.json) if args.json else Path(args.run) / f"attack-eps{args.eps:g}.json"
    atomic_write_json(out, report)
    print(json.dumps(report["accuracy_pct"]))
    print(f"-> {out}")
    return 0
