"""`hmd bench table4`: the paper's Table 4 at reduced scale -- every weighting method trained on
the same data, network and budget in one run, our numbers beside the paper's.

``--tasks cifar`` (default) is the left half (CIFAR-10: class, colour, edges, denoised); ``--tasks room``
the right half (NYUv2 in the paper: depth, normals, layout keypoints; here rendered rooms,
models/room_tasks.py). Every method trains on the same frames, loaded once."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shared.atomic import atomic_write_json

from models.registry import DEFAULT_TASK_SET, TASK_SETS, WEIGHTINGS
from models.train import TrainConfig, build_data, train

# GREAT paper, Table 4 (CIFAR-10 multi-task, ResNet-18 encoder, 50 epochs, GPUs)
PAPER_TABLE4 = {
    "equal": {"class_error_pct": 24.0, "rmse_colour": 0.131, "rmse_edges": 0.349, "rmse_denoised": 0.113},
    "gradnorm": {"class_error_pct": 23.5, "rmse_colour": 0.116, "rmse_edges": 0.270, "rmse_denoised": 0.091},
    "uncertainty": {"class_error_pct": 26.6, "rmse_colour": 0.111, "rmse_edges": 0.270, "rmse_denoised": 0.090},
    "great": {"class_error_pct": 24.2, "rmse_colour": 0.114, "rmse_edges": 0.252, "rmse_denoised": 0.087},
}
COLUMNS = ("class_error_pct", "rmse_colour", "rmse_edges", "rmse_denoised")
# GREAT paper, Table 4, NYUv2 (dilated ResNet-53 encoder, 320x320 in, 80x80 out, 30 epochs)
PAPER_TABLE4_ROOM = {
    "equal": {"rmse_depth": 0.861, "normals_1_minus_cos": 0.207, "rmse_keypoints": 0.407},
    "gradnorm": {"rmse_depth": 0.810, "normals_1_minus_cos": 0.169, "rmse_keypoints": 0.377},
    "uncertainty": {"rmse_depth": 0.796, "normals_1_minus_cos": 0.192, "rmse_keypoints": 0.389},
    "great": {"rmse_depth": 0.779, "normals_1_minus_cos": 0.167, "rmse_keypoints": 0.382},
}
ROOM_DEFAULTS = {"data": "rooms:600", "size": 64, "epochs": 8, "batch_size": 16}  # ~1 h on 2 cores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=DEFAULT_TASK_SET, choices=TASK_SETS.names(),
                        help="cifar: the CIFAR-10 half; room: the NYUv2 half on rendered rooms")
    parser.add_argument("--data", default=None,
                        help=f"default synthetic:2000 (cifar), {ROOM_DEFAULTS['data']} (room)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"per method (default 20 for cifar, {ROOM_DEFAULTS['epochs']} for room: ~1 h on 2 cores)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"input side (default: the source's; {ROOM_DEFAULTS['size']} for room, outputs a quarter)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default 32 (cifar), {ROOM_DEFAULTS['batch_size']} (room)")
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


def format_room_table(results: dict[str, dict]) -> str:
    head = (f"{'method':<12} {'RMSE depth m':>12} {'1-|cos|':>8} {'angle deg':>9} {'RMSE kp':>8}   "
            f"| paper NYUv2: {'depth':>6} {'1-|cos|':>7} {'kp':>6}")
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        p = PAPER_TABLE4_ROOM.get(m, {})
        lines.append(f"{m:<12} {r['rmse_depth']:>12.4f} {r['normals_1_minus_cos']:>8.4f} "
                     f"{r['normals_mean_angle_deg']:>9.2f} {r['rmse_keypoints']:>8.4f}   | paper NYUv2: "
                     f"{p.get('rmse_depth', float('nan')):>6.3f} {p.get('normals_1_minus_cos', float('nan')):>7.3f} "
                     f"{p.get('rmse_keypoints', float('nan')):>6.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from shared.errors import UserError

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(WEIGHTINGS.names())
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)}")
    room = args.tasks == "room"
    defaults = ROOM_DEFAULTS if room else {"data": "synthetic:2000", "size": None, "epochs": 20, "batch_size": 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out)
    results, seconds = {}, {}
    data = None  # every method trains on the same frames, rendered or loaded once
    for m in methods:
        t = time.perf_counter()
        cfg = TrainConfig(method=m, tasks=args.tasks, data=args.data, epochs=args.epochs, size=args.size,
                          width=args.width, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
        data = data or build_data(cfg)
        metrics = train(cfg, out / m, command="hmd bench table4 " + " ".join(sys.argv[3:]), data=data)
        results[m] = metrics["final"]
        seconds[m] = time.perf_counter() - t
    table = (format_room_table if room else format_table)(results)
    print(table, file=sys.stderr)
    report = {"benchmark": "table4", "tasks": args.tasks, "config": vars(args), "results": results,
              "paper": PAPER_TABLE4_ROOM if room else PAPER_TABLE4, "seconds": seconds, "table": table}
    atomic_write_json(out / "table4.json", report)
    print(json.dumps(report, indent=2))
    return 0
