"""`hmd bench personalise`: personalisation with GREAT against equal weighting, on the same
wearer frames, the same base model, teacher and budget, in one run."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from shared.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hmd.assets import BASE_STUDIO_RUN as BASE_RUN, TEACHER_RUN

    parser.add_argument("--base-run", default=str(BASE_RUN), help="the wearer's current model (a run folder)")
    parser.add_argument("--teacher-run", default=str(TEACHER_RUN), help="cloud teacher ('' for none)")
    parser.add_argument("--base-data", default="synthetic:2000", help="the base training data (replay, base gate)")
    parser.add_argument("--world", default="forest", help="the wearer's world")
    parser.add_argument("--frames", type=int, default=400, help="wearer frames")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--methods", default="great,equal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the candidate runs here (default: a temp folder)")


def wearer_frames(world: str, n: int, size: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    from shared.worlds import render_scene

    pairs = [render_scene(world, seed, i, size) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def run(args: argparse.Namespace) -> int:
    from models.data import FrameSet, TaskData
    from models.personalise import personalise
    from models.train import evaluate, load_model

    base, ck = load_model(args.base_run)
    size = ck["input_size"][0]
    frames, _ = wearer_frames(args.world, args.frames, size)
    # a labelled test set of the wearer's world that no method trains on
    test_rgb, test_labels = wearer_frames(args.world, 300, size, seed=args.seed + 1000)
    test = TaskData(FrameSet(test_rgb, test_labels, ck["class_names"], f"{args.world}-test"))
    teacher = args.teacher_run or None
    if teacher and not Path(teacher).exists():
        raise UserError(f"teacher run not found: {teacher}")
    results = {"base": {"wearer_test": evaluate(base, test)}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for m in [s for s in args.methods.split(",") if s]:
            res = personalise(args.base_run, frames, root / m, base_data=args.base_data, teacher_run=teacher,
                              method=m, epochs=args.epochs, seed=args.seed)
            cand, _ = load_model(res.run_dir)
            results[m] = {"accepted": res.accepted, "reason": res.reason, "seconds": res.seconds,
                          "gate": res.evaluation, "wearer_test": evaluate(cand, test)}
    ratios = {}
    if "great" in results and "equal" in results:
        g, e = results["great"]["wearer_test"], results["equal"]["wearer_test"]
        for k in ("rmse_colour", "rmse_edges", "rmse_denoised"):
            ratios[f"great/equal {k}"] = g[k] / e[k]
        ratios["great/equal seconds"] = results["great"]["seconds"] / results["equal"]["seconds"]
    print(json.dumps({"benchmark": "personalise", "config": vars(args), "results": results, "ratios": ratios},
                     indent=2))
    return 0
