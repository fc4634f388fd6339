"""Paths recorded in run folders and commands, resolved on this machine."""
from __future__ import annotations

from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding the packages


def resolve_source(spec: str) -> str:
    """A data source whose path is relative to the repository (as recorded in shipped checkpoints)
    works from any folder: ``walk:``/``images:``/``video:`` paths that do not exist relative to the
    current folder are looked up relative to the repository root."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("walk", "images", "video") or not rest:
        return spec
    path, n = rest, ""
    if kind == "walk":
        head, s2, tail = rest.rpartition(":")
        if s2 and tail.isdigit():
            path, n = head, f":{tail}"
    if Path(path).expanduser().exists() or Path(path).is_absolute():
        return spec
    alt = REPO_ROOT / path
    return f"{kind}:{alt}{n}" if alt.exists() else spec
