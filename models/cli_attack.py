"""`hmd attack DIR --eps E`: the paper's Table 1 columns for one trained model, plus PGD
with random start, (with --transfer-from) a transfer attack from another model and (with
--autoattack) the standard AutoAttack with its gradient-masking checks
(:func:`models.robustness.attack_run`; DIR is a classifier run, or a multi-task run from
`hmd train`, whose class head is attacked).

stdout: one human table (or, with ``--json`` alone, the report as JSON and nothing else); the
report is also written to DIR/attack-eps<E>.json (``--json PATH``: there instead).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.cli_common import set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="DIR", help="run folder of the model to attack (hmd defend / distill / train)")
    parser.add_argument("--eps", type=float, required=True, help="L-inf budget, pixels in [0, 1] (paper 0.1 CIFAR)")
    parser.add_argument("--steps", type=int, default=10, help="iFGSM / PGD iterations k (paper 10)")
    parser.add_argument("--step-size", type=float, default=None, help="iFGSM step (default eps / k)")
    parser.add_argument("--pgd-step-size", type=float, default=None, help="PGD step (default 2.5 eps / k)")
    parser.add_argument("--transfer-from", default=None, metavar="DIR",
                        help="an undefended model's run folder: iFGSM examples crafted on it")
    parser.add_argument("--autoattack", action="store_true",
                        help="also the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; torchattacks) and "
                             "the gradient-masking checks, with a verdict")
    parser.add_argument("--aa-steps", type=int, default=100, help="AutoAttack: APGD / FAB iterations (standard 100)")
    parser.add_argument("--aa-queries", type=int, default=5000, help="AutoAttack: Square queries (standard 5000)")
    parser.add_argument("--data", default=None, metavar="SOURCE", help="default: the run's own data source")
    parser.add_argument("--limit", type=int, default=1000, help="held-out images attacked (default 1000)")
    parser.add_argument("--train-limit", type=int, default=2000, help="train images for the Train column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="the report as JSON: alone, on stdout instead of the table; with PATH, written there "
                             "(default file: DIR/attack-eps<E>.json)")
    parser.add_argument("--threads", type=int, default=None)


def format_autoattack(aa: dict) -> str:
    """The AutoAttack columns, the masking checks and the verdict, as text."""
    acc = aa["accuracy_pct"]
    cols = [("clean", "No-Attack"), ("apgd-ce", "APGD-CE"), ("square", "Square"), ("autoattack", "AutoAttack"),
            ("apgd-ce-4x", "APGD-CE 4x"), ("apgd-ce-eps0.5", "APGD-CE eps0.5")]
    cols = [(k, h) for k, h in cols if k in acc]
    lines = ["".join(f"{h:>16}" for _, h in cols), "".join(f"{acc[k]:>16.2f}" for k, _ in cols)]
    for name, c in aa.get("masking_checks", {}).items():
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
    lines.append(f"verdict: {aa['verdict']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from models.attacks import format_table
    from models.robustness import attack_run
    from shared.atomic import atomic_write_json

    set_threads(args.threads)
    aa = {"steps": args.aa_steps, "queries": args.aa_queries} if args.autoattack else None
    report = attack_run(args.run, args.eps, args.steps, args.step_size, args.pgd_step_size, args.transfer_from,
                        args.data, args.limit, args.train_limit, args.seed, autoattack=aa)
    out = Path(args.json) if args.json not in (None, "-") else Path(args.run) / f"attack-eps{args.eps:g}.json"
    atomic_write_json(out, report)
    if args.json == "-":
        print(json.dumps(report))
        return 0
    print(f"{report['run']} ({report['method']}): accuracy % on {report['samples']} held-out images of "
          f"{report['data']}, eps {args.eps}, iFGSM {args.steps} steps of {report['ifgsm_step_size']:.4g}, "
          f"PGD random start, {args.steps} steps of {report['pgd_step_size']:.4g}"
          + (f", transfer: iFGSM crafted on {args.transfer_from}" if args.transfer_from else ""))
    print(format_table({report["method"]: report["accuracy_pct"]}))
    if aa is not None:
        print(f"AutoAttack ({report['autoattack']['version']}, {args.aa_steps} steps, {args.aa_queries} queries):")
        print(format_autoattack(report["autoattack"]))
    print(f"report: {out}", file=sys.stderr)
    return 0
