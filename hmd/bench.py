"""`hmd bench WHAT`: benchmarks that print JSON with ratios measured side by side in one run.

A benchmark of one package lives in it (``models.bench``, ``models.table4``, ...); one that
spans packages lives here in hmd/ (``hmd.bench_device``, ``hmd.bench_cloud``,
``hmd.bench_personalise``). Each exposes ``add_arguments(parser)`` and ``run(args) -> int``,
like a subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "train": ("models.bench", "ms per training step of every method vs equal weighting, memory ratio"),
    "table4": ("models.table4", "reduced-scale Table 4: weightings and architectures (--methods all), one budget"),
    "table1": ("models.tables_robust", "reduced-scale Table 1: the five defence methods on one budget"),
    "table3": ("models.tables_robust", "reduced-scale Table 3: distillation, dense and sparse"),
    "table5": ("models.tables_robust", "the patent's Table 5 (MNIST-style, eps 0.2, beta_max 20) on Fashion-MNIST"),
    "device": ("hmd.bench_device", "ONNX Runtime FP32/INT8 vs torch eager, pipeline fps, memory"),
    "cloud": ("hmd.bench_cloud", "upload throughput vs copy, concurrent devices, upload-to-serving time"),
    "real": ("hmd.bench_real", "the headset model vs classical tools on real footage (RMSE ratios per task)"),
    "personalise": ("hmd.bench_personalise", "personalisation with GREAT vs equal weighting, same frames and budget"),
    "room-real": ("models.room_real", "the room model's ordinal depth on a real stereo pair vs 'lower is nearer'"),
    "soak": ("hmd.bench_soak", "headsets uploading while the server is killed, full and fed bad input: nothing lost"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")


def run(args: argparse.Namespace) -> int:
    module_name, helptext = BENCHES[args.what]
    module = importlib.import_module(module_name)
    from hmd.cli import ArgumentParser  # shows every option's default in --help, like every hmd command

    parser = ArgumentParser(prog=f"hmd bench {args.what}", description=helptext)
    if hasattr(module, f"add_arguments_{args.what}"):
        getattr(module, f"add_arguments_{args.what}")(parser)
        fn = getattr(module, f"run_{args.what}")
    else:
        module.add_arguments(parser)
        fn = module.run
    sub = parser.parse_args(args.rest)
    return int(fn(sub) or 0)


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(what=sys.argv[1], rest=sys.argv[2:])))
