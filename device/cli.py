"""`hmd device`: run the headset on a camera, a video, an image folder or a synthetic world."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from device import overlay
from device.capture import open_source, quiet_video_backend
from device.runtime import HeadsetRuntime, RuntimeConfig
from shared.errors import UserError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 320x240, not {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("size must be at least 16x16")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the headset: capture -> ONNX Runtime -> overlay -> window and/or recording. Prints a start "
        "line on stderr and a short summary on stdout at the end (the whole summary as JSON with --json "
        "or --metrics FILE). Stop with q/Esc in the window, Ctrl+C, SIGTERM, --max-frames or --duration.")
    parser.add_argument("--source", default="synthetic",
                        help="webcam:N | video:PATH | images:DIR | synthetic[:WORLD] | walk:DIR (a simulated head "
                             "over real photos) | rooms[:STYLE]")
    parser.add_argument("--model", help="an exported model: FILE.onnx (manifest beside it), a folder with "
                                        "model.onnx + manifest.json (`hmd export RUN_DIR --out FILE.onnx` makes "
                                        "one) or a shipped model's name (default: base, the shipped headset "
                                        "model; with --store, the store's current version)")
    parser.add_argument("--mode", default="edges", choices=overlay.MODES,
                        help="overlay (keys 1-5 / m switch it in the window, h toggles the HUD); a room model "
                             "has depth, normals, layout, side-by-side and starts in depth unless one of those is given")
    parser.add_argument("--no-hud", action="store_true", help="no FPS/latency/version band above the view")
    parser.add_argument("--headless", action="store_true", help="no window even when a display is there")
    parser.add_argument("--record", metavar="OUT.mp4", help="write the overlaid video")
    parser.add_argument("--snapshot", metavar="FILE.png", help="write the last frame shown (HUD included) here")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames shown")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--loop", action="store_true", help="video:/images: start again at the end")
    parser.add_argument("--fps", type=float, help="pace synthetic/images/video at this rate (0 = as fast as "
                                                  "possible; default: the video's own rate, 30 otherwise)")
    parser.add_argument("--size", type=_size, default=(240, 320), metavar="WxH",
                        help="synthetic camera WIDTHxHEIGHT (default 320x240)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    parser.add_argument("--lockstep", action="store_true",
                        help="never drop a camera frame (the source waits for the loop): offline processing")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default min(2, cores))")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--pipelined", dest="pipelined", action="store_true", default=None,
                      help="infer the next frame on a second thread while this one is drawn (faster when inference "
                           "dominates the frame; slower when it is as cheap as the drawing: README, 'The headset'). "
                           "Default: chosen after 30 frames, by measurement")
    loop.add_argument("--sequential", dest="pipelined", action="store_false",
                      help="draw each frame before inferring the next")
    parser.add_argument("--metrics", metavar="FILE", help="write the JSON summary here")
    parser.add_argument("--json", action="store_true", help="print the JSON summary on stdout instead of the "
                                                            "short human one")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="a progress line every 5 s on stderr; FFmpeg/OpenCV messages are not silenced")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no start line and no summary: only errors (and --json/--metrics output)")
    parser.add_argument("--store", metavar="DIR", help="model store: versions, `current` pointer, rollback")
    parser.add_argument("--watch", metavar="DIR", help="hot-swap models dropped into this folder")
    parser.add_argument("--trusted-key", metavar="FILE",
                        help="base64 Ed25519 public key; every model must then carry a valid signature")
    # issue 13 (harden): --watch needs a trusted key unless the user opts out
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="with --watch and no --trusted-key: accept unsigned models (unsafe)")
    parser.add_argument("--journal", metavar="DIR", help="opt in to keeping sampled frames here")
    parser.add_argument("--journal-mb", type=float, default=64.0, help="journal disk budget in MB")
    parser.add_argument("--journal-every", type=int, default=30, help="journal every k-th frame (0: only scene changes)")
    parser.add_argument("--journal-scene", type=float, default=0.12,
                        help="journal on scene change above this thumbnail difference (0..1; 0 disables)")
    parser.add_argument("--cloud", metavar="URL", help="cloud service URL (sync client, when installed)")
    parser.add_argument("--token", help="device token for --cloud")
    parser.add_argument("--health-interval", type=float, default=30.0, metavar="S",
                        help="with --cloud: report this headset's model health (frames, FPS, latency, rollbacks, "
                             "inference errors) every S seconds (staged rollout)")
    parser.add_argument("--retrain-locally", action="store_true",
                        help="personalise on the headset itself while idle (optional extra: needs torch)")
    parser.add_argument("--base-run", metavar="RUN_DIR", default=None,
                        help="training checkpoint of the running model, for --retrain-locally "
                             "(default: the shipped base model)")
    parser.add_argument("--charging", action="store_true", help="the headset is charging: it counts as idle")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="no camera frame for this long counts as idle (--retrain-locally)")
    parser.add_argument("--retrain-min-frames", type=int, default=200,
                        help="new journalled frames before a local job (--retrain-locally)")
    parser.add_argument("--retrain-epochs", type=int, default=3, help="epochs of a local job (--retrain-locally)")
    parser.add_argument("--retrain-max-steps", type=int, default=None, help=argparse.SUPPRESS)


def _check_model_path(model: str) -> str:
    """A shipped model's name -> its folder; a path that is not an exported model gets one line
    saying what it is and what to run."""
    from shared.paths import SHIPPED

    path = Path(model)
    if not path.exists() and model in SHIPPED and SHIPPED[model].is_dir():
        path = SHIPPED[model]
    if not path.exists():
        raise UserError(f"model not found: {model} (shipped models: {', '.join(n for n, p in SHIPPED.items() if any(p.glob('*.onnx')))})")
    if path.is_dir() and not (path / "manifest.json").is_file() and not any(path.glob("*.onnx")) \
            and (path / "checkpoint.pt").is_file():
        raise UserError(f"{model} is a training run folder (checkpoint.pt), not an exported model: "
                        f"run `hmd export {model} --out model.onnx`, then --model model.onnx")
    return str(path)


def _public_key(path: str | None) -> bytes | None:
    if not path:
        return None
    from shared.hashing import read_key

    try:
        key = read_key(path)
    except FileNotFoundError:
        raise UserError(f"trusted key not found: {path}") from None
    except ValueError:
        raise UserError(f"trusted key {path} is not base64") from None
    if len(key) != 32:
        raise UserError(f"trusted key {path} is not a 32-byte Ed25519 public key")
    return key


def start_line(runtime: HeadsetRuntime, args: argparse.Namespace) -> str:
    """What is running, on what, and how to stop it."""
    engine = runtime.models.active
    info = runtime.source.info()
    size = info.get("size")
    source = info.get("source", args.source) + (f" {size[1]}x{size[0]}" if size else "")
    if runtime.display == "window":
        where, stop = "in a window", "q or Esc in the window, or Ctrl+C, stops it"
    else:
        where, stop = f"headless ({runtime.headless_reason})", "Ctrl+C stops it"
    limits = [f"{args.max_frames} frames" if args.max_frames else "", f"{args.duration:g} s" if args.duration else ""]
    ends = " or ".join(x for x in limits if x)
    return (f"hmd device: model {engine.version} ({engine.onnx_path}) on {source}, {runtime.shown_mode} view, {where}; "
            + (f"ends after {ends}; " if ends else "") + stop)


def _ms(latency: dict, stage: str) -> str:
    lat = latency.get(stage) or {}
    return f"{lat['p50']:.1f}/{lat['p95']:.1f}" if lat.get("n") else "-"


def human_summary(summary: dict) -> list[str]:
    """The summary a person reads at the end of a run (the JSON has everything)."""
    lat = summary["latency_ms"]
    lines = [f"hmd device: {summary['frames_shown']} frames in {summary['duration_s']:.1f} s "
             f"({summary['fps']:.1f} FPS), {summary['camera_frames_dropped']} of "
             f"{summary['camera_frames_captured']} camera frames dropped; ended: {summary['exit_reason']}",
             f"  latency p50/p95 ms: total {_ms(lat, 'total')}, inference {_ms(lat, 'inference')}, "
             f"overlay {_ms(lat, 'overlay')}"]
    events = [e["kind"] for e in summary["model"]["events"]]
    models = f"  model {summary['model']['active']} (used: {', '.join(summary['model_versions'])}"
    models += f"; {events.count('swapped')} swaps, {events.count('rolled_back')} rollbacks)"
    if summary["inference_errors"]:
        models += f"; {summary['inference_errors']} inference errors, " \
                  f"{summary['frames_without_overlay']} frames without overlay"
    lines.append(models + f"; {summary['display']}")
    outputs = []
    if summary.get("record"):
        outputs.append(f"recorded {summary['record']['path']} ({summary['record']['frames']} frames)")
    if summary.get("snapshot"):
        outputs.append(f"snapshot {summary['snapshot']}")
    if summary.get("journal"):
        j = summary["journal"]
        outputs.append(f"journal {j['dir']}: {j['written']} frames kept ({j['disk_bytes'] / 1e6:.1f} MB)")
    if outputs:
        lines.append("  " + "; ".join(outputs))
    sync = summary.get("sync")
    if sync:
        state = "token rejected" if sync["token_rejected"] else f"{sync['uploads']} uploads"
        lines.append(f"  cloud {sync['cloud']}: {state}, {sync['frames']} frames ({sync['bytes'] / 1e6:.1f} MB), "
                     f"{len(sync['versions_received'])} versions received, {sync['refused_batches']} batches refused")
    return lines


def _progress(runtime: HeadsetRuntime, every_s: float = 5.0):
    """-v: an on_frame callback printing one status line every ``every_s`` seconds."""
    last = [time.monotonic()]

    def on_frame(index, shown, pred) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            p50, p95 = runtime.timer.recent_p50_p95()
            print(f"hmd device: {runtime.frames_shown + 1} frames, {runtime.timer.fps():.1f} FPS, "
                  f"{p50:.1f}/{p95:.1f} ms p50/p95, model {runtime.model_version}", file=sys.stderr, flush=True)
    return on_frame


def run(args: argparse.Namespace) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError("--max-frames must be at least 1")
    if args.journal_mb <= 0:
        raise UserError("--journal-mb must be positive")
    if args.watch and not Path(args.watch).is_dir():
        raise UserError(f"watch folder not found: {args.watch}")
    if args.snapshot and not Path(args.snapshot).resolve().parent.is_dir():
        raise UserError(f"cannot write the snapshot {args.snapshot}: its folder does not exist")
    if args.watch and not args.trusted_key and not args.allow_unsigned:  # issue 13 (harden)
        raise UserError("--watch needs --trusted-key FILE (models dropped in are verified against it), "
                        "or --allow-unsigned to accept unsigned models")
    if args.model is None and (args.store is None or not (Path(args.store) / "current").exists()):
        args.model = "base"  # the shipped headset model
    if args.model is not None:
        args.model = _check_model_path(args.model)
    if not args.verbose:
        quiet_video_backend()  # FFmpeg's own messages ("moov atom not found") before our one-line error
    cfg = RuntimeConfig(mode=args.mode, hud=not args.no_hud, headless=True if args.headless else None,
                        record=args.record, max_frames=args.max_frames, duration=args.duration,
                        lockstep=args.lockstep, threads=args.threads, pipelined=args.pipelined,
                        metrics_path=args.metrics,
                        store_dir=args.store, watch_dir=args.watch, public_key=_public_key(args.trusted_key),
                        journal_dir=args.journal, journal_mb=args.journal_mb, journal_every=args.journal_every,
                        journal_scene_threshold=args.journal_scene, snapshot_path=args.snapshot)
    if not args.health_interval > 0:
        raise UserError(f"--health-interval {args.health_interval:g}: a number of seconds above 0")
    source_kind = args.source.partition(":")[0]
    # a file source is checked before paying for the model load; a camera is opened after it
    source = open_source(args.source, size=args.size, fps=args.fps, loop=args.loop, seed=args.seed) \
        if source_kind != "webcam" else args.source
    announce = None if args.quiet else (lambda rt: print(start_line(rt, args), file=sys.stderr, flush=True))
    runtime = HeadsetRuntime(source, args.model, cfg, on_start=announce)
    if args.verbose:
        runtime.on_frame = _progress(runtime)
    sync = None
    if args.cloud:
        try:
            from device import sync as sync_module  # written with the cloud issue
        except ImportError:
            raise UserError("--cloud needs the sync client (device/sync.py), which is not in this build") from None
        sync = sync_module.start(runtime, args.cloud, args.token, health_interval=args.health_interval)
    retrainer = None
    if args.retrain_locally:
        from device.retrain import LocalRetrainer

        base_run = args.base_run or str(Path(__file__).resolve().parent.parent / "hmd" / "assets" / "base-studio")
        work = Path(args.store) / "retrain" if args.store else Path(args.journal).parent / "retrain"
        retrainer = LocalRetrainer(runtime, base_run, work, charging=args.charging, idle_seconds=args.idle_seconds,
                                   min_new_frames=args.retrain_min_frames, epochs=args.retrain_epochs,
                                   max_steps=args.retrain_max_steps).start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    try:
        summary = runtime.run()
    finally:
        if sync is not None and hasattr(sync, "stop"):
            sync.stop()
        if retrainer is not None:
            retrainer.stop()
    if retrainer is not None:
        summary["local_retraining"] = retrainer.history
    if sync is not None:  # issue 16 (2), harden: uploads, frames, bytes, versions received, refused batches
        summary["sync"] = sync.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print("\n".join(human_summary(summary)))
    if summary["frames_shown"] == 0:
        print(f"hmd device: error: no frame was shown ({summary['exit_reason']})", file=sys.stderr)
        return 1
    return 0
