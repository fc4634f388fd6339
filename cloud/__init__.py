"""The cloud retraining service: device auth, ingest, job queue and worker, model registry,
push channel. ``create_app(Settings(...))`` builds the FastAPI app; ``hmd cloud`` runs it."""
from cloud.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(*args, **kwargs):  # lazy: `hmd cloud add-device` must not import FastAPI's app
    from cloud.app import create_app as _create_app

    return _create_app(*args, **kwargs)
