"""Per-stage latency bookkeeping for the frame loop, and the summary's percentiles."""
from __future__ import annotations

import collections
import resource
import sys
import time

import numpy as np

STAGES: tuple[str, ...] = ("capture_wait", "preprocess", "inference", "overlay", "output", "total")
_KEEP = 100_000  # samples per stage kept for the exit summary (about an hour at 30 fps)


def percentiles(samples_ms, ps=(50, 95, 99)) -> dict[str, float]:
    if len(samples_ms) == 0:
        return {"n": 0}
    arr = np.asarray(samples_ms, dtype=np.float64)
    out = {"n": int(arr.size), "mean": round(float(arr.mean()), 3), "max": round(float(arr.max()), 3)}
    for p, v in zip(ps, np.percentile(arr, ps)):
        out[f"p{p}"] = round(float(v), 3)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size. On Linux VmHWM: ru_maxrss would include the RSS of
    the parent at fork (it survives execve), which inflates a subprocess's figure."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)


class StageTimer:
    """Latency samples per stage: the whole run (for the summary) and a recent window (for the HUD)."""

    def __init__(self, recent: int = 120):
        self._all: dict[str, list[float]] = {s: [] for s in STAGES}
        self._recent: collections.deque[float] = collections.deque(maxlen=recent)  # total latency
        self._frame_times: collections.deque[float] = collections.deque(maxlen=recent)
        self._added = 0  # total latencies added, for the HUD's cached percentiles
        self._hud_cache: tuple[int, float, float] | None = None

    def add(self, stage: str, ms: float) -> None:
        samples = self._all.setdefault(stage, [])
        if len(samples) < _KEEP:
            samples.append(ms)
        if stage == "total":
            self._recent.append(ms)
            self._added += 1

    def frame_done(self, now: float | None = None) -> None:
        self._frame_times.append(time.perf_counter() if now is None else now)

    def fps(self) -> float:
        if len(self._frame_times) < 2:
            return 0.0
        span = self._frame_times[-1] - self._frame_times[0]
        return (len(self._frame_times) - 1) / span if span > 0 else 0.0

    def recent_p50_p95(self, every: int = 10) -> tuple[float, float]:
        """p50 / p95 of the recent total latencies, recomputed every ``every`` samples (the HUD
        asks each frame; a percentile of 120 values each time was a measurable part of the overlay)."""
        if not self._recent:
            return 0.0, 0.0
        if self._hud_cache is None or self._added - self._hud_cache[0] >= every:
            p50, p95 = np.percentile(np.fromiter(self._recent, float), (50, 95))
            self._hud_cache = (self._added, float(p50), float(p95))
        return self._hud_cache[1], self._hud_cache[2]

    def median(self, stage: str, last: int | None = None) -> float | None:
        """The median of a stage's samples (of its ``last`` ones when given), None before any."""
        samples = self._all.get(stage) or []
        if last is not None:
            samples = samples[-last:]
        return float(np.median(samples)) if samples else None

    def summary(self) -> dict[str, dict[str, float]]:
        return {stage: percentiles(samples) for stage, samples in self._all.items()}
