"""Which room style (office, living, bare) a wearer's frames look like: the style whose rendered
rooms a personalisation job replays and the gate judges on, when the wearer does not say.

A multinomial logistic regression on per-frame features that survive a moving camera: a hue x
saturation histogram (12 x 4), a value histogram (8), the Lab means and spreads, a gradient
orientation histogram weighted by magnitude (8: furniture edges run differently per style) and the
edge density. It is trained once per process (about 6 s of CPU, cached) on rendered frames of each
style: 400 dataset views of training rooms and 8 views from each of 60 walks (walk seeds
1000-1059), all at 48 pixels. A wearer's frames vote by their summed log-probabilities.

``python -m models.room_style [--walks N]`` measures it against the earlier rule (nearest pooled
colour histogram, :func:`infer_style_histogram`) on walks it never trained on (seeds 100 onwards):
JSON on stdout.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import cv2
import numpy as np

from shared.rooms import STYLES, RoomWalk, room_frames

SIDE = 48  # frames are compared at this square side
DATASET_FRAMES = 400  # dataset views per style (training rooms, seed 0)
TRAIN_WALKS = range(1000, 1060)  # walk seeds per style, 8 views each
WALK_VIEWS, WALK_STEP = 8, 37  # views of a training walk: frames 0, 37, 74, ... at 30 fps
HIST_REFERENCE_FRAMES = 32  # infer_style_histogram: rendered frames per style


def features(rgb: np.ndarray) -> np.ndarray:
    """N x H x W x 3 uint8 RGB -> N x 72 float32 (see the module docstring)."""
    out = np.empty((len(rgb), 72), np.float32)
    n = SIDE * SIDE
    for i, frame in enumerate(rgb):
        s = cv2.resize(frame, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(s, cv2.COLOR_RGB2HSV)
        hs = cv2.calcHist([hsv], [0, 1], None, [12, 4], [0, 180, 0, 256]).ravel()
        v = cv2.calcHist([hsv], [2], None, [8], [0, 256]).ravel()
        lab = cv2.cvtColor(s, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
        g = cv2.cvtColor(s, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
        mag = np.hypot(gx, gy)
        angle = np.arctan2(gy, gx) % np.pi
        orient = np.bincount(np.minimum((angle / np.pi * 8).astype(np.int64), 7).ravel(), weights=mag.ravel(),
                             minlength=8)
        out[i] = np.concatenate([hs / n, v / n, lab.mean(0) / 255, lab.std(0) / 255, orient / (mag.sum() + 1e-6),
                                 [mag.mean() / 255, (mag > 40).mean()]])
    return out


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, iters: int = 500, lr: float = 0.5,
                 l2: float = 1e-3) -> tuple[np.ndarray, ...]:
    """Multinomial logistic regression by full-batch gradient descent on standardised features:
    (mean, scale, W, b)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w, b = np.zeros((z.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(iters):
        g = (_softmax_rows(z @ w + b) - onehot) / len(z)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return mu, sd, w, b


def style_classifier() -> tuple[np.ndarray, ...]:
    """The classifier, trained on rendered frames of every style (deterministic; once per process
    for the module's DATASET_FRAMES and TRAIN_WALKS)."""
    return _trained(DATASET_FRAMES, TRAIN_WALKS.start, TRAIN_WALKS.stop)


@functools.lru_cache(maxsize=2)
def _trained(dataset_frames: int, first_walk: int, end_walk: int) -> tuple[np.ndarray, ...]:
    xs, ys = [], []
    for k, style in enumerate(STYLES):
        xs.append(features(room_frames(dataset_frames, style, 0, SIDE, "train").rgb))
        ys += [k] * dataset_frames
        for seed in range(first_walk, end_walk):
            walk = RoomWalk(style, seed=seed, size=(SIDE, SIDE * 4 // 3))
            xs.append(features(np.stack([walk.render(WALK_STEP * i).rgb for i in range(WALK_VIEWS)])))
            ys += [k] * WALK_VIEWS
    return fit_logistic(np.concatenate(xs), np.array(ys), len(STYLES))


def style_log_likelihoods(frames: np.ndarray) -> dict[str, float]:
    """Each style's summed log-probability over the wearer's frames (N x H x W x 3 uint8 RGB)."""
    mu, sd, w, b = style_classifier()
    p = _softmax_rows(((features(frames) - mu) / sd) @ w + b)
    return {style: float(v) for style, v in zip(STYLES, np.log(p + 1e-9).sum(0))}


def infer_style(frames: np.ndarray) -> str:
    """The most likely style of the wearer's frames."""
    ll = style_log_likelihoods(frames)
    return max(ll, key=ll.get)


def infer_style_histogram(frames: np.ndarray, seed: int = 0, per_style: int | None = None) -> str:
    """The earlier rule, kept for comparison: the style whose rendered frames' pooled colour
    histogram (8 bins per channel, ``per_style`` frames of its held-out rooms at 32x32) is nearest
    (L1) the wearer's frames'."""

    def hist(rgb: np.ndarray) -> np.ndarray:
        small = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in rgb])
        h = cv2.calcHist([np.ascontiguousarray(small.reshape(-1, 32, 3))], [0, 1, 2], None, [8, 8, 8],
                         [0, 256, 0, 256, 0, 256]).ravel()
        return h / max(1.0, float(h.sum()))

    wearer = hist(frames)
    per_style = per_style or HIST_REFERENCE_FRAMES
    dist = {s: float(np.abs(hist(room_frames(per_style, s, seed, 32, "test").rgb) - wearer).sum()) for s in STYLES}
    return min(dist, key=dist.get)


def accuracy(walks: int = 12, frames: int = 16, every: int = 9) -> dict:
    """Both rules on ``walks`` walks per style (seeds 100 onwards: never trained on), ``frames``
    views each, every ``every``-th frame at 120x160, as a headset journal keeps them."""
    t0 = time.process_time()
    style_classifier()
    train_s = time.process_time() - t0
    right = {"classifier": 0, "histogram": 0}
    wrong: dict[str, list] = {"classifier": [], "histogram": []}
    for seed in range(100, 100 + walks):
        for style in STYLES:
            walk = RoomWalk(style, seed=seed, size=(120, 160))
            views = np.stack([walk.render(every * i).rgb for i in range(frames)])
            for rule, guess in (("classifier", infer_style(views)), ("histogram", infer_style_histogram(views))):
                if guess == style:
                    right[rule] += 1
                else:
                    wrong[rule].append([style, seed, guess])
    n = walks * len(STYLES)
    return {"walks": n, "frames_per_walk": frames,
            "right": {k: f"{v}/{n}" for k, v in right.items()},
            "accuracy": {k: round(v / n, 3) for k, v in right.items()},
            "wrong (style, seed, guess)": wrong, "classifier_training_cpu_s": round(train_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="style inference accuracy on rendered walks")
    parser.add_argument("--walks", type=int, default=12, help="walks per style (seeds 100 onwards)")
    parser.add_argument("--frames", type=int, default=16, help="views per walk")
    args = parser.parse_args(argv)
    print(json.dumps({"command": f"python -m models.room_style --walks {args.walks} --frames {args.frames}",
                      **accuracy(args.walks, args.frames)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
