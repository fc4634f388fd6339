"""On-device retraining worker: ``python -m models.ondevice`` (started by device/retrain.py).

The headset runtime never imports torch: when the wearer opts in (``hmd device
--retrain-locally``), it starts this worker as a separate process while the headset is idle.
The worker reads the journal's frames, runs the same personalisation job as the cloud (GREAT,
replay, the same evaluation gate) and, if the candidate passes, exports it to a model folder
(model.onnx + manifest.json) and prints one JSON line. The runtime then offers the folder to
the same verified hot-swap as a cloud model. SIGTERM stops it between training steps (the
wearer is active again): nothing is exported then.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import cv2
import numpy as np


def journal_frames(journal_dir: str | Path, max_frames: int) -> np.ndarray:
    """The newest ``max_frames`` journalled frames (RGB), read straight from the journal's JPEGs."""
    files = sorted((Path(journal_dir) / "frames").glob("*.jpg"))[-max_frames:]
    frames = []
    for f in files:
        im = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if im is not None:
            frames.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
    if not frames:
        return np.zeros((0, 1, 1, 3), np.uint8)
    h, w = frames[0].shape[:2]
    return np.stack([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h)) for f in frames])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.ondevice")
    p.add_argument("--base-run", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parent-version", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--base-data", default="synthetic:2000:studio")
    p.add_argument("--method", default="great")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=512)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args(argv)

    import torch

    from models.export_run import export_run
    from models.personalise import personalise

    torch.set_num_threads(args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    frames = journal_frames(args.journal, args.max_frames)
    out = Path(args.out)
    result: dict = {"frames": int(len(frames))}
    if len(frames) < 10:
        result.update(state="skipped", reason=f"only {len(frames)} journalled frames")
    else:
        res = personalise(args.base_run, frames, out / "run", base_data=args.base_data, method=args.method,
                          epochs=args.epochs, max_steps_per_epoch=args.max_steps, tolerance=args.tolerance, lr=args.lr,
                          should_stop=stop.is_set)
        result.update(state="accepted" if res.accepted else ("yielded" if stop.is_set() else "rejected"),
                      reason=res.reason, evaluation=res.evaluation, run_dir=str(res.run_dir))
        if res.accepted and not stop.is_set():
            folder = out / "model"
            export_run(res.run_dir, folder / "model.onnx", version=args.version,
                       parent_version=args.parent_version, manifest_path=folder / "manifest.json",
                       extra_training={"where": "on-device"})
            result["model_folder"] = str(folder)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
