"""``POST /v1/uploads``: a batch of journal frames; ``GET /v1/uploads/{id}``."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cloud.deps import ApiError, DeviceDep, ServicesDep
from cloud.ingest import UploadRejected, commit, receive_upload
from shared.wire import UploadReceipt

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post("", response_model=UploadReceipt, status_code=201,
             responses={200: {"description": "a repeat of an earlier upload"}, 400: {}, 401: {}, 413: {}})
async def create_upload(request: Request, response: Response, device: DeviceDep,
                        services: ServicesDep) -> UploadReceipt:
    s = services.settings
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > s.max_upload_bytes:
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {s.max_upload_bytes} bytes")
    try:
        received = await receive_upload(request.stream(), services.blobs, s.data_dir / "spool",
                                        limit=s.max_upload_bytes, max_frames=s.max_frames_per_upload,
                                        max_frame_bytes=s.max_frame_bytes)
        upload, created = await run_in_threadpool(commit, received, device.id, services.storage, services.blobs)
    except UploadRejected as exc:
        raise ApiError(exc.status, exc.code, exc.detail) from None
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


@router.get("/{upload_id}", response_model=UploadReceipt)
def get_upload(upload_id: str, device: DeviceDep, services: ServicesDep) -> UploadReceipt:
    upload = services.storage.upload(device.id, upload_id)
    if upload is None:
        raise ApiError(404, "not_found", f"no upload {upload_id}")
    return UploadReceipt(upload_id=upload.id, frames=upload.frames, bytes=upload.bytes)
