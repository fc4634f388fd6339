"""``POST /v1/uploads``: a batch of journal frames; ``GET /v1/uploads/{id}``.

Per device: at most ``max_uploads_in_flight`` uploads at once (429), at most ``max_device_bytes``
stored (507, retried later). Server-side storage faults answer 507/503 (retried), never 400.
"""
from __future__ import annotations

import functools
import logging
import threading

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cloud.deps import ApiError, DeviceDep, ServicesDep
from cloud.ingest import UploadRejected, commit, receive_upload, release
from shared.wire import ErrorBody, UploadReceipt

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
log = logging.getLogger("hmd.cloud.uploads")
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 409, 413, 429, 503, 507)}


@router.post("", response_model=UploadReceipt, status_code=201,
             responses={200: {"description": "a repeat of an earlier upload", "model": UploadReceipt}, **_ERRORS})
async def create_upload(request: Request, response: Response, device: DeviceDep,
                        services: ServicesDep) -> UploadReceipt:
    s = services.settings
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and len(declared) < 20 and int(declared) > s.max_upload_bytes:
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {s.max_upload_bytes} bytes")
    if s.max_device_bytes:
        stored = await run_in_threadpool(services.storage.device_bytes, device.id)
        if stored >= s.max_device_bytes:
            raise ApiError(507, "quota_exceeded", f"device {device.name} has {stored} bytes stored; its quota is "
                                                  f"{s.max_device_bytes}", {"Retry-After": "300"})
    in_flight = services.uploads_in_flight
    if not in_flight.try_enter(device.id, s.max_uploads_in_flight):
        raise ApiError(429, "too_many_uploads", f"{s.max_uploads_in_flight} uploads of this device are in progress",
                       {"Retry-After": "5"})
    try:
        received = await receive_upload(request.stream(), services.blobs, s.data_dir / "spool",
                                        limit=s.max_upload_bytes, max_frames=s.max_frames_per_upload,
                                        max_frame_bytes=s.max_frame_bytes, max_pixels=s.max_frame_pixels,
                                        max_meta_bytes=s.max_frame_meta_bytes, prepare=_prepare(services, device.id))
        try:
            upload, created = await run_in_threadpool(commit, received, device.id, services.storage, services.blobs)
        except BaseException:  # commit cleans up after itself; if it never ran (cancelled), this does
            threading.Thread(target=release, args=(received,), name="upload-release", daemon=True).start()
            raise
    except UploadRejected as exc:
        log.info("upload from %s refused: %d %s: %s", device.name, exc.status, exc.code, exc.detail)
        retry = {"Retry-After": "30"} if exc.status >= 500 else None
        raise ApiError(exc.status, exc.code, exc.detail, retry) from None
    finally:
        in_flight.leave(device.id)
    log.info("upload %s from %s: %d frames, %d bytes%s", upload.id, device.name, upload.frames, upload.bytes,
             "" if created else " (a repeat)")
    job_id = None
    if created and s.auto_job_frames > 0:
        job = await run_in_threadpool(services.storage.create_job_if_due, device.id, s.auto_job_frames, "auto")
        if job is not None:
            services.queue.submit(job)
            job_id = job.id
    if not created:
        response.status_code = 200
    return UploadReceipt(upload_id=upload.id, frames=upload.frames, bytes=upload.bytes, duplicate=not created,
                         job_id=job_id)


def _prepare(services, device_id: int):
    """The database's early upload transaction for this device (PostgreSQL, unless the setting
    ``early_transaction`` is off), or None."""
    prepare = getattr(services.storage, "prepare_upload", None) if services.settings.early_transaction else None
    return None if prepare is None else functools.partial(prepare, device_id)


@router.get("/{upload_id}", response_model=UploadReceipt)
def get_upload(upload_id: str, device: DeviceDep, services: ServicesDep) -> UploadReceipt:
    upload = services.storage.upload(device.id, upload_id)
    if upload is None:
        raise ApiError(404, "not_found", f"no upload {upload_id}")
    return UploadReceipt(upload_id=upload.id, frames=upload.frames, bytes=upload.bytes)
