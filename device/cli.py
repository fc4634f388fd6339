"""`hmd device`: run the headset on a camera, a video, an image folder or a synthetic world."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from device import overlay
from device.capture import open_source
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
    parser.add_argument("--source", default="synthetic",
                        help="webcam:N | video:PATH | images:DIR | synthetic[:WORLD] (default synthetic)")
    parser.add_argument("--model", help="FILE.onnx (manifest beside it) or a model folder; "
                                        "optional with --store that has a current version")
    parser.add_argument("--mode", default="edges", choices=overlay.MODES,
                        help="overlay (keys 1-5 / m switch it in the window, h toggles the HUD)")
    parser.add_argument("--no-hud", action="store_true", help="no FPS/latency/version band")
    parser.add_argument("--headless", action="store_true", help="no window even when a display is there")
    parser.add_argument("--record", metavar="OUT.mp4", help="write the overlaid video")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames shown")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--loop", action="store_true", help="video:/images: start again at the end")
    parser.add_argument("--fps", type=float, help="pace synthetic/images/video at this rate (0 = as fast as possible)")
    parser.add_argument("--size", type=_size, default=(240, 320), help="synthetic camera WIDTHxHEIGHT (320x240)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    parser.add_argument("--lockstep", action="store_true",
                        help="never drop a camera frame (the source waits for the loop): offline processing")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default min(2, cores))")
    parser.add_argument("--metrics", metavar="FILE", help="also write the JSON summary here")
    parser.add_argument("--store", metavar="DIR", help="model store: versions, `current` pointer, rollback")
    parser.add_argument("--watch", metavar="DIR", help="hot-swap models dropped into this folder")
    parser.add_argument("--trusted-key", metavar="FILE",
                        help="base64 Ed25519 public key; every model must then carry a valid signature")
    # issue 13 (harden): --watch needs a trusted key unless the user opts out
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="with --watch and no --trusted-key: accept unsigned models (unsafe)")
    parser.add_argument("--journal", metavar="DIR", help="opt in to keeping sampled frames here")
    parser.add_argument("--journal-mb", type=float, default=64.0, help="journal disk budget in MB (64)")
    parser.add_argument("--journal-every", type=int, default=30, help="journal every k-th frame (0: only scene changes)")
    parser.add_argument("--journal-scene", type=float, default=0.12,
                        help="journal on scene change above this thumbnail difference (0..1; 0 disables)")
    parser.add_argument("--cloud", metavar="URL", help="cloud service URL (sync client, when installed)")
    parser.add_argument("--token", help="device token for --cloud")
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
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--retrain-max-steps", type=int, default=None, help=argparse.SUPPRESS)


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


def run(args: argparse.Namespace) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError("--max-frames must be at least 1")
    if args.journal_mb <= 0:
        raise UserError("--journal-mb must be positive")
    if args.watch and not Path(args.watch).is_dir():
        raise UserError(f"watch folder not found: {args.watch}")
    if args.watch and not args.trusted_key and not args.allow_unsigned:  # issue 13 (harden)
        raise UserError("--watch needs --trusted-key FILE (models dropped in are verified against it), "
                        "or --allow-unsigned to accept unsigned models")
    if args.model is None and args.store is None:
        raise UserError("--model FILE.onnx is required (or --store DIR with a current version)")
    cfg = RuntimeConfig(mode=args.mode, hud=not args.no_hud, headless=True if args.headless else None,
                        record=args.record, max_frames=args.max_frames, duration=args.duration,
                        lockstep=args.lockstep, threads=args.threads, metrics_path=args.metrics,
                        store_dir=args.store, watch_dir=args.watch, public_key=_public_key(args.trusted_key),
                        journal_dir=args.journal, journal_mb=args.journal_mb, journal_every=args.journal_every,
                        journal_scene_threshold=args.journal_scene)
    model = args.model
    if model is not None and not Path(model).exists():
        raise UserError(f"model not found: {model}")
    source_kind = args.source.partition(":")[0]
    # a file source is checked before paying for the model load; a camera is opened after it
    source = open_source(args.source, size=args.size, fps=args.fps, loop=args.loop, seed=args.seed) \
        if source_kind != "webcam" else args.source
    runtime = HeadsetRuntime(source, model, cfg)
    sync = None
    if args.cloud:
        try:
            from device import sync as sync_module  # written with the cloud issue
        except ImportError:
            raise UserError("--cloud needs the sync client (device/sync.py), which is not in this build") from None
        sync = sync_module.start(runtime, args.cloud, args.token)
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
    print(json.dumps(summary, indent=2))
    if summary["frames_shown"] == 0:
        print(f"hmd device: error: no frame was shown ({summary['exit_reason']})", file=sys.stderr)
        return 1
    return 0
