"""Everything a request or the worker needs, built once from :class:`Settings`."""
from __future__ import annotations

import dataclasses
import logging

from cloud.blobs import BlobStore, open_blob_store
from cloud.events import EventBroker
from cloud.jobqueue import JobQueue, open_queue
from cloud.keys import SigningKey
from cloud.registry import ModelRegistry
from cloud.settings import Settings
from cloud.storage import Storage, open_storage
from cloud.worker import JobRunner, Worker
from shared.errors import UserError

log = logging.getLogger("hmd.cloud")


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

    @classmethod
    def open(cls, settings: Settings, runner: JobRunner | None = None) -> "Services":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(settings.db_url)
        blobs = open_blob_store(settings.blobs_url)
        key = SigningKey(settings.data_dir)
        registry = ModelRegistry(settings.data_dir, storage, blobs, key, int8=settings.int8)
        services = cls(settings, storage, blobs, open_queue(settings.queue_url, storage), key, registry,
                       EventBroker())
        if settings.worker:
            if runner is None:
                runner = load_runner(settings.runner)
            services.worker = Worker(settings, storage, services.queue, blobs, registry, services.broker, runner)
        return services

    def ensure_base(self) -> None:
        """Register ``--base-run`` as the base version on first start, and keep a signed copy of the
        base model in ``DATA/base-model/`` (model.onnx + manifest.json) for provisioning headsets."""
        if self.settings.base_run is not None and self.storage.base_version() is None:
            v = self.registry.import_base(self.settings.base_run)
            log.info("registered base version %s from %s", v.version, self.settings.base_run)
        base = self.storage.base_version()
        if base is not None:
            self.registry.write_model_folder(base, self.settings.data_dir / "base-model")

    def start(self) -> None:
        self.ensure_base()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        self.broker.close()
        if self.worker is not None:
            self.worker.stop()
        self.storage.close()
