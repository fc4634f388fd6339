"""The opt-in data journal: a disk-bounded sample of what the headset's camera saw.

Nothing is journalled unless ``--journal DIR`` is given. The frame loop only *offers* frames
(:meth:`Journal.submit` never blocks: a bounded queue, overflow counted); a writer thread does the
JPEG encoding and the disk work.

On-disk format (version 1), designed so a sync client can upload in order and resume::

    DIR/
      journal.json                  {"format": 1, "created": ...}
      frames/<seq:010d>.jpg         the camera frame (RGB -> JPEG), written atomically
      index/<seq // 1000:06d>.jsonl one JSON line per frame, appended after its JPEG is in place
      uploaded.json                 {"through_seq": N}: every frame with seq <= N is uploaded
                                    (replaced atomically)

An index line::

    {"seq": 12, "t": 1732200000.123, "file": "frames/0000000012.jpg", "bytes": 18231,
     "sha256": "...", "width": 320, "height": 240, "frame_index": 360, "reason": "every-k",
     "model_version": "v3", "outputs": {"class": "star", "confidence": 0.91, ...}}

``seq`` increases by one per journalled frame and is never reused (also across restarts).
A frame exists when its index line parses *and* its JPEG exists: eviction (oldest first, when
JPEGs plus index exceed the byte budget) deletes JPEGs first and whole index segments once all
their frames are gone, so a line whose JPEG is missing means "evicted". A crash can leave at
most a JPEG without a line (deleted on the next start) or a torn last line (skipped by readers).

For the sync client (device/sync.py)::

    journal = Journal(DIR)                        # reading needs no writer thread
    for batch in journal.pending_batches(max_frames=64):
        frames = batch.load()                     # [(entry dict, jpeg bytes)], evicted ones skipped
        ... upload ...
        journal.mark_uploaded(batch)              # in order: oldest batch first
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from shared.atomic import atomic_write_bytes, atomic_write_json

FORMAT = 1
SEGMENT_FRAMES = 1000


def _frame_name(seq: int) -> str:
    return f"frames/{seq:010d}.jpg"


def _segment_name(seq: int) -> str:
    return f"index/{seq // SEGMENT_FRAMES:06d}.jsonl"


@dataclasses.dataclass
class JournalBatch:
    """Consecutive not-yet-uploaded frames, oldest first."""

    root: Path
    entries: list[dict]

    @property
    def first_seq(self) -> int:
        return self.entries[0]["seq"]

    @property
    def last_seq(self) -> int:
        return self.entries[-1]["seq"]

    def paths(self) -> list[Path]:
        return [self.root / e["file"] for e in self.entries]

    def load(self) -> list[tuple[dict, bytes]]:
        """(entry, JPEG bytes) for every frame still on disk (eviction may race an upload)."""
        out = []
        for e in self.entries:
            try:
                out.append((e, (self.root / e["file"]).read_bytes()))
            except FileNotFoundError:
                continue
        return out


class Journal:
    def __init__(self, root: str | os.PathLike, max_bytes: int = 64 * 1024 * 1024, queue_size: int = 16,
                 jpeg_quality: int = 85):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.jpeg_quality = int(jpeg_quality)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._live: deque[tuple[int, int]] = deque()  # (seq, jpeg bytes), oldest first
        self._segments: dict[str, int] = {}  # segment file -> its size in bytes
        self._next_seq = 0
        self.submitted = 0
        self.written = 0
        self.overflow = 0
        self.evicted = 0
        self.evicted_not_uploaded = 0
        self.write_errors = 0
        self.last_error: str | None = None

    # -- writer side -------------------------------------------------------------------------
    def start(self) -> "Journal":
        """Recover what a previous run left, then start the writer thread."""
        (self.root / "frames").mkdir(parents=True, exist_ok=True)
        (self.root / "index").mkdir(parents=True, exist_ok=True)
        if not (self.root / "journal.json").exists():
            atomic_write_json(self.root / "journal.json", {"format": FORMAT, "created": time.time()})
        self._recover()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()
        return self

    def _recover(self) -> None:
        entries, max_seq = self._scan()
        listed = {e["file"] for e in entries}
        for p in (self.root / "frames").iterdir():
            rel = f"frames/{p.name}"
            if p.name.startswith(".") or rel not in listed:  # temp files, JPEGs whose line never came
                try:
                    seq = int(p.stem)
                    max_seq = max(max_seq, seq)
                except ValueError:
                    pass
                p.unlink(missing_ok=True)
        for p in (self.root / "index").iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
                continue
            data = p.read_bytes()
            if data and not data.endswith(b"\n"):  # a torn last line: cut it, or the next line joins it
                with open(p, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
                    os.fsync(fh.fileno())
            self._segments[f"index/{p.name}"] = p.stat().st_size
        self._live = deque((e["seq"], e["bytes"]) for e in entries)
        self._next_seq = max_seq + 1
        self._evict()

    def submit(self, image_rgb: np.ndarray, meta: dict) -> bool:
        """Offer a frame (never blocks). False if the queue was full: the frame is counted as overflow."""
        self.submitted += 1
        try:
            self._queue.put_nowait((image_rgb, meta, time.time()))
            return True
        except queue.Full:
            self.overflow += 1
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except OSError as exc:  # a full or failing disk must not take the headset down
                self.write_errors += 1
                self.last_error = str(exc)

    def _write(self, image_rgb: np.ndarray, meta: dict, t: float) -> None:
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        data = jpg.tobytes()
        seq = self._next_seq
        self._next_seq += 1
        rel = _frame_name(seq)
        atomic_write_bytes(self.root / rel, data)
        entry = {"seq": seq, "t": round(t, 3), "file": rel, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "width": int(image_rgb.shape[1]),
                 "height": int(image_rgb.shape[0]), **meta}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        segment = _segment_name(seq)
        # one write() of a whole line with O_APPEND: a crash leaves at most a torn last line
        fd = os.open(self.root / segment, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._segments[segment] = self._segments.get(segment, 0) + len(line)
            self._live.append((seq, len(data)))
            self.written += 1
        self._evict()

    def disk_bytes(self) -> int:
        with self._lock:
            return sum(b for _, b in self._live) + sum(self._segments.values())

    def _evict(self) -> None:
        through = self.uploaded_through()
        while self._live and self.disk_bytes() > self.max_bytes:
            with self._lock:
                seq, _ = self._live.popleft()
            (self.root / _frame_name(seq)).unlink(missing_ok=True)
            self.evicted += 1
            if seq > through:
                self.evicted_not_uploaded += 1
            oldest = self._live[0][0] if self._live else self._next_seq
            for segment in list(self._segments):
                last_seq_of_segment = (int(Path(segment).stem) + 1) * SEGMENT_FRAMES - 1
                if last_seq_of_segment < oldest:
                    (self.root / segment).unlink(missing_ok=True)
                    with self._lock:
                        del self._segments[segment]

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict:
        return {"dir": str(self.root), "submitted": self.submitted, "written": self.written,
                "overflow": self.overflow, "evicted": self.evicted,
                "evicted_not_uploaded": self.evicted_not_uploaded, "write_errors": self.write_errors,
                "disk_bytes": self.disk_bytes(), "max_bytes": self.max_bytes}

    # -- reader side (any process) -----------------------------------------------------------
    def _scan(self) -> tuple[list[dict], int]:
        """Entries whose JPEG exists (oldest first) and the highest seq ever indexed."""
        entries, max_seq = [], -1
        index = self.root / "index"
        if not index.is_dir():
            return entries, max_seq
        for seg in sorted(index.glob("[0-9]*.jsonl")):
            with open(seg, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        continue  # torn last line of a crash
                    try:
                        e = json.loads(raw)
                        seq = int(e["seq"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    max_seq = max(max_seq, seq)
                    if (self.root / e.get("file", _frame_name(seq))).is_file():
                        entries.append(e)
        entries.sort(key=lambda e: e["seq"])
        return entries, max_seq

    def entries(self) -> list[dict]:
        """Every journalled frame still on disk, oldest first."""
        return self._scan()[0]

    def uploaded_through(self) -> int:
        try:
            return int(json.loads((self.root / "uploaded.json").read_text())["through_seq"])
        except (FileNotFoundError, ValueError, KeyError):
            return -1

    def pending_batches(self, max_frames: int = 64, max_batches: int | None = None) -> list[JournalBatch]:
        """Frames not uploaded yet, oldest first, in batches of at most ``max_frames``."""
        through = self.uploaded_through()
        pending = [e for e in self.entries() if e["seq"] > through]
        batches = [JournalBatch(self.root, pending[i:i + max_frames]) for i in range(0, len(pending), max(1, max_frames))]
        return batches[:max_batches] if max_batches is not None else batches

    def mark_uploaded(self, batch: JournalBatch) -> None:
        """Record ``batch`` as uploaded. Batches must be marked oldest first (the mark is a watermark)."""
        through = self.uploaded_through()
        if batch.last_seq <= through:
            return  # already marked: idempotent
        older = [e["seq"] for e in self.entries() if through < e["seq"] < batch.first_seq]
        if older:
            raise ValueError(f"frames {older[0]}..{older[-1]} are older than this batch and not uploaded yet: "
                             "mark batches oldest first")
        atomic_write_json(self.root / "uploaded.json", {"through_seq": batch.last_seq})


class JournalSampler:
    """Which frames to journal: every ``every``-th frame, or when the scene changed.

    Scene change: mean absolute difference of 16x16 gray thumbnails (0..1) between this frame
    and the last journalled one above ``scene_threshold`` (0 disables)."""

    def __init__(self, every: int = 30, scene_threshold: float = 0.12):
        self.every, self.scene_threshold = max(0, every), scene_threshold
        self._last_thumb: np.ndarray | None = None
        self._count = 0

    def reason(self, image_rgb: np.ndarray) -> str | None:
        self._count += 1
        thumb = None
        why = None
        if self.scene_threshold > 0:
            thumb = cv2.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), (16, 16),
                               interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            if self._last_thumb is None or float(np.abs(thumb - self._last_thumb).mean()) > self.scene_threshold:
                why = "scene-change"
        if why is None and self.every and (self._count - 1) % self.every == 0:
            why = "every-k"
        if why is not None and thumb is not None:
            self._last_thumb = thumb
        return why
