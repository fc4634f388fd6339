"""`hmd bench train`: ms per training step of every weighting method on the same network and
batch, measured round-robin in one run, with ratios to ``equal``; peak step memory of each
method measured in its own subprocess; data generation speed against training speed."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.data import TaskData, load_source
from models.network import MultiTaskNet, NetConfig
from models.mtl_architectures import method_spec, parse_methods
from models.registry import DEFAULT_TASK_SET, TASK_SETS, create_mtl_architecture, create_weighting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=DEFAULT_TASK_SET, choices=TASK_SETS.names(),
                        help="task set: cifar (synthetic frames) or room (rendered rooms, the room network)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 32 (cifar), 16 (room: the shipped room model's training batch)")
    parser.add_argument("--size", type=int, default=None,
                        help="input side; default: 64 (cifar), 160 (room: the shipped room model's training size)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (round-robin)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by the wall clock or by this process's CPU time (steadier on a loaded "
                        "machine: other processes' work is not counted)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--robust", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the defence (great+ce) and GREAT distillation steps")
    parser.add_argument("--methods", default="all",
                        help="all (every weighting on the shared network, then mtan and astmt) or a comma list")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)


def _data(args, frames: int = 256, seed: int = 0):
    """``frames`` training frames of the task set, with their targets, at ``args.size``."""
    if getattr(args, "tasks", DEFAULT_TASK_SET) == "room":
        from models.room_tasks import RoomTaskData
        from shared.rooms import room_frames

        return RoomTaskData(room_frames(frames, seed=seed, size=args.size), "rooms")
    return TaskData(load_source(f"synthetic:{frames}", "train", args.size, seed))


def _model_and_data(args, frames: int = 256, seed: int = 0):
    """The task set's network and ``frames`` training frames (with their targets) at ``args.size``."""
    if getattr(args, "tasks", DEFAULT_TASK_SET) == "room":
        from models.room_network import RoomNet
        from models.room_tasks import net_config

        return RoomNet(net_config(args.width, 32)), _data(args, frames, seed)
    return MultiTaskNet(NetConfig(width=args.width)), _data(args, frames, seed)


def _setup(method_name: str, args) -> tuple:
    """One training step of ``method_name`` (a weighting, or an architecture method: mtan, astmt)."""
    weighting, architecture = method_spec(method_name)
    torch.manual_seed(0)
    model, data = _model_and_data(args, frames=args.batch_size if args.tasks == "room" else 256)
    model = create_mtl_architecture(architecture, model).train()
    g = torch.Generator().manual_seed(0)
    x, targets = data.batch(torch.arange(args.batch_size) % len(data), g)
    method = create_weighting(weighting, model.tasks)
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
    opt = torch.optim.Adam(list(model.parameters()) + method.main_parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        method.step(model, x, targets)
        opt.step()
    return step


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _memory_child(args) -> int:
    torch.set_num_threads(args.threads)
    step = _setup(args.memory_child, args)
    before = _rss_mb()
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "step_mb": peak - before}))
    return 0


def measure_memory(method: str, args) -> dict:
    cmd = [sys.executable, "-m", "hmd", "bench", "train", "--memory-child", method, "--tasks", args.tasks, "--batch-size",
           str(args.batch_size), "--size", str(args.size), "--width", str(args.width), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_times(methods: list[str], args, clock_name: str | None = None) -> dict[str, float]:
    """Median ms per training step of every method on the same network and batch, round-robin
    (machine noise hits every method alike); ``args``: tasks, batch_size, size, width, warmup, steps."""
    steps = {m: _setup(m, args) for m in methods}
    for m in methods:
        for _ in range(args.warmup):
            steps[m]()
    times: dict[str, list[float]] = {m: [] for m in methods}
    clock = time.process_time if (clock_name or getattr(args, "clock", "wall")) == "cpu" else time.perf_counter
    for _ in range(args.steps):
        for m in methods:
            t = clock()
            steps[m]()
            times[m].append(clock() - t)
    return {m: 1000 * statistics.median(v) for m, v in times.items()}


# --size / --batch-size when not given: the shipped models' training configuration per task set
DEFAULTS = {"cifar": {"size": 64, "batch_size": 32}, "room": {"size": 160, "batch_size": 16}}


def run(args: argparse.Namespace) -> int:
    for key, value in DEFAULTS[args.tasks].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.memory_child:
        return _memory_child(args)
    torch.set_num_threads(args.threads)
    methods = parse_methods(getattr(args, "methods", "all"))
    for needed in ("equal", "great"):
        if needed not in methods:
            methods.insert(0, needed)
    ms = step_times(methods, args)
    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    result: dict = {
        "benchmark": "train",
        "config": {"tasks": args.tasks, "clock": args.clock, "batch_size": args.batch_size, "size": args.size, "width": args.width,
                   "steps": args.steps, "threads": args.threads},
        "ms_per_step": ms,
        "ratios": {f"{m}/equal": ms[m] / ms["equal"] for m in methods if m != "equal"},
        "targets": {"great/equal": 1.15, "gradnorm/equal": 1.5, "great/equal memory": 1.2},
    }
    # data generation must keep up with training (frames and their targets, rendered anew)
    n_gen = 48 if args.tasks == "room" else 200
    warm_ms = 0.0
    if args.tasks == "room":  # the procedural textures: made once per process, not per frame
        from shared.rooms import warm_texture_cache

        t = clock()
        warm_texture_cache()
        warm_ms = 1000 * (clock() - t)
    passes = []
    for seed in (1, 2, 3):  # other scenes (rooms) than the timed batch: no frame cached; no network built
        t = clock()
        _data(args, frames=n_gen, seed=seed)
        passes.append(1000 * (clock() - t) / n_gen)
    gen_ms = statistics.median(passes)  # of three passes: one pass is ~0.2 s, easily skewed by other load
    result["data"] = {"generate_and_targets_ms_per_frame": gen_ms, "generate_ms_per_frame_passes": passes,
                      "textures_once_per_process_ms": warm_ms,
                      "train_ms_per_frame_great": ms["great"] / args.batch_size,
                      "generation_speed_over_training_speed": (ms["great"] / args.batch_size) / gen_ms}
    if not args.no_memory:
        mem = {m: measure_memory(m, args) for m in ("equal", "great")}
        result["memory"] = mem
        result["ratios"]["great/equal memory"] = mem["great"]["step_mb"] / max(1e-6, mem["equal"]["step_mb"])
        result["ratios"]["great/equal peak rss"] = mem["great"]["peak_rss_mb"] / mem["equal"]["peak_rss_mb"]
    if args.robust and args.tasks == "cifar":
        from models.bench_robust import robust_step_ratios

        # the classifiers' own training configuration (hmd defend / hmd distill: batch 64, 32x32),
        # not the multi-task one above
        robust = robust_step_ratios(batch_size=64, size=32, repeats=max(30, args.steps), threads=args.threads,
                                    clock=args.clock)
        result["robust"] = robust
        # the paper's defaults against their targets, the fast variants (flags) beside them
        for k in ("defence-great+ce/plain", "distill-great/plain", "defence-great+ce (fast)/plain",
                  "distill-great (fast)/plain"):
            result["ratios"][k] = robust[k]
        result["targets"].update(robust["targets"])
    print(json.dumps(result, indent=2))
    return 0
