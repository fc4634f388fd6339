"""Checkpoint files: one writer (atomic) and one reader for both formats the project writes.

``great-hmd-checkpoint/1``  a multi-task run (`hmd train`), see :mod:`models.train`;
``great-hmd-classifier/1``  a classifier run (`hmd defend`, `hmd distill`): architecture name,
                            its :class:`models.network.NetConfig`, the weights, extra fields.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.atomic import atomic_write_bytes
from shared.errors import UserError

from models.network import NetConfig
from models.registry import ARCHITECTURES, create_classifier

CHECKPOINT_NAME = "checkpoint.pt"
MULTITASK_FORMAT = "great-hmd-checkpoint/1"
CLASSIFIER_FORMAT = "great-hmd-classifier/1"
# format -> (what it holds, the commands that write it)
FORMATS = {MULTITASK_FORMAT: ("multi-task", "`hmd train`"),
           CLASSIFIER_FORMAT: ("classifier", "`hmd defend` / `hmd distill`")}


def checkpoint_path(run_dir: str | Path) -> Path:
    """``RUN/checkpoint.pt`` for a run folder, the path itself for a file."""
    p = Path(run_dir)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` written atomically (a crash never leaves half a checkpoint)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_checkpoint_file(run_dir: str | Path, fmt: str | None = None, what: str | None = None) -> dict[str, Any]:
    """The checkpoint of a run folder (or .pt path) in format ``fmt`` (None: either), with a
    one-line UserError (prefixed ``what: ``) for anything else."""
    prefix = f"{what}: " if what else ""
    path = checkpoint_path(run_dir)
    writers = FORMATS[fmt][1] if fmt else " or ".join(w for _, w in FORMATS.values())
    if not path.is_file():
        raise UserError(f"{prefix}no checkpoint at {path} (expected a folder written by {writers})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint"
        raise UserError(f"{prefix}{path} is not a readable checkpoint ({type(exc).__name__})") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found not in FORMATS:
        raise UserError(f"{prefix}{path} is not a great-hmd checkpoint")
    if fmt is not None and found != fmt:
        (have, by), (want, want_by) = FORMATS[found], FORMATS[fmt]
        raise UserError(f"{prefix}{path} is a {have} checkpoint ({by}), not a {want} one ({want_by})")
    return ckpt


# --- classifiers ------------------------------------------------------------------------------

def save_classifier(out_dir: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write ``out_dir/checkpoint.pt`` in the classifier format (arch, config, weights, extra)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    save_checkpoint(path, {"format": CLASSIFIER_FORMAT, "task": "classify", "arch": model.name,
                           "net": model.cfg.to_dict(), "model": model.state_dict(), **extra})
    return path


def read_classifier_checkpoint(run_dir: str | Path, what: str = "model") -> dict[str, Any]:
    return check_classifier_checkpoint(read_checkpoint_file(run_dir, CLASSIFIER_FORMAT, what), run_dir, what)


def check_classifier_checkpoint(ckpt: dict[str, Any], run_dir: str | Path, what: str = "model") -> dict[str, Any]:
    """``ckpt`` (read from ``run_dir``) if it is a classifier of a registered architecture."""
    path = checkpoint_path(run_dir)
    if ckpt.get("format") != CLASSIFIER_FORMAT or ckpt.get("task") != "classify":
        raise UserError(f"{what}: {path} is not a great-hmd classifier checkpoint")
    if ckpt.get("arch") not in ARCHITECTURES:
        raise UserError(f"{what}: {path} has architecture {ckpt.get('arch')!r}, not one of "
                        f"{', '.join(ARCHITECTURES.names())}")
    return ckpt


def classifier_from_checkpoint(ckpt: dict[str, Any], what: str = "model") -> nn.Module:
    try:
        model = create_classifier(ckpt["arch"], NetConfig.from_dict(ckpt["net"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"{what}: checkpoint does not match its {ckpt.get('arch')!r} architecture: "
                        f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_classifier(run_dir: str | Path, what: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    ckpt = read_classifier_checkpoint(run_dir, what)
    return classifier_from_checkpoint(ckpt, what), ckpt
