"""Reduced-scale Tables 1 and 3 of the paper: every method on the same data and budget, in one run.

    hmd bench table1 [--data synthetic:4000] [--epochs 30] ...   # the five defences, attacked
    hmd bench table3 [--data synthetic:4000] [--epochs 40] ...   # teacher, then none/kd/great, 100 % and 5 %
    hmd bench table5 [--data fashion-mnist:DIR] [--epochs 10] ... # the patent's MNIST table, eps 0.2, beta 20

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
# The patent's Table 5 (MNIST, eps 0.2, beta_max 20): Train, No-Attack, FGSM, iFGSM, then a targeted
# attack with a random and with the worst target (the patent's flattened header does not say whether the
# targeted columns are FGSM or iFGSM; its "Adversarial" row is empty).
PAPER_TABLE5 = {
    "none": [100.0, 93.58, 22.76, 5.84, 95.87, 40.77],
    "greace": [100.0, 99.59, 17.82, 6.49, 97.24, 53.43],
    "great": [99.93, 99.35, 53.74, 6.66, 91.99, 30.62],
    "great+ce": [98.78, 98.94, 82.14, 75.86, 95.59, 54.78],
}
TABLE5_COLUMNS = (("train", "Train"), ("clean", "No-Attack"), ("fgsm", "FGSM"), ("ifgsm", "iFGSM"),
                  ("fgsm_random", "T-FGSM random"), ("fgsm_worst", "T-FGSM worst"),
                  ("ifgsm_random", "T-iFGSM random"), ("ifgsm_worst", "T-iFGSM worst"), ("pgd", "PGD"),
                  ("transfer", "Transfer"))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
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
                        help="GREAT/GREACE aux classifier width (default: --width, the paper's copy)")
    _gradient_options(parser)
    _autoattack_options(parser)


def _gradient_options(parser: argparse.ArgumentParser) -> None:
    """The defences' gradient-path options (their defaults: the paper's; hmd defend --help)."""
    parser.add_argument("--grad-bn", choices=["batch", "detached"], default=None,
                        help="BN statistics in the input gradient (default batch, the paper's)")
    parser.add_argument("--aux-norm", choices=["none", "rms"], default=None,
                        help="aux classifier input normalisation (default none, the paper's)")
    parser.add_argument("--greace", choices=["reweight", "literal", "scaled", "normalised"], default=None,
                        help="GREACE reading of eq. 6 (default reweight)")


def _autoattack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-autoattack", action="store_true", help="skip the AutoAttack columns")
    parser.add_argument("--aa-steps", type=int, default=100, help="AutoAttack APGD / FAB iterations (standard 100)")
    parser.add_argument("--aa-queries", type=int, default=5000, help="AutoAttack Square queries (standard 5000)")
    parser.add_argument("--aa-limit", type=int, default=None,
                        help="held-out images AutoAttack runs on (default: all of --limit)")


def _defence_options(args: argparse.Namespace) -> dict:
    opts = {"alpha_max": args.alpha_max, "beta_max": args.beta_max, "seed": args.seed, "aux_width": args.aux_width}
    for key in ("grad_bn", "aux_norm", "greace"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    return opts


def _autoattack_rows(methods, reports) -> str:
    """Per method: the AutoAttack columns and the verdict."""
    from models.cli_attack import format_autoattack

    return "\n".join(f"{m}:\n" + format_autoattack(reports[m]["autoattack"]) for m in methods
                     if "autoattack" in reports[m])


def _attack_all(args, out: Path, methods: list[str], test_set, train_eval, log_name: str):
    """Attack every trained method (Table 1 columns, then AutoAttack on the first --aa-limit images)."""
    from models.autoattack import evaluate
    from models.robustness import attack_run, load_attack_target

    rows, reports = {}, {}
    for m in methods:
        rep = attack_run(out / m, args.eps, args.steps, seed=args.seed, test_set=test_set, train_set=train_eval,
                         transfer_from=(out / "none") if "none" in methods else None)
        if not args.no_autoattack:
            model, _ = load_attack_target(out / m)
            aa_set = test_set.subset(torch.arange(min(args.aa_limit or len(test_set), len(test_set))))
            rep["autoattack"] = evaluate(model, aa_set.x, aa_set.y, args.eps, len(test_set.class_names),
                                         table1=rep["accuracy_pct"], steps=args.aa_steps, queries=args.aa_queries,
                                         seed=args.seed)
            _log(f"{log_name}: {m}: AutoAttack {rep['autoattack']['accuracy_pct']}; {rep['autoattack']['verdict']}")
        reports[m], rows[m] = rep, rep["accuracy_pct"]
        _log(f"{log_name}: {m}: " + json.dumps(rep["accuracy_pct"]))
    return rows, reports


def _load_sets(args, train_images: int | None = None):
    """(train, held-out, the first --limit held-out images attacked, the first --train-limit train
    images for the Train column); ``train_images``: a class-stratified subset of the training split."""
    from models.labelled import load_labelled

    train_set = load_labelled(args.data, "train", args.size, args.seed)
    if train_images is not None:
        train_set = train_set.fraction(min(1.0, train_images / len(train_set)), args.seed)
    val_set = load_labelled(args.data, "val", args.size, args.seed)
    test_set = val_set.subset(torch.arange(min(args.limit, len(val_set))))
    train_eval = train_set.subset(torch.arange(min(args.train_limit, len(train_set))))
    return train_set, val_set, test_set, train_eval


def _train_and_attack(args, table: str, out: Path, methods: list[str], train_set, val_set, test_set, train_eval):
    """Train every defence on the same data and budget, then attack each: (options, seconds, rows, reports)."""
    from models.train_classifier import train_defended

    options = _defence_options(args)
    seconds = {}
    for m in methods:
        ts = time.perf_counter()
        train_defended(m, args.data, out / m, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                       size=args.size, width=args.width, options=options, max_steps=args.max_steps,
                       train_set=train_set, val_set=val_set, command=_command(table), log=_log)
        seconds[m] = time.perf_counter() - ts
        _log(f"{table}: {m} trained in {seconds[m]:.0f}s")
    rows, reports = _attack_all(args, out, methods, test_set, train_eval, table)
    return options, seconds, rows, reports


def run_table1(args: argparse.Namespace) -> int:
    from models.attacks import format_table

    torch.set_num_threads(args.threads)
    methods = _methods(args.methods)
    out = Path(args.out or "runs/table1")
    t0 = time.perf_counter()
    train_set, val_set, test_set, train_eval = _load_sets(args)
    options, seconds, rows, reports = _train_and_attack(args, "table1", out, methods, train_set, val_set, test_set,
                                                        train_eval)
    result = {
        "table": "1", "data": train_set.source, "train_images": len(train_set), "test_images": len(test_set),
        "size": args.size, "epochs": args.epochs, "width": args.width, "eps": args.eps, "ifgsm_steps": args.steps,
        "ifgsm_step_size": args.eps / args.steps, "pgd_step_size": 2.5 * args.eps / args.steps,
        "transfer": "iFGSM crafted on the undefended ('none') model",
        "accuracy_pct": rows, "train_seconds": seconds, "seconds": time.perf_counter() - t0,
        "options": options, "autoattack": {m: r["autoattack"] for m, r in reports.items() if "autoattack" in r},
        "paper_cifar10_eps0.1": PAPER_TABLE1, "command": _command("table1"),
    }
    print(f"Reduced-scale Table 1: accuracy % on {len(test_set)} held-out images of {train_set.source} "
          f"({args.size}x{args.size}, {args.epochs} epochs each), eps {args.eps}, iFGSM/PGD {args.steps} steps "
          f"(iFGSM step eps/k, PGD 2.5 eps/k, random start); transfer = iFGSM from the 'none' model. "
          f"'paper' rows: CIFAR-10, ResNet-18, full scale.")
    print(format_table(rows, PAPER_TABLE1))
    if not args.no_autoattack:
        print(f"AutoAttack (standard, {args.aa_steps} steps, {args.aa_queries} queries) and the masking checks:")
        print(_autoattack_rows(methods, reports))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table1.json", result)
    print(json.dumps(result))
    return 0


# --- Table 5 (the patent's MNIST table) ----------------------------------------------------------

def add_arguments_table5(parser: argparse.ArgumentParser) -> None:
    _common(parser, epochs=10)
    parser.set_defaults(data=f"fashion-mnist:{FASHION_MNIST}")
    parser.add_argument("--train-images", type=int, default=6000,
                        help="class-stratified training images taken from the 60,000 (default 6000)")
    parser.add_argument("--methods", default="none,fgsm-at,great,greace,great+ce", help="comma-separated defences")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--eps", type=float, default=0.2, help="attack eps (the patent's MNIST table: 0.2)")
    parser.add_argument("--steps", type=int, default=10, help="iFGSM / PGD steps (paper 10)")
    parser.add_argument("--limit", type=int, default=1000, help="held-out images attacked")
    parser.add_argument("--train-limit", type=int, default=1000, help="train images for the Train column")
    parser.add_argument("--beta-max", type=float, default=20.0, help="GREACE (the patent's MNIST value: 20)")
    parser.add_argument("--alpha-max", type=float, default=1.0)
    parser.add_argument("--aux-width", type=int, default=None, help="aux classifier width (default: --width)")
    _gradient_options(parser)
    _autoattack_options(parser)


def format_table5(rows: dict[str, dict[str, float | None]]) -> str:
    """Measured rows with the patent's values (its six columns) in the line below each."""
    heads = [h for _, h in TABLE5_COLUMNS]
    lines = [f"{'':<16}" + "".join(f"{h:>15}" for h in heads)]
    paper_keys = ("train", "clean", "fgsm", "ifgsm", "random", "worst")
    for name, acc in rows.items():
        lines.append(f"{name:<16}" + "".join(f"{'-' if acc.get(k) is None else f'{acc[k]:.2f}':>15}"
                                             for k, _ in TABLE5_COLUMNS))
        if name in PAPER_TABLE5:
            p = dict(zip(paper_keys, PAPER_TABLE5[name]))
            vals = [p.get(k) for k in ("train", "clean", "fgsm", "ifgsm")] + [p["random"], p["worst"]] * 2 + [None] * 2
            lines.append(f"{'  patent ' + name:<16}" + "".join(f"{'-' if v is None else f'{v:.2f}':>15}"
                                                               for v in vals))
    return "\n".join(lines)


