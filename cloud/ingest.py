"""Upload ingest: stream the body to a spool file (size-limited), validate the whole archive,
then store its frames as blobs and commit the upload in one database transaction.

Nothing of a rejected upload is kept: validation runs on the spool file before any blob or row
is written. A crash after some frame blobs were written but before the commit leaves only
unreferenced content-addressed blobs (the same frames, if retried, reuse them), never a
partial batch.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path
from typing import AsyncIterator

import cv2
import numpy as np
from pydantic import ValidationError

from cloud.blobs import BlobStore
from cloud.storage import FrameRow, Storage, Upload
from shared.wire import FRAME_PATH, INDEX_NAME, UploadIndex


class UploadRejected(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def spool(body: AsyncIterator[bytes], spool_dir: Path, limit: int) -> tuple[Path, int]:
    """Write the request body to a temporary file as it arrives; 413 past ``limit`` bytes."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool_dir, suffix=".upload")
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise UploadRejected(413, "too_large", f"upload exceeds the limit of {limit} bytes")
                fh.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), size


def validate_archive(path: Path, *, max_frames: int, max_frame_bytes: int) -> tuple[UploadIndex, bytes, list[FrameRow]]:
    """Check every member of an upload archive; returns (index, index bytes, frames) or raises 400."""
    def bad(detail: str) -> UploadRejected:
        return UploadRejected(400, "bad_archive", detail)

    try:
        tar = tarfile.open(path, mode="r:")  # uncompressed only: no decompression bombs
    except (tarfile.TarError, OSError) as exc:
        raise bad(f"not a tar archive ({exc})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise bad(f"the archive is truncated or corrupt ({exc})") from None
        by_name: dict[str, tarfile.TarInfo] = {}
        for m in members:
            if not m.isfile():
                raise bad(f"member {m.name!r} is not a regular file")
            if m.name in by_name:
                raise bad(f"member {m.name!r} appears twice")
            by_name[m.name] = m
        if INDEX_NAME not in by_name:
            raise bad(f"the archive has no {INDEX_NAME}")
        if by_name[INDEX_NAME].size > 8 * 1024 * 1024:
            raise bad(f"{INDEX_NAME} is larger than 8 MiB")
        index_bytes = tar.extractfile(by_name[INDEX_NAME]).read()  # type: ignore[union-attr]
        try:
            index = UploadIndex.model_validate_json(index_bytes)
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()
            raise bad(f"{INDEX_NAME} is not a valid upload index: {' '.join(first[:3])}") from None
        if len(index.frames) > max_frames:
            raise bad(f"{len(index.frames)} frames in one upload; the limit is {max_frames}")
        listed = [f.file for f in index.frames]
        if len(set(listed)) != len(listed):
            raise bad("the index lists a frame file twice")
        extra = set(by_name) - set(listed) - {INDEX_NAME}
        if extra:
            raise bad(f"archive members not in the index: {sorted(extra)[:3]}")
        rows: list[FrameRow] = []
        for i, f in enumerate(index.frames):
            if not FRAME_PATH.match(f.file):
                raise bad(f"frame {i}: file name {f.file!r} is not frames/NAME.jpg")
            m = by_name.get(f.file)
            if m is None:
                raise bad(f"frame {i}: {f.file} is in the index but not in the archive")
            if m.size != f.bytes:
                raise bad(f"frame {i}: {f.file} has {m.size} bytes, the index says {f.bytes}")
            if m.size > max_frame_bytes:
                raise bad(f"frame {i}: {f.file} is larger than {max_frame_bytes} bytes")
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise bad(f"frame {i}: {f.file} does not match its sha256 in the index")
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise bad(f"frame {i}: {f.file} is not a decodable image")
            h, w = img.shape[:2]
            if (f.width is not None and f.width != w) or (f.height is not None and f.height != h):
                raise bad(f"frame {i}: {f.file} is {w}x{h}, the index says {f.width}x{f.height}")
            meta = f.model_dump(exclude={"file", "sha256", "bytes", "width", "height"})
            rows.append(FrameRow(f.sha256, w, h, meta))
    return index, index_bytes, rows


def store_frames(path: Path, index: UploadIndex, blobs: BlobStore) -> None:
    """Copy the (already validated) frames of the spool file into the blob store."""
    with tarfile.open(path, mode="r:") as tar:
        for f in index.frames:
            if not blobs.exists(f.sha256):
                blobs.put_bytes(tar.extractfile(f.file).read())  # type: ignore[union-attr]


def ingest(path: Path, size: int, device_id: int, storage: Storage, blobs: BlobStore, *,
           max_frames: int, max_frame_bytes: int) -> tuple[Upload, bool]:
    """Validate and commit a spooled upload; returns (upload, created). The spool file is removed."""
    try:
        index, index_bytes, rows = validate_archive(path, max_frames=max_frames, max_frame_bytes=max_frame_bytes)
        content = index.content_sha256()
        existing = storage.find_upload(device_id, content)
        if existing is not None:
            return existing, False
        store_frames(path, index, blobs)
        index_sha = blobs.put_bytes(index_bytes)
        return storage.commit_upload(device_id, content, index_sha, size, rows)
    finally:
        path.unlink(missing_ok=True)


def decode_frames(blobs: BlobStore, frames: list[FrameRow], size: tuple[int, int]) -> np.ndarray:
    """N x H x W x 3 uint8 RGB at ``size`` (h, w) from stored JPEG blobs."""
    h, w = size
    out = np.empty((len(frames), h, w, 3), np.uint8)
    for i, f in enumerate(frames):
        with blobs.open(f.sha256) as fh:
            img = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_COLOR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (h, w):
            interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        out[i] = img
    return out

