"""`hmd train`: train the multi-task network with a loss-weighting method (and optionally a
defence of its class head)."""
from __future__ import annotations

import argparse

from shared.errors import UserError

from models.cli_common import add_defence_arguments, add_run_arguments, command_line, defence_options, parse_size_arg
from models.registry import DEFAULT_TASK_SET, DEFENCES, MTL_ARCHITECTURES, TASK_SETS, WEIGHTINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="great", choices=WEIGHTINGS.names(), help="loss weighting (default: great)")
    parser.add_argument("--tasks", default=DEFAULT_TASK_SET, choices=TASK_SETS.names(),
                        help="task set: cifar (class, colour, edges, denoised) or room (depth, normals, layout "
                        "keypoints; --data rooms[:N][:STYLE], default size 320)")
    add_run_arguments(parser, data_help="synthetic[:N][:WORLD] | cifar10:PATH | images:DIR | video:PATH "
                      "(default: synthetic)", size=None, batch_size=32,
                      size_type=parse_size_arg,
                      size_help="input size in pixels, sides multiples of 8: N (square) or WIDTHxHEIGHT, e.g. "
                      "160x120 for a 4:3 camera (default: 64 for synthetic/images/video, 32 for CIFAR-10, "
                      "160x120 for walk)")
    parser.add_argument("--val-data", default=None, metavar="SOURCE",
                        help="held-out source (default: the held-out split of --data)")
    parser.add_argument("--width", type=int, default=16, help="encoder width (shared feature has 4x this)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--alpha", type=float, default=None,
                        help="GradNorm asymmetry alpha (default: the paper's, 0.6 for cifar, 1.5 for room)")
    parser.add_argument("--weight-lr", type=float, default=None, help="GradNorm: Adam lr of the task weights (1e-3)")
    parser.add_argument("--gal-lr", type=float, default=1e-4, help="GREAT: Adam lr of the gradient-alignment layers")
    parser.add_argument("--gal-floor", type=float, default=None, help="GREAT: lower clamp of the GALs (1e-3)")
    parser.add_argument("--aux-lr", type=float, default=1e-3, help="GREAT: Adam lr of the auxiliary task classifier")
    parser.add_argument("--aux-norm", choices=["none", "rms"], default="none",
                        help="GREAT: the classifier's input gamma_i * g_i as it is (none, the paper's, default) or "
                             "per-sample RMS-normalised (then the GALs cannot rescale a task's gradient)")
    parser.add_argument("--temperature", type=float, default=2.0, help="DWA: softmax temperature T (2, as MTAN)")
    parser.add_argument("--cagrad-c", type=float, default=0.4, help="CAGrad: the ball's radius c (0.4)")
    parser.add_argument("--disc-weight", type=float, default=0.01,
                        help="ASTMT: the discriminator loss's weight w in (1 - w) J + w CE (0.01)")
    parser.add_argument("--disc-lr", type=float, default=1e-2, help="ASTMT: Adam lr of the discriminator (1e-2)")
    parser.add_argument("--architecture", default="shared", choices=MTL_ARCHITECTURES.names(),
                        help="shared (the paper's: one encoder feature for every head), mtan (per-task attention "
                        "masks) or astmt (per-task squeeze-and-excitation; train it with --method astmt)")
    parser.add_argument("--aux-stride", type=int, choices=[1, 2], default=None,
                        help="GREAT: the task classifier's first conv stride (default 2 on a feature map of at "
                             "least 4x4, a deviation for cost; 1: the paper's ResNet-11)")
    parser.add_argument("--decoder", choices=["paper", "camera"], default="paper",
                        help="dense decoders: the paper's (feature only, sigmoid outputs) or the headset's "
                        "camera decoder (input skips, linear outputs, colour/denoised residual over the input)")
    parser.add_argument("--clean-fraction", type=float, default=0.0,
                        help="share of training inputs fed the clean gray frame instead of the paper's noisy "
                        "input (default 0: the paper; the headset feeds clean camera frames)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel training on N CPU processes (gloo, one thread each), the same "
                        "weights as one process up to float rounding; --method equal, uncertainty, gradnorm or great "
                        "(default 1)")
    parser.add_argument("--init-from", default=None, metavar="DIR", help="start from this run's weights")
    parser.add_argument("--defence", default=None, choices=DEFENCES.names(),
                        help="also train the class head with an adversarial defence (e.g. great+ce), "
                             "so the deployed headset model is the defended one; its options: --defence-*")
    add_defence_arguments(parser.add_argument_group("defence options (with --defence; default: the defence's)"),
                          prefix="defence-")


def method_options(args: argparse.Namespace) -> dict:
    """The options of the chosen weighting (those without a default here only when given)."""
    if args.method == "gradnorm":
        opts = {"alpha": args.alpha, "weight_lr": args.weight_lr}
    elif args.method == "great":
        opts = {"gal_lr": args.gal_lr, "aux_lr": args.aux_lr, "aux_norm": args.aux_norm, "gal_floor": args.gal_floor,
                "aux_stride": args.aux_stride}
    elif args.method == "dwa":
        opts = {"temperature": args.temperature}
    elif args.method == "cagrad":
        opts = {"c": args.cagrad_c}
    elif args.method == "astmt":
        opts = {"disc_weight": args.disc_weight, "disc_lr": args.disc_lr}
    else:
        opts = {}
    return {k: v for k, v in opts.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train

    if args.batch_size < 2:
        raise UserError("--batch-size must be >= 2")
    if not 0.0 <= args.clean_fraction <= 1.0:
        raise UserError("--clean-fraction must be between 0 and 1")
    options = defence_options(args, given_only=True)
    if options and not args.defence:
        raise UserError(f"--defence-* options need --defence (given: {', '.join(sorted(options))})")
    cfg = TrainConfig(method=args.method, tasks=args.tasks, architecture=args.architecture, data=args.data, val_data=args.val_data, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=args.size,
                      width=args.width, decoder=args.decoder, clean_fraction=args.clean_fraction,
                      method_options=method_options(args), defence=args.defence,
                      defence_options=options, max_steps_per_epoch=args.max_steps, init_from=args.init_from,
                      threads=args.threads)
    if args.nproc != 1:
        from models.distributed import launch

        metrics = launch(cfg, args.out, args.nproc, resume=args.resume, command=command_line())
    else:
        metrics = train(cfg, args.out, resume=args.resume, command=command_line())
    f = metrics["final"]
    if args.tasks == "room":
        from models.room_tasks import describe

        print(f"{args.method}: {describe(f)} -> {args.out}/metrics.json")
        return 0
    ce = f["class_error_pct"]
    print(f"{args.method}: class error {'n/a' if ce is None else f'{ce:.2f}%'}, RMSE colour "
          f"{f['rmse_colour']:.4f} edges {f['rmse_edges']:.4f} denoised {f['rmse_denoised']:.4f} "
          f"-> {args.out}/metrics.json")
    return 0
