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


def run(args: argparse.Namespace) -> int:
    from models.train_classifier import train_defended

    set_threads(args.threads)
    m = train_defended(args.method, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, size=args.size, width=args.width,
                       options={**defence_options(args), "seed": args.seed}, max_steps=args.max_steps,
                       augment=not args.no_augment, command=command_line())
    print(f"{args.method}: train accuracy {m['train_accuracy_pct']:.2f}%, held-out {m['val_accuracy_pct']:.2f}% "
          f"-> {args.out}/metrics.json (attack it: hmd attack {args.out} --eps 0.1)")
    return 0
