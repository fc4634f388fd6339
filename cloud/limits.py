"""Limits on concurrent work: per device (uploads being received, open event streams) and per
process (uploads being parsed, which bounds the ingest's memory).

In-process counters: the embedded deployment is one process. With several API processes the
same two methods would sit on the shared database or a cache.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from typing import AsyncIterator, Iterator


class PerDeviceSlots:
    """At most ``limit`` concurrent holders per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[int, int] = {}

    def try_enter(self, device_id: int, limit: int) -> bool:
        with self._lock:
            n = self._count.get(device_id, 0)
            if n >= limit:
                return False
            self._count[device_id] = n + 1
            return True

    def leave(self, device_id: int) -> None:
        with self._lock:
            n = self._count.get(device_id, 0) - 1
            if n > 0:
                self._count[device_id] = n
            else:
                self._count.pop(device_id, None)

    def held(self, device_id: int) -> int:
        with self._lock:
            return self._count.get(device_id, 0)

    @contextlib.contextmanager
    def hold(self, device_id: int) -> Iterator[None]:
        try:
            yield
        finally:
            self.leave(device_id)


class ReceivingSlots:
    """At most ``limit`` uploads received and parsed at once by this process, whatever device
    sends them: the factor that bounds the ingest's memory (see :func:`ingest_memory_bound`).

    An upload waiting for a slot has had none of its body read: it holds only the server's
    flow-controlled socket buffer. One waiting longer than ``wait_s`` answers 503 (retried).
    One semaphore per event loop (a test client runs its own loop)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._semaphores: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = \
            weakref.WeakKeyDictionary()
        self.peak = 0
        self._held = 0

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(self.limit)
        return sem

    @contextlib.asynccontextmanager
    async def slot(self, wait_s: float) -> AsyncIterator[bool]:
        """Yields True while holding a slot, False if none freed within ``wait_s`` seconds."""
        sem = self._semaphore()
        try:
            await asyncio.wait_for(sem.acquire(), wait_s)
        except asyncio.TimeoutError:
            yield False
            return
        self._held += 1
        self.peak = max(self.peak, self._held)
        try:
            yield True
        finally:
            self._held -= 1
            sem.release()


# What one socket can hold before the server reads it: uvicorn pauses reading past 64 KiB of
# buffered body, and one read of asyncio's transport is at most 256 KiB.
CONNECTION_BUFFER_BYTES = 64 * 1024 + 256 * 1024


def ingest_memory_bound(*, receiving: int, queue_bytes: int, pending_decode_bytes: int, max_frame_bytes: int,
                        index_bytes: int, decode_workers: int, max_frame_pixels: int,
                        connections: int = 0, pack_part_requests: int = 0, pack_part_bytes: int = 0) -> dict[str, int]:
    """The most memory the upload path can hold, in bytes, whatever the uploads say, by term.

    Per upload being received: the body queue between the event loop and the parser
    (``queue_bytes``); the frame being read, up to three copies in flight (the socket chunks
    joined by tarfile, the parser's buffer, the bytes hashed and written); the frames handed to
    the decode pool and not yet checked (``pending_decode_bytes`` plus the one that crossed it);
    the index (its bytes, and the parsed models: counted as four times its size). Per decode
    worker: one full BGR decode of the largest frame allowed (an EXIF frame gets OpenCV's full
    decode; the others are decoded gray at 1/8 scale). Per open connection: its socket buffer. Per
    request putting a part of an object store's pack (``pack_part_requests`` at once): the part."""
    per_upload = queue_bytes + 3 * max_frame_bytes + pending_decode_bytes + max_frame_bytes + 5 * index_bytes
    terms = {
        "uploads_being_received": receiving * per_upload,
        "decode_workers": decode_workers * 3 * max_frame_pixels,
        "connections": connections * CONNECTION_BUFFER_BYTES,
        "pack_parts": pack_part_requests * pack_part_bytes,
    }
    terms["total"] = sum(terms.values())
    return terms
