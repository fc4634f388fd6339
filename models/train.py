"""Multi-task training (`hmd train`): Adam with the paper's poly multiplier on the training
engine (:mod:`models.engine`), resumable checkpoints, held-out evaluation with the paper's
Table 4 columns, metrics.json.

Used by ``hmd train``, the Table 4 benchmark and the cloud's personalisation jobs. Public here:
:class:`TrainConfig`, :func:`train`, :func:`evaluate`, :func:`load_model`, :func:`read_checkpoint`,
:func:`model_from_checkpoint`, :func:`freeze_batchnorm`, :func:`slim_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from shared.atomic import atomic_write_json
from shared.console import progress
from shared.errors import UserError

from models.batchnorm import freeze_batchnorm
from models.checkpoints import CHECKPOINT_NAME, MULTITASK_FORMAT, read_checkpoint_file, save_checkpoint
from models.data import FrameSet, TaskData, load_source
from models.engine import TrainingEngine
from models.network import MultiTaskNet, NetConfig
from models.defence import MultiTaskClassDefence
from models.mtl_architectures import check_pair
from models.registry import (DEFENCES, MTL_ARCHITECTURES, TASK_SETS, WEIGHTINGS, create_defence,
                             create_mtl_architecture, create_weighting)

__all__ = ["CHECKPOINT_NAME", "TrainConfig", "build_data", "evaluate", "freeze_batchnorm", "load_model",
           "model_from_checkpoint", "read_checkpoint", "slim_checkpoint", "train"]

@dataclasses.dataclass
class TrainConfig:
    method: str = "great"
    tasks: str = "cifar"  # task set (models/registry.py TASK_SETS): "cifar" or "room" (models/room_tasks.py)
    architecture: str = "shared"  # models/registry.py MTL_ARCHITECTURES: shared (the paper's), mtan, astmt
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
    trainable: tuple[str, ...] = ()  # fine-tuning: only parameters whose names start with one of these
    # prefixes train (e.g. ("heads", "encoder.stages.4")); empty = every parameter
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        d["trainable"] = list(self.trainable)
        if isinstance(self.size, (tuple, list)):
            d["size"] = list(self.size)
        return d


# --- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: MultiTaskNet, data: TaskData, batch_size: int = 128, seed: int = 1234,
             clean_tasks: tuple[str, ...] = ()) -> dict[str, float]:
    """Table 4 columns on ``data`` with a fixed noise draw: class error %, RMSE colour/edges/denoised.

    ``clean_tasks`` are scored on the clean gray input instead (the headset's protocol: it feeds clean
    camera frames for colour and edges; `hmd bench real` scores the same way). Default: the paper's,
    every task on the noisy input."""
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
        if clean_tasks:
            out = {**out, **{t: v for t, v in model(tg["denoised"]).items() if t in clean_tasks}}
        for t in sq:
            sq[t] += float(((out[t] - tg[t]) ** 2).sum())
            count[t] += tg[t].numel()
        m = tg["class"] >= 0
        labelled += int(m.sum())
        wrong += int((out["class"][m].argmax(1) != tg["class"][m]).sum())
    res = {f"rmse_{t}": math.sqrt(sq[t] / max(1, count[t])) for t in sq}
    res = {"class_error_pct": (100.0 * wrong / labelled) if labelled else None, **res}
    return res


# --- checkpoints ---------------------------------------------------------------------------------

def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Load ``RUN/checkpoint.pt`` (or a .pt path) with a clear error for anything else."""
    return read_checkpoint_file(run_dir, MULTITASK_FORMAT)


def model_from_checkpoint(ckpt: dict[str, Any]) -> MultiTaskNet:
    try:
        if ckpt["arch"].get("task_set") == "room":
            from models.room_network import RoomNet, RoomNetConfig

            model = RoomNet(RoomNetConfig.from_dict(ckpt["arch"]))
        else:
            model = MultiTaskNet(NetConfig.from_dict(ckpt["arch"]))
        model = create_mtl_architecture(ckpt.get("architecture") or "shared", model)
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
    if cfg.tasks == "room":
        from models.room_tasks import load_room_data

        room_train, room_val = load_room_data(cfg.data, cfg.val_data, cfg.size, cfg.seed)
        return room_train, room_val, room_train  # type: ignore[return-value]  # it has .source, .class_names
    train_frames = load_source(cfg.data, "train", cfg.size, cfg.seed)
    val_frames = load_source(cfg.val_data or cfg.data, "val", cfg.size, cfg.seed)
    if len(train_frames) == 0:
        raise UserError(f"data source {cfg.data!r} has no training frames")
    if len(val_frames) == 0:
        raise UserError(f"data source {cfg.val_data or cfg.data!r} has no held-out frames")
    return TaskData(train_frames, clean_fraction=cfg.clean_fraction), TaskData(val_frames), train_frames


