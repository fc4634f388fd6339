"""Classifier training with a defence (`hmd defend`) or a distillation method (`hmd distill`) on
the training engine (:mod:`models.engine`): the defence or distillation method supplies the
step, the engine the epochs, schedules, progress and checks. Each run writes ``checkpoint.pt``
(:func:`models.checkpoints.save_classifier`) and ``metrics.json``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from shared.atomic import atomic_write_json
from shared.console import progress
from shared.errors import UserError

from models.checkpoints import load_classifier, save_classifier
from models.distill import distill_options
from models.engine import TrainingEngine
from models.labelled import LabelledImages, accuracy, augment, load_labelled
from models.network import NetConfig
from models.registry import create_classifier, create_defence, create_distiller


def check_training_options(epochs: int, batch_size: int, size: int | None) -> None:
    """The one-line errors for options every classifier run shares."""
    if epochs < 1:
        raise UserError("--epochs must be >= 1")
    if batch_size < 2:
        raise UserError("--batch-size must be >= 2")
    if size is not None and (size < 8 or size % 8):
        raise UserError(f"--size {size}: must be a positive multiple of 8")


def fit(model: nn.Module, method_step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
        train_data: LabelledImages, val_data: LabelledImages, *, epochs: int, batch_size: int,
        optimizer: torch.optim.Optimizer, seed: int, tag: str,
        on_epoch: Callable[[int, int], None], augment_data: bool = True, max_steps: int | None = None,
        log: Callable[[str], None] = print, run_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The engine over labelled images: shuffled (augmented) batches, ``method_step(x, y)`` fills
    the grads and steps the method's own optimizers; held-out accuracy after every epoch. With
    ``run_dir`` the curves go there (``curves.jsonl``, ``curves.png``)."""
    engine = TrainingEngine(model, [optimizer], samples=len(train_data), batch_size=batch_size, epochs=epochs,
                            seed=seed, tag=tag, log=log, max_steps=max_steps, reports_per_epoch=4, run_dir=run_dir)

    def step(idx: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        x = train_data.x[idx]
        if augment_data:
            x = augment(x, gen)
        return method_step(x, train_data.y[idx])

    def end_epoch(epoch: int, m: float, seconds: float, averages: dict[str, float]) -> dict[str, Any]:
        val_acc = accuracy(model, val_data)
        log(f"[{tag}] epoch {epoch + 1}/{epochs} held-out accuracy {val_acc:.2f}%")
        return {"epoch": epoch + 1, "lr_multiplier": m, "seconds": seconds, "train": averages,
                "val_accuracy": val_acc}

    return engine.run(step, end_epoch, on_epoch=lambda epoch, total, m: on_epoch(epoch, total))


def train_defended(method: str, data: str, out: str | Path, *, epochs: int = 10, batch_size: int = 64,
                   lr: float = 1e-3, seed: int = 0, size: int = 32, width: int = 16,
                   options: dict[str, Any] | None = None, max_steps: int | None = None, augment: bool = True,
                   train_set=None, val_set=None, command: str | None = None, log=None) -> dict[str, Any]:
    """Train a ``resnet`` classifier with defence ``method``; writes checkpoint.pt and metrics.json."""
    log = log or progress
    out = Path(out)
    check_training_options(epochs, batch_size, size)
    options = dict(options or {})
    if not 0.0 <= options.get("eps", 0.2) <= 1.0:
        raise UserError(f"--fgsm-eps {options['eps']}: must be in [0, 1]")
    t0 = time.perf_counter()
    train_set = train_set or load_labelled(data, "train", size, seed)
    val_set = val_set or load_labelled(data, "val", size, seed)
    torch.manual_seed(seed)
    cfg = NetConfig(num_classes=len(train_set.class_names), width=width, in_channels=3)
    model = create_classifier("resnet", cfg)
    defence = create_defence(method, cfg, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log(f"defend {method}: {len(train_set)} train / {len(val_set)} held-out images of {train_set.source} "
        f"at {size}x{size}, {epochs} epochs")
    history = fit(model, lambda x, y: defence.train_step(model, x, y), train_set, val_set, epochs=epochs,
                  batch_size=batch_size, optimizer=optimizer, seed=seed, tag=method, on_epoch=defence.set_epoch,
                  augment_data=augment, max_steps=max_steps, log=log, run_dir=out)
    model.eval()
    config = {"method": method, "data": data, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "seed": seed, "size": size, "width": width, "options": options, "augment": augment}
    save_classifier(out, model, method=method, defence=defence.state_dict(), class_names=train_set.class_names,
                    input_size=[size, size], source=train_set.source, data=data, history=history,
                    config=config, command=command)
    metrics = {"method": method, "data": train_set.source, "train_accuracy_pct": accuracy(model, train_set),
               "val_accuracy_pct": history[-1]["val_accuracy"], "seconds": time.perf_counter() - t0,
               "final_alpha": getattr(defence, "alpha", None), "final_beta": getattr(defence, "beta", None),
               "history": history, "config": config, "class_names": train_set.class_names, "command": command}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_teacher(path: str | Path, class_names: list[str] | None = None, size: int | None = None):
    """The teacher classifier, checked against the data it will be distilled on."""
    teacher, ckpt = load_classifier(path, "--teacher")
    if teacher.cfg.in_channels != 3:
        raise UserError(f"--teacher {path}: takes {teacher.cfg.in_channels}-channel input, not RGB")
    tsize = int(ckpt.get("input_size", [0])[0])
    if size is not None and tsize and tsize != size:
        raise UserError(f"--teacher {path} was trained at {tsize}x{tsize}, --size is {size}")
    if class_names is not None and list(ckpt.get("class_names", [])) != list(class_names):
        raise UserError(f"--teacher {path} predicts {len(ckpt.get('class_names', []))} classes "
                        f"{ckpt.get('class_names')}, the data has {class_names}")
    return teacher, ckpt


def train_distilled(teacher_dir: str | Path, method: str, data: str, out: str | Path, *, fraction: float = 1.0,
                    epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                    size: int | None = None, student_arch: str = "cnn5", width: int = 32,
                    options: dict[str, Any] | None = None, max_steps: int | None = None, augment: bool = True,
                    train_set=None, val_set=None, command: str | None = None, log=None) -> dict[str, Any]:
    """Distil the classifier in ``teacher_dir`` into a ``student_arch`` student with ``method``
    (``size`` None: the teacher's input size); writes checkpoint.pt and metrics.json."""
    log = log or progress
    out = Path(out)
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction {fraction}: must be in (0, 1]")
    check_training_options(epochs, batch_size, size)
    teacher, tckpt = load_teacher(teacher_dir, size=size)
    size = size or int(tckpt["input_size"][0])
    t0 = time.perf_counter()
    train_full = train_set or load_labelled(data, "train", size, seed)
    val_set = val_set or load_labelled(data, "val", size, seed)
    load_teacher(teacher_dir, train_full.class_names, size)
    train_part = train_full.fraction(fraction, seed)
    options = dict(options if options is not None else distill_options(method, fraction))
    torch.manual_seed(seed)
    cfg = NetConfig(num_classes=len(train_full.class_names), width=width, in_channels=3)
    student = create_classifier(student_arch, cfg)
    if method == "great" and not options.get("disc_arch"):
        options["disc_arch"] = student_arch  # the paper's discriminator: the student's architecture
    distiller = create_distiller(method, cfg, teacher, **options)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    log(f"distill {method}: {len(train_part)} of {len(train_full)} train images ({100 * fraction:g} %), "
        f"{len(val_set)} held-out, {student_arch} student <- {tckpt['arch']} teacher, {epochs} epochs")
    history = fit(student, lambda x, y: distiller.train_step(student, x, y), train_part, val_set, epochs=epochs,
                  batch_size=batch_size, optimizer=optimizer, seed=seed, tag=f"distill-{method}",
                  on_epoch=distiller.set_epoch, augment_data=augment, max_steps=max_steps, log=log, run_dir=out)
    student.eval()
    config = {"method": method, "teacher": str(teacher_dir), "data": data, "fraction": fraction, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "seed": seed, "size": size, "student": student_arch,
              "width": width, "options": options, "augment": augment}
    save_classifier(out, student, method=f"distill-{method}", distiller=distiller.state_dict(),
                    class_names=train_full.class_names, input_size=[size, size], source=train_full.source,
                    data=data, history=history, config=config, command=command)
    metrics = {"method": method, "fraction": fraction, "train_images": len(train_part),
               "data": train_full.source, "train_accuracy_pct": accuracy(student, train_part),
               "val_accuracy_pct": history[-1]["val_accuracy"], "teacher_val_accuracy_pct": accuracy(teacher, val_set),
               "seconds": time.perf_counter() - t0, "history": history, "config": config, "command": command}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
