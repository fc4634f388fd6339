"""The cloud's HTTP wire schemas, shared by the service (cloud/) and the headset's sync client
(device/sync.py). Pydantic only, no torch.

An upload is an uncompressed tar archive (``application/x-tar``; JPEG frames are compressed
already) whose members are ``index.json`` (an :class:`UploadIndex`) and one JPEG per frame at
the path its :class:`UploadFrame` names. Build it with :func:`build_upload_archive` so that the
same frames always give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

UPLOAD_FORMAT = 1
UPLOAD_CONTENT_TYPE = "application/x-tar"
INDEX_NAME = "index.json"
FRAME_PATH = re.compile(r"^frames/[A-Za-z0-9._-]{1,80}\.jpe?g$")


class UploadFrame(BaseModel):
    """One frame of an upload: where it is in the archive, and what the device knows about it."""

    model_config = ConfigDict(extra="allow")  # journal metadata (t, reason, outputs, ...) passes through

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    seq: int | None = None


class UploadIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = UPLOAD_FORMAT
    frames: list[UploadFrame] = Field(min_length=1)
    first_seq: int | None = None  # the journal's sequence numbers, for the device's own bookkeeping
    last_seq: int | None = None

    def content_sha256(self) -> str:
        """The upload's identity: its frames' hashes in order (not the archive's bytes, so a
        re-packed retry of the same frames is still recognised as the same upload)."""
        h = hashlib.sha256()
        for f in self.frames:
            h.update(f.sha256.encode("ascii"))
            h.update(b"\n")
        return h.hexdigest()


class UploadReceipt(BaseModel):
    upload_id: str
    frames: int
    bytes: int
    duplicate: bool = False  # True: this content had been uploaded before; upload_id is the first one's
    job_id: str | None = None  # a personalisation job this upload started, if any


class ErrorBody(BaseModel):
    error: str  # a short machine-readable code: bad_archive, too_large, unauthorised, not_found, ...
    detail: str  # a sentence for people


JobState = Literal["queued", "running", "accepted", "rejected", "failed"]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_frames: int | None = Field(default=None, ge=2)


class JobInfo(BaseModel):
    job_id: str
    state: JobState
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    frames: int = 0
    base_version: str | None = None
    progress: dict[str, Any] = Field(default_factory=dict)  # {"stage": ..., "fraction": 0..1, "log": [...]}
    evaluation: dict[str, Any] | None = None  # {"wearer": {"before", "after"}, "base": {...}, "tolerance"}
    result_version: str | None = None
    reason: str | None = None
    trigger: str = "api"


class ModelInfo(BaseModel):
    version: str
    parent_version: str | None = None
    sha256: str
    bytes: int
    created: float
    manifest_url: str
    model_url: str


class ModelAvailable(BaseModel):
    """The ``model_available`` server-sent event's data."""

    version: str
    sha256: str
    parent_version: str | None = None
    manifest_url: str
    model_url: str
    job_id: str | None = None


def build_upload_archive(frames: Iterable[tuple[dict, bytes]], first_seq: int | None = None,
                         last_seq: int | None = None) -> bytes:
    """A deterministic upload archive from (journal entry, JPEG bytes) pairs.

    Every entry keeps its metadata; ``file``, ``sha256`` and ``bytes`` are recomputed from the
    bytes actually sent, so the index always describes the archive."""
    entries, blobs = [], []
    for i, (entry, data) in enumerate(frames):
        meta = {k: v for k, v in entry.items() if k not in ("file", "sha256", "bytes")}
        name = f"frames/{int(meta['seq']):010d}.jpg" if isinstance(meta.get("seq"), int) else f"frames/{i:06d}.jpg"
        entries.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **meta})
        blobs.append((name, data))
    index = {"format": UPLOAD_FORMAT, "frames": entries}
    if first_seq is not None:
        index["first_seq"] = first_seq
    if last_seq is not None:
        index["last_seq"] = last_seq
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(INDEX_NAME, json.dumps(index, sort_keys=True).encode("utf-8")), *blobs]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_members(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A plain tar of (name, bytes) members, as given: for tests, fuzzing and bad-input probes
    (uploads are built with :func:`build_upload_archive`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
