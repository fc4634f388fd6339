"""``GET /v1/events``: server-sent events for one device.

The stream opens with a ``model_available`` event for the device's current model (a device that
missed events while offline catches up on connect), then one per new version, and a comment line
every ``sse_keepalive_s`` so proxies and the client can tell a live but quiet stream from a dead one.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cloud.deps import ApiError, DeviceDep, ServicesDep
from cloud.registry import model_info
from shared.wire import ErrorBody, ModelAvailable

router = APIRouter(prefix="/v1", tags=["events"])


def sse(event: str, data: dict, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 401: {"model": ErrorBody},
                       429: {"model": ErrorBody}})
async def events(request: Request, device: DeviceDep, services: ServicesDep) -> StreamingResponse:
    limit = services.settings.max_streams_per_device
    if not services.event_streams.try_enter(device.id, limit):
        raise ApiError(429, "too_many_streams", f"{limit} event streams of this device are open already",
                       {"Retry-After": "30"})
    broker = services.broker
    queue = broker.subscribe(device.id)
    keepalive = services.settings.sse_keepalive_s

    async def stream():
        try:
            yield b"retry: 2000\n\n"
            # the database is synchronous: never call it on the event loop
            current = await asyncio.to_thread(services.storage.current_version, device.id)
            if current is not None:
                info = model_info(current)
                yield sse("model_available", ModelAvailable(
                    version=info.version, sha256=info.sha256, parent_version=info.parent_version,
                    manifest_url=info.manifest_url, model_url=info.model_url).model_dump())
            while not broker.closed:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=keepalive)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield b": keepalive\n\n"
                    continue
                if item is None:
                    return
                event_id, name, data = item
                yield sse(name, data, event_id)
        finally:
            broker.unsubscribe(device.id, queue)
            services.event_streams.leave(device.id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
