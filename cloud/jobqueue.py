"""The job queue between the API and the worker.

:class:`JobQueue` is what the worker and the API use; :class:`DatabaseJobQueue` (the embedded
default) keeps jobs as rows of the metadata database and claims them with one transaction, so
jobs survive restarts and a job is never handed to two workers. A real queue (e.g. a broker
with acknowledgements) would implement the same methods, keeping job state in the database.
"""
from __future__ import annotations

import threading
from typing import Protocol

from cloud.storage import Job, Storage
from shared.errors import UserError


class JobQueue(Protocol):
    def submit(self, job: Job) -> None: ...
    def claim(self, timeout: float) -> Job | None: ...
    def recover(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]: ...
    def wake(self) -> None: ...


class DatabaseJobQueue:
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


def open_queue(url: str, storage: Storage) -> JobQueue:
    if url in ("db:", "db", "database"):
        return DatabaseJobQueue(storage)
    raise UserError(f"job queue {url!r}: only 'db:' is built in (a broker plugs in behind cloud.jobqueue.JobQueue)")
