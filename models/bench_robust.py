"""ms per training step of the defence and distillation methods vs plain training of the same
network on the same batch, measured side by side in one run (``robust_step_ratios``).

Each method is timed in the configuration the project trains it in (the defaults of
``hmd defend`` / ``hmd distill`` / ``hmd bench table3``), against plain training of the same
network on the same batch (one forward/backward of cross-entropy + Adam):

* ``defence-great+ce``: ``hmd defend --method great+ce``: the width-16 residual classifier,
  32x32 RGB, batch 64, at full strength (alpha = alpha_max, beta = beta_max: the double-backprop
  path), with its auxiliary classifier; vs plain training of that classifier.
* ``distill-great``: ``hmd distill --method great``: the paper's CNN-5 student (width 32),
  a frozen residual teacher (width 16, Table 3's; BN running statistics set from the batch, as
  a trained teacher's would be), ``hmd distill``'s discriminator; vs plain training of the
  CNN-5 student.
* secondary figures: ``distill-great (resnet student)``, the width-16 residual classifier as the
  student of a same-size residual teacher; ``defence-great+ce (full-width aux)``, the defence
  with the paper's full-width auxiliary copy (``hmd defend --aux-width 16``).

``--compare-faithful`` also times the exact-maths variants in the same run (autograd double
backprop, BN statistics differentiated in g, the paper's full-width auxiliary copy, a
discriminator the student's size). Steps are interleaved round-robin so that load from other processes hits every
variant alike; the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from models.distill import distill_options
from models.network import NetConfig
from models.registry import create_classifier, create_defence, create_distiller

# the configurations the project trains (hmd defend / hmd distill / hmd bench table3 defaults)
DEFENCE_NET = {"arch": "resnet", "width": 16}
STUDENT_NET = {"arch": "cnn5", "width": 32}
TEACHER_NET = {"arch": "resnet", "width": 16}


def _net(arch: str, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_classifier(arch, NetConfig(num_classes=10, width=width, in_channels=3)).train()


def _plain_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return plain_step


def _variants(batch_size: int, size: int, seed: int = 0, compare_faithful: bool = False,
              **options: Any) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """(name -> step, name -> the plain variant it is compared with)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    steps: dict[str, Callable[[], None]] = {}
    base: dict[str, str] = {}
    steps["plain"] = _plain_step(_net(**DEFENCE_NET, seed=seed), x, y)
    steps["plain-cnn5"] = _plain_step(_net(**STUDENT_NET, seed=seed), x, y)
    variants = [("", options, False)]
    if compare_faithful:
        variants.append(("@faithful", {**options, **FAITHFUL}, True))
    for suffix, opts, paper_sizes in variants:
        steps["defence-great+ce" + suffix] = _defence_step(x, y, seed, opts, full_width_aux=paper_sizes)
        base["defence-great+ce" + suffix] = "plain"
        steps["distill-great" + suffix] = _distill_step(STUDENT_NET, TEACHER_NET, x, y, seed, opts, paper_sizes)
        base["distill-great" + suffix] = "plain-cnn5"
        steps["distill-great (resnet student)" + suffix] = _distill_step(DEFENCE_NET, DEFENCE_NET, x, y, seed, opts,
                                                                         paper_sizes)
        base["distill-great (resnet student)" + suffix] = "plain"
    steps["defence-great+ce (full-width aux)"] = _defence_step(x, y, seed, options, full_width_aux=True)
    base["defence-great+ce (full-width aux)"] = "plain"
    return steps, base


# the exact-maths variants: autograd double backprop, BN batch statistics differentiated in g (timed
# with the paper's full-width auxiliary copy and a discriminator of the student's architecture and width)
FAITHFUL = {"input_grad": "autograd", "grad_bn": "batch"}


def _defence_step(x: torch.Tensor, y: torch.Tensor, seed: int, options: dict[str, Any],
                  full_width_aux: bool = False):
    dmodel = _net(**DEFENCE_NET, seed=seed)
    dopt = torch.optim.Adam(dmodel.parameters(), lr=1e-3)
    opts = {**options, "aux_width": DEFENCE_NET["width"]} if full_width_aux else options
    defence = create_defence("great+ce", dmodel.cfg, aux_arch=DEFENCE_NET["arch"], **opts)
    defence.set_epoch(1, 1)  # alpha = alpha_max, beta = beta_max

    def defence_step():
        dopt.zero_grad(set_to_none=True)
        defence.train_step(dmodel, x, y)
        dopt.step()
    return defence_step


def _distill_step(student_net: dict, teacher_net: dict, x: torch.Tensor, y: torch.Tensor, seed: int,
                  options: dict[str, Any], student_sized_disc: bool = False):
    student = _net(**student_net, seed=seed)
    sopt = torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher = _net(**teacher_net, seed=seed + 1)
    with torch.no_grad():  # a trained teacher's BN running statistics match its activations
        for _ in range(3):
            teacher(x)
    teacher.eval()
    opts = {**distill_options("great", 1.0, None, None), **options}  # what `hmd distill` trains with
    if student_sized_disc:
        opts.update(disc_width=student_net["width"], disc_arch=student_net["arch"])
    distiller = create_distiller("great", student.cfg, teacher, **opts)

    def distill_step():
        sopt.zero_grad(set_to_none=True)
        distiller.train_step(student, x, y)
        sopt.step()
    return distill_step


def robust_step_ratios(batch_size: int = 64, size: int = 32, repeats: int = 30, warmup: int = 2,
                       threads: int | None = None, compare_faithful: bool = False,
                       **options: Any) -> dict[str, Any]:
    """{"defence-great+ce/plain": r1, "distill-great/plain": r2, "ms_per_step": {...}, ...} (medians).

    ``compare_faithful``: also the exact-maths variants (:data:`FAITHFUL`) in the same run, as
    ``"...@faithful/plain"`` ratios; ``options`` go to both methods (e.g. ``grad_bn``)."""
    if threads:
        torch.set_num_threads(threads)
    variants, base = _variants(batch_size, size, compare_faithful=compare_faithful, **options)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(1000.0 * (time.perf_counter() - t))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}/plain": ms[k] / ms[b] for k, b in base.items()},
        "ms_per_step": ms, "ms_min": {k: min(v) for k, v in times.items()},
        "compared_with": base,
        "networks": {"plain": DEFENCE_NET, "plain-cnn5": STUDENT_NET, "teacher": TEACHER_NET},
        "batch_size": batch_size, "size": size, "repeats": repeats,
        "threads": torch.get_num_threads(), "targets": {"defence-great+ce/plain": 3.0, "distill-great/plain": 3.0},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="(hmd defend / hmd distill default: 64)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-faithful", action="store_true",
                        help="also time the exact-maths variants (autograd, BN statistics in g, full-width aux)")


def run(args: argparse.Namespace) -> int:
    res = robust_step_ratios(args.batch_size, args.size, args.repeats, threads=args.threads,
                             compare_faithful=getattr(args, "compare_faithful", False))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
