"""Output calibration of the camera decoder's dense heads on held-out frames (least squares).

A multi-task model trained on a few dozen photos colourises unseen scenes with tints it learnt
from the training photos: on new footage its colour residual over the gray frame is partly wrong,
and the MSE-best use of it is a shrunken one. So after training, each dense head's output is
calibrated on a validation set the model never trained on (for the shipped ``base``: walks over
its real validation photos), by least squares:

* colour and denoised (residual heads, ``out = gray + r``): ``out = gray + s * r``, with
  ``s = <r, target - gray> / <r, r>`` (colour and edges on clean input, as the headset feeds it;
  denoised on the paper's noisy input);
* edges (a linear head): ``out = a * e + b``.

Each factor is folded into the head's last 1x1 convolution (weights and bias), so the calibrated
model is an ordinary model: same architecture, same export, no extra op. A training-time deviation
from the paper, listed in the README's deviations table with its measured effect.

    python -m models.calibrate RUN --data walk:data/real/val:300 --out RUN-calibrated
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from shared.errors import UserError

from models.data import TaskData, load_source
from models.network import MultiTaskNet


@torch.no_grad()
def head_outputs(model: MultiTaskNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense heads' last-conv outputs (before the residual sum and the clamp), in eval mode."""
    model.eval()
    got: dict[str, torch.Tensor] = {}
    hooks = [model.head(t).out.register_forward_hook(lambda m, i, o, t=t: got.__setitem__(t, o))
             for t in ("colour", "edges", "denoised")]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


@torch.no_grad()
def fit(model: MultiTaskNet, data: TaskData, batch: int = 64) -> dict[str, dict[str, float]]:
    """Least-squares factors per head on ``data`` (see the module docstring)."""
    if model.cfg.decoder != "camera":
        raise UserError("calibration is for the camera decoder (residual and linear heads)")
    g = torch.Generator().manual_seed(0)
    acc = {"colour": [0.0, 0.0], "denoised": [0.0, 0.0]}
    e_sums = torch.zeros(5, dtype=torch.float64)  # sum e, sum t, sum e*e, sum e*t, n
    for start in range(0, len(data), batch):
        idx = torch.arange(start, min(len(data), start + batch))
        noisy, t = data.batch(idx, g)
        clean = t["denoised"]
        r_clean = head_outputs(model, clean)
        r_noisy = head_outputs(model, noisy)
        for task, r, base in (("colour", r_clean["colour"], clean), ("denoised", r_noisy["denoised"], noisy)):
            resid = t[task] - base.expand_as(t[task])
            acc[task][0] += float((r * resid).sum())
            acc[task][1] += float((r * r).sum())
        e, tgt = r_clean["edges"].double(), t["edges"].double()
        e_sums += torch.stack([e.sum(), tgt.sum(), (e * e).sum(), (e * tgt).sum(), torch.tensor(float(e.numel()))])
    out = {task: {"scale": a / b if b > 0 else 1.0} for task, (a, b) in acc.items()}
    se, st, see, set_, n = e_sums.tolist()
    var = see - se * se / n
    a = (set_ - se * st / n) / var if var > 0 else 1.0
    out["edges"] = {"scale": a, "offset": (st - a * se) / n}
    return out


@torch.no_grad()
def apply(model: MultiTaskNet, factors: dict[str, dict[str, float]]) -> None:
    """Fold the factors into each head's last convolution."""
    for task, f in factors.items():
        conv = model.head(task).out
        conv.weight.mul_(f["scale"])
        conv.bias.mul_(f["scale"]).add_(f.get("offset", 0.0))


def calibrate_run(run_dir: str | Path, data: str, out_dir: str | Path, seed: int = 0) -> dict:
    from models.checkpoints import save_checkpoint
    from models.train import model_from_checkpoint, read_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = read_checkpoint(run_dir)
    model = model_from_checkpoint(ckpt)
    h, w = ckpt["input_size"]
    frames = load_source(data, "val", (h, w), seed)
    if len(frames) < 2:
        raise UserError(f"--data {data}: too few held-out frames to calibrate on")
    factors = fit(model, TaskData(frames))
    apply(model, factors)
    ckpt = dict(ckpt)
    ckpt["model"] = model.state_dict()
    ckpt["calibration"] = {"data": data, "frames": len(frames), "factors": factors,
                           "command": "python -m models.calibrate " + " ".join(sys.argv[1:]) if sys.argv else None}
    if out_dir.resolve() != run_dir.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "metrics.json").is_file():
            shutil.copyfile(run_dir / "metrics.json", out_dir / "metrics.json")
    save_checkpoint(out_dir / "checkpoint.pt", ckpt)
    return ckpt["calibration"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", metavar="RUN")
    ap.add_argument("--data", required=True, metavar="SOURCE", help="held-out frames (its 'val' split is used)")
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(json.dumps(calibrate_run(args.run_dir, args.data, args.out, args.seed), indent=1))
    except UserError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
