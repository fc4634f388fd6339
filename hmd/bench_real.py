"""`hmd bench real --video PATH [--model M]`: the headset model against classical tools on real footage.

Per frame, at the model's input size (the frame centre-cropped to its aspect, never squashed), each
dense task is scored against the frame's own targets (the paper's: the colour frame, Canny sigma 1
edges of the colour frame, the clean gray frame), side by side with a classical tool on the same
frames and inputs:

=========  ==========================================  ======================================
task       network input (as the headset feeds it)      classical tool
=========  ==========================================  ======================================
colour     the clean gray frame                          the gray frame in three channels
edges      the clean gray frame                          Canny sigma 1 on the 3x3-median-filtered input
denoised   the paper's noisy input (speckle 0.1, 4 % s&p) a 3x3 median filter
=========  ==========================================  ======================================

The network runs through ONNX Runtime exactly as on the headset (device.engine). JSON on stdout:
RMSE per task for both, and the ratios ``"colour/classical"``, ``"edges/classical"``,
``"denoised/classical"`` (< 1: the network is better); a side-by-side picture of a few frames.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from shared.errors import UserError
from shared.walk import fit_to

TASKS = ("colour", "edges", "denoised")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", metavar="PATH", help="a video file (any OpenCV-readable format)")
    src.add_argument("--walk", metavar="DIR", help="or: a simulated head walking over the photos in DIR")
    parser.add_argument("--model", default="base", metavar="M",
                        help="a shipped model name, an exported .onnx (with its manifest) or a run folder "
                             "(default: base)")
    parser.add_argument("--max-frames", type=int, default=300, help="frames scored (default 300)")
    parser.add_argument("--stride", type=int, default=2, help="score every k-th frame (default 2)")
    parser.add_argument("--skip", type=int, default=0, help="frames skipped at the start (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="noise draw and walk seed (default 0)")
    parser.add_argument("--out", default="runs/bench-real", metavar="DIR",
                        help="folder for real.json and the side-by-side picture (default runs/bench-real)")


# --- the paper's targets and noise, and the classical tools (numpy + OpenCV) --------------------

def canny_edges(rgb_or_gray: np.ndarray, sigma: float = 1.0, low: int = 50, high: int = 100) -> np.ndarray:
    """Canny (0/255) after a Gaussian blur with ``sigma``: the paper's edge target (models.data uses
    the same parameters)."""
    return cv2.Canny(cv2.GaussianBlur(rgb_or_gray, (0, 0), sigma), low, high, L2gradient=True)


def corrupt(gray: np.ndarray, rng: np.random.Generator, speckle: float = 0.1, salt_pepper: float = 0.04) -> np.ndarray:
    """The paper's input noise on a [0, 1] float image: speckle x + x N(0, s), then salt-and-pepper."""
    x = gray + gray * rng.normal(0.0, speckle, gray.shape).astype(np.float32)
    u = rng.random(gray.shape)
    x = np.where(u < salt_pepper / 2, 0.0, x)
    x = np.where((u >= salt_pepper / 2) & (u < salt_pepper), 1.0, x)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def median3(x: np.ndarray) -> np.ndarray:
    """3x3 median of a [0, 1] float image (on its exact uint8 values when it came from uint8)."""
    u8 = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return cv2.medianBlur(u8, 3).astype(np.float32) / 255.0


