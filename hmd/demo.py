"""`hmd demo`: the whole loop on this machine, nothing to set up.

1. the shipped base model (``base``: real photos, camera resolution);
2. the cloud service on 127.0.0.1 (a real `hmd cloud serve` process) and one provisioned headset;
3. the simulated headset walking over real photos the base model never saw (the wearer's own
   surroundings; ``--scene``): live inference, overlay, recording, journal, background upload;
4. the cloud personalises the wearer's model with GREAT, gates it and pushes it (SSE);
5. the headset verifies it and hot-swaps it live, and keeps running on it;
6. a before/after table on held-out frames (the wearer's later views, and the base model's own
   validation set) with the classical tools beside them, `summary.json`, the recorded overlay video
   and a plot of the metrics across versions.

``--scene synthetic:WORLD`` with ``--base-run base-studio`` runs the earlier synthetic-world demo.
``--base-run room`` runs it with the room model: the wearer walks a rendered room (``--scene
rooms:STYLE``), the room teacher labels the frames, and every version is scored on held-out rendered
rooms with exact labels (:mod:`hmd.demo_room`).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shared.errors import UserError

MARKER = ".hmd-demo"
METRICS = ("rmse_colour", "rmse_edges", "rmse_denoised")
CLASSICAL = "classical tools"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="everything lands here")
    parser.add_argument("--scene", default=None, metavar="SOURCE",
                        help="the wearer's surroundings: walk:DIR (real photos; default: the shipped test photos, "
                             "which the base model never saw) or synthetic:WORLD")
    parser.add_argument("--base-run", default="base", help="the headset's base model (a shipped name or a run folder)")
    parser.add_argument("--teacher-run", default="", help="a cloud teacher for class targets ('' for none)")
    parser.add_argument("--base-data", default=None, help="the base training data (default: the base run's own)")
    parser.add_argument("--base-val-data", default=None,
                        help="the base model's validation set for the gate (default: the base run's own)")
    parser.add_argument("--job-frames", type=int, default=480, help="uploaded frames that start a job (default 480)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="personalisation epochs (default 4: 100 steps, most of the 200-step gain in half the time)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap personalisation steps per epoch")
    parser.add_argument("--lr", type=float, default=None, help="personalisation learning rate (cloud default)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative loss on the base set")
    parser.add_argument("--journal-every", type=int, default=9, help="journal every k-th frame (default 9: a job's frames span the walk)")
    parser.add_argument("--fps", type=float, default=20.0, help="the simulated camera's frame rate")
    parser.add_argument("--after-frames", type=int, default=200, help="frames to run on the new model")
    parser.add_argument("--eval-frames", type=int, default=120, help="held-out frames per evaluation set")
    parser.add_argument("--timeout", type=float, default=1500.0, help="give up after this many seconds (default 1500)")
    parser.add_argument("--port", type=int, default=0, help="cloud port (0: a free one)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run for tests: few frames and steps, small base data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not a demo folder: choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by hmd demo\n")


def _hmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hmd", *args]


def _start_cloud(args, out: Path, port: int) -> tuple[subprocess.Popen, str, bytes, Path]:
    import httpx

    data = out / "cloud"
    r = subprocess.run(_hmd("cloud", "add-device", "headset-1", "--data-dir", str(data)), capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        raise UserError(f"could not provision the headset: {r.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    token, trust_key = fields["token"], base64.b64decode(fields["trust-key"])
    cmd = ["cloud", "serve", "--data-dir", str(data), "--port", str(port), "--base-run", args.base_run,
           "--auto-job-frames", str(args.job_frames), "--epochs", str(args.epochs), "--tolerance",
           str(args.tolerance), "--log-level", "warning"]
    if args.base_data:
        cmd += ["--base-data", args.base_data]
    if args.base_val_data:
        cmd += ["--base-val-data", args.base_val_data]
    if args.teacher_run:
        cmd += ["--teacher-run", args.teacher_run]
    if args.max_steps:
        cmd += ["--max-steps-per-epoch", str(args.max_steps)]
    if args.lr:
        cmd += ["--lr", str(args.lr)]
    log = open(out / "cloud.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one core for the cloud, one for the headset
    proc = subprocess.Popen(_hmd(*cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the cloud service exited (code {proc.returncode}); see {out / 'cloud.log'}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200 and (data / "base-model" / "manifest.json").exists():
                return proc, token, trust_key, data
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the cloud service did not come up in 180 s; see {out / 'cloud.log'}")


def _jobs(url: str, token: str) -> list[dict]:
    import httpx

    try:
        r = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        return r.json() if r.status_code == 200 else []
    except httpx.HTTPError:
        return []


def _run_headset(args, out: Path, url: str, token: str, trust_key: bytes, base_folder: Path) -> tuple[dict, dict]:
    from device import sync as sync_module
    from device.capture import open_source
    from device.runtime import HeadsetRuntime, RuntimeConfig

    cfg = RuntimeConfig(mode="side-by-side", headless=True, record=str(out / "overlay.mp4"),
                        journal_dir=str(out / "journal"), journal_every=args.journal_every, journal_mb=64,
                        store_dir=str(out / "headset-store"), public_key=trust_key, threads=1,
                        metrics_path=str(out / "headset.json"))
    rt = HeadsetRuntime(open_source(args.scene, size=(240, 320), fps=args.fps, seed=0), base_folder, cfg)
    base_version = rt.model_version
    sync = sync_module.start(rt, url, token, upload_interval=1.0, poll_interval=3.0, batch_frames=48)
    state: dict[str, Any] = {"swapped_at_frame": None, "job": None, "jobs": [], "timed_out": False,
                             "base": base_version}
    done = threading.Event()

    def monitor() -> None:
        t0 = time.time()
        last = 0.0
        while not done.is_set():
            now = time.time()
            jobs = _jobs(url, token)
            if jobs:
                state["jobs"] = jobs
                state["job"] = jobs[-1]
            if state["swapped_at_frame"] is None and rt.model_version != base_version:
                state["swapped_at_frame"] = rt.frames_shown
                _say(f"hot-swapped to {rt.model_version} at frame {rt.frames_shown} (no frame lost)")
            if state["swapped_at_frame"] is not None and rt.frames_shown >= state["swapped_at_frame"] + args.after_frames:
                rt.stop()
                return
            job = state["job"]
            ended = [j for j in state["jobs"] if j["state"] in ("rejected", "failed")]
            if ended and state["swapped_at_frame"] is None:  # the first finished job decides (more may queue)
                _say(f"the cloud did not accept a new model: {ended[0]['state']}: {ended[0].get('reason')}")
                rt.stop()
                return
            if now - t0 > args.timeout:
                state["timed_out"] = True
                _say(f"no new model within {args.timeout:.0f} s: stopping")
                rt.stop()
                return
            if now - last >= 5:
                last = now
                js = "no job yet"
                if job:
                    prog = job.get("progress") or {}
                    js = f"job {job['state']}" + (f" ({prog.get('stage')}, {100 * prog.get('fraction', 0):.0f}%)"
                                                  if prog.get("stage") else "")
                _say(f"t={now - t0:4.0f}s frames shown {rt.frames_shown}, model {rt.model_version}, "
                     f"uploaded {sync.stats.uploaded_frames} "
                     f"frames, {js}")
            time.sleep(0.5)

    mon = threading.Thread(target=monitor, name="demo-monitor", daemon=True)
    mon.start()
    try:
        summary = rt.run()
    finally:
        done.set()
        sync.stop()
    mon.join(5)
    return summary, state


WEARER_LATER = 100_000  # the wearer's held-out views: frames of the same walk far beyond the demo's


def _evaluation_sets(args, base_run: Path, n: int) -> dict[str, list]:
    """RGB frames nobody trained on: the wearer's surroundings seen later (same scene, unseen views) and
    the base model's own validation set (what the gate guards against forgetting)."""
    from device.capture import open_source
    from hmd.assets import default_base_sources
    from models.train import read_checkpoint
    from shared.walk import HeadWalk, load_photos, parse_walk, walk_seed

    cam = open_source(args.scene, size=(240, 320), fps=0, seed=0)
    if hasattr(cam, "walk"):
        views = [cam.walk.frame(WEARER_LATER + 5 * i) for i in range(n)]
    else:  # a synthetic world: a different camera seed, as before
        cam = open_source(args.scene, size=(240, 320), fps=0, seed=12345)
        views = [cam.read() for _ in range(3 * n)][::3]
    sets = {"wearer, later views": views}
    base_val = args.base_val_data or default_base_sources(base_run, read_checkpoint(base_run))[1]
    if base_val and base_val.startswith("walk:"):
        folder, _ = parse_walk(base_val)
        walk = HeadWalk(load_photos(folder), size=(240, 320), seed=walk_seed(folder, 1))
        sets["base validation (real photos)"] = [walk.frame(7 * i) for i in range(n)]
    return sets


