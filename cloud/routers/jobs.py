"""``POST /v1/jobs`` (start a personalisation job now), ``GET /v1/jobs[/{id}]``."""
from __future__ import annotations

from fastapi import APIRouter, Response

from cloud.deps import ApiError, DeviceDep, ServicesDep
from cloud.storage import Job
from shared.wire import ErrorBody, JobCreate, JobInfo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_info(job: Job) -> JobInfo:
    return JobInfo(job_id=job.id, state=job.state, created=job.created, started=job.started, finished=job.finished,
                   attempts=job.attempts, frames=job.frames, base_version=job.base_version, progress=job.progress,
                   evaluation=job.evaluation, result_version=job.result_version, reason=job.reason,
                   trigger=job.trigger)


@router.post("", response_model=JobInfo, status_code=201,
             responses={code: {"model": ErrorBody} for code in (401, 409, 422)})
def create_job(device: DeviceDep, services: ServicesDep, response: Response, body: JobCreate | None = None) -> JobInfo:
    storage = services.storage
    limit = services.settings.job_max_frames
    if body is not None and body.max_frames is not None and body.max_frames > limit:
        raise ApiError(422, "invalid_request", f"max_frames: at most {limit} frames per job on this service")
    active = [j for j in storage.jobs(device.id) if j.state in ("queued", "running")]
    if active:
        raise ApiError(409, "job_active", f"job {active[0].id} is {active[0].state}; wait for it to finish")
    if storage.frame_count(device.id) < 2:
        raise ApiError(409, "no_frames", "upload at least 2 frames before starting a job")
    job = storage.create_job_if_due(device.id, 0, "api", max_frames=body.max_frames if body else None)
    if job is None:  # raced with an automatic job
        raise ApiError(409, "job_active", "a job for this device was started just now")
    services.queue.submit(job)
    return job_info(job)


@router.get("", response_model=list[JobInfo])
def list_jobs(device: DeviceDep, services: ServicesDep) -> list[JobInfo]:
    return [job_info(j) for j in services.storage.jobs(device.id)]


@router.get("/{job_id}", response_model=JobInfo)
def get_job(job_id: str, device: DeviceDep, services: ServicesDep) -> JobInfo:
    job = services.storage.job(job_id, device.id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job_info(job)
