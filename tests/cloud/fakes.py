"""Fast job runners for tests (no torch): a new version is the current model re-signed under a
new name, so everything around the training (queue, gate record, registry, push) is exercised."""
from __future__ import annotations

import os
import time

from cloud.worker import JobContext, JobInterrupted, JobOutcome
from hmd.bench_soak import resigned_version

EVALUATION = {"wearer": {"before": {"rmse_colour": 0.2}, "after": {"rmse_colour": 0.1}},
              "base": {"before": {"rmse_colour": 0.2}, "after": {"rmse_colour": 0.2}}, "tolerance": 0.02}


def accept_job(ctx: JobContext) -> JobOutcome:
    ctx.progress("training", 0.5, "fake training")
    return JobOutcome(True, "fake: better on the wearer's frames", EVALUATION, resigned_version(ctx), None)


def reject_job(ctx: JobContext) -> JobOutcome:
    return JobOutcome(False, "fake: not better on the wearer's frames", EVALUATION, None, "/candidates/x")


def slow_job(ctx: JobContext) -> JobOutcome:
    """The first attempt of a job takes long (a test kills the process meanwhile); later ones are quick."""
    seconds = float(os.environ.get("HMD_TEST_FIRST_ATTEMPT_SECONDS", "60")) if ctx.job.attempts == 1 else 0.2
    marker = ctx.settings.data_dir / f"attempt-{ctx.job.id}-{ctx.job.attempts}"
    marker.write_text("started")
    t0 = time.time()
    while time.time() - t0 < seconds:
        if ctx.should_stop():
            raise JobInterrupted()
        ctx.progress("training", min(0.9, (time.time() - t0) / seconds))
        time.sleep(0.1)
    return accept_job(ctx)
