"""`hmd personalise MODEL --data video:PATH --out DIR`: the cloud's personalisation job, offline.

The same code path as a cloud job (cloud/personalisation.py): the wearer's frames in time order,
:func:`models.personalise.personalise` (GREAT fine-tuning with base-data replay, frozen BatchNorm,
warm-up) trained on the first part of the footage and judged on the later frames, the same gate
(better on the wearer's later frames, not worse beyond the tolerance on the base model's own
validation set), and the same export: ONNX + manifest signed with an Ed25519 key
(``cloud.keys.SigningKey``; a key pair is made in ``--key-dir`` if there is none).

Writes DIR/run (the candidate run folder), DIR/personalise.json (both evaluations and the verdict)
and, when accepted, DIR/model.onnx + DIR/model.manifest.json (signed) and DIR/signing.pub.

A room model (``room`` or a `hmd train --tasks room` run) goes through
:func:`models.room_personalise.personalise_room`: the room teacher (``--teacher``, default the
shipped ``room-teacher``) labels the wearer's frames, and the gate judges on held-out rendered
rooms of the wearer's style (``--style``, default inferred from the frames) and on the base run's
held-out rooms. ``--data rooms[:STYLE][:N]`` is a wearer walking through a rendered room.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from shared.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the wearer's current model: a shipped name (base) or a run folder")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="the wearer's footage in time order: video:PATH, walk:DIR[:N] or images:DIR (sorted)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--max-frames", type=int, default=512,
                        help="the most recent frames used (the cloud's job_max_frames; default 512)")
    parser.add_argument("--stride", type=int, default=9,
                        help="keep every k-th video frame (a journal keeps every k-th frame too; default 9: "
                             "512 frames span about 5 minutes of 15 fps footage)")
    parser.add_argument("--base-data", default=None, metavar="SOURCE",
                        help="the base model's training data, replayed (default: what the model was trained on)")
    parser.add_argument("--base-val-data", default=None, metavar="SOURCE",
                        help="the base model's own validation set, the gate's guard against forgetting "
                             "(default: the model's recorded validation data)")
    parser.add_argument("--teacher", default=None, metavar="RUN",
                        help="class targets from this teacher (default: none); a room model's labels come from a "
                             "room teacher (default: the shipped room-teacher)")
    parser.add_argument("--style", default=None, metavar="STYLE",
                        help="room model: the wearer's room style for the gate's held-out rooms "
                             "(office, living, bare; default: inferred from the frames)")
    parser.add_argument("--method", default="great", help="weighting method (default great)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of the footage judged on (default 0.2)")
    parser.add_argument("--split", choices=["time", "interleaved"], default="time",
                        help="held-out frames: the later ones (time, default) or every k-th (interleaved)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="base-set tolerance (default 0.05)")
    parser.add_argument("--replay", type=float, default=None,
                        help="base frames replayed per wearer frame (default 1; a room model: 4)")
    parser.add_argument("--style-replay", type=float, default=None, metavar="F",
                        help="room model: share of the replayed frames rendered in the wearer's style (default 0.5)")
    parser.add_argument("--no-mirror", action="store_true",
                        help="room model: do not add the wearer's frames mirrored (the teacher labels both)")
    parser.add_argument("--fine-tune", choices=["all", "last"], default=None,
                        help="room model: layers trained: all (default) or the heads and the last encoder stage")
    parser.add_argument("--train-batchnorm", action="store_true",
                        help="room model: BatchNorm normalises with batch statistics and updates its running ones "
                             "(default: frozen)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="camera decoder: skip the least-squares output calibration on the wearer's training frames")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; a room model: 3e-4)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 32; a room model: 16)")
    parser.add_argument("--key-dir", default=None, metavar="DIR",
                        help="folder with signing.key/signing.pub (default: DIR; made if missing)")
    parser.add_argument("--int8", action="store_true", help="export static INT8 instead of FP32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--nproc", type=int, default=1,
                        help="train on N CPU processes (models/distributed.py: the same weights as one process up "
                             "to float rounding; the batch size a multiple of N; a room model trains on one; default 1)")
    parser.add_argument("--seed", type=int, default=0)


def read_footage(source: str, size: tuple[int, int], max_frames: int, stride: int, seed: int = 0) -> np.ndarray:
    """The wearer's frames, in time order, fitted to ``size`` (centre crop to the aspect, no squash)."""
    from shared.paths import resolve_source
    from shared.walk import HeadWalk, fit_to, load_photos, parse_walk, walk_seed

    if max_frames < 10:
        raise UserError("--max-frames must be >= 10")
    if stride < 1:
        raise UserError("--stride must be >= 1")
    source = resolve_source(source)
    kind, _, rest = source.partition(":")
    if kind == "video":
        from models.data import read_video_frames

        frames = read_video_frames(rest, size, max_frames=100_000, stride=stride)
        return frames[-max_frames:]  # the most recent frames, as a job takes them
    if kind == "walk":
        folder, n = parse_walk(source)
        walk = HeadWalk(load_photos(folder), size=size, seed=walk_seed(folder, seed))
        n = min(n, max_frames)
        return walk.frames(0, n, stride)
    if kind == "images":
        from shared.walk import list_photos
        import cv2

        frames = []
        for p in list_photos(rest)[-max_frames:]:
            im = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if im is not None:
                frames.append(fit_to(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), size))
        if not frames:
            raise UserError(f"none of the images in {rest} could be read")
        return np.stack(frames)
    if kind == "rooms":  # a wearer walking through a rendered room, as the headset's rooms source shows it
        from shared.rooms import STYLES, RoomWalk

        style, n = "living", max_frames
        for part in filter(None, rest.split(":")):
            if part.isdigit():
                n = min(int(part), max_frames)
            elif part in STYLES:
                style = part
            else:
                raise UserError(f"--data {source!r}: {part!r} is neither a count nor a style ({', '.join(STYLES)})")
        walk = RoomWalk(style, seed=seed, size=(240, 320))
        return np.stack([fit_to(walk.render(i * stride).rgb, size) for i in range(n)])
    raise UserError(f"--data {source!r}: use video:PATH, walk:DIR[:N], images:DIR or rooms[:STYLE][:N]")


