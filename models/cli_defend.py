"""`hmd defend`: train a classifier (RGB in [0, 1]) with an adversarial defence.

    hmd defend --method great+ce --data synthetic:2000 --epochs 10 --out runs/def-greatce
"""
from __future__ import annotations

import argparse

from models.cli_common import (add_classifier_run_arguments, add_defence_arguments, command_line, defence_options,
                               set_threads)
from models.registry import DEFENCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=DEFENCES.names(), help="defence")
    add_classifier_run_arguments(parser)
    parser.add_argument("--width", type=int, default=16, help="encoder width (feature has 4x this)")
    add_defence_arguments(parser)


def schedule_note(method: str, epochs: int) -> str | None:
    """What the alpha / beta ramp (max * (1 - (1 - e/E)^0.9), epoch e = 0..E-1) does in this run, for
    the defences that have one: a warning when it is 0 the whole run, else the share the last epoch reaches."""
    if method not in ("great", "greace", "great+ce") or epochs < 1:
        return None
    if epochs == 1:
        return (f"warning: with --epochs 1 the {method} weights stay at alpha = beta = 0 the whole run (they ramp "
                f"from 0 in the first epoch): the defence is off; train for 2 epochs or more")
    share = 1.0 - (1.0 / epochs) ** 0.9
    return (f"note: alpha and beta ramp from 0 in the first epoch to {share:.2f} x their max in the last "
            f"(1 - (1/E)^0.9, E = {epochs})")


def run(args: argparse.Namespace) -> int:
    import sys

    from models.train_classifier import train_defended

    set_threads(args.threads)
    note = schedule_note(args.method, args.epochs)
    if note:
        print(note, file=sys.stderr)
    m = train_defended(args.method, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, size=args.size, width=args.width,
                       options={**defence_options(args), "seed": args.seed}, max_steps=args.max_steps,
                       augment=not args.no_augment, command=command_line())
    print(f"{args.method}: train accuracy {m['train_accuracy_pct']:.2f}%, held-out {m['val_accuracy_pct']:.2f}% "
          f"-> {args.out}/metrics.json (attack it: hmd attack {args.out} --eps 0.1)")
    return 0
