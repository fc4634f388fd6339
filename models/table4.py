"""`hmd bench table4`: the paper's Table 4 at reduced scale -- every weighting method trained on
the same data, network and budget in one run, our numbers beside the paper's."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shared.atomic import atomic_write_json

from models.registry import WEIGHTINGS
from models.train import TrainConfig, train

# GREAT paper, Table 4 (CIFAR-10 multi-task, ResNet-18 encoder, 50 epochs, GPUs)
PAPER_TABLE4 = {
    "equal": {"class_error_pct": 24.0, "rmse_colour": 0.131, "rmse_edges": 0.349, "rmse_denoised": 0.113},
    "gradnorm": {"class_error_pct": 23.5, "rmse_colour": 0.116, "rmse_edges": 0.270, "rmse_denoised": 0.091},
    "uncertainty": {"class_error_pct": 26.6, "rmse_colour": 0.111, "rmse_edges": 0.270, "rmse_denoised": 0.090},
    "great": {"class_error_pct": 24.2, "rmse_colour": 0.114, "rmse_edges": 0.252, "rmse_denoised": 0.087},
}
COLUMNS = ("class_error_pct", "rmse_colour", "rmse_edges", "rmse_denoised")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic:2000")
    parser.add_argument("--epochs", type=int, default=20, help="per method (default sized for ~1 h on 2 cores)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=",".join(WEIGHTINGS.names()))
    parser.add_argument("--out", default="runs/table4", help="one run folder per method + table4.json")


def format_table(results: dict[str, dict]) -> str:
    head = f"{'method':<12} {'class err %':>11} {'RMSE colour':>11} {'RMSE edges':>10} {'RMSE denoised':>13}   " \
           f"| paper: {'err %':>5} {'colour':>6} {'edges':>6} {'auto':>6}"
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        p = PAPER_TABLE4.get(m, {})
        ce = r["class_error_pct"]
        lines.append(f"{m:<12} {('n/a' if ce is None else f'{ce:.1f}'):>11} {r['rmse_colour']:>11.4f} "
                     f"{r['rmse_edges']:>10.4f} {r['rmse_denoised']:>13.4f}   | paper: "
                     f"{p.get('class_error_pct', float('nan')):>5.1f} {p.get('rmse_colour', float('nan')):>6.3f} "
                     f"{p.get('rmse_edges', float('nan')):>6.3f} {p.get('rmse_denoised', float('nan')):>6.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(WEIGHTINGS.names())
    if unknown:
        from shared.errors import UserError
        raise UserError(f"unknown methods {sorted(unknown)}")
    out = Path(args.out)
    results, seconds = {}, {}
    for m in methods:
        t = time.perf_counter()
        cfg = TrainConfig(method=m, data=args.data, epochs=args.epochs, size=args.size, width=args.width,
                          batch_size=args.batch_size, seed=args.seed, threads=args.threads)
        metrics = train(cfg, out / m, command="hmd bench table4 " + " ".join(sys.argv[3:]))
        results[m] = metrics["final"]
        seconds[m] = time.perf_counter() - t
    table = format_table(results)
    print(table, file=sys.stderr)
    report = {"benchmark": "table4", "config": vars(args), "results": results, "paper": PAPER_TABLE4,
              "seconds": seconds, "table": table}
    atomic_write_json(out / "table4.json", report)
    print(json.dumps(report, indent=2))
    return 0
