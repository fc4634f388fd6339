"""Argument groups the training commands share, defined once: the run options of every
training command and the defence options (`hmd defend`, and `hmd train --defence` with a
``--defence-`` prefix). Nothing here imports torch: `hmd CMD --help` stays instant."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from shared.errors import UserError

from models.registry import ARCHITECTURES

# flag, option name of the defence classes, type, `hmd defend` default, choices, help
DEFENCE_OPTIONS: list[tuple[str, str, type, Any, list[str] | None, str]] = [
    ("alpha-max", "alpha_max", float, 1.0, None,
     "GREAT: the aux-loss weight's ceiling (paper 1); alpha = max * (1 - (1 - e/E)^0.9) at epoch e of E: "
     "0 in the first epoch, 1 - (1/E)^0.9 of the max in the last (never the max itself)"),
    ("beta-max", "beta_max", float, 2.0, None,
     "GREACE: the penalty's ceiling (paper: 2 CIFAR-10, 10 SVHN, patent 20 MNIST), ramped as alpha"),
    ("aux-lr", "aux_lr", float, 1e-3, None, "GREAT/GREACE: aux classifier Adam lr"),
    ("aux-width", "aux_width", int, None, None,
     "GREAT/GREACE: aux classifier width (default: --width, the paper's copy; less is faster)"),
    ("aux-norm", "aux_norm", str, "none", ["none", "rms"],
     "aux classifier's input gradient: as it is (none, the paper's, default) or per-sample RMS-normalised"),
    ("greace", "greace", str, "reweight", ["reweight", "literal", "scaled", "normalised"],
     "GREACE: reading of the paper's eq. 6 (default reweight; literal = the formula as printed, collapses "
     "at beta-max 20: see README and models/greace.py)"),
    ("fgsm-eps", "eps", float, 0.2, None, "fgsm-at: training eps (paper 0.2)"),
    ("aux-arch", "aux_arch", str, "resnet", ARCHITECTURES.names(), "GREAT/GREACE: aux classifier architecture"),
    ("input-grad", "input_grad", str, "explicit", ["explicit", "autograd"],
     "GREAT/GREACE: input gradient from explicit ops (default; same maths, faster) or autograd"),
    ("grad-bn", "grad_bn", str, "batch", ["batch", "detached"],
     "BatchNorm batch statistics in the input-gradient path: 'batch' (default) = the paper's exact maths, "
     "'detached' = treated as constants, faster (see models/defence.py)"),
]


def parse_size_arg(text: str) -> int | tuple[int, int]:
    """``N`` or ``WxH`` -> N or (H, W)."""
    if text.isdigit():
        return int(text)
    w, sep, h = text.lower().partition("x")
    if sep and w.isdigit() and h.isdigit():
        return int(h), int(w)
    raise argparse.ArgumentTypeError(f"expected N or WIDTHxHEIGHT, got {text!r}")


def check_run_folder(args: argparse.Namespace) -> None:
    """A run never silently replaces another: ``--out`` must be new or empty, unless ``--resume``
    (continue it, `hmd train`) or ``--force`` (write over it) is given."""
    out = Path(args.out)
    if getattr(args, "resume", False) or args.force:
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder")
    if out.is_dir() and any(out.iterdir()):
        how = "--resume to continue it or --force" if hasattr(args, "resume") else "--force"
        raise UserError(f"--out {out} holds a run already: give {how} to overwrite it, or another --out")


def add_run_arguments(parser: argparse.ArgumentParser, *, data_help: str, size: int | None, size_help: str,
                      batch_size: int, epochs: int = 10, size_type=int) -> None:
    """--data --out --force --epochs --batch-size --lr --seed --size --max-steps --threads; `hmd`
    checks the run folder (:func:`check_run_folder`) before the command starts."""
    parser.add_argument("--data", default="synthetic", metavar="SOURCE", help=data_help)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder (new or empty): checkpoint.pt, metrics.json, curves.jsonl, curves.png")
    parser.add_argument("--force", action="store_true", help="write over the run already in --out")
    parser.set_defaults(run_checks=(check_run_folder,))
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (poly multiplier per epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=size_type, default=size, metavar="N" if size_type is int else "N|WxH",
                        help=size_help)
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_classifier_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run options of `hmd defend` and `hmd distill`."""
    add_run_arguments(parser, data_help="synthetic[:N][:WORLD] | cifar10:PATH | images:DIR (labelled frames only)",
                      size=32, size_help="input side in pixels, a multiple of 8 (default 32)", batch_size=64)
    parser.add_argument("--no-augment", action="store_true", help="no flips / 4-pad crops")


def add_defence_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The defence options. With a ``prefix`` (``hmd train --defence``) every flag is
    ``--PREFIXflag`` and defaults to the defence's own default (nothing is passed)."""
    for flag, key, typ, default, choices, helptext in DEFENCE_OPTIONS:
        parser.add_argument(f"--{prefix}{flag}", dest=f"defence_{key}", type=typ, choices=choices,
                            default=None if prefix else default, help=helptext)


def defence_options(args: argparse.Namespace, given_only: bool = False) -> dict[str, Any]:
    """The defence options parsed by :func:`add_defence_arguments` (``given_only``: those set)."""
    opts = {key: getattr(args, f"defence_{key}") for _, key, *_ in DEFENCE_OPTIONS}
    return {k: v for k, v in opts.items() if v is not None} if given_only else opts


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def command_line() -> str:
    return "hmd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
