"""Progress meters and log lines of the training engine (torchvision references' SmoothedValue)."""
from __future__ import annotations

import math

from models.curves import hms


class SmoothedValue:
    """A running window average plus the global average."""

    def __init__(self, window: int = 20):
        self.values: list[float] = []
        self.window = window
        self.total = 0.0
        self.count = 0

    def update(self, v: float) -> None:
        self.values = (self.values + [v])[-self.window:]
        self.total += v
        self.count += 1

    @property
    def avg(self) -> float:
        return sum(self.values) / max(1, len(self.values))

    @property
    def global_avg(self) -> float:
        return self.total / max(1, self.count)


class MetricLogger:
    """One meter per logged name plus the step time; formats the progress line with its ETA."""

    def __init__(self) -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.step_time = SmoothedValue()

    def update(self, logs: dict[str, float], seconds: float) -> None:
        for k, v in logs.items():
            self.meters.setdefault(k, SmoothedValue()).update(v)
        self.step_time.update(seconds)

    def averages(self) -> dict[str, float]:
        return {k: v.global_avg for k, v in self.meters.items()}

    def line(self, keys: list[str], steps_left: int) -> str:
        eta = self.step_time.avg * steps_left
        shown = " ".join(f"{k}={self.meters[k].avg:.4f}" for k in keys)
        return f"{shown} {self.step_time.avg * 1000:.0f}ms/step eta {hms(eta)}"


def check_finite(logs: dict[str, float], epoch: int, step: int) -> None:
    """The divergence check: a non-finite logged value stops training with where it happened."""
    if not all(math.isfinite(v) for v in logs.values()):
        raise RuntimeError(f"training diverged at epoch {epoch + 1} step {step + 1}: {logs}")