def _evaluate(folder: Path, frames: list) -> tuple[dict[str, float], dict[str, float]]:
    """(network, classical) RMSE per dense task, as `hmd bench real` measures them."""
    from device.engine import load_model
    from hmd.bench_real import score

    engine = load_model(folder, threads=1, warm_runs=1)
    rmse, _ = score(engine, frames, seed=0)
    return ({f"rmse_{t}": v for t, v in rmse["network"].items()},
            {f"rmse_{t}": v for t, v in rmse["classical"].items()})


def _plot(table: dict, versions: list[str], path: Path, metrics: tuple[str, ...] = METRICS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 3.8))
    colours = {name: f"C{i}" for i, name in enumerate(table)}  # one colour per set in every panel
    for ax, metric in zip(axes, metrics):
        for set_name, rows in table.items():
            ys = [rows[v][metric] for v in versions]
            if all(y is not None for y in ys):
                ax.plot(range(len(versions)), ys, marker="o", label=set_name, color=colours[set_name])
        ax.set_title(metric.replace("_", " "))
        ax.set_xticks(range(len(versions)))
        ax.set_xticklabels([v if len(v) < 18 else v[:8] + "…" + v[-8:] for v in versions], fontsize=7)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("held-out metrics across model versions (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _snapshot(video: Path, png: Path) -> bool:
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.set(cv2.CAP_PROP_POS_FRAMES, max(0, n - 10))
    ok, frame = cap.read()
    cap.release()
    if ok:
        cv2.imwrite(str(png), frame)
    return bool(ok)


def _format_table(table: dict, columns: list[str], metrics: tuple[str, ...] = METRICS) -> str:
    lines = [f"{'held-out set':<32} {'metric':<14} " + " ".join(f"{c[:18]:>18}" for c in columns)]
    for set_name, rows in table.items():
        for metric in metrics:
            vals = [rows[c][metric] if c in rows else None for c in columns]
            lines.append(f"{set_name:<32} {metric:<14} " + " ".join(
                f"{'' if v is None else f'{v:.4f}':>18}" for v in vals))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hmd.assets import PHOTOS
    from models.personalise import base_regressions, wearer_score
    from models.train import read_checkpoint
    from shared.paths import resolve_model

    base_run = resolve_model(args.base_run)
    if not (base_run / "checkpoint.pt").is_file():
        raise UserError(f"base model {args.base_run} is not a run folder (rebuild with scripts/train_assets.sh)")
    room = read_checkpoint(base_run).get("task_set") == "room"
    if room:
        from hmd import demo_room
        from models.room_personalise import room_regressions as base_regressions, room_score as wearer_score

        args.scene = args.scene or demo_room.DEFAULT_SCENE
        demo_room.scene_style(args.scene)  # a bad scene fails here, before anything starts
    args.scene = args.scene or f"walk:{PHOTOS / 'test'}"
    metrics = demo_room.METRICS if room else METRICS
    if args.quick:
        args.job_frames, args.epochs = min(args.job_frames, 48), 1
        args.max_steps = args.max_steps or 4
        args.lr = args.lr or 1e-4  # a handful of steps with fresh Adam moments: keep them small
        args.after_frames, args.eval_frames = min(args.after_frames, 30), min(args.eval_frames, 12)
        args.journal_every = 1
        args.tolerance = max(args.tolerance, 1.0)  # the quick run checks the loop, not the gain
    if args.teacher_run:
        args.teacher_run = str(resolve_model(args.teacher_run))
    args.base_run = str(base_run)
    kind = args.scene.partition(":")[0]
    if kind not in ("walk", "synthetic") and not room:
        raise UserError(f"--scene {args.scene!r}: use walk:DIR or synthetic:WORLD")
    from device.capture import open_source

    open_source(args.scene, size=(24, 32), fps=0).close()  # a bad scene fails here, before anything starts
    out = Path(args.out)
    _prepare_out(out)
    t_start = time.time()
    port = args.port or _free_port()
    _say(f"1/5 starting the cloud service on 127.0.0.1:{port} (base model {args.base_run})")
    proc, token, trust_key, data = _start_cloud(args, out, port)
    url = f"http://127.0.0.1:{port}"
    try:
        _say(f"2/5 headset provisioned; the wearer walks {args.scene}, journalling and uploading "
             f"(a job starts after {args.job_frames} frames)")
        headset, state = _run_headset(args, out, url, token, trust_key, data / "base-model")
    finally:
        proc.terminate()
        try:
            proc.wait(5)  # a job still running (the next one) stops at its next step; its store is crash-safe
        except subprocess.TimeoutExpired:
            proc.kill()
    versions = headset["model_versions"]
    base_version = state["base"]
    new_version = next((v for v in versions if v != base_version), None)
    _say(f"3/5 headset done: {headset['frames_shown']} frames, versions served {versions}")

    _say("4/5 evaluating every version on held-out frames" + ("" if room else ", beside the classical tools"))
    from device.store import ModelStore

    store = ModelStore(out / "headset-store")
    folders = {base_version: data / "base-model"}
    if new_version:
        folders[new_version] = store.folder(new_version)
    table: dict[str, dict[str, dict[str, float]]] = {}
    if room:  # rendered rooms with exact labels; no classical tool gives depth, normals or a layout
        from shared.manifest import Manifest

        base_manifest = Manifest.load(data / "base-model" / "manifest.json")
        sets = demo_room.evaluation_sets(args.scene, base_run, args.eval_frames,
                                         (base_manifest.input.height, base_manifest.input.width))
        for name, frames in sets.items():
            table[name] = {v: demo_room.evaluate(Path(f), frames) for v, f in folders.items()}
    else:
        sets = _evaluation_sets(args, base_run, args.eval_frames)
        for name, frames in sets.items():
            table[name] = {}
            for v, f in folders.items():
                table[name][v], classical = _evaluate(Path(f), frames)
            table[name][CLASSICAL] = classical
    wearer = next(iter(table))  # the wearer's surroundings (later views; for rooms: held-out rooms of its style)
    base_set = next((n for n in table if n != wearer), None)
    improved = False
    verdict = "no new model was served"
    if new_version:
        score = wearer_score(table[wearer][base_version], table[wearer][new_version])
        better_all = all(table[wearer][new_version][m] < table[wearer][base_version][m] for m in metrics)
        regress = base_regressions(table[base_set][base_version], table[base_set][new_version], args.tolerance) \
            if base_set else []
        improved = score < 0 and not regress
        verdict = (f"personalisation helped on the wearer's later views (mean relative change {score:+.3f}"
                   f"{', better on every task' if better_all else ''}), base set within tolerance" if improved else
                   f"personalisation did NOT help as required: wearer change {score:+.3f}, base regressions {regress}")
    _say("5/5 writing summary, plot and video")
    columns = list(folders) + ([] if room else [CLASSICAL])
    _plot(table, columns, out / "metrics.png", metrics)
    snapshot = _snapshot(out / "overlay.mp4", out / "overlay.png")
    ratios = {} if room else {name: {v: {m: rows[v][m] / rows[CLASSICAL][m] for m in METRICS} for v in folders}
                              for name, rows in table.items()}
    summary = {
        "improved": improved, "verdict": verdict, "versions_served": versions, "base_version": base_version,
        "new_version": new_version, "swapped_at_frame": state["swapped_at_frame"],
        "table": table, "ratio_to_classical": ratios, "timed_out": state["timed_out"], "jobs": state["jobs"],
        "job": next((j for j in state["jobs"] if new_version and j.get("result_version") == new_version),
                    state["job"]),
        "headset": {k: headset[k] for k in ("frames_shown", "camera_frames_dropped", "fps", "latency_ms",
                                            "inference_errors", "frames_without_overlay", "journal", "record")},
        "files": {"video": str(out / "overlay.mp4"), "plot": str(out / "metrics.png"),
                  "snapshot": str(out / "overlay.png") if snapshot else None},
        "seconds": round(time.time() - t_start, 1), "scene": args.scene, "quick": args.quick,
        "task_set": "room" if room else "cifar",
    }
    from shared.atomic import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    print(_format_table(table, columns, metrics))
    print(f"\n{verdict}")
    print(f"versions served: {' -> '.join(versions)}; {headset['frames_shown']} frames, "
          f"{headset['camera_frames_dropped']} camera frames dropped; {summary['seconds']} s")
    print(f"wrote {out / 'summary.json'}, {out / 'overlay.mp4'}, {out / 'metrics.png'}")
    # the loop ran when the cloud finished a job: accepted (served and swapped) or rejected by the gate
    # (then the wearer keeps the base model, as the verdict says); a failure or a timeout is exit 1
    finished = any(j.get("state") in ("accepted", "rejected") for j in state["jobs"])
    return 0 if new_version or finished else 1
