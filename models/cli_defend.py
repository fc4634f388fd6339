"""`hmd defend`: train a classifier (RGB in [0, 1]) with an adversarial defence.

    hmd defend --method great+ce --data synthetic:2000 --epochs 10 --out runs/def-greatce
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write_json
from shared.errors import UserError


def add_classifier_training_arguments(parser: argparse.ArgumentParser, epochs: int = 10) -> None:
    """Options shared by `hmd defend` and `hmd distill`."""
    parser.add_argument("--data", default="synthetic", metavar="SOURCE",
                        help="synthetic[:N][:WORLD] | cifar10:PATH | images:DIR (labelled frames only)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint.pt, metrics.json")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (poly multiplier per epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="input side in pixels, a multiple of 8 (default 32)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--no-augment", action="store_true", help="no flips / 4-pad crops")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def check_common(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UserError("--epochs must be >= 1")
    if args.batch_size < 2:
        raise UserError("--batch-size must be >= 2")
    if args.size < 8 or args.size % 8:
        raise UserError(f"--size {args.size}: must be a positive multiple of 8")
    if args.threads:
        torch.set_num_threads(args.threads)


def command_line() -> str:
    return "hmd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.defence import list_defences
    from models.greace import DEFAULT_GREACE, GREACE_VARIANTS

    parser.add_argument("--method", required=True, choices=list_defences(), help="defence")
    add_classifier_training_arguments(parser)
    parser.add_argument("--width", type=int, default=16, help="encoder width (feature has 4x this)")
    parser.add_argument("--alpha-max", type=float, default=1.0, help="GREAT: final aux-loss weight (paper 1)")
    parser.add_argument("--beta-max", type=float, default=2.0,
                        help="GREACE: final penalty (paper: 2 CIFAR-10, 10 SVHN)")
    parser.add_argument("--greace", choices=list(GREACE_VARIANTS), default=DEFAULT_GREACE,
                        help="GREACE: reading of the paper's eq. 6 (default reweight; literal = the formula as "
                             "printed, collapses at beta-max 20: see README)")
    parser.add_argument("--aux-lr", type=float, default=1e-3, help="GREAT/GREACE: aux classifier Adam lr")
    parser.add_argument("--aux-width", type=int, default=None,
                        help="GREAT/GREACE: aux classifier width (default: half of --width; --width = the "
                             "paper's full copy)")
    parser.add_argument("--aux-norm", choices=["rms", "none"], default="rms",
                        help="per-sample RMS normalisation of the aux classifier's input gradient (default rms)")
    parser.add_argument("--fgsm-eps", type=float, default=0.2, help="fgsm-at: training eps (paper 0.2)")
    parser.add_argument("--grad-bn", choices=["detached", "batch"], default="detached",
                        help="BatchNorm batch statistics in the input-gradient path: 'batch' = the paper's exact "
                             "maths, 'detached' (default) = treated as constants, ~1.4x faster (see models/defence.py)")


def defence_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"alpha_max": args.alpha_max, "beta_max": args.beta_max, "aux_lr": args.aux_lr,
            "aux_norm": args.aux_norm, "aux_width": args.aux_width, "eps": args.fgsm_eps, "seed": args.seed,
            "grad_bn": args.grad_bn, "greace": args.greace}


def train_defended(method: str, data: str, out: str | Path, *, epochs: int = 10, batch_size: int = 64,
                   lr: float = 1e-3, seed: int = 0, size: int = 32, width: int = 16,
                   options: dict[str, Any] | None = None, max_steps: int | None = None, augment: bool = True,
                   train_set=None, val_set=None, command: str | None = None, log=None) -> dict[str, Any]:
    """Train a ``resnet`` classifier with defence ``method``; writes checkpoint.pt and metrics.json."""
    from models.classifier import accuracy, create_classifier, fit, load_labelled, save_classifier
    from models.defence import create_defence
    from models.network import NetConfig

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    options = dict(options or {})
    if not 0.0 <= options.get("eps", 0.2) <= 1.0:
        raise UserError(f"--fgsm-eps {options['eps']}: must be in [0, 1]")
    t0 = time.perf_counter()
    train_set = train_set or load_labelled(data, "train", size, seed)
    val_set = val_set or load_labelled(data, "val", size, seed)
    torch.manual_seed(seed)
    cfg = NetConfig(num_classes=len(train_set.class_names), width=width, in_channels=3)
    model = create_classifier("resnet", cfg)
    defence = create_defence(method, cfg, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        logs = defence.train_step(model, x, y)
        optimizer.step()
        return logs

    log(f"defend {method}: {len(train_set)} train / {len(val_set)} held-out images of {train_set.source} "
        f"at {size}x{size}, {epochs} epochs")
    history = fit(model, step, train_set, val_set, epochs=epochs, batch_size=batch_size,
                  optimizers=[optimizer], seed=seed, tag=method, on_epoch=defence.set_epoch,
                  augment_data=augment, max_steps=max_steps, log=log)
    model.eval()
    config = {"method": method, "data": data, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "seed": seed, "size": size, "width": width, "options": options, "augment": augment}
    out = Path(out)
    save_classifier(out, model, method=method, defence=defence.state_dict(), class_names=train_set.class_names,
                    input_size=[size, size], source=train_set.source, data=data, history=history,
                    config=config, command=command)
    metrics = {"method": method, "data": train_set.source, "train_accuracy_pct": accuracy(model, train_set),
               "val_accuracy_pct": history[-1]["val_accuracy"], "seconds": time.perf_counter() - t0,
               "final_alpha": getattr(defence, "alpha", None), "final_beta": getattr(defence, "beta", None),
               "history": history, "config": config, "class_names": train_set.class_names, "command": command}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run(args: argparse.Namespace) -> int:
    check_common(args)
    m = train_defended(args.method, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, size=args.size, width=args.width,
                       options=defence_options(args), max_steps=args.max_steps, augment=not args.no_augment,
                       command=command_line())
    print(f"{args.method}: train accuracy {m['train_accuracy_pct']:.2f}%, held-out {m['val_accuracy_pct']:.2f}% "
          f"-> {args.out}/metrics.json (attack it: hmd attack {args.out} --eps 0.1)")
    return 0
