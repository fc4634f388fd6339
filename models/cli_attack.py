"""`hmd attack DIR --eps E`: the paper's Table 1 columns for one trained model, plus PGD
with random start and (with --transfer-from) a transfer attack from another model
(:func:`models.robustness.attack_run`; DIR is a classifier or a multi-task run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.cli_common import set_threads


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


def run(args: argparse.Namespace) -> int:
    from models.attacks import format_table
    from models.robustness import attack_run
    from shared.atomic import atomic_write_json

    set_threads(args.threads)
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
