#!/usr/bin/env python
"""Which reading of GREACE's eq. 6 keeps clean accuracy at beta_max 2 / 10 / 20 (issue #17)?

Trains the ``resnet`` classifier with ``hmd defend``'s defence for every (variant, beta_max) asked
for, plus an undefended baseline, on real handwritten digits or Fashion-MNIST, and prints one JSON
table on stdout: held-out and train accuracy, the last epoch's cross-entropy, and the per-class
logit drift (mean held-out logit of each class, per epoch: the literal reading pushes every
negative logit down with a force that does not vanish, which shows as a drift of the class logits
away from each other and from the input).

    .venv/bin/python scripts/greace_experiment.py --data sklearn-digits --threads 1
    .venv/bin/python scripts/greace_experiment.py --data fashion-mnist:/usr/share/datasets/fashion-mnist \\
        --train-n 2000 --val-n 1000 --threads 1

``sklearn-digits`` needs scikit-learn (``pip install scikit-learn``: 1,797 8x8 digits bundled, no
download); ``fashion-mnist:PATH`` / ``mnist:PATH`` read the standard idx files (models/idx_data.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from models.attacks import fgsm, ifgsm
from models.labelled import LabelledImages, accuracy
from models.registry import create_classifier, create_defence
from models.train_classifier import fit
from models.greace import GREACE_VARIANTS
from models.network import NetConfig
from shared.errors import UserError


def _to_labelled(gray: np.ndarray, labels: np.ndarray, names: list[str], source: str) -> LabelledImages:
    x = torch.from_numpy(np.ascontiguousarray(gray)).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return LabelledImages(x, torch.from_numpy(labels.astype(np.int64)), names, source)


def _random_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices, a random (seeded) subset, in a fixed order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(len(y))[:n])


def load_data(spec: str, size: int, train_n: int, val_n: int, seed: int) -> tuple[LabelledImages, LabelledImages]:
    import cv2

    if spec == "sklearn-digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError("sklearn-digits needs scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        imgs = np.stack([cv2.resize((im / 16.0).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                         for im in d.images])
        y = d.target.astype(np.int64)
        perm = np.random.default_rng(seed).permutation(len(y))
        n_val = min(val_n, len(y) // 4)
        tr, va = perm[n_val:][:train_n], perm[:n_val]
        names = [str(i) for i in range(10)]
        return (_to_labelled(imgs[tr], y[tr], names, spec), _to_labelled(imgs[va], y[va], names, spec))
    kind, _, path = spec.partition(":")
    if kind in ("mnist", "fashion-mnist"):
        from models.idx_data import load_idx

        sets = []
        for split, n in (("train", train_n), ("val", val_n)):
            f = load_idx(kind, path, split, size)
            idx = _random_subset(f.labels, n, seed)
            sets.append(_to_labelled(f.rgb[idx, :, :, 0] / 255.0, f.labels[idx], f.class_names, spec))
        return sets[0], sets[1]
    raise UserError(f"--data {spec!r}: use sklearn-digits, mnist:PATH or fashion-mnist:PATH")


@torch.no_grad()
def logit_stats(model: torch.nn.Module, data: LabelledImages) -> dict[str, Any]:
    """Held-out (eval mode) mean logit of each class, and of the true vs the negative classes."""
    was = model.training
    model.eval()
    a = torch.cat([model(data.x[s:s + 512]) for s in range(0, len(data), 512)])
    model.train(was)
    onehot = torch.nn.functional.one_hot(data.y, a.shape[1]).bool()
    return {"mean_logit_by_class": [round(float(v), 3) for v in a.mean(0)],
            "true": round(float(a[onehot].mean()), 3), "negative": round(float(a[~onehot].mean()), 3),
            "spread": round(float(a.std()), 3)}


def attacked_accuracy(model: torch.nn.Module, val: LabelledImages, eps_list: list[float],
                      transfer_from: torch.nn.Module | None) -> dict[str, dict[str, float | None]]:
    """Per eps, held-out accuracy (%) under FGSM, iFGSM (10 steps of eps / 10) and iFGSM crafted on
    ``transfer_from`` (the undefended model)."""
    x, y = val.x, val.y

    def acc(xa: torch.Tensor) -> float:
        with torch.no_grad():
            return round(100.0 * float((model.eval()(xa).argmax(1) == y).float().mean()), 2)

    return {f"{eps:g}": {"fgsm": acc(fgsm(model, x, y, eps)), "ifgsm": acc(ifgsm(model, x, y, eps)),
                         "transfer": acc(ifgsm(transfer_from, x, y, eps)) if transfer_from is not None else None}
            for eps in eps_list}


def run_one(method: str, variant: str | None, beta_max: float, train: LabelledImages, val: LabelledImages,
            args: argparse.Namespace, transfer_from: torch.nn.Module | None = None
            ) -> tuple[dict[str, Any], torch.nn.Module]:
    torch.manual_seed(args.seed)
    cfg = NetConfig(num_classes=len(train.class_names), width=args.width, in_channels=3)
    model = create_classifier("resnet", cfg)
    options: dict[str, Any] = {"beta_max": beta_max, "seed": args.seed}
    if variant:
        options["greace"] = variant
    defence = create_defence(method, cfg, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    drift: list[dict[str, Any]] = []

    def on_epoch(epoch: int, epochs: int) -> None:
        defence.set_epoch(epoch, epochs)
        drift.append({"epoch": epoch, "beta": round(float(getattr(defence, "beta", 0.0)), 3),
                      **logit_stats(model, val)})

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        logs = defence.train_step(model, x, y)
        optimizer.step()
        return logs

    tag = f"{method}/{variant or '-'}/{beta_max:g}"
    t0 = time.process_time()
    history = fit(model, step, train, val, epochs=args.epochs, batch_size=args.batch_size, optimizers=[optimizer],
                  seed=args.seed, tag=tag, on_epoch=on_epoch, augment_data=False,
                  log=lambda s: print(s, file=sys.stderr, flush=True) if args.verbose else None)
    drift.append({"epoch": args.epochs, "beta": round(float(getattr(defence, "beta", 0.0)), 3),
                  **logit_stats(model, val)})
    last = history[-1]["train"]
    row = {"method": method, "greace": variant, "beta_max": beta_max,
           "val_accuracy_pct": round(history[-1]["val_accuracy"], 2),
           "train_accuracy_pct": round(accuracy(model, train), 2),
           "val_accuracy_by_epoch": [round(h["val_accuracy"], 1) for h in history],
           "last_epoch_ce": round(last.get("ce", float("nan")), 4),
           "last_epoch_aux_acc": round(last["aux_acc"], 3) if "aux_acc" in last else None,
           "attacked_pct_by_eps": attacked_accuracy(model, val, args.eps, transfer_from),
           "cpu_seconds": round(time.process_time() - t0, 1), "logit_drift": drift}
    print(f"{tag}: held-out {row['val_accuracy_pct']}% train {row['train_accuracy_pct']}% "
          f"true/neg logit {drift[-1]['true']}/{drift[-1]['negative']} ({row['cpu_seconds']}s)",
          f"attacked {row['attacked_pct_by_eps']}", file=sys.stderr, flush=True)
    return row, model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sklearn-digits", help="sklearn-digits | mnist:PATH | fashion-mnist:PATH")
    ap.add_argument("--variants", default=",".join(GREACE_VARIANTS), help="comma-separated GREACE readings")
    ap.add_argument("--betas", default="2,10,20", help="comma-separated beta_max values")
    ap.add_argument("--method", default="greace", choices=["greace", "great+ce"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the undefended ('none') row")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--train-n", type=int, default=1500)
    ap.add_argument("--val-n", type=int, default=400)
    ap.add_argument("--eps", default="0.05,0.1,0.2",
                    help="comma-separated attack eps on held-out images (patent MNIST: 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="per-step progress on stderr")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        variants = [v for v in args.variants.split(",") if v]
        bad = [v for v in variants if v not in GREACE_VARIANTS]
        if bad:
            raise UserError(f"--variants: unknown {bad} (choose from {', '.join(GREACE_VARIANTS)})")
        betas = [float(b) for b in args.betas.split(",") if b]
        args.eps = [float(e) for e in args.eps.split(",") if e]
        train, val = load_data(args.data, args.size, args.train_n, args.val_n, args.seed)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, baseline = [], None
    if not args.no_baseline:
        row, baseline = run_one("none", None, 0.0, train, val, args)
        rows.append(row)
    for beta in betas:
        for v in variants:
            rows.append(run_one(args.method, v, beta, train, val, args, transfer_from=baseline)[0])
    table = {"data": args.data, "train": len(train), "val": len(val), "size": args.size, "width": args.width,
             "epochs": args.epochs, "eps": args.eps, "chance_pct": round(100.0 / len(train.class_names), 1),
             "command": "scripts/greace_experiment.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "rows": rows}
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
