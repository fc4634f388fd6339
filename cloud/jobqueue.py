"""The job queue between the API and the workers.

:class:`JobQueue` is what the worker and the API use. Jobs are rows of the metadata database
either way, so they survive restarts and a job is never handed to two workers:

- :class:`DatabaseJobQueue` (the embedded default, SQLite): the worker thread of the one
  process; a job left running by a process that died is re-run at the next start.
- :class:`SharedJobQueue` (PostgreSQL): any number of ``hmd cloud worker`` processes on any
  machines claim jobs with ``SELECT ... FOR UPDATE SKIP LOCKED`` and hold them by a lease that
  their heartbeat renews. A worker that dies (SIGKILL, power, network) stops renewing; once the
  lease expires any worker puts the job back in the queue, or fails it once it has been tried
  ``max_job_attempts`` times, with the reason. A worker whose lease expired cannot finish the job
  (:meth:`cloud.storage.SQLStorage.finish_job` checks the owner), so no job completes twice.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Protocol

from cloud.storage import Job, Storage
from shared.errors import UserError


class JobQueue(Protocol):
    owner: str | None  # the lease holder's name (None: no leases)
    lease_s: float | None

    def submit(self, job: Job) -> None: ...
    def claim(self, timeout: float) -> Job | None: ...
    def recover(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]: ...
    def wake(self) -> None: ...


class DatabaseJobQueue:
    owner: str | None = None
    lease_s: float | None = None

    def __init__(self, storage: Storage):
        self.storage = storage
        self._event = threading.Event()

    def submit(self, job: Job) -> None:
        self._event.set()  # the row is already committed; just wake the worker

    def wake(self) -> None:
        self._event.set()

    def claim(self, timeout: float) -> Job | None:
        job = self.storage.claim_next_job()
        if job is None:
            self._event.wait(timeout)
            self._event.clear()
            job = self.storage.claim_next_job()
        return job

    def recover(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """After a restart: jobs that were running when the process died are queued again, or
        failed once tried ``max_attempts`` times; (requeued, failed)."""
        return self.storage.requeue_interrupted(max_attempts)


def worker_name() -> str:
    """host:pid:random, unique per worker process (the lease owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class SharedJobQueue:
    POLL_S = 0.5  # how often an idle worker looks for a job (and for expired leases)

    def __init__(self, storage: Storage, lease_s: float, max_attempts: int, owner: str | None = None):
        self.storage, self.lease_s, self.max_attempts = storage, lease_s, max_attempts
        self.owner = owner or worker_name()
        self._event = threading.Event()

    def submit(self, job: Job) -> None:
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    def claim(self, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            self.storage.requeue_expired(self.max_attempts)
            job = self.storage.claim_next_job(self.owner, self.lease_s)
            left = deadline - time.monotonic()
            if job is not None or left <= 0:
                return job
            if self._event.wait(min(self.POLL_S, left)):
                self._event.clear()
                return None  # woken to stop (or for a local job): the caller loops

    def recover(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """Only jobs whose lease expired: others are running on live workers elsewhere."""
        return self.storage.requeue_expired(max_attempts)


def open_queue(url: str, storage: Storage, *, lease_s: float = 30.0, max_attempts: int = 3) -> JobQueue:
    """``db:`` — jobs are rows of the metadata database; shared (leased) when it is PostgreSQL."""
    if url in ("db:", "db", "database"):
        if getattr(storage, "FOR_UPDATE", ""):  # a database several processes share
            return SharedJobQueue(storage, lease_s, max_attempts)
        return DatabaseJobQueue(storage)
    raise UserError(f"job queue {url!r}: only 'db:' is built in (jobs are rows of the metadata database)")
