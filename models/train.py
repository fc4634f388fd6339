"""The multi-task training loop: Adam with the paper's poly multiplier, resumable
checkpoints, held-out evaluation with the paper's Table 4 columns, metrics.json.

Used by ``hmd train``, the Table 4 benchmark and the cloud's personalisation jobs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.atomic import atomic_write_bytes, atomic_write_json
from shared.errors import UserError

from models.data import FrameSet, TaskData, load_source
from models.network import TASKS, MultiTaskNet, NetConfig
from models.weighting import WeightingMethod, create_method, list_methods, poly_multiplier

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "great-hmd-checkpoint/1"


@dataclasses.dataclass
class TrainConfig:
    method: str = "great"
    data: str = "synthetic"
    val_data: str | None = None  # default: the held-out split of ``data``
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    size: int | tuple[int, int] | None = None  # input side or (height, width); None = the source's default
    # (64 synthetic/images/video, 32 CIFAR-10, 120x160 walk)
    width: int = 16
    blocks: tuple[int, int, int] = (1, 1, 1)
    decoder_width: int = 32
    decoder: str = "paper"  # "paper" or "camera" (models/network.py: input skips, residual heads)
    clean_fraction: float = 0.0  # share of training inputs left clean (0: the paper's noisy input always)
    base_data: str | None = None  # personalised runs: the base model's training data (replayed again when
    # this run is personalised in turn); val_data then names the base model's validation set
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    defence: str | None = None  # adversarial defence of the class head (see models/defence.py)
    defence_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_steps_per_epoch: int | None = None  # cap (tests, quick runs); None = the whole set
    init_from: str | None = None  # a run folder whose weights start this run (fine-tuning)
    warmup_steps: int = 0  # linear learning-rate warm-up (fine-tuning: fresh Adam moments move every
    # weight by ~lr on the first steps, which a converged model does not need)
    freeze_bn: bool = False  # BatchNorm uses (and keeps) its running statistics: for fine-tuning on
    # small or shifted data, where batch statistics would make training a different function than
    # inference (a batch of dark frames is normalised to look bright)
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        if isinstance(self.size, (tuple, list)):
            d["size"] = list(self.size)
        return d


# --- progress ----------------------------------------------------------------------------------

class SmoothedValue:
    """A running window average (torchvision's references, minimal)."""

    def __init__(self, window: int = 20):
        self.values: list[float] = []
        self.window = window
        self.total = 0.0
        self.count = 0

    def update(self, v: float) -> None:
        self.values = (self.values + [v])[-self.window:]
        self.total += v
        self.count += 1

    @property
    def avg(self) -> float:
        return sum(self.values) / max(1, len(self.values))

    @property
    def global_avg(self) -> float:
        return self.total / max(1, self.count)


# --- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: MultiTaskNet, data: TaskData, batch_size: int = 128, seed: int = 1234) -> dict[str, float]:
    """Table 4 columns on ``data`` with a fixed noise draw: class error %, RMSE colour/edges/denoised."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    sq = {t: 0.0 for t in ("colour", "edges", "denoised")}
    count = {t: 0 for t in sq}
    wrong, labelled = 0, 0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        x, tg = data.batch(idx, g)
        out = model(x)
        for t in sq:
            sq[t] += float(((out[t] - tg[t]) ** 2).sum())
            count[t] += tg[t].numel()
        m = tg["class"] >= 0
        labelled += int(m.sum())
        wrong += int((out["class"][m].argmax(1) != tg["class"][m]).sum())
    res = {f"rmse_{t}": math.sqrt(sq[t] / max(1, count[t])) for t in sq}
    res = {"class_error_pct": (100.0 * wrong / labelled) if labelled else None, **res}
    return res


# --- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Load ``RUN/checkpoint.pt`` (or a .pt path) with a clear error for anything else."""
    p = Path(run_dir)
    path = p / CHECKPOINT_NAME if p.is_dir() else p
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} (expected a folder written by `hmd train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a great-hmd multi-task checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> MultiTaskNet:
    try:
        cfg = NetConfig.from_dict(ckpt["arch"])
        model = MultiTaskNet(cfg)
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"checkpoint does not match the multi-task architecture: {str(exc).splitlines()[0]}") \
            from None
    return model.eval()


def load_model(run_dir: str | Path) -> tuple[MultiTaskNet, dict[str, Any]]:
    ckpt = read_checkpoint(run_dir)
    return model_from_checkpoint(ckpt), ckpt


# --- training -----------------------------------------------------------------------------------

def build_data(cfg: TrainConfig) -> tuple[TaskData, TaskData, FrameSet]:
    train_frames = load_source(cfg.data, "train", cfg.size, cfg.seed)
    val_frames = load_source(cfg.val_data or cfg.data, "val", cfg.size, cfg.seed)
    if len(train_frames) == 0:
        raise UserError(f"data source {cfg.data!r} has no training frames")
    if len(val_frames) == 0:
        raise UserError(f"data source {cfg.val_data or cfg.data!r} has no held-out frames")
    return TaskData(train_frames, clean_fraction=cfg.clean_fraction), TaskData(val_frames), train_frames


def freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _set_lr(opt: torch.optim.Optimizer, m: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * m


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          log: Callable[[str], None] | None = None,
          data: tuple[TaskData, TaskData, FrameSet] | None = None,
          should_stop: Callable[[], bool] | None = None, command: str | None = None) -> dict[str, Any]:
    """Train, checkpoint every epoch to ``out_dir``, write ``metrics.json``; returns the metrics.

    ``data`` may pass pre-built (train, val, frames) to skip loading; ``should_stop`` is polled
    between steps (a retraining job that must yield) -- the run then stops after saving.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method not in list_methods():
        raise UserError(f"unknown method {cfg.method!r} (choose from {', '.join(list_methods())})")
    if cfg.epochs < 1:
        raise UserError("--epochs must be >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    ckpt = None
    if resume:
        ckpt = read_checkpoint(out)
        saved = ckpt.get("config", {})
        for key in ("method", "data", "size", "width", "blocks", "decoder_width", "decoder", "seed"):
            a, b = saved.get(key, "paper" if key == "decoder" else None), cfg.to_dict().get(key)
            a, b = (list(a) if isinstance(a, tuple) else a), (list(b) if isinstance(b, tuple) else b)
            if a != b:
                raise UserError(f"--resume: {key} differs from the checkpoint ({a!r} there, {b!r} here)")
    t_data = time.perf_counter()
    train_data, val_data, frames = data or build_data(cfg)
    data_seconds = time.perf_counter() - t_data
    h, w = train_data.size
    log(f"data: {len(train_data)} train / {len(val_data)} held-out frames of {frames.source} at {h}x{w} "
        f"({data_seconds:.1f}s to load and build targets)")

    torch.manual_seed(cfg.seed)
    net_cfg = NetConfig(num_classes=len(frames.class_names), width=cfg.width, blocks=tuple(cfg.blocks),
                        decoder_width=cfg.decoder_width, decoder=cfg.decoder)
    model = MultiTaskNet(net_cfg)
    parent = None
    if cfg.init_from and not resume:
        base = read_checkpoint(cfg.init_from)
        base_model = model_from_checkpoint(base)
        if base_model.cfg != net_cfg:
            raise UserError(f"--init-from {cfg.init_from}: architecture {base_model.cfg} differs from {net_cfg}")
        model.load_state_dict(base_model.state_dict())
        parent = str(cfg.init_from)
    method: WeightingMethod = create_method(cfg.method, TASKS, **cfg.method_options)
    with torch.no_grad():
        model.eval()
        method.setup(model, model.encode(train_data.batch(torch.arange(1))[0]).shape)
    defence = None
    if cfg.defence:
        from models.defence import create_class_defence  # the issue-3 module; optional here
        defence = create_class_defence(cfg.defence, model, **cfg.defence_options)
    optimizer = torch.optim.Adam(list(model.parameters()) + method.main_parameters(), lr=cfg.lr)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        method.load_optim_state(ckpt["method_optim"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if defence is not None and ckpt.get("defence") is not None:
            defence.load_state_dict(ckpt["defence"])
        gen.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"]
        parent = ckpt.get("parent")
        log(f"resumed from {out / CHECKPOINT_NAME} after epoch {start_epoch}")

    n = len(train_data)
    bs = min(cfg.batch_size, n)
    steps = n // bs
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        m = poly_multiplier(epoch, cfg.epochs)
        _set_lr(optimizer, m)
        method.set_lr_multiplier(m)
        if defence is not None:
            defence.set_epoch(epoch, cfg.epochs)
        model.train()
        if cfg.freeze_bn:
            freeze_batchnorm(model)
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        meters: dict[str, SmoothedValue] = {}
        step_time = SmoothedValue()
        report_every = max(1, steps // 5)
        for step in range(steps):
            ts = time.perf_counter()
            idx = perm[step * bs:(step + 1) * bs]
            x, targets = train_data.batch(idx, gen)
            if cfg.warmup_steps:
                _set_lr(optimizer, m * min(1.0, (epoch * steps + step + 1) / cfg.warmup_steps))
            optimizer.zero_grad(set_to_none=True)
            logs = method.step(model, x, targets)
            if defence is not None:
                logs.update(defence.step(model, x, targets))
            optimizer.step()
            for k, v in logs.items():
                meters.setdefault(k, SmoothedValue()).update(v)
            step_time.update(time.perf_counter() - ts)
            if not all(math.isfinite(v) for v in logs.values()):
                raise RuntimeError(f"training diverged at epoch {epoch + 1} step {step + 1}: {logs}")
            if (step + 1) % report_every == 0 or step + 1 == steps:
                eta = step_time.avg * ((steps - step - 1) + steps * (cfg.epochs - epoch - 1))
                shown = " ".join(f"{k}={meters[k].avg:.4f}" for k in sorted(meters) if k.startswith("loss_"))
                log(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps} {shown} "
                    f"{step_time.avg * 1000:.0f}ms/step eta {eta:.0f}s")
            if should_stop is not None and should_stop():
                stopped = True
                break
        if stopped:
            log("stop requested: leaving without finishing the epoch (nothing saved for it)")
            break
        val = evaluate(model, val_data)
        record = {"epoch": epoch + 1, "lr": cfg.lr * m, "seconds": time.perf_counter() - t0,
                  "train": {k: v.global_avg for k, v in meters.items()}, "val": val,
                  "task_weights": method.task_weights()}
        history.append(record)
        ce = val["class_error_pct"]
        log(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} held-out: class error "
            f"{'n/a' if ce is None else f'{ce:.1f}%'} rmse colour {val['rmse_colour']:.4f} "
            f"edges {val['rmse_edges']:.4f} denoised {val['rmse_denoised']:.4f}")
        save_checkpoint(out / CHECKPOINT_NAME, {
            "format": CHECKPOINT_FORMAT, "arch": net_cfg.to_dict(), "model": model.state_dict(),
            "method_name": cfg.method, "method": method.state_dict(), "method_optim": method.optim_state(),
            "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict(),
            "defence": defence.state_dict() if defence is not None else None,
            "history": history, "class_names": frames.class_names, "input_size": [h, w],
            "source": frames.source, "parent": parent, "command": command,
            "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()},
        })
    final = history[-1]["val"] if history else evaluate(model, val_data)
    metrics = {
        "method": cfg.method, "data": frames.source, "epochs": len(history), "final": final,
        "normalisers": getattr(getattr(method, "normalisers", None), "as_dict", lambda: None)(),
        "task_weights": method.task_weights(), "history": history, "config": cfg.to_dict(),
        "class_names": frames.class_names, "input_size": [h, w], "stopped": stopped, "command": command,
        "generation_ms_per_frame": 1000.0 * data_seconds / max(1, len(train_data) + len(val_data)),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def slim_checkpoint(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a run keeping only what inference, export and fine-tuning need (no optimizer,
    method or RNG state): the form in which models are shipped."""
    ckpt = read_checkpoint(run_dir)
    keep = ("format", "arch", "model", "method_name", "epoch", "config", "history", "class_names",
            "input_size", "source", "parent", "command")
    slim = {k: ckpt.get(k) for k in keep}
    slim["slim"] = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT_NAME, slim)
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():
        (out / "metrics.json").write_text(metrics.read_text())
    return out
