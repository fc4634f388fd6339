"""`hmd distill`: distil a trained classifier (the teacher, from `hmd defend --method none`)
into a student (default the paper's CNN-5) with ``none``, ``kd`` or ``great``.

    hmd distill --teacher runs/teacher --method great --fraction 0.05 --data synthetic:2000 --out runs/s-great
"""
from __future__ import annotations

import argparse

from models.cli_common import add_classifier_run_arguments, command_line, set_threads
from models.registry import ARCHITECTURES, DISTILLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="DIR", help="a classifier run folder (hmd defend)")
    parser.add_argument("--method", required=True, choices=DISTILLERS.names())
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="fraction of the training split, class-stratified (paper's sparse regime: 0.05)")
    add_classifier_run_arguments(parser)
    parser.set_defaults(size=None)  # the teacher's
    parser.add_argument("--student", choices=ARCHITECTURES.names(), default="cnn5", help="student architecture (cnn5)")
    parser.add_argument("--width", type=int, default=32, help="student width (CNN-5: first conv's channels, 32)")
    parser.add_argument("--temperature", type=float, default=None, help="kd: temperature (paper 20)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="kd: KL weight (paper 0.1 dense, 0.99 when --fraction < 1); great: the "
                             "discriminator weight (paper 0.1)")
    parser.add_argument("--disc-norm", choices=["none", "rms"], default="none",
                        help="great: the discriminator's input gradients as they are (none, the paper's, default) "
                             "or per-sample RMS-normalised")
    parser.add_argument("--disc-arch", choices=ARCHITECTURES.names(), default=None,
                        help="great: discriminator architecture (default: the student's, the paper's)")
    parser.add_argument("--disc-width", type=int, default=None,
                        help="great: discriminator width (default: the student's; less is faster)")
    parser.add_argument("--disc-bn", choices=["separate", "joint"], default="separate",
                        help="great: teacher and student gradients through the discriminator as two batches "
                             "(separate, the paper's, default) or one (joint: BatchNorm mixes them, cheaper)")
    parser.add_argument("--disc-lr", type=float, default=None, help="great: discriminator Adam lr (default 1e-3)")
    parser.add_argument("--input-grad", choices=["explicit", "autograd"], default=None,
                        help="great: input gradients from explicit ops (default; same maths, faster) or autograd")
    parser.add_argument("--grad-bn", choices=["batch", "detached"], default="batch",
                        help="great: BatchNorm batch statistics in the student's input gradient: 'batch' (default) "
                             "= the paper's exact maths, 'detached' = treated as constants, faster "
                             "(see models/defence.py)")


def method_options(args: argparse.Namespace) -> dict:
    """The chosen method's options: the paper's where not given (models.distill.distill_options)."""
    from models.distill import distill_options

    return distill_options(args.method, args.fraction, args.temperature, args.alpha, args.disc_norm,
                           args.disc_arch, args.disc_width, args.grad_bn, args.disc_lr, args.input_grad,
                           args.disc_bn)


def run(args: argparse.Namespace) -> int:
    from models.train_classifier import train_distilled

    set_threads(args.threads)
    opts = method_options(args)
    m = train_distilled(args.teacher, args.method, args.data, args.out, fraction=args.fraction, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=args.size,
                        student_arch=args.student, width=args.width, options=opts, max_steps=args.max_steps,
                        augment=not args.no_augment, command=command_line())
    print(f"distill {args.method} ({100 * args.fraction:g} % of the data): student held-out "
          f"{m['val_accuracy_pct']:.2f}% (teacher {m['teacher_val_accuracy_pct']:.2f}%) -> {args.out}/metrics.json")
    return 0
