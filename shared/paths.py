"""Paths recorded in run folders and commands, resolved on this machine."""
from __future__ import annotations

from pathlib import Path


from shared.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding the packages
ASSETS = REPO_ROOT / "hmd" / "assets"  # shipped models and photos (package data of hmd)
SHIPPED = {"base": ASSETS / "base", "base-studio": ASSETS / "base-studio", "teacher": ASSETS / "teacher",
           "room": ASSETS / "room",  # room: the room task set's model (depth, normals, layout)
           "room-teacher": ASSETS / "room-teacher"}  # the cloud's larger room teacher (labels wearer frames)


def shipped_names() -> list[str]:
    return [n for n, p in SHIPPED.items() if p.is_dir()]


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped model's name (``base``, ``base-studio``, ``teacher``) -> its folder; an existing path
    -> itself; anything else -> one clear error. Every command that takes a run folder or a model
    file accepts a shipped name too."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if p.exists():
        return p
    if text in SHIPPED and SHIPPED[text].is_dir():
        return SHIPPED[text]
    raise UserError(f"{text!r} is neither a file or folder nor a shipped model "
                    f"(shipped: {', '.join(shipped_names()) or 'none'})")


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
