"""`hmd bench room-real`: the room model on real geometry -- ordinal depth agreement on Middlebury's
motorcycle stereo pair (scikit-image's sample data: a left image and its ground-truth disparity).

The score is the share of random pixel pairs (with a clear ground-truth order) that a depth map
orders as the ground truth does (:func:`models.room_data.ordinal_depth_agreement`), for the room
model's predicted depth and for the naive prior "lower in the image is nearer". The model never saw
a real image nor a motorcycle: this checks whether what it learnt from rendered rooms transfers.
JSON on stdout, whatever the numbers are.
"""
from __future__ import annotations

import argparse
import json
import sys

import cv2
import numpy as np

from shared.paths import resolve_model

from models.room_data import lower_is_nearer, motorcycle_depth_order, ordinal_depth_agreement, random_pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="room", help="a room run folder or a shipped model name (default room)")
    parser.add_argument("--height", type=int, default=None,
                        help="model input height, a multiple of 8 (default: the model's training side); the "
                        "width keeps the image's aspect")
    parser.add_argument("--pairs", type=int, default=20000, help="random pixel pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def predict_depth(model, rgb: np.ndarray, height: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The model's depth (metres) for ``rgb`` fed at ``height`` rows (aspect kept, sides multiples of 8),
    resized back to the image's size (bilinear)."""
    import torch

    h0, w0 = rgb.shape[:2]
    w = max(8, int(round(w0 * height / h0 / 8)) * 8)
    x = cv2.resize(rgb, (w, height), interpolation=cv2.INTER_AREA).astype(np.float32).transpose(2, 0, 1) / 255.0
    model.eval()
    with torch.no_grad():
        depth = model(torch.from_numpy(x)[None])["depth"][0, 0].numpy()
    return cv2.resize(depth, (w0, h0), interpolation=cv2.INTER_LINEAR), (height, w)


def run(args: argparse.Namespace) -> int:
    import torch

    from shared.errors import UserError
    from models.train import load_model

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    model, ckpt = load_model(folder)
    if ckpt.get("task_set") != "room":
        raise UserError(f"{args.model} is not a room model (task set {ckpt.get('task_set') or 'cifar'})")
    height = args.height or ckpt["input_size"][0]
    if height < 16 or height % 8:
        raise UserError(f"--height {height}: a multiple of 8, at least 16")
    left, truth, valid = motorcycle_depth_order()
    pairs = random_pairs(truth.shape, args.pairs, args.seed)
    depth, fed = predict_depth(model, left, height)
    scores = {"room_model": ordinal_depth_agreement(depth, truth, pairs, valid),
              "lower_is_nearer": ordinal_depth_agreement(lower_is_nearer(truth.shape), truth, pairs, valid),
              # the model's map upside down: tells a learnt "lower is nearer" from more than that
              "room_model_flipped_vertically": ordinal_depth_agreement(depth[::-1], truth, pairs, valid)}
    result = {
        "benchmark": "room-real",
        "command": "hmd bench room-real " + " ".join(sys.argv[3:]),
        "image": {"name": "Middlebury motorcycle (skimage.data.stereo_motorcycle)", "size": list(truth.shape),
                  "valid_fraction": round(float(valid.mean()), 4)},
        "model": {"name": args.model, "version_epoch": ckpt.get("epoch"), "trained_on": ckpt.get("source"),
                  "input": list(fed)},
        "pairs": args.pairs,
        "ordinal_agreement": {k: round(v, 4) for k, v in scores.items()},
        "model_minus_prior": round(scores["room_model"] - scores["lower_is_nearer"], 4),
        "chance": 0.5,
    }
    print(json.dumps(result, indent=2))
    return 0