def run(args: argparse.Namespace) -> int:
    import torch

    from cloud.keys import SigningKey
    from hmd.assets import default_base_sources
    from shared.paths import resolve_model
    from models.export_run import export_run
    from models.personalise import personalise
    from models.train import read_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 < args.holdout < 1.0:
        raise UserError("--holdout must be between 0 and 1")
    if args.nproc < 1:
        raise UserError("--nproc must be >= 1")
    if args.nproc > 1:
        batch = args.batch_size
        if batch is None:  # the multi-task personalisation's own default
            import inspect

            from models.personalise import personalise as _personalise

            batch = inspect.signature(_personalise).parameters["batch_size"].default
        if batch % args.nproc:
            raise UserError(f"--nproc {args.nproc}: the batch size ({batch}) must be a multiple of it")
    run_dir = resolve_model(args.model)
    if not (run_dir / "checkpoint.pt").is_file():
        raise UserError(f"{args.model}: not a run folder (no checkpoint.pt); personalise a shipped model or a "
                        f"folder written by `hmd train`")
    ck = read_checkpoint(run_dir)
    h, w = ck["input_size"]
    room = ck.get("task_set") == "room"
    if args.style is not None:
        from shared.rooms import STYLES

        if not room:
            raise UserError("--style is for a room model")
        if args.style not in STYLES:
            raise UserError(f"--style {args.style!r}: choose from {', '.join(STYLES)}")
    if not room and (args.style_replay is not None or args.no_mirror or args.fine_tune is not None
                     or args.train_batchnorm):
        raise UserError("--style-replay, --no-mirror, --fine-tune and --train-batchnorm are for a room model")
    base_data, base_val = default_base_sources(run_dir, ck)
    base_data = args.base_data or base_data
    base_val = args.base_val_data or base_val
    frames = read_footage(args.data, (h, w), args.max_frames, args.stride, args.seed)
    n_val = int(round(len(frames) * args.holdout))
    if len(frames) < 10 or n_val < 2 or len(frames) - n_val < 8:
        raise UserError(f"--data {args.data}: {len(frames)} frames is shorter than the split needs "
                        f"(at least 8 to train on and 2 held out; --holdout {args.holdout})")
    out = Path(args.out)
    print(f"personalise: {args.model} ({h}x{w}) on {len(frames)} frames of {args.data}; replay {base_data}; "
          f"base gate on {base_val}", file=sys.stderr)
    # options left unset take each path's own default (the room set's fine-tuning defaults differ)
    given = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size), ("replay_ratio", args.replay))
             if v is not None}
    if room:
        from models.room_personalise import FINE_TUNED, personalise_room

        if args.nproc > 1:
            raise UserError("--nproc > 1 is for the multi-task model's personalisation; a room model trains on one process")
        if args.style_replay is not None:
            given["style_replay"] = args.style_replay
        if args.fine_tune is not None:
            given["trainable"] = FINE_TUNED[args.fine_tune]
        teacher = resolve_model(args.teacher or "room-teacher")
        res = personalise_room(run_dir, frames, out / "run", teacher_run=teacher, base_data=base_data,
                               base_val_data=base_val, style=args.style, export_hw=_exported_hw(run_dir),
                               method=args.method, epochs=args.epochs, max_steps_per_epoch=args.max_steps,
                               holdout_fraction=args.holdout, tolerance=args.tolerance, seed=args.seed,
                               mirror=not args.no_mirror, freeze_bn=not args.train_batchnorm, **given)
    else:
        res = personalise(run_dir, frames, out / "run", base_data=base_data, base_val_data=base_val,
                          split=args.split, teacher_run=args.teacher, method=args.method, epochs=args.epochs,
                          max_steps_per_epoch=args.max_steps, holdout_fraction=args.holdout,
                          tolerance=args.tolerance, seed=args.seed, calibrate=not args.no_calibrate,
                          nproc=args.nproc, **given)
    summary = res.to_dict()
    if res.accepted:
        key = SigningKey(args.key_dir or out)
        parent = ck.get("version") or Path(run_dir).name
        manifest = export_run(res.run_dir, out / "model.onnx", int8=args.int8, parent_version=parent,
                              version=f"{Path(run_dir).name}-personalised",
                              extra_training={"role": "personalised", "frames": len(frames),
                                              "gate": res.evaluation})
        signed = key.sign_manifest(manifest)
        from shared.atomic import atomic_write_text

        atomic_write_text(out / "model.manifest.json", signed.to_json())
        summary["model"] = str(out / "model.onnx")
        summary["trusted_key"] = str(key.public_path)
    from shared.atomic import atomic_write_json

    atomic_write_json(out / "personalise.json", summary)
    ev = res.evaluation
    if room:
        from models.room_personalise import describe_change

        table = describe_change(ev)
    else:
        table = {split: {k: {s: ev[split][s].get(k) for s in ("before", "after")}
                         for k in ("rmse_colour", "rmse_edges", "rmse_denoised")} for split in ("wearer", "base")
                 if split in ev and "after" in ev[split]}
    print(json.dumps({"accepted": res.accepted, "reason": res.reason, "rmse": table,
                      "model": summary.get("model"), "seconds": round(res.seconds, 1)}, indent=1))
    return 0 if res.accepted else 1


def _exported_hw(run_dir: Path) -> tuple[int, int] | None:
    """The (height, width) a run was exported at (its model.manifest.json), if it was."""
    from shared.manifest import Manifest

    path = Path(run_dir) / "model.manifest.json"
    if not path.is_file():
        return None
    m = Manifest.load(path)
    return m.input.height, m.input.width
