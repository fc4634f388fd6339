"""The real job runner: personalise the device's current model on its wearer's frames.

Calls :func:`models.personalise.personalise` (GREAT multi-task fine-tuning with base-data
replay and teacher distillation, and the evaluation gate), then exports and signs an accepted
candidate as the device's next version. torch is imported here only, lazily.
"""
from __future__ import annotations

import re
import shutil

from cloud.ingest import decode_frames
from cloud.worker import JobContext, JobInterrupted, JobOutcome
from shared.errors import UserError

_PROGRESS = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+)")


def personalise_job(ctx: JobContext) -> JobOutcome:
    from hmd.assets import default_base_sources
    from models.personalise import personalise
    from models.train import read_checkpoint

    job, s = ctx.job, ctx.settings
    device = ctx.storage.device(job.device_id)
    base = ctx.storage.current_version(job.device_id)
    if device is None or base is None:
        raise UserError("no base model is registered: start the service with --base-run or run import-base")
    ctx.storage.update_job(job.id, base_version=base.version)
    ctx.progress("loading frames", 0.02)
    manifest = ctx.registry.manifest(base)
    side = s.frame_size
    size = (side, side) if side else (manifest.input.height, manifest.input.width)
    if manifest.task_set == "room" and not side:  # decoded at the camera's aspect, at least the training side
        from models.room_personalise import decode_size

        size = decode_size((manifest.input.height, manifest.input.width), read_checkpoint(ctx.registry.run_dir(base)))
    rows = ctx.storage.frames_for_job(job.device_id, job.frames_through, job.max_frames or s.job_max_frames)
    frames = decode_frames(ctx.blobs, rows, size)
    ctx.storage.update_job(job.id, frames=len(rows))
    ctx.progress("training", 0.05, f"{len(rows)} wearer frames at {size[0]}x{size[1]} from {base.version}")

    out_dir = ctx.candidates_dir / job.id
    if out_dir.exists():  # an interrupted attempt: start over
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    def log_line(line: str) -> None:
        m = _PROGRESS.search(line)
        frac = None
        if m:
            e, ne, st, ns = map(int, m.groups())
            frac = 0.05 + 0.75 * ((e - 1) + st / max(1, ns)) / max(1, ne)
        ctx.progress(None, frac, line)

    optional = {k: v for k, v in (("lr", s.lr), ("batch_size", s.batch_size)) if v is not None}
    run_dir = ctx.registry.run_dir(base)
    base_data, base_val_data = default_base_sources(run_dir, read_checkpoint(run_dir))
    common = dict(base_data=s.base_data or base_data, base_val_data=s.base_val_data or base_val_data,
                  method=s.method, epochs=s.epochs, max_steps_per_epoch=s.max_steps_per_epoch,
                  holdout_fraction=s.holdout_fraction, tolerance=s.tolerance, seed=s.seed, log=log_line,
                  should_stop=ctx.should_stop, **optional)
    if manifest.task_set == "room":  # the device runs a room model: a room teacher labels its frames
        from models.room_personalise import personalise_room, room_teacher

        if s.job_nproc > 1:
            ctx.progress(None, None, f"room job: one process (job_nproc {s.job_nproc} is for multi-task jobs)")
        res = personalise_room(run_dir, frames, out_dir, teacher_run=room_teacher(s.teacher_run),
                               export_hw=(manifest.input.height, manifest.input.width), **common)
    else:
        res = personalise(run_dir, frames, out_dir, teacher_run=str(s.teacher_run) if s.teacher_run else None,
                          nproc=s.job_nproc, **common)
    if ctx.should_stop():
        raise JobInterrupted()
    if not res.accepted:
        return JobOutcome(False, res.reason, res.evaluation, None, str(res.run_dir))
    ctx.progress("exporting", 0.85)
    version = ctx.registry.build_version(
        res.run_dir, f"{device.name}-{job.id}", parent=base.version, device_id=job.device_id, job_id=job.id,
        extra_training={"role": "personalised", "job": job.id, "frames": len(rows), "gate": res.evaluation})
    ctx.progress("signed", 0.98)
    return JobOutcome(True, res.reason, res.evaluation, version, str(res.run_dir))
