"""ms per training step of the defence and distillation methods vs plain training of the same
network on the same batch, measured side by side in one run (``robust_step_ratios``).

Each method is timed with the defaults of ``hmd defend`` / ``hmd distill`` (the paper's choices),
against plain training of the same network on the same batch (one forward/backward of
cross-entropy + Adam), and beside it the fast variant (the former defaults, all flags):

* ``defence-great+ce``: ``hmd defend --method great+ce``: the width-16 residual classifier,
  32x32 RGB, batch 64, at full strength (alpha = alpha_max, beta = beta_max: the double-backprop
  path), its auxiliary classifier the paper's full-width copy, BN statistics differentiated in g;
  ``(fast)``: ``--aux-width 8 --grad-bn detached``.
* ``distill-great``: ``hmd distill --method great``: the paper's CNN-5 student (width 32), a frozen
  residual teacher (width 16, Table 3's; BN running statistics set from the batch, as a trained
  teacher's would be), the paper's discriminator (CNN-5 at the student's width, leaky-ReLU 0.2,
  teacher and student gradients as two BN batches); ``(fast)``: ``--disc-arch resnet --disc-width 8
  --disc-bn joint --grad-bn detached``.
* secondary: ``distill-great (resnet student)``, the width-16 residual classifier as the student
  of a same-size residual teacher.

``--compare-faithful`` also times the defaults with autograd's double backprop
(``--input-grad autograd``, the same maths) in the same run. Steps are interleaved round-robin so
that load from other processes hits every variant alike; the median is reported.
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


# the former defaults, each a flag of hmd defend / hmd distill (README, "Paper vs this implementation")
FAST_DEFENCE = {"aux_width": DEFENCE_NET["width"] // 2, "grad_bn": "detached"}
FAST_DISTILL = {"disc_arch": "resnet", "disc_width": 8, "disc_bn": "joint", "grad_bn": "detached"}
# the same maths through autograd's double backprop (--compare-faithful)
AUTOGRAD = {"input_grad": "autograd"}
TARGETS = {"defence-great+ce/plain": 3.1, "distill-great/plain": 3.5}


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
    variants = [("", {}, {}), (" (fast)", FAST_DEFENCE, FAST_DISTILL)]
    if compare_faithful:
        variants.append((" (autograd)", AUTOGRAD, AUTOGRAD))
    for suffix, dopts, sopts in variants:
        steps["defence-great+ce" + suffix] = _defence_step(x, y, seed, {**dopts, **options})
        base["defence-great+ce" + suffix] = "plain"
        steps["distill-great" + suffix] = _distill_step(STUDENT_NET, TEACHER_NET, x, y, seed, {**sopts, **options})
        base["distill-great" + suffix] = "plain-cnn5"
    steps["distill-great (resnet student)"] = _distill_step(DEFENCE_NET, DEFENCE_NET, x, y, seed, options)
    base["distill-great (resnet student)"] = "plain"
    return steps, base


def _defence_step(x: torch.Tensor, y: torch.Tensor, seed: int, options: dict[str, Any]):
    dmodel = _net(**DEFENCE_NET, seed=seed)
    dopt = torch.optim.Adam(dmodel.parameters(), lr=1e-3)
    defence = create_defence("great+ce", dmodel.cfg, aux_arch=DEFENCE_NET["arch"], **options)
    defence.set_epoch(1, 1)  # alpha = alpha_max, beta = beta_max

    def defence_step():
        dopt.zero_grad(set_to_none=True)
        defence.train_step(dmodel, x, y)
        dopt.step()
    return defence_step


def _distill_step(student_net: dict, teacher_net: dict, x: torch.Tensor, y: torch.Tensor, seed: int,
                  options: dict[str, Any]):
    student = _net(**student_net, seed=seed)
    sopt = torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher = _net(**teacher_net, seed=seed + 1)
    with torch.no_grad():  # a trained teacher's BN running statistics match its activations
        for _ in range(3):
            teacher(x)
    teacher.eval()
    # what `hmd distill` trains with (train_distilled: the discriminator of the student's architecture)
    opts = {**distill_options("great", 1.0, None, None), "disc_arch": student_net["arch"], **options}
    distiller = create_distiller("great", student.cfg, teacher, **opts)

    def distill_step():
        sopt.zero_grad(set_to_none=True)
        distiller.train_step(student, x, y)
        sopt.step()
    return distill_step


def robust_step_ratios(batch_size: int = 64, size: int = 32, repeats: int = 30, warmup: int = 2,
                       threads: int | None = None, compare_faithful: bool = False, clock: str = "wall",
                       flops: bool = False, **options: Any) -> dict[str, Any]:
    """{"defence-great+ce/plain": r1, "distill-great/plain": r2, "... (fast)/plain": ..., "ms_per_step":
    {...}, ...} (medians).

    ``compare_faithful``: also the defaults through autograd (:data:`AUTOGRAD`) in the same run, as
    ``"... (autograd)/plain"`` ratios; ``clock="cpu"`` times this process's CPU time (steadier on a
    loaded machine: other processes' work is not counted); ``flops``: also each step's floating-point
    operations (convolutions and matrix products, ``torch.utils.flop_counter``) and their ratios, the
    floor an exact rewrite of a method cannot go below at equal kernel efficiency; ``options`` go
    to every variant of both methods."""
    if threads:
        torch.set_num_threads(threads)
    variants, base = _variants(batch_size, size, compare_faithful=compare_faithful, **options)
    times: dict[str, list[float]] = {k: [] for k in variants}
    now = time.process_time if clock == "cpu" else time.perf_counter
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = now()
            fn()
            if i >= warmup:
                times[name].append(1000.0 * (now() - t))
    ms = {k: statistics.median(v) for k, v in times.items()}
    extra: dict[str, Any] = {}
    if flops:
        from torch.utils.flop_counter import FlopCounterMode

        gflop = {}
        for name, fn in variants.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            gflop[name] = counter.get_total_flops() / 1e9
        extra = {"gflop_per_step": gflop, "flop_ratios": {f"{k}/plain": gflop[k] / gflop[b] for k, b in base.items()}}
    return {
        **{f"{k}/plain": ms[k] / ms[b] for k, b in base.items()}, **extra,
        "ms_per_step": ms, "ms_min": {k: min(v) for k, v in times.items()},
        "compared_with": base,
        "networks": {"plain": DEFENCE_NET, "plain-cnn5": STUDENT_NET, "teacher": TEACHER_NET},
        "batch_size": batch_size, "size": size, "repeats": repeats, "clock": clock,
        "threads": torch.get_num_threads(), "targets": TARGETS,
        "fast_variants": {"defence-great+ce (fast)": FAST_DEFENCE, "distill-great (fast)": FAST_DISTILL},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="(hmd defend / hmd distill default: 64)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by the wall clock or by this process's CPU time (steadier under load)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each step's floating-point operations (the floor of an exact rewrite)")
    parser.add_argument("--compare-faithful", action="store_true",
                        help="also time the defaults through autograd's double backprop (the same maths)")


def run(args: argparse.Namespace) -> int:
    res = robust_step_ratios(args.batch_size, args.size, args.repeats, threads=args.threads,
                             compare_faithful=getattr(args, "compare_faithful", False),
                             clock=getattr(args, "clock", "wall"), flops=getattr(args, "flops", False))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