def run_table5(args: argparse.Namespace) -> int:
    from shared.errors import UserError

    torch.set_num_threads(args.threads)
    methods = _methods(args.methods)
    out = Path(args.out or "runs/table5")
    t0 = time.perf_counter()
    if args.train_images < 10:
        raise UserError("--train-images must be >= 10")
    train_set, _, test_set, train_eval = _load_sets(args, args.train_images)
    options, seconds, rows, reports = _train_and_attack(args, "table5", out, methods, train_set, test_set, test_set,
                                                        train_eval)
    result = {
        "table": "5 (patent)", "data": train_set.source, "train_images": len(train_set), "test_images": len(test_set),
        "size": args.size, "epochs": args.epochs, "width": args.width, "eps": args.eps, "ifgsm_steps": args.steps,
        "options": options, "accuracy_pct": rows,
        "autoattack": {m: r["autoattack"] for m, r in reports.items() if "autoattack" in r},
        "train_seconds": seconds, "seconds": time.perf_counter() - t0,
        "patent_mnist_eps0.2": PAPER_TABLE5, "command": _command("table5"),
    }
    print(f"Reduced-scale Table 5 (the patent's MNIST table): accuracy % on {len(test_set)} held-out images of "
          f"{train_set.source} ({len(train_set)} training images at {args.size}x{args.size}, {args.epochs} epochs "
          f"each), eps {args.eps}, beta_max {args.beta_max}, iFGSM/PGD {args.steps} steps; transfer = iFGSM from "
          f"the 'none' model. 'patent' rows: MNIST, full scale (its targeted columns shown under both ours).")
    print(format_table5(rows))
    if not args.no_autoattack:
        print(f"AutoAttack (standard, {args.aa_steps} steps, {args.aa_queries} queries) and the masking checks:")
        print(_autoattack_rows(methods, reports))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table5.json", result)
    print(json.dumps(result))
    return 0


def _methods(text: str) -> list[str]:
    """The comma-separated defences, the undefended one first (it is the transfer source)."""
    from shared.errors import UserError

    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in DEFENCES.names()]
    if bad:
        raise UserError(f"unknown defence(s) {bad} (choose from {', '.join(DEFENCES.names())})")
    if "none" in methods:
        methods = ["none"] + [m for m in methods if m != "none"]
    return methods


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
