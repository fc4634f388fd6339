"""What a headset tells the cloud about each model it ran (staged rollout, ``POST /v1/health``).

The frame loop counts, per model version, the frames it showed, their inference latency, the
inferences that failed and the times that version was rolled back; the sync client's health
thread takes the counts every ``--health-interval`` seconds and posts one report per version.
A report that could not be sent is put back and merged into the next one, so nothing counted
is lost while the cloud is away (the cloud's canary check sums reports, so merging is exact
for frames, errors and rollbacks and frame-weighted for FPS and latency).

numpy-free and torch-free: a lock and a dict, cheap enough to run on every frame.
"""
from __future__ import annotations

import dataclasses
import threading
import time


@dataclasses.dataclass
class VersionHealth:
    frames: int = 0
    latency_ms_sum: float = 0.0
    inference_errors: int = 0
    rollbacks: int = 0
    first_frame_t: float | None = None
    last_frame_t: float | None = None
    carried_frames: int = 0  # of ``frames``, those restored from undelivered reports
    carried_fps_frames: float = 0.0  # their sum of fps * frames

    def report(self, version: str) -> dict:
        live = self.frames - self.carried_frames
        span = (self.last_frame_t or 0.0) - (self.first_frame_t or 0.0)
        live_fps = (live - 1) / span if live >= 2 and span > 0 else 0.0
        fps = (live_fps * live + self.carried_fps_frames) / self.frames if self.frames else 0.0
        return {"version": version, "frames": self.frames, "fps": round(fps, 3),
                "latency_ms": round(self.latency_ms_sum / self.frames, 3) if self.frames else 0.0,
                "rollbacks": self.rollbacks, "inference_errors": self.inference_errors}


class HealthMeter:
    """Per-version counters since the last :meth:`take` (any thread)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._versions: dict[str, VersionHealth] = {}
        # errors and rollbacks of the frame being inferred: counted with that frame (its :meth:`frame`
        # call), so no report holds an error without the frame it happened on (a report taken
        # between the two said 531 errors over 530 frames)
        self._pending: list[tuple[str, str]] = []

    def _get(self, version: str) -> VersionHealth:
        h = self._versions.get(version)
        if h is None:
            h = self._versions[version] = VersionHealth()
        return h

    def frame(self, version: str, latency_ms: float) -> None:
        """A frame was shown while ``version`` served (with or without an overlay)."""
        now = self._clock()
        with self._lock:
            self._count_pending()
            h = self._get(version)
            h.frames += 1
            h.latency_ms_sum += latency_ms
            if h.first_frame_t is None:
                h.first_frame_t = now
            h.last_frame_t = now

    def inference_error(self, version: str) -> None:
        """``version`` failed on the frame being inferred (counted with that frame's :meth:`frame`)."""
        with self._lock:
            self._pending.append(("inference_errors", version))

    def rollback(self, version: str) -> None:
        """``version`` failed and the headset went back to its previous model (counted with the frame)."""
        with self._lock:
            self._pending.append(("rollbacks", version))

    def flush(self) -> None:
        """Count errors and rollbacks whose frame was never shown (the loop stopped in between)."""
        with self._lock:
            self._count_pending()

    def _count_pending(self) -> None:
        for field, version in self._pending:
            h = self._get(version)
            setattr(h, field, getattr(h, field) + 1)
        self._pending.clear()

    def take(self) -> list[dict]:
        """The reports since the last take (one per version with anything to say); resets."""
        with self._lock:
            versions, self._versions = self._versions, {}
        return [h.report(v) for v, h in versions.items() if h.frames or h.inference_errors or h.rollbacks]

    def restore(self, reports: list[dict]) -> None:
        """Put back reports that were not delivered; they are merged into the next ones."""
        with self._lock:
            for r in reports:
                h = self._get(r["version"])
                h.frames += r["frames"]
                h.carried_frames += r["frames"]
                h.carried_fps_frames += r["fps"] * r["frames"]
                h.latency_ms_sum += r["latency_ms"] * r["frames"]
                h.inference_errors += r["inference_errors"]
                h.rollbacks += r["rollbacks"]
