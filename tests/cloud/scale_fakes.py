"""Job runners for the shared-queue tests (no torch)."""
from __future__ import annotations

import os
import signal

from cloud.worker import JobContext, JobOutcome


def kill_worker(ctx: JobContext) -> JobOutcome:
    """A job that kills the worker process running it, every time (e.g. it runs out of memory)."""
    (ctx.settings.data_dir / f"attempt-{ctx.job.id}-{ctx.job.attempts}").write_text("started")
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