def _stderr(s: str) -> None:
    progress(s)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          log: Callable[[str], None] | None = None,
          data: tuple[TaskData, TaskData, FrameSet] | None = None,
          should_stop: Callable[[], bool] | None = None, command: str | None = None,
          replica: Any = None) -> dict[str, Any]:
    """Train, checkpoint every epoch to ``out_dir``, write ``metrics.json``; returns the metrics.

    ``data`` may pass pre-built (train, val, frames) to skip loading; ``should_stop`` is polled
    between steps (a retraining job that must yield) -- the run then stops after saving.
    ``replica`` (:class:`models.distributed.Replica`, set by :func:`models.distributed.launch`): this
    process is one rank of a data-parallel run; it trains on its shard of every batch, and only
    rank 0 evaluates and writes ``out_dir`` (the others return their history only).
    """
    log = log or _stderr
    WEIGHTINGS.check(cfg.method)
    TASK_SETS.check(cfg.tasks)
    MTL_ARCHITECTURES.check(cfg.architecture)
    check_pair(cfg.architecture, cfg.method, MTL_ARCHITECTURES.get(cfg.architecture))  # before any data loads
    room = cfg.tasks == "room"
    if cfg.defence:
        DEFENCES.check(cfg.defence)
        if room:
            raise UserError("--defence protects a class head: the room task set has none")
    if cfg.epochs < 1:
        raise UserError("--epochs must be >= 1")
    out = Path(out_dir)  # made once the data and options are checked: a failed start leaves no folder
    lead = replica is None or replica.rank == 0  # the other ranks of --nproc N neither evaluate nor write
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    ckpt = None
    if resume:
        ckpt = read_checkpoint(out)
        saved = ckpt.get("config", {})
        for key in ("method", "tasks", "architecture", "data", "size", "width", "blocks", "decoder_width", "decoder", "seed"):
            a, b = saved.get(key, {"decoder": "paper", "tasks": "cifar", "architecture": "shared"}.get(key)), cfg.to_dict().get(key)
            a, b = (list(a) if isinstance(a, tuple) else a), (list(b) if isinstance(b, tuple) else b)
            if a != b:
                raise UserError(f"--resume: {key} differs from the checkpoint ({a!r} there, {b!r} here)")
    t_data = time.perf_counter()
    train_data, val_data, frames = data or build_data(cfg)
    data_seconds = time.perf_counter() - t_data
    h, w = train_data.size
    if replica is not None:
        replica.check(cfg, train_data)
    log(f"data: {len(train_data)} train / {len(val_data)} held-out frames of {frames.source} at {h}x{w} "
        f"({data_seconds:.1f}s to load and build targets)")

    torch.manual_seed(cfg.seed)
    method_options = dict(cfg.method_options)
    if room:
        from models.room_network import RoomNet
        from models.room_tasks import ROOM, describe, evaluate_room, net_config

        net_cfg = net_config(cfg.width, cfg.decoder_width, tuple(cfg.blocks))
        model = RoomNet(net_cfg)
        method_options = {**ROOM.method_defaults.get(cfg.method, {}), **method_options}
        evaluate_fn, describe_fn = evaluate_room, describe
    else:
        net_cfg = NetConfig(num_classes=len(frames.class_names), width=cfg.width, blocks=tuple(cfg.blocks),
                            decoder_width=cfg.decoder_width, decoder=cfg.decoder)
        model = MultiTaskNet(net_cfg)
        evaluate_fn, describe_fn = evaluate, _describe_cifar
    model = create_mtl_architecture(cfg.architecture, model)
    check_pair(cfg.architecture, cfg.method, model)
    parent = None
    if cfg.init_from and not resume:
        base_model = model_from_checkpoint(read_checkpoint(cfg.init_from))
        if base_model.cfg != net_cfg:
            raise UserError(f"--init-from {cfg.init_from}: architecture {base_model.cfg} differs from {net_cfg}")
        model.load_state_dict(base_model.state_dict())
        parent = str(cfg.init_from)
    if replica is not None:  # (the replica brings its BatchNorm: train does not import models.distributed)
        replica.convert_batchnorm(model)
    if cfg.trainable:  # the others keep their weights (Adam skips parameters without a gradient)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(tuple(cfg.trainable)))
    method = create_weighting(cfg.method, model.tasks, **method_options)
    if replica is not None:  # before setup: the method's own networks get synced BatchNorms too
        method.data_parallel = replica
    with torch.no_grad():
        model.eval()
        method.setup(model, model.encode(train_data.batch(torch.arange(1))[0]).shape)
    defence = None
    if cfg.defence:
        defence = MultiTaskClassDefence(create_defence(cfg.defence, net_cfg, **cfg.defence_options))
    optimizer = torch.optim.Adam(list(model.parameters()) + method.main_parameters(), lr=cfg.lr)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    engine = TrainingEngine(model, [optimizer], samples=len(train_data), batch_size=cfg.batch_size,
                            epochs=cfg.epochs, seed=cfg.seed, tag=cfg.method, log=log,
                            max_steps=cfg.max_steps_per_epoch, warmup_steps=cfg.warmup_steps,
                            shown=lambda key: key.startswith("loss_"), run_dir=out if lead else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(_method_state(ckpt))
        optimizer.load_state_dict(ckpt["optimizer"])
        if defence is not None and ckpt.get("defence") is not None:
            defence.load_state_dict(ckpt["defence"])
        engine.resume(ckpt["epoch"], ckpt["history"], ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        parent = ckpt.get("parent")
        log(f"resumed from {out / CHECKPOINT_NAME} after epoch {ckpt['epoch']}")

    def step(idx: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        x, targets = train_data.batch(idx, gen)
        if replica is not None:
            x, targets = replica.shard(x, targets)
        logs = method.step(model, x, targets)
        if defence is not None:
            logs.update(defence.step(model, x, targets))
        if replica is not None:
            replica.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
            logs = replica.average_logs(logs)
        return logs

    def on_epoch(epoch: int, epochs: int, m: float) -> None:
        method.set_lr_multiplier(m)
        method.set_epoch(epoch, epochs)
        if defence is not None:
            defence.set_epoch(epoch, epochs)

    def train_mode(net: torch.nn.Module) -> None:
        net.train()
        if cfg.freeze_bn:
            freeze_batchnorm(net)

    def end_epoch(epoch: int, m: float, seconds: float, averages: dict[str, float]) -> dict[str, Any]:
        if not lead:
            return {"epoch": epoch + 1, "seconds": seconds, "train": averages}
        val = evaluate_fn(model, val_data)
        log(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} held-out: {describe_fn(val)}")
        return {"epoch": epoch + 1, "lr": cfg.lr * m, "seconds": seconds, "train": averages, "val": val,
                "task_weights": method.task_weights()}

    def checkpoint(epoch: int) -> None:
        if not lead:
            return
        save_checkpoint(out / CHECKPOINT_NAME, {
            "format": MULTITASK_FORMAT, "arch": net_cfg.to_dict(), "model": model.state_dict(),
            "method_name": cfg.method, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1, "config": cfg.to_dict(), "architecture": cfg.architecture,
            "defence": defence.state_dict() if defence is not None else None,
            "history": engine.history, "class_names": frames.class_names, "input_size": [h, w],
            "source": frames.source, "task_set": cfg.tasks, "parent": parent, "command": command,
            "rng": {"generator": engine.generator.get_state(), "torch": torch.get_rng_state()},
        })

    if replica is not None:
        replica.barrier()  # every rank has built its data and model: the epochs' timings start together
    history = engine.run(step, end_epoch, on_epoch=on_epoch, train_mode=train_mode, checkpoint=checkpoint,
                         should_stop=should_stop)
    if not lead:
        return {"history": history, "stopped": engine.stopped}
    final = history[-1]["val"] if history else evaluate_fn(model, val_data)
    metrics = {
        "method": cfg.method, "tasks": cfg.tasks, "data": frames.source, "epochs": len(history), "final": final,
        "normalisers": getattr(getattr(method, "normalisers", None), "as_dict", lambda: None)(),
        "task_weights": method.task_weights(), "method_options": method_options, "history": history, "config": cfg.to_dict(),
        "class_names": frames.class_names, "input_size": [h, w], "stopped": engine.stopped, "command": command,
        "generation_ms_per_frame": 1000.0 * data_seconds / max(1, len(train_data) + len(val_data)),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _describe_cifar(val: dict[str, Any]) -> str:
    ce = val["class_error_pct"]
    return (f"class error {'n/a' if ce is None else f'{ce:.1f}%'} rmse colour {val['rmse_colour']:.4f} "
            f"edges {val['rmse_edges']:.4f} denoised {val['rmse_denoised']:.4f}")


def _method_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The weighting method's state; checkpoints written before its optimizers' state moved into
    it kept that state under ``method_optim``."""
    state = dict(ckpt["method"])
    if "method_optim" in ckpt:
        state["_extra_state"] = {"optimizers": ckpt["method_optim"]}
    return state


def slim_checkpoint(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a run keeping only what inference, export and fine-tuning need (no optimizer,
    method or RNG state): the form in which models are shipped."""
    ckpt = read_checkpoint(run_dir)
    keep = ("format", "arch", "model", "method_name", "epoch", "config", "history", "class_names",
            "input_size", "source", "task_set", "parent", "command", "calibration", "export_size")
    slim = {k: ckpt.get(k) for k in keep}
    slim["slim"] = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT_NAME, slim)
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():
        (out / "metrics.json").write_text(metrics.read_text())
    return out
