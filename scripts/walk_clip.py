"""Write a simulated head walk over a photo folder as a video file (footage for `hmd bench real`,
`hmd personalise` and `hmd device --source video:PATH`).

    python scripts/walk_clip.py hmd/assets/photos/test runs/wearer.avi --seconds 300 --fps 15
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.walk import HeadWalk, load_photos, walk_seed  # noqa: E402 (after the path line above)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", help="a folder of photos")
    ap.add_argument("out", help="the video file to write (.avi: MJPG, .mp4: mp4v)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--size", default="320x240", help="WIDTHxHEIGHT (default 320x240, the headset's capture size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    walk = HeadWalk(load_photos(args.photos), size=(h, w), seed=walk_seed(args.photos, args.seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if out.suffix.lower() == ".avi" else "mp4v"))
    # the walk is defined at 30 frames a second of head motion: a slower clip skips frames
    step = max(1, round(30.0 / args.fps))
    n = int(args.seconds * args.fps)
    vw = cv2.VideoWriter(str(out), fourcc, args.fps, (w, h))
    for i in range(n):
        vw.write(cv2.cvtColor(walk.frame(i * step), cv2.COLOR_RGB2BGR))
    vw.release()
    print(f"wrote {out}: {n} frames at {args.fps:g} fps ({args.seconds:g} s), {w}x{h}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
