"""`hmd bench device`: ONNX Runtime FP32 / INT8 against torch eager, pipeline fps, FLOPs, memory.

Everything in one run, on one freshly exported model and the same frames: ``--model base`` (the
default: the shipped headset model at its camera resolution, fed a walk over the shipped real test
photos at the headset's 320x240 capture size) or ``--model none`` (an untrained MultiTaskNet at
``--size``, synthetic frames, as in the first rounds), or ``--model room`` (the shipped room model at
its exported size, fed a wearer's walk through a rendered room at 320x240, RGB input): batch-1
latency of torch eager, ONNX Runtime FP32 and INT8 (the device's own loader,
device.engine.load_model, with the same thread count as torch); the full headset pipeline (`hmd
device` in a subprocess, so its memory is the device's, free of torch) over the same frames,
through the default loop and, in FP32, through ``--pipelined`` and ``--sequential`` each; the
model's FLOPs
(torch.utils.flop_counter) and the achieved GFLOP/s against an estimate of this CPU's peak. JSON on
stdout; the command is in the output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"eager/ort-fp32": 1.5, "eager/ort-int8": 2.0, "pipeline-fps/inference-fps": 0.85, "peak_rss_mb": 400,
           "int8-pipeline-fps": 30.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="base", metavar="M",
                        help="a shipped model name or a run folder (default base); 'none' for an untrained network")
    parser.add_argument("--size", type=int, default=128, help="input side of the untrained network (--model none)")
    parser.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per backend")
    parser.add_argument("--frames", type=int, default=300, help="frames through the full pipeline")
    parser.add_argument("--threads", type=int, help="threads for torch and ONNX Runtime (default: the device's)")
    parser.add_argument("--seed", type=int, default=0)


def _latencies(backends: dict, runs: int, rounds: int = 10, warmup: int = 10) -> dict:
    """Batch-1 latency per backend, measured in interleaved rounds so that every backend sees the
    same background load (this matters on a shared machine). backends: name -> (fn, inputs)."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    for fn, inputs in backends.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, (fn, inputs) in backends.items():
            for i in range(per_round):
                x = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1000)
    out = {}
    for name, samples in times.items():
        arr = np.asarray(samples)
        out[name] = {"median_ms": round(float(np.median(arr)), 3), "p95_ms": round(float(np.percentile(arr, 95)), 3),
                     "mean_ms": round(float(arr.mean()), 3), "runs": int(arr.size)}
    return out


