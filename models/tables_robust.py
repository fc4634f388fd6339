"""Reduced-scale Tables 1 and 3 of the paper: every method on the same data and budget, in one run.

    hmd bench table1 [--data synthetic:4000] [--epochs 30] ...   # the five defences, attacked
    hmd bench table3 [--data synthetic:4000] [--epochs 40] ...   # teacher, then none/kd/great, 100 % and 5 %

Each prints a text table beside the paper's numbers (stderr has the progress) and the JSON
on stdout's last line; the run folders and ``table1.json`` / ``table3.json`` go to --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from shared.atomic import atomic_write_json

from models.registry import DEFENCES, DISTILLERS

# Table 1 (CIFAR-10, eps 0.1, k = 10): Train, No-Attack, FGSM, iFGSM, targeted FGSM worst/random,
# targeted iFGSM worst/random.
PAPER_TABLE1 = {
    "none": [99.97, 93.32, 32.75, 1.99, 72.89, 10.43, 89.59, 18.29],
    "fgsm-at": [99.97, 89.91, 56.88, 16.73, 82.07, 45.26, 89.81, 69.89],
    "greace": [92.56, 89.84, 77.90, 72.40, 83.39, 66.23, 87.13, 79.10],
    "great": [99.53, 91.95, 47.51, 15.45, 72.73, 12.78, 89.62, 21.95],
    "great+ce": [90.87, 89.97, 81.28, 77.04, 84.53, 73.52, 88.57, 82.38],
}
# Table 3 (CIFAR-10, CNN-5 student, ResNet-18 teacher): 100 % and 5 % of the training data.
PAPER_TABLE3 = {"none": (84.74, 65.41), "kd": (85.69, 66.45), "great": (85.72, 66.55)}


def _common(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--data", default="synthetic:4000", metavar="SOURCE")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, metavar="DIR", help="run folders + JSON (default runs/tableN)")


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _command(what: str) -> str:
    return f"hmd bench {what} " + " ".join(shlex.quote(a) for a in sys.argv[3:])


# --- Table 1 -----------------------------------------------------------------------------------

def add_arguments_table1(parser: argparse.ArgumentParser) -> None:
    _common(parser, epochs=30)
    parser.add_argument("--methods", default=",".join(DEFENCES.names()), help="comma-separated defences")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--eps", type=float, default=0.1, help="attack eps (paper 0.1 CIFAR-10)")
    parser.add_argument("--steps", type=int, default=10, help="iFGSM / PGD steps (paper 10)")
    parser.add_argument("--limit", type=int, default=1000, help="held-out images attacked")
    parser.add_argument("--train-limit", type=int, default=1000, help="train images for the Train column")
    parser.add_argument("--beta-max", type=float, default=2.0)
    parser.add_argument("--alpha-max", type=float, default=1.0)
    parser.add_argument("--aux-width", type=int, default=None,
                        help="GREAT/GREACE aux classifier width (default: half of --width; --width = the paper's copy)")


def run_table1(args: argparse.Namespace) -> int:
    from models.attacks import format_table
    from models.labelled import load_labelled
    from models.robustness import attack_run
    from models.train_classifier import train_defended
    from shared.errors import UserError

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in DEFENCES.names()]
    if bad:
        raise UserError(f"unknown defence(s) {bad} (choose from {', '.join(DEFENCES.names())})")
    if "none" in methods:  # the undefended model goes first: it is the transfer source
        methods = ["none"] + [m for m in methods if m != "none"]
    out = Path(args.out or "runs/table1")
    t0 = time.perf_counter()
    train_set = load_labelled(args.data, "train", args.size, args.seed)
    val_set = load_labelled(args.data, "val", args.size, args.seed)
    test_set = val_set.subset(torch.arange(min(args.limit, len(val_set))))
    train_eval = train_set.subset(torch.arange(min(args.train_limit, len(train_set))))
    options = {"alpha_max": args.alpha_max, "beta_max": args.beta_max, "seed": args.seed,
               "aux_width": args.aux_width}
    rows, reports, seconds = {}, {}, {}
    for m in methods:
        ts = time.perf_counter()
        train_defended(m, args.data, out / m, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                       size=args.size, width=args.width, options=options, max_steps=args.max_steps,
                       train_set=train_set, val_set=val_set, command=_command("table1"), log=_log)
        seconds[m] = time.perf_counter() - ts
        rep = attack_run(out / m, args.eps, args.steps, seed=args.seed, test_set=test_set, train_set=train_eval,
                         transfer_from=(out / "none") if "none" in methods else None)
        reports[m], rows[m] = rep, rep["accuracy_pct"]
        _log(f"table1: {m} trained in {seconds[m]:.0f}s; " + json.dumps(rep["accuracy_pct"]))
    result = {
        "table": "1", "data": train_set.source, "train_images": len(train_set), "test_images": len(test_set),
        "size": args.size, "epochs": args.epochs, "width": args.width, "eps": args.eps, "ifgsm_steps": args.steps,
        "ifgsm_step_size": args.eps / args.steps, "pgd_step_size": 2.5 * args.eps / args.steps,
        "transfer": "iFGSM crafted on the undefended ('none') model",
        "accuracy_pct": rows, "train_seconds": seconds, "seconds": time.perf_counter() - t0,
        "paper_cifar10_eps0.1": PAPER_TABLE1, "command": _command("table1"),
    }
    print(f"Reduced-scale Table 1: accuracy % on {len(test_set)} held-out images of {train_set.source} "
          f"({args.size}x{args.size}, {args.epochs} epochs each), eps {args.eps}, iFGSM/PGD {args.steps} steps "
          f"(iFGSM step eps/k, PGD 2.5 eps/k, random start); transfer = iFGSM from the 'none' model. "
          f"'paper' rows: CIFAR-10, ResNet-18, full scale.")
    print(format_table(rows, PAPER_TABLE1))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table1.json", result)
    print(json.dumps(result))
    return 0


# --- Table 3 -----------------------------------------------------------------------------------

def add_arguments_table3(parser: argparse.ArgumentParser) -> None:
    _common(parser, epochs=40)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--teacher-width", type=int, default=16)
    parser.add_argument("--student-width", type=int, default=32, help="CNN-5 first conv (paper 32)")
    parser.add_argument("--fractions", default="1,0.05", help="comma-separated data fractions (paper 1, 0.05)")
    parser.add_argument("--methods", default="none,kd,great")


def run_table3(args: argparse.Namespace) -> int:
    from models.labelled import load_labelled
    from models.train_classifier import train_defended, train_distilled
    from shared.errors import UserError

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in DISTILLERS.names()]
    if bad:
        raise UserError(f"unknown distillation method(s) {bad} (choose from {', '.join(DISTILLERS.names())})")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise UserError(f"--fractions {args.fractions!r}: comma-separated numbers in (0, 1]") from None
    if not all(0.0 < f <= 1.0 for f in fractions):
        raise UserError(f"--fractions {args.fractions}: each must be in (0, 1]")
    out = Path(args.out or "runs/table3")
    t0 = time.perf_counter()
    train_set = load_labelled(args.data, "train", args.size, args.seed)
    val_set = load_labelled(args.data, "val", args.size, args.seed)
    teacher = train_defended("none", args.data, out / "teacher", epochs=args.teacher_epochs,
                             batch_size=args.batch_size, seed=args.seed, size=args.size, width=args.teacher_width,
                             max_steps=args.max_steps, train_set=train_set, val_set=val_set,
                             command=_command("table3"), log=_log)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for frac in fractions:
        for m in methods:
            name = f"{m}-{frac:g}"
            ts = time.perf_counter()
            r = train_distilled(out / "teacher", m, args.data, out / name, fraction=frac, epochs=args.epochs,
                                batch_size=args.batch_size, seed=args.seed, size=args.size,
                                width=args.student_width, max_steps=args.max_steps, train_set=train_set,
                                val_set=val_set, command=_command("table3"), log=_log)
            seconds[name] = time.perf_counter() - ts
            rows.setdefault(m, {})[f"{100 * frac:g}%"] = r["val_accuracy_pct"]
            _log(f"table3: {name}: {r['val_accuracy_pct']:.2f}% in {seconds[name]:.0f}s")
    cols = [f"{100 * f:g}%" for f in fractions]
    print(f"Reduced-scale Table 3: held-out accuracy % ({len(val_set)} images of {train_set.source}, "
          f"{args.size}x{args.size}), CNN-5 (width {args.student_width}) students of a resnet teacher "
          f"(width {args.teacher_width}, {teacher['val_accuracy_pct']:.2f}%), {args.epochs} epochs each. "
          f"'paper': CIFAR-10 CNN-5 + ResNet-18, 100 % / 5 %.")
    print(f"{'':<12}" + "".join(f"{c:>10}" for c in cols) + f"{'paper 100%':>12}{'paper 5%':>10}")
    for m in methods:
        p = PAPER_TABLE3.get(m, (None, None))
        print(f"{m:<12}" + "".join(f"{rows[m][c]:>10.2f}" for c in cols)
              + "".join(f"{'-' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(p, (12, 10))))
    result = {"table": "3", "data": train_set.source, "train_images": len(train_set), "val_images": len(val_set),
              "size": args.size, "epochs": args.epochs, "teacher_val_accuracy_pct": teacher["val_accuracy_pct"],
              "accuracy_pct": rows, "train_seconds": seconds, "seconds": time.perf_counter() - t0,
              "paper_cifar10_cnn5_resnet18": {m: {"100%": a, "5%": b} for m, (a, b) in PAPER_TABLE3.items()},
              "command": _command("table3")}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table3.json", result)
    print(json.dumps(result))
    return 0
