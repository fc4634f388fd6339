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

from models.mtl_architectures import method_spec, parse_methods
from models.registry import DEFAULT_TASK_SET, TASK_SETS
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
    parser.add_argument("--methods", default=",".join(PAPER_TABLE4),
                        help="comma list, or all: every weighting (equal, gradnorm, uncertainty, great, dwa, pcgrad, "
                        "cagrad) on the shared network, then the architectures mtan and astmt (default: the paper's four)")
    parser.add_argument("--timing-steps", type=int, default=5,
                        help="round-robin steps per method for the step-time column (CPU time, after 1 warm-up)")
    parser.add_argument("--out", default="runs/table4", help="one run folder per method + table4.json")


ROOM_COLUMNS = ("rmse_depth", "normals_1_minus_cos", "rmse_keypoints")  # the paper's; all lower-is-better


def delta_m(results: dict[str, dict], columns: tuple[str, ...], baseline: str = "equal") -> dict[str, float]:
    """Delta-m % (Maninis et al. 2019; Liu et al. 2021): the mean over metrics k of
    (-1)^{l_k} (M_k - B_k) / B_k * 100 against the ``baseline`` method, l_k = 1 for lower-is-better
    metrics (every Table 4 column), so a positive value is an improvement. A metric missing in
    either (class error of an unlabelled set) is left out."""
    if baseline not in results:
        return {}
    base = results[baseline]
    out = {}
    for m, r in results.items():
        terms = [-(r[k] - base[k]) / base[k] * 100.0 for k in columns
                 if r.get(k) is not None and base.get(k) not in (None, 0)]
        out[m] = sum(terms) / len(terms) if terms else float("nan")
    return out


def _extra_columns(m: str, extras: dict[str, dict] | None) -> str:
    if not extras:
        return ""
    e = extras.get(m, {})
    return (f" {e.get('params', 0) / 1e3:>8.1f}k {e.get('step_vs_equal', float('nan')):>6.2f}x "
            f"{e.get('delta_m_pct', float('nan')):>+7.2f}")


EXTRA_HEAD = f" {'params':>9} {'step/eq':>7} {'dm %':>7}"


def format_table(results: dict[str, dict], extras: dict[str, dict] | None = None) -> str:
    head = f"{'method':<12} {'class err %':>11} {'RMSE colour':>11} {'RMSE edges':>10} {'RMSE denoised':>13}" \
           f"{EXTRA_HEAD if extras else ''}   | paper: {'err %':>5} {'colour':>6} {'edges':>6} {'auto':>6}"
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        p = PAPER_TABLE4.get(m, {})
        ce = r["class_error_pct"]
        lines.append(f"{m:<12} {('n/a' if ce is None else f'{ce:.1f}'):>11} {r['rmse_colour']:>11.4f} "
                     f"{r['rmse_edges']:>10.4f} {r['rmse_denoised']:>13.4f}{_extra_columns(m, extras)}   | paper: "
                     f"{p.get('class_error_pct', float('nan')):>5.1f} {p.get('rmse_colour', float('nan')):>6.3f} "
                     f"{p.get('rmse_edges', float('nan')):>6.3f} {p.get('rmse_denoised', float('nan')):>6.3f}")
    return "\n".join(lines)


def format_room_table(results: dict[str, dict], extras: dict[str, dict] | None = None) -> str:
    head = (f"{'method':<12} {'RMSE depth m':>12} {'1-|cos|':>8} {'angle deg':>9} {'RMSE kp':>8}"
            f"{EXTRA_HEAD if extras else ''}   | paper NYUv2: {'depth':>6} {'1-|cos|':>7} {'kp':>6}")
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        p = PAPER_TABLE4_ROOM.get(m, {})
        lines.append(f"{m:<12} {r['rmse_depth']:>12.4f} {r['normals_1_minus_cos']:>8.4f} "
                     f"{r['normals_mean_angle_deg']:>9.2f} {r['rmse_keypoints']:>8.4f}{_extra_columns(m, extras)}"
                     f"   | paper NYUv2: "
                     f"{p.get('rmse_depth', float('nan')):>6.3f} {p.get('normals_1_minus_cos', float('nan')):>7.3f} "
                     f"{p.get('rmse_keypoints', float('nan')):>6.3f}")
    return "\n".join(lines)


def method_costs(methods: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """Each trained method's parameter count (the inference network: what the headset runs) and,
    with ``--timing-steps``, its step time relative to equal weighting, timed round-robin on one
    batch of the table's configuration (CPU time of this process: steadier on a shared machine)."""
    import torch

    from models.bench import step_times
    from models.train import load_model

    costs: dict[str, dict] = {}
    for m in methods:
        model, _ = load_model(out / m)
        costs[m] = {"params": sum(p.numel() for p in model.parameters())}
    if args.timing_steps:
        timed = methods if "equal" in methods else ["equal"] + methods
        ns = argparse.Namespace(tasks=args.tasks, batch_size=args.batch_size, size=args.size or 64, width=args.width,
                                warmup=1, steps=args.timing_steps)
        torch.manual_seed(args.seed)
        ms = step_times(timed, ns, clock_name="cpu")
        for m in methods:
            costs[m].update(ms_per_step=ms[m], step_vs_equal=ms[m] / ms["equal"])
    return costs


def run(args: argparse.Namespace) -> int:
    from shared.errors import UserError

    methods = parse_methods(args.methods)
    if args.timing_steps < 0:
        raise UserError("--timing-steps must be >= 0")
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
        weighting, architecture = method_spec(m)
        cfg = TrainConfig(method=weighting, architecture=architecture, tasks=args.tasks, data=args.data, epochs=args.epochs, size=args.size,
                          width=args.width, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
        data = data or build_data(cfg)
        metrics = train(cfg, out / m, command="hmd bench table4 " + " ".join(sys.argv[3:]), data=data)
        results[m] = metrics["final"]
        seconds[m] = time.perf_counter() - t
    extras = method_costs(methods, args, out)
    for m, dm in delta_m(results, ROOM_COLUMNS if room else COLUMNS).items():
        extras[m]["delta_m_pct"] = dm
    table = (format_room_table if room else format_table)(results, extras)
    print(table, file=sys.stderr)
    report = {"benchmark": "table4", "tasks": args.tasks, "config": vars(args), "results": results,
              "costs": extras, "delta_m_baseline": "equal" if "equal" in results else None,
              "paper": PAPER_TABLE4_ROOM if room else PAPER_TABLE4, "seconds": seconds, "table": table}
    atomic_write_json(out / "table4.json", report)
    print(json.dumps(report, indent=2))
    return 0