def _cpu_peak_gflops(threads: int) -> dict:
    """Peak fp32 GFLOP/s estimate: threads x clock x FLOPs/cycle from the SIMD width (2 FMA units)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"estimate_gflops": None, "how": "no /proc/cpuinfo"}
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    ghz = max(mhz) / 1000 if mhz else None
    if "avx512f" in flags:
        per_cycle, simd = 64, "avx512 (2 FMA x 16 lanes x 2)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, simd = 32, "avx2+fma (2 FMA x 8 lanes x 2)"
    else:
        per_cycle, simd = 8, "sse (4 lanes x 2)"
    peak = round(threads * ghz * per_cycle, 1) if ghz else None
    return {"estimate_gflops": peak, "threads": threads, "ghz": ghz, "flops_per_cycle": per_cycle, "simd": simd,
            "cpu": model.group(1).strip() if model else None}


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from device.engine import default_threads, load_model
    from device.metrics import peak_rss_mb
    from models.export import export_onnx
    from models.network import MultiTaskNet, NetConfig
    from shared.worlds import CLASS_NAMES, render_scene

    load_before = [round(v, 2) for v in os.getloadavg()]
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if args.model == "none":
        h = w = args.size
        rgb = [render_scene("studio", args.seed, i, h)[0] for i in range(32)]
        net = MultiTaskNet(NetConfig(num_classes=len(CLASS_NAMES))).eval()
        class_names = list(CLASS_NAMES)
    else:
        from hmd.assets import PHOTOS
        from models.train import load_model as load_run
        from shared.paths import resolve_model
        from shared.walk import HeadWalk, load_photos

        folder = resolve_model(args.model)
        net, ck = load_run(folder)
        h, w = ck["input_size"]
        class_names = ck["class_names"]
        if ck.get("task_set") == "room":
            from shared.manifest import Manifest
            from shared.rooms import RoomWalk

            if (folder / "model.manifest.json").is_file():  # the size it ships at (the camera's aspect)
                spec = Manifest.load(folder / "model.manifest.json").input
                h, w = spec.height, spec.width
            walk = RoomWalk("living", seed=args.seed, size=(240, 320))
            rgb = [walk.render(9 * i).rgb for i in range(32)]
        else:
            walk = HeadWalk(load_photos(PHOTOS / "test"), size=(240, 320), seed=args.seed)
            rgb = [walk.frame(9 * i) for i in range(32)]  # camera frames: the pipeline resizes them itself
    from shared.walk import fit_to

    if net.cfg.in_channels == 3:  # RGB models (room): 1 x 3 x H x W in [0, 1]
        gray = np.stack([fit_to(f, (h, w)).astype(np.float32).transpose(2, 0, 1) / 255.0 for f in rgb])
    else:
        gray = np.stack([(np.dot(fit_to(f, (h, w)).astype(np.float32), [0.299, 0.587, 0.114]) / 255.0)[None]
                         for f in rgb]).astype(np.float32)
    inputs = [g[None] for g in gray]  # 1 x C x H x W each
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        export_onnx(net, tmp / "fp32.onnx", height=h, width=w, class_names=class_names, version="bench-fp32",
                    parity_frames=gray[:4])
        export_onnx(net, tmp / "int8.onnx", height=h, width=w, class_names=class_names, version="bench-int8",
                    parity_frames=gray[:4], calib_frames=gray[:16], int8=True)
        export_s = time.perf_counter() - t0

        fp32 = load_model(tmp / "fp32.onnx", threads=threads)
        int8 = load_model(tmp / "int8.onnx", threads=threads)
        with torch.no_grad():
            torch_inputs = [torch.from_numpy(x) for x in inputs]
            lat = _latencies({"torch_eager": (net, torch_inputs), "ort_fp32": (fp32.infer, inputs),
                              "ort_int8": (int8.infer, inputs)}, args.runs)
            with FlopCounterMode(display=False) as counter:
                net(torch_inputs[0])
            flops = int(counter.get_total_flops())
        eager, ort_fp32, ort_int8 = lat["torch_eager"], lat["ort_fp32"], lat["ort_int8"]

        # the whole headset loop over the same frames, in its own process (no torch in it)
        frames_dir = tmp / "frames"
        frames_dir.mkdir()
        import cv2
        for i, f in enumerate(rgb):
            cv2.imwrite(str(frames_dir / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        env = dict(os.environ)
        env.pop("DISPLAY", None)
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
        pipes, cmds = {}, {}
        # the default loop in FP32 and INT8, and FP32 through each loop
        for name, precision, extra in (("fp32", "fp32", []), ("fp32-pipelined", "fp32", ["--pipelined"]),
                                       ("fp32-sequential", "fp32", ["--sequential"]), ("int8", "int8", [])):
            metrics = tmp / f"pipeline-{name}.json"
            cmd = [sys.executable, "-m", "hmd", "device", "--model", str(tmp / f"{precision}.onnx"), "--source",
                   f"images:{frames_dir}", "--loop", "--fps", "0", "--lockstep", "--headless", "--mode",
                   "side-by-side", "--max-frames", str(args.frames), "--threads", str(threads), "--metrics",
                   str(metrics)] + extra
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            pipes[name] = json.loads(metrics.read_text())
            cmds[name] = cmd
        pipe, pipelined, sequential = pipes["fp32"], pipes["fp32-pipelined"], pipes["fp32-sequential"]

    # frames per second are a throughput, frames / time, on both sides: the pipeline's frames over its
    # wall time, inference-only runs over theirs (1 / mean latency, not 1 / median: spikes count)
    inference_fps = 1000.0 / ort_fp32["mean_ms"]
    ratios = {
        "eager/ort-fp32": round(eager["median_ms"] / ort_fp32["median_ms"], 3),
        "eager/ort-int8": round(eager["median_ms"] / ort_int8["median_ms"], 3),
        "pipeline-fps/inference-fps": round(pipe["fps"] / inference_fps, 3),
    }
    int8_fps = pipes["int8"]["fps"]
    peak = _cpu_peak_gflops(threads)
    achieved = flops / (ort_fp32["median_ms"] / 1000) / 1e9
    result = {
        "command": "hmd bench device " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None
                                                   and k in ("model", "size", "runs", "frames", "threads", "seed")),
        "model": {"name": args.model, "architecture": net.cfg.to_dict(), "input": [1, net.cfg.in_channels, h, w],
                  "parameters": int(sum(p.numel() for p in net.parameters())), "export_s": round(export_s, 1)},
        "threads": threads,
        "cpu_count": os.cpu_count(),
        # other work on the machine skews everything, torch eager most (its OpenMP pool): see these
        "load_average_1_5_15": {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]},
        "latency_batch1": {"torch_eager": eager, "ort_fp32": ort_fp32, "ort_int8": ort_int8},
        "ratios": ratios,
        "int8_pipeline": {"fps": int8_fps, "frames": pipes["int8"]["frames_shown"],
                          "peak_rss_mb": pipes["int8"]["peak_rss_mb"]},
        "pipeline": {"fps": pipe["fps"], "inference_only_fps": round(inference_fps, 2),
                     "frames": pipe["frames_shown"], "camera_frames_dropped": pipe["camera_frames_dropped"],
                     "latency_ms_p50": {k: v.get("p50") for k, v in pipe["latency_ms"].items()},
                     "command": " ".join(["hmd device"] + cmds["fp32"][4:])},
        # the same FP32 frames through each loop: what pipelining gains in FPS and costs in latency
        # (capture_to_shown); "default" is the loop `hmd device` picked for this model
        "loops": {"default": pipe["loop"],
                  "default_choice": pipe.get("loop_choice"),
                  "pipelined/sequential_fps": round(pipelined["fps"] / sequential["fps"], 3),
                  **{name: {"fps": run["fps"], "frames": run["frames_shown"],
                            "latency_ms_p50": {k: v.get("p50") for k, v in run["latency_ms"].items()}}
                     for name, run in (("pipelined", pipelined), ("sequential", sequential))}},
        "flops": {"per_frame_gflop": round(flops / 1e9, 4), "achieved_gflops_ort_fp32": round(achieved, 2),
                  "cpu_peak": peak,
                  "fraction_of_peak": round(achieved / peak["estimate_gflops"], 4) if peak.get("estimate_gflops") else None},
        "peak_rss_mb": max(p["peak_rss_mb"] for p in pipes.values()),  # the headset process (onnxruntime, OpenCV, numpy)
        "bench_process_peak_rss_mb": peak_rss_mb(),  # this process, torch included
        "targets": TARGETS,
        "meets_targets": {k: (ratios[k] >= v if k in ratios else int8_fps >= v if k == "int8-pipeline-fps"
                              else max(p["peak_rss_mb"] for p in pipes.values()) < v) for k, v in TARGETS.items()},
    }
    print(json.dumps(result, indent=2))
    return 0
