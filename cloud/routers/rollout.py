"""``POST /v1/health``: a headset's health report (staged rollout, cloud/rollout.py).

A report covers the frames since the previous one: how many, the mean FPS and inference latency,
how many times the headset rolled back to its previous model, and how many inferences failed.
A report from a canary device is checked against the release's thresholds at once, and a
crossed threshold halts the release (the canary devices are told over their event streams).
"""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from cloud import rollout
from cloud.deps import ApiError, DeviceDep, ServicesDep
from shared.wire import ErrorBody

router = APIRouter(prefix="/v1", tags=["rollout"])


class HealthReport(BaseModel):
    version: str = Field(min_length=1, max_length=200, description="the model version the headset ran")
    frames: int = Field(ge=0, le=10_000_000)
    # no tight bound: a model that fails at once (no inference) is shown at thousands of FPS, and a
    # report refused for its FPS (422, dropped by the headset) would lose its frames and errors
    fps: float = Field(ge=0, le=10_000_000)
    latency_ms: float = Field(ge=0, le=600_000, description="mean inference latency")
    rollbacks: int = Field(0, ge=0, le=1_000_000, description="times the headset went back to its previous model")
    inference_errors: int = Field(0, ge=0, le=10_000_000)


class HealthAnswer(BaseModel):
    release: str | None = Field(None, description="the release the report was about, if any")
    state: str | None = Field(None, description="that release's state after this report")


@router.post("/health", response_model=HealthAnswer, status_code=202,
             responses={code: {"model": ErrorBody} for code in (401, 404, 422)})
async def report_health(body: HealthReport, device: DeviceDep, services: ServicesDep) -> HealthAnswer:
    storage = services.storage
    if await run_in_threadpool(storage.version, body.version) is None:
        raise ApiError(404, "not_found", f"no model version {body.version}")

    def record() -> HealthAnswer:
        storage.add_health(device.id, body.version, body.frames, body.fps, body.latency_ms, body.rollbacks,
                           body.inference_errors)
        halted = rollout.after_health_report(storage, services.registry, body.version)
        if halted is not None:
            rollout.notify_devices(storage, services.broker.publish, halted)
        release = storage.release(body.version)
        return HealthAnswer(release=release.version if release else None, state=release.state if release else None)

    return await run_in_threadpool(record)
