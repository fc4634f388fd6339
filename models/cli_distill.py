"""`hmd distill`: distil a trained classifier (the teacher, from `hmd defend --method none`)
into a student (default the paper's CNN-5) with ``none``, ``kd`` or ``great``.

    hmd distill --teacher runs/teacher --method great --fraction 0.05 --data synthetic:2000 --out runs/s-great
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write_json
from shared.errors import UserError

from models.cli_defend import add_classifier_training_arguments, check_common, command_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.classifier import list_archs
    from models.distill import list_distill_methods

    parser.add_argument("--teacher", required=True, metavar="DIR", help="a classifier run folder (hmd defend)")
    parser.add_argument("--method", required=True, choices=list_distill_methods())
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="fraction of the training split, class-stratified (paper's sparse regime: 0.05)")
    add_classifier_training_arguments(parser)
    parser.set_defaults(size=None)
    parser.add_argument("--student", choices=list_archs(), default="cnn5", help="student architecture (cnn5)")
    parser.add_argument("--width", type=int, default=32, help="student width (CNN-5: first conv's channels, 32)")
    parser.add_argument("--temperature", type=float, default=None, help="kd: temperature (paper 20)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="kd: KL weight (paper 0.1 dense, 0.99 when --fraction < 1); great: the "
                             "discriminator weight (paper 0.1)")
    parser.add_argument("--disc-norm", choices=["rms", "none"], default="rms",
                        help="great: per-sample RMS normalisation of the discriminator's input (default rms)")
    parser.add_argument("--disc-arch", choices=list_archs(), default=None,
                        help="great: discriminator architecture (default resnet: stride-2 first layer)")
    parser.add_argument("--disc-width", type=int, default=None, help="great: discriminator width (default 8)")
    parser.add_argument("--grad-bn", choices=["detached", "batch"], default="detached",
                        help="great: BatchNorm batch statistics in the student's input gradient: 'batch' = the "
                             "paper's exact maths, 'detached' (default) = treated as constants (see models/defence.py)")


def distill_options(method: str, fraction: float, temperature: float | None, alpha: float | None,
                    disc_norm: str = "rms", disc_arch: str | None = None, disc_width: int | None = None,
                    grad_bn: str = "detached") -> dict[str, Any]:
    from models.distill import PAPER_GREAT_ALPHA, PAPER_KD

    if method == "kd":
        a = alpha if alpha is not None else (PAPER_KD["alpha_dense"] if fraction >= 1.0 else PAPER_KD["alpha_sparse"])
        return {"temperature": temperature if temperature is not None else PAPER_KD["temperature"], "alpha": a}
    if method == "great":
        return {"alpha": PAPER_GREAT_ALPHA if alpha is None else alpha, "disc_norm": disc_norm,
                "disc_arch": disc_arch, "disc_width": disc_width, "grad_bn": grad_bn}
    return {}


def load_teacher(path: str | Path, class_names: list[str] | None = None, size: int | None = None):
    """The teacher classifier, checked against the data it will be distilled on."""
    from models.classifier import load_classifier

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
    from models.classifier import accuracy, create_classifier, fit, load_labelled, save_classifier
    from models.distill import create_distill
    from models.network import NetConfig

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction {fraction}: must be in (0, 1]")
    teacher, tckpt = load_teacher(teacher_dir, size=size)
    size = size or int(tckpt["input_size"][0])
    t0 = time.perf_counter()
    train_full = train_set or load_labelled(data, "train", size, seed)
    val_set = val_set or load_labelled(data, "val", size, seed)
    load_teacher(teacher_dir, train_full.class_names, size)
    train_part = train_full.fraction(fraction, seed)
    options = dict(options if options is not None else distill_options(method, fraction, None, None))
    torch.manual_seed(seed)
    cfg = NetConfig(num_classes=len(train_full.class_names), width=width, in_channels=3)
    student = create_classifier(student_arch, cfg)
    distiller = create_distill(method, cfg, teacher, **options)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        logs = distiller.train_step(student, x, y)
        optimizer.step()
        return logs

    log(f"distill {method}: {len(train_part)} of {len(train_full)} train images ({100 * fraction:g} %), "
        f"{len(val_set)} held-out, {student_arch} student <- {tckpt['arch']} teacher, {epochs} epochs")
    history = fit(student, step, train_part, val_set, epochs=epochs, batch_size=batch_size,
                  optimizers=[optimizer], seed=seed, tag=f"distill-{method}", on_epoch=distiller.set_epoch,
                  augment_data=augment, max_steps=max_steps, log=log)
    student.eval()
    config = {"method": method, "teacher": str(teacher_dir), "data": data, "fraction": fraction, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "seed": seed, "size": size, "student": student_arch,
              "width": width, "options": options, "augment": augment}
    out = Path(out)
    save_classifier(out, student, method=f"distill-{method}", distiller=distiller.state_dict(),
                    class_names=train_full.class_names, input_size=[size, size], source=train_full.source,
                    data=data, history=history, config=config, command=command)
    metrics = {"method": method, "fraction": fraction, "train_images": len(train_part),
               "data": train_full.source, "train_accuracy_pct": accuracy(student, train_part),
               "val_accuracy_pct": history[-1]["val_accuracy"], "teacher_val_accuracy_pct": accuracy(teacher, val_set),
               "seconds": time.perf_counter() - t0, "history": history, "config": config, "command": command}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.fraction <= 1.0:
        raise UserError(f"--fraction {args.fraction}: must be in (0, 1]")
    if args.size is None:
        args.size = 32  # checked below against the teacher; replaced by the teacher's size when absent
        size = None
    else:
        size = args.size
    check_common(args)
    opts = distill_options(args.method, args.fraction, args.temperature, args.alpha, args.disc_norm,
                           args.disc_arch, args.disc_width, args.grad_bn)
    m = train_distilled(args.teacher, args.method, args.data, args.out, fraction=args.fraction, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=size,
                        student_arch=args.student, width=args.width, options=opts, max_steps=args.max_steps,
                        augment=not args.no_augment, command=command_line())
    print(f"distill {args.method} ({100 * args.fraction:g} % of the data): student held-out "
          f"{m['val_accuracy_pct']:.2f}% (teacher {m['teacher_val_accuracy_pct']:.2f}%) -> {args.out}/metrics.json")
    return 0