def classical(rgb: np.ndarray, noisy: np.ndarray) -> dict[str, np.ndarray]:
    """The classical outputs for one RGB uint8 frame and its noisy gray input, all in [0, 1]."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    g = gray.astype(np.float32) / 255.0
    return {"colour": np.repeat(g[None], 3, axis=0),
            "edges": canny_edges(cv2.medianBlur(gray, 3))[None].astype(np.float32) / 255.0,
            "denoised": median3(noisy)[None]}


def targets(rgb: np.ndarray) -> dict[str, np.ndarray]:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return {"colour": rgb.transpose(2, 0, 1).astype(np.float32) / 255.0,
            "edges": canny_edges(rgb)[None].astype(np.float32) / 255.0,
            "denoised": gray[None].astype(np.float32) / 255.0}


# --- footage and model ---------------------------------------------------------------------------

def read_footage(video: str | None, walk: str | None, max_frames: int, stride: int, skip: int,
                 seed: int) -> tuple[list[np.ndarray], str]:
    if max_frames < 1 or stride < 1 or skip < 0:
        raise UserError("--max-frames and --stride must be >= 1, --skip >= 0")
    if walk:
        from shared.walk import HeadWalk, load_photos, walk_seed

        w = HeadWalk(load_photos(walk), size=(480, 640), seed=walk_seed(walk, seed))
        return [w.frame(skip + k * stride) for k in range(max_frames)], f"walk:{walk}"
    p = Path(video or "")
    if not p.is_file():
        raise UserError(f"video not found: {p}")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise UserError(f"cannot open video {p} (unsupported or corrupt)")
    frames, i = [], 0
    try:
        while len(frames) < max_frames:
            ok, im = cap.read()
            if not ok:
                break
            if i >= skip and (i - skip) % stride == 0:
                frames.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
            i += 1
    finally:
        cap.release()
    if not frames:
        raise UserError(f"video {p} has no readable frames" + (f" after --skip {skip}" if skip else ""))
    return frames, f"video:{p}"


def open_engine(model: str, workdir: Path):
    """A device engine for a shipped name, an .onnx file/folder, or a run folder (exported here)."""
    from device.engine import load_model
    from shared.paths import resolve_model

    path = resolve_model(model)
    if (path / "checkpoint.pt").is_file() if path.is_dir() else False:
        if not any(path.glob("*.onnx")):
            from models.export_run import export_run

            onnx = workdir / "model.onnx"
            print(f"bench real: exporting {path} to ONNX", file=sys.stderr)
            export_run(path, onnx, frames=16)
            path = onnx
    return load_model(path, threads=2, warm_runs=1)


def score(engine, frames: list[np.ndarray], seed: int = 0) -> tuple[dict, list[dict]]:
    """Sums of squared errors per task for the network and the classical tools, and a few samples."""
    h, w = engine.input_hw
    rng = np.random.default_rng(seed)
    names = engine.output_names
    idx = {t: names.index(t) for t in TASKS}
    sse = {k: dict.fromkeys(TASKS, 0.0) for k in ("network", "classical")}
    count = dict.fromkeys(TASKS, 0)
    samples: list[dict] = []
    pick = set(np.linspace(0, len(frames) - 1, min(3, len(frames))).round().astype(int).tolist())
    for i, full in enumerate(frames):
        rgb = fit_to(full, (h, w))
        tgt = targets(rgb)
        clean = tgt["denoised"][None]  # 1 x 1 x H x W in [0, 1]: the clean gray frame
        noisy = corrupt(clean[0, 0], rng)
        out_clean = engine.infer(np.ascontiguousarray(clean, np.float32))
        out_noisy = engine.infer(noisy[None, None])
        net = {"colour": out_clean[idx["colour"]][0], "edges": out_clean[idx["edges"]][0],
               "denoised": out_noisy[idx["denoised"]][0]}
        cls = classical(rgb, noisy)
        for t in TASKS:
            sse["network"][t] += float(((net[t] - tgt[t]) ** 2).sum())
            sse["classical"][t] += float(((cls[t] - tgt[t]) ** 2).sum())
            count[t] += tgt[t].size
        if i in pick:
            samples.append({"rgb": rgb, "noisy": noisy, "net": net, "classical": cls, "target": tgt})
    rmse = {k: {t: float(np.sqrt(v[t] / count[t])) for t in TASKS} for k, v in sse.items()}
    return rmse, samples


def picture(samples: list[dict], path: Path) -> None:
    """Rows = frames; columns = input gray, network colour, true colour, classical edges, network
    edges, true edges, noisy input, median filter, network denoised."""
    def rgb8(x):  # C x H x W float -> H x W x 3 uint8 BGR
        x = np.clip(x, 0, 1)
        x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x
        return cv2.cvtColor((x.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)

    rows = []
    for s in samples:
        tiles = [rgb8(s["target"]["denoised"]), rgb8(s["net"]["colour"]), rgb8(s["target"]["colour"]),
                 rgb8(s["classical"]["edges"]), rgb8(s["net"]["edges"]), rgb8(s["target"]["edges"]),
                 rgb8(s["noisy"][None]), rgb8(s["classical"]["denoised"]), rgb8(s["net"]["denoised"])]
        rows.append(np.hstack(tiles))
    labels = ["input", "net colour", "colour", "classical edges", "net edges", "edges", "noisy",
              "median 3x3", "net denoised"]
    tw = rows[0].shape[1] // len(labels)
    head = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
    for k, lab in enumerate(labels):
        cv2.putText(head, lab, (k * tw + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", np.vstack([head] + rows))
    from shared.atomic import atomic_write_bytes

    atomic_write_bytes(path, buf.tobytes())


def bench_real(video: str | None, walk: str | None, model: str, max_frames: int = 300, stride: int = 2,
               skip: int = 0, seed: int = 0, out: str | Path | None = None) -> dict:
    frames, source = read_footage(video, walk, max_frames, stride, skip, seed)
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(model, Path(tmp))
        rmse, samples = score(engine, frames, seed)
    result = {"source": source, "frames": len(frames), "frame_size": list(frames[0].shape[:2]),
              "model": model, "model_version": engine.version, "input_size": list(engine.input_hw),
              "rmse": rmse}
    for t in TASKS:
        result[f"{t}/classical"] = rmse["network"][t] / max(rmse["classical"][t], 1e-12)
    if out is not None:
        out = Path(out)
        picture(samples, out / "real.png")
        result["picture"] = str(out / "real.png")
        from shared.atomic import atomic_write_json

        atomic_write_json(out / "real.json", result)
    return result


def run(args: argparse.Namespace) -> int:
    result = bench_real(args.video, args.walk, args.model, args.max_frames, args.stride, args.skip, args.seed,
                        args.out)
    print(json.dumps(result, indent=1))
    return 0
