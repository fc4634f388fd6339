"""The job worker: one thread that claims queued jobs and runs them with a :class:`JobRunner`.

Exactly-once completion: a job's result (its state, evaluations and, when accepted, the new
version and the device's current pointer) is written in one transaction by
:meth:`Storage.finish_job`. A process that dies before that commit leaves the job ``running``;
the next start puts it back in the queue and it re-runs from the start, overwriting whatever
half-made candidate folder the dead attempt left. On the shared queue (PostgreSQL) a job is
leased: a heartbeat thread renews the lease while the job runs; when the lease is lost (the
database says the job is no longer ours) the job is stopped and its result never written.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

from cloud.blobs import BlobStore
from cloud.events import EventBroker
from cloud.jobqueue import JobQueue
from cloud.registry import ModelRegistry, model_info
from cloud.settings import Settings
from cloud.storage import Job, Storage, Version
from shared.wire import ModelAvailable

log = logging.getLogger("hmd.cloud.worker")
LOG_LINES_KEPT = 20


class JobInterrupted(Exception):
    """The worker is stopping: the job goes back to the queue."""


@dataclasses.dataclass
class JobOutcome:
    accepted: bool
    reason: str
    evaluation: dict[str, Any] | None
    version: Version | None = None
    candidate_dir: str | None = None


@dataclasses.dataclass
class JobContext:
    job: Job
    settings: Settings
    storage: Storage
    blobs: BlobStore
    registry: ModelRegistry
    progress: Callable[..., None]  # progress(stage, fraction=None, line=None)
    should_stop: Callable[[], bool]

    @property
    def candidates_dir(self) -> Path:
        return self.settings.data_dir / "candidates"


class JobRunner(Protocol):
    def __call__(self, ctx: JobContext) -> JobOutcome: ...


class Heartbeat:
    """Renews a job's lease every third of its length until stopped; ``lost`` once it failed."""

    def __init__(self, storage: Storage, job_id: str, owner: str, lease_s: float):
        self.storage, self.job_id, self.owner, self.lease_s = storage, job_id, owner, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hmd-cloud-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.storage.renew_lease(self.job_id, self.owner, self.lease_s):
                    log.error("job %s: lease lost (another worker has it now); stopping it", self.job_id)
                    self.lost.set()
                    return
            except Exception:  # the database is unreachable: keep trying until the lease runs out
                log.exception("job %s: renewing the lease failed", self.job_id)


class Worker:
    def __init__(self, settings: Settings, storage: Storage, queue: JobQueue, blobs: BlobStore,
                 registry: ModelRegistry, broker: EventBroker, runner: JobRunner):
        self.settings, self.storage, self.queue = settings, storage, queue
        self.blobs, self.registry, self.broker, self.runner = blobs, registry, broker, runner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None
        self.completed = 0

    def start(self) -> None:
        recovered, failed = self.queue.recover(self.settings.max_job_attempts)
        if recovered:
            log.warning("re-running %d interrupted job(s): %s", len(recovered), ", ".join(recovered))
        if failed:
            log.error("failed %d job(s) interrupted %d times: %s", len(failed), self.settings.max_job_attempts,
                      ", ".join(failed))
        self._thread = threading.Thread(target=self._loop, name="hmd-cloud-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim(timeout=1.0)
            except Exception:  # a database hiccup must not kill the worker
                log.exception("claiming a job failed")
                time.sleep(1.0)
                continue
            if job is None:
                continue
            self.current_job = job.id
            try:
                owner, lease_s = getattr(self.queue, "owner", None), getattr(self.queue, "lease_s", None)
                if owner and lease_s:
                    with Heartbeat(self.storage, job.id, owner, lease_s) as beat:
                        self.run_job(job, owner, beat.lost.is_set)
                else:
                    self.run_job(job)
            except Exception:  # e.g. the database went away while recording the outcome
                log.exception("job %s: the worker could not record its outcome", job.id)
            finally:
                self.current_job = None

    def run_job(self, job: Job, owner: str | None = None, lease_lost: Callable[[], bool] = lambda: False) -> None:
        """Run one claimed job and record its outcome. ``owner``: the lease holder (shared queue),
        whose lease must still hold when the outcome is written; ``lease_lost`` stops the job."""
        lines: list[str] = list(job.progress.get("log", []))[-LOG_LINES_KEPT:]
        state = {"stage": "starting", "fraction": 0.0}

        who = {"worker": owner} if owner else {}  # which worker process ran it (shared queue)
        stages: dict[str, float] = {}  # stage -> when it began (the bench splits latency by stage)

        def progress(stage: str | None = None, fraction: float | None = None, line: str | None = None) -> None:
            if stage is not None:
                state["stage"] = stage
                stages.setdefault(stage, round(time.time(), 3))
            if fraction is not None:
                state["fraction"] = round(float(fraction), 4)
            if line:
                lines.append(line.rstrip()[:300])
                del lines[:-LOG_LINES_KEPT]
            self.storage.update_job(job.id, progress={**state, "attempt": job.attempts, "stages": stages,
                                                      "log": lines, **who})

        def should_stop() -> bool:
            return self._stop.is_set() or lease_lost()

        ctx = JobContext(job, self.settings, self.storage, self.blobs, self.registry, progress, should_stop)
        log.info("job %s (device %d, attempt %d) started", job.id, job.device_id, job.attempts)
        progress("starting", 0.0)
        try:
            outcome = self.runner(ctx)
            if should_stop():
                raise JobInterrupted()
        except JobInterrupted:
            if lease_lost():
                log.warning("job %s: stopped, its lease went to another worker", job.id)
            elif owner is not None:
                self.storage.release_job(job.id, owner, "worker stopped; another worker re-runs it")
                log.info("job %s interrupted by shutdown; queued again", job.id)
            else:
                self.storage.update_job(job.id, state="queued", progress={
                    "stage": "queued", "note": "service stopped; it re-runs at the next start"})
                log.info("job %s interrupted by shutdown; queued again", job.id)
            return
        except Exception as exc:  # a failed job is recorded, the worker goes on
            log.error("job %s failed: %s", job.id, traceback.format_exc())
            progress("failed", None, f"{type(exc).__name__}: {exc}")
            self.storage.finish_job(job.id, "failed", owner=owner, reason=f"{type(exc).__name__}: {exc}")
            return
        state_name = "accepted" if outcome.accepted and outcome.version is not None else "rejected"
        progress("done", 1.0)
        self.storage.finish_job(job.id, state_name, version=outcome.version if state_name == "accepted" else None,
                                owner=owner, evaluation=outcome.evaluation, reason=outcome.reason,
                                candidate_dir=outcome.candidate_dir)
        self.completed += 1
        log.info("job %s %s: %s", job.id, state_name, outcome.reason)
        if state_name == "accepted":
            info = model_info(outcome.version)  # type: ignore[arg-type]
            event = ModelAvailable(version=info.version, sha256=info.sha256, parent_version=info.parent_version,
                                   manifest_url=info.manifest_url, model_url=info.model_url, job_id=job.id)
            self.broker.publish(job.device_id, "model_available", event.model_dump())
