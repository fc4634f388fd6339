"""ms per training step of the defence and distillation methods vs plain training of the same
network on the same batch, measured side by side in one run (``robust_step_ratios``).

Plain: one forward/backward of cross-entropy + Adam. ``great+ce`` at its full strength
(alpha = alpha_max, beta = beta_max: the double-backprop path) with its auxiliary copy of
the network. ``great`` distillation: the same network as the student, a frozen teacher of
the same architecture (same size as the student; its BN running statistics set from the batch,
as a trained teacher's would be, not left at their initial values), the student-family
discriminator at the method's default width. ``--compare-faithful`` also times the previous
implementation (autograd double backprop, BN statistics differentiated in g, a full-width
discriminator) in the same run. Steps are interleaved round-robin
so that load from other processes hits every variant alike; the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from models.classifier import create_classifier
from models.defence import create_defence
from models.distill import create_distill
from models.network import NetConfig


def _variants(batch_size: int, size: int, width: int, arch: str, seed: int = 0, compare_faithful: bool = False,
              **options: Any) -> dict[str, Callable[[], None]]:
    torch.manual_seed(seed)
    cfg = NetConfig(num_classes=10, width=width, in_channels=3)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    out: dict[str, Callable[[], None]] = {}

    plain = create_classifier(arch, cfg).train()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    out["plain"] = plain_step

    faithful = {**FAITHFUL, "disc_width": width}
    for suffix, opts in [("", options)] + ([("@faithful", faithful)] if compare_faithful else []):
        out["defence-great+ce" + suffix] = _defence_step(cfg, arch, x, y, opts)
        out["distill-great" + suffix] = _distill_step(cfg, arch, x, y, opts)
    return out


# the previous implementation: autograd double backprop, BN batch statistics differentiated in g,
# a full-width discriminator
FAITHFUL = {"input_grad": "autograd", "grad_bn": "batch"}


def _defence_step(cfg: NetConfig, arch: str, x: torch.Tensor, y: torch.Tensor, options: dict[str, Any]):
    dmodel = create_classifier(arch, cfg).train()
    dopt = torch.optim.Adam(dmodel.parameters(), lr=1e-3)
    defence = create_defence("great+ce", cfg, aux_arch=arch, **options)
    defence.set_epoch(1, 1)  # alpha = alpha_max, beta = beta_max

    def defence_step():
        dopt.zero_grad(set_to_none=True)
        defence.train_step(dmodel, x, y)
        dopt.step()
    return defence_step


def _distill_step(cfg: NetConfig, arch: str, x: torch.Tensor, y: torch.Tensor, options: dict[str, Any]):
    student = create_classifier(arch, cfg).train()
    sopt = torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher = create_classifier(arch, cfg)
    with torch.no_grad():  # a trained teacher's BN running statistics match its activations
        for _ in range(3):
            teacher(x)
    teacher.eval()
    distiller = create_distill("great", cfg, teacher, disc_arch=arch, **options)

    def distill_step():
        sopt.zero_grad(set_to_none=True)
        distiller.train_step(student, x, y)
        sopt.step()
    return distill_step


def robust_step_ratios(batch_size: int = 64, size: int = 32, repeats: int = 10, width: int = 16,
                       arch: str = "resnet", warmup: int = 2, threads: int | None = None,
                       compare_faithful: bool = False, **options: Any) -> dict[str, Any]:
    """{"defence-great+ce/plain": r1, "distill-great/plain": r2, "ms": {...}, ...} (medians).

    ``compare_faithful``: also the previous implementation (:data:`FAITHFUL` options) in the same
    run, as ``"...@faithful/plain"`` ratios; ``options`` go to both methods (e.g. ``grad_bn``)."""
    if threads:
        torch.set_num_threads(threads)
    variants = _variants(batch_size, size, width, arch, compare_faithful=compare_faithful, **options)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(1000.0 * (time.perf_counter() - t))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}/plain": ms[k] / ms["plain"] for k in ms if k != "plain"},
        "ms_per_step": ms, "ms_min": {k: min(v) for k, v in times.items()},
        "batch_size": batch_size, "size": size, "width": width, "arch": arch, "repeats": repeats,
        "threads": torch.get_num_threads(), "targets": {"defence-great+ce/plain": 3.0, "distill-great/plain": 3.0},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--arch", default="resnet", choices=["resnet", "cnn5"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-faithful", action="store_true",
                        help="also time the previous implementation (autograd, BN statistics in g)")


def run(args: argparse.Namespace) -> int:
    res = robust_step_ratios(args.batch_size, args.size, args.repeats, args.width, args.arch,
                             threads=args.threads, compare_faithful=getattr(args, "compare_faithful", False))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
