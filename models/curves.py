"""Training curves of a run folder: ``curves.jsonl`` (one JSON object a line, written as training
goes) and ``curves.png`` (drawn at the end of the run from that file).

A ``step`` line is written at every progress report: the window averages of every logged value,
the learning rate, the step time and the ETA. An ``epoch`` line after every epoch: the epoch's
record as the run keeps it in ``metrics.json`` (training averages, held-out metrics), flattened
to ``group/name`` numbers. A resumed run keeps the lines of the epochs it resumes after.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_bytes

CURVES_NAME = "curves.jsonl"
PLOT_NAME = "curves.png"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested record as ``{"a/b": x}``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def read_curves(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's curves file (a torn last line, from a killed run, is skipped)."""
    path = Path(run_dir) / CURVES_NAME
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


class CurveLog:
    """Appends the lines of ``run_dir/curves.jsonl``; :meth:`plot` draws ``curves.png``."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CURVES_NAME

    def start(self, after_epoch: int = 0) -> None:
        """A new run (``after_epoch`` 0) starts an empty file; a resumed one keeps its earlier epochs."""
        kept = [line for line in read_curves(self.run_dir) if line.get("epoch", 0) <= after_epoch] \
            if after_epoch else []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, "".join(json.dumps(line) + "\n" for line in kept).encode())

    def _append(self, line: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def step(self, epoch: int, step: int, global_step: int, values: dict[str, float], *, lr: float,
             seconds_per_step: float, eta_s: float) -> None:
        self._append({"kind": "step", "epoch": epoch, "step": step, "global_step": global_step,
                      **flatten(values), "lr": lr, "seconds_per_step": seconds_per_step, "eta_s": round(eta_s, 1)})

    def epoch(self, epoch: int, global_step: int, record: dict[str, Any]) -> None:
        values = flatten({k: v for k, v in record.items() if k != "epoch"})
        self._append({"kind": "epoch", "epoch": epoch, "global_step": global_step, **values})

    def plot(self, title: str = "") -> Path | None:
        """``curves.png``: the step losses against the step, the epochs' held-out metrics against
        the epoch. None if there is nothing to draw."""
        lines = read_curves(self.run_dir)
        steps = [line for line in lines if line.get("kind") == "step"]
        epochs = [line for line in lines if line.get("kind") == "epoch"]
        if not steps and not epochs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        skip = {"kind", "epoch", "step", "global_step", "lr", "seconds_per_step", "eta_s", "seconds",
                "lr_multiplier"}
        fig = Figure(figsize=(11, 4.2), dpi=100)
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        step_keys = sorted({k for line in steps for k in line if k not in skip})
        for key in step_keys:
            pts = [(line["global_step"], line[key]) for line in steps if key in line]
            left.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        left.set_xlabel("step")
        left.set_title("training (window averages)")
        held_out = sorted({k for line in epochs for k in line
                           if k not in skip and not k.startswith("train/") and not k.startswith("task_weights/")})
        percent = [k for k in held_out if "pct" in k or "accuracy" in k]  # on their own axis (0-100)
        pct_axis = right.twinx() if percent and len(percent) < len(held_out) else right
        for i, key in enumerate(held_out):
            pts = [(line["epoch"], line[key]) for line in epochs if key in line]
            ax = pct_axis if key in percent else right
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key, color=f"C{i}",
                    linestyle="--" if ax is not right else "-")
        if pct_axis is not right:
            pct_axis.set_ylabel("% (dashed)")
        right.set_xlabel("epoch")
        right.set_title("held-out, after each epoch")
        for ax in {left, right, pct_axis}:
            if ax.lines:
                ax.legend(fontsize=7, loc="upper right" if ax is pct_axis and ax is not right else "best")
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = self.run_dir / PLOT_NAME
        tmp = out.with_name(out.name + ".tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
        return out


def hms(seconds: float) -> str:
    """``h:mm:ss`` (the ETA of the progress lines)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
