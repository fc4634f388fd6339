"""``GET /v1/models/current``, ``/v1/models/{version}/manifest``, ``/v1/models/{version}/model.onnx``.

A device sees the base version and its own versions; anyone else's answers 404. The ONNX file is
served with a strong ETag (its sha256) and single-range ``Range`` requests, so an interrupted
download resumes where it stopped (``If-Range`` guards against the file having changed).
"""
from __future__ import annotations

import re
from typing import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from cloud.deps import ApiError, DeviceDep, ServicesDep
from cloud.registry import model_info
from cloud.storage import Device, Storage, Version
from shared.wire import ErrorBody, ModelInfo

router = APIRouter(prefix="/v1/models", tags=["models"])
CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # 18 digits: any real offset, never a huge int


def visible_version(storage: Storage, device: Device, name: str) -> Version:
    v = storage.version(name)
    if v is None or (v.device_id is not None and v.device_id != device.id):
        raise ApiError(404, "not_found", f"no model version {name}")
    return v


@router.get("/current", response_model=ModelInfo)
def current_model(device: DeviceDep, services: ServicesDep) -> ModelInfo:
    v = services.storage.current_version(device.id)
    if v is None:
        raise ApiError(404, "no_model", "no model is registered yet (the service has no base version)")
    return model_info(v)


@router.get("/{version}/manifest")
def get_manifest(version: str, request: Request, device: DeviceDep, services: ServicesDep) -> Response:
    v = visible_version(services.storage, device, version)
    etag = f'"{v.manifest_sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    with services.blobs.open(v.manifest_sha256) as fh:
        data = fh.read()
    return Response(data, media_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})


def _read(services, sha: str, start: int, end: int) -> Iterator[bytes]:
    with services.blobs.open(sha) as fh:
        fh.seek(start)
        left = end - start + 1
        while left > 0:
            block = fh.read(min(CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block


@router.head("/{version}/model.onnx", operation_id="head_model", response_class=Response,
             responses={200: {"description": "the model's size and ETag"}})
@router.get("/{version}/model.onnx", operation_id="get_model", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a range"},
                       304: {"description": "not modified"}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                       416: {"model": ErrorBody}})
def get_model(version: str, request: Request, device: DeviceDep, services: ServicesDep) -> Response:
    v = visible_version(services.storage, device, version)
    size, etag = v.bytes, f'"{v.onnx_sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size - 1, 200
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if rng and (if_range is None or if_range == etag):
        m = _RANGE.match(rng.strip())
        if m is None or (not m.group(1) and not m.group(2)):
            raise ApiError(416, "bad_range", f"unsupported Range {rng!r} (one bytes=START-END range)",
                           {"Content-Range": f"bytes */{size}"})
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # bytes=-N: the last N bytes
            start = max(0, size - int(m.group(2)))
        if start >= size or start > end:
            raise ApiError(416, "bad_range", f"Range {rng!r} is outside the {size}-byte file",
                           {"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_read(services, v.onnx_sha256, start, end), status_code=status, headers=headers,
                             media_type="application/octet-stream")
