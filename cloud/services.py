"""Everything a request or the worker needs, built once from :class:`Settings`."""
from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from typing import Any

from cloud.backends import open_blob_store, open_storage
from cloud.blobs import BlobStore
from cloud.events import EventBroker
from cloud.jobqueue import JobQueue, open_queue
from cloud.keys import SigningKey
from cloud.limits import PerDeviceSlots
from cloud.registry import ModelRegistry
from cloud.settings import Settings
from cloud.storage import Storage
from cloud.worker import JobRunner, Worker
from shared.errors import UserError

log = logging.getLogger("hmd.cloud")


def is_shared(storage: Storage) -> bool:
    """Several processes share this database (PostgreSQL), so none may assume it is alone."""
    return bool(getattr(storage, "FOR_UPDATE", ""))


def load_runner(spec: str) -> JobRunner:
    """``MODULE:FUNCTION`` -> the job runner (the personalisation job unless configured)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"job runner {spec!r} cannot be loaded: {exc}") from None


@dataclasses.dataclass
class Services:
    settings: Settings
    storage: Storage
    blobs: BlobStore
    queue: JobQueue
    key: SigningKey
    registry: ModelRegistry
    broker: EventBroker
    worker: Worker | None = None
    bridge: Any = None  # cloud.postgres.PostgresEventBridge: events from other processes (shared database)
    uploads_in_flight: PerDeviceSlots = dataclasses.field(default_factory=PerDeviceSlots)
    event_streams: PerDeviceSlots = dataclasses.field(default_factory=PerDeviceSlots)

    @classmethod
    def open(cls, settings: Settings, runner: JobRunner | None = None) -> "Services":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(settings.db_url)
        blobs = open_blob_store(settings.blobs_url, settings.s3_endpoint_url, settings.s3_multipart_mb)
        if hasattr(blobs, "attach_index"):  # an object store packs uploads, located in the database
            blobs.attach_index(storage)
        key = SigningKey(settings.data_dir, settings.signing_key)
        registry = ModelRegistry(settings.data_dir, storage, blobs, key, int8=settings.int8)
        queue = open_queue(settings.queue_url, storage, lease_s=settings.job_lease_s,
                           max_attempts=settings.max_job_attempts)
        broker = EventBroker()
        if is_shared(storage):  # events go through the database to every API process
            from cloud.postgres import publish_event

            broker.relay = functools.partial(publish_event, storage)
        services = cls(settings, storage, blobs, queue, key, registry, broker)
        if settings.worker:
            if runner is None:
                runner = load_runner(settings.runner)
            services.worker = Worker(settings, storage, services.queue, blobs, registry, services.broker, runner)
        return services

    def ensure_base(self) -> None:
        """Register ``--base-run`` as the base version on first start, and keep a signed copy of the
        base model in ``DATA/base-model/`` (model.onnx + manifest.json) for provisioning headsets."""
        if self.settings.base_run is not None and self.storage.base_version() is None:
            try:
                v = self.registry.import_base(self.settings.base_run)
                log.info("registered base version %s from %s", v.version, self.settings.base_run)
            except UserError:  # another API process starting at the same time registered it first
                if self.storage.base_version() is None:
                    raise
        base = self.storage.base_version()
        if base is not None:
            self.registry.write_model_folder(base, self.settings.data_dir / "base-model")

    def recover_files(self) -> dict[str, int]:
        """Remove what a killed process left behind: temporary and spooled frames, half-made run
        folders, and blobs no row names (frames renamed into the store whose upload never
        committed). The embedded deployment is one process, so nothing else is writing now."""
        removed = {"temporary": 0, "unreferenced_blobs": 0, "run_folders": 0}
        if hasattr(self.blobs, "remove_temporary"):
            removed["temporary"] += self.blobs.remove_temporary()
        spool = self.settings.data_dir / "spool"
        if spool.is_dir():
            for path in spool.iterdir():
                path.unlink(missing_ok=True)
                removed["temporary"] += 1
        for path in self.registry.runs_dir.glob(".*"):
            shutil.rmtree(path, ignore_errors=True)
            removed["run_folders"] += 1
        if hasattr(self.blobs, "remove_unreferenced"):
            removed["unreferenced_blobs"] = self.blobs.remove_unreferenced(self.storage.referenced_blobs())
        if any(removed.values()):
            log.warning("removed what an interrupted run left: %s", removed)
        return removed

    def start(self, api: bool = True) -> None:
        """``api``: this process serves HTTP (registers the base, listens for events); False: a
        worker process (`hmd cloud worker`)."""
        if not is_shared(self.storage):  # the embedded deployment is one process: nobody else is writing
            self.recover_files()
        if api:
            self.ensure_base()
            if is_shared(self.storage):
                from cloud.postgres import PostgresEventBridge

                self.bridge = PostgresEventBridge(self.storage.url, self.broker.deliver)  # type: ignore[attr-defined]
                self.bridge.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        self.broker.close()
        if self.worker is not None:
            self.worker.stop()
        self.storage.close()
