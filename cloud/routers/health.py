"""``GET /healthz``: liveness for the compose healthcheck and load balancers (no auth)."""
from __future__ import annotations

from fastapi import APIRouter

from cloud.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(services: ServicesDep) -> dict:
    base = services.storage.base_version()
    worker = services.worker
    return {"ok": True, "base_version": base.version if base else None,
            "worker": None if worker is None else ("running" if worker.alive else "stopped"),
            "job": worker.current_job if worker else None}
