"""The ingest's memory bound holds whatever an upload says: a tar header tarfile would read whole
is refused from its declared size, and only so many uploads are parsed at once (the others wait,
unread, then answer 503)."""
from __future__ import annotations

import asyncio
import io
import tarfile

import cv2
import numpy as np
import pytest

from cloud import ingest
from cloud.backends import open_blob_store
from cloud.limits import ReceivingSlots


def _chunks(body: bytes):
    async def gen():
        for i in range(0, len(body), 256 * 1024):
            yield body[i:i + 256 * 1024]
    return gen()


@pytest.mark.parametrize("kind", ["pax", "gnu-longname"])
def test_a_huge_extended_tar_header_is_refused_before_it_is_read(tmp_path, kind):
    blobs = open_blob_store(f"file://{tmp_path / 'blobs'}")
    jpg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    buf = io.BytesIO()
    if kind == "pax":
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            info = tarfile.TarInfo("frames/0.jpg")
            info.size, info.pax_headers = len(jpg), {"comment": "x" * 3_000_000}
            t.addfile(info, io.BytesIO(jpg))
    else:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            info = tarfile.TarInfo("frames/" + "a" * 200_000 + ".jpg")
            info.size = len(jpg)
            t.addfile(info, io.BytesIO(jpg))
    with pytest.raises(ingest.UploadRejected) as exc:
        asyncio.run(ingest.receive_upload(_chunks(buf.getvalue()), blobs, tmp_path / "spool", limit=64 << 20,
                                          max_frames=10, max_frame_bytes=1 << 20))
    assert exc.value.status == 400 and "extended tar header of" in exc.value.detail
    assert "limit is 65536" in exc.value.detail
    assert not list((tmp_path / "blobs").rglob("*.jpg")) and blobs.names() == []  # nothing stored


def test_receiving_slots_make_uploads_wait_then_answer_busy():
    slots = ReceivingSlots(1)

    async def scenario():
        order = []

        async def upload(name, hold, wait):
            async with slots.slot(wait) as got:
                order.append((name, got))
                if got:
                    await asyncio.sleep(hold)

        first = asyncio.create_task(upload("first", 0.2, 1.0))
        await asyncio.sleep(0.01)
        await asyncio.gather(upload("waits", 0.0, 5.0), upload("gives up", 0.0, 0.05), first)
        return order

    order = asyncio.run(scenario())
    assert order == [("first", True), ("gives up", False), ("waits", True)]
    assert slots.peak == 1


def test_the_bound_adds_up_from_the_limits():
    small = ingest.memory_bound(max_frame_bytes=1 << 20, max_frame_pixels=1 << 20)
    large = ingest.memory_bound(max_frame_bytes=2 << 20, max_frame_pixels=1 << 20, connections=10)
    # each upload being parsed may hold four more copies of a frame; every connection its buffer
    assert large["uploads_being_received"] - small["uploads_being_received"] == ingest.MAX_RECEIVING * 4 * (1 << 20)
    assert large["connections"] == 10 * (64 + 256) * 1024
    assert small["pack_parts"] == 0  # the folder store: no parts
    in_parts = ingest.memory_bound(max_frame_bytes=1 << 20, max_frame_pixels=1 << 20, object_store=True)
    assert in_parts["pack_parts"] == ingest.MAX_RECEIVING * 8 * 1024 * 1024  # an object store's parts being put
    assert in_parts["total"] - small["total"] == in_parts["pack_parts"]
    assert small["total"] == sum(v for k, v in small.items() if k != "total")
