"""The on-device model store: one folder per version, a ``current`` pointer, the previous kept.

Layout::

    STORE/
      versions/<version>/model.onnx      the ONNX file, as verified
      versions/<version>/manifest.json   its manifest, unchanged (so its signature still verifies)
      current                            one line: the version in use (replaced atomically)
      previous                           one line: the version to roll back to
      cache/                             ONNX Runtime's optimised graphs, by model sha256
      rejected.json                      models rolled back or refused: never tried again

A version folder is written under a temporary name and renamed into place, so a reader sees
either no folder or a complete one. ``current`` is replaced with an atomic rename, so a crash
leaves the old or the new pointer, never a torn one. Old versions beyond ``keep`` are pruned,
never the current or previous one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from shared.atomic import atomic_write_json, atomic_write_text, fsync_dir
from shared.errors import UserError
from shared.manifest import Manifest

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_version_name(version: str) -> str:
    name = _SAFE.sub("_", version).strip(".")
    if not name:
        raise UserError(f"model version {version!r} is not usable as a folder name")
    return name


class ModelStore:
    def __init__(self, root: str | os.PathLike, keep: int = 4):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.cache_dir = self.root / "cache"
        self.keep = max(2, keep)
        self._lock = threading.Lock()
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------
    def _pointer(self, name: str) -> str | None:
        try:
            text = (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def current_version(self) -> str | None:
        return self._pointer("current")

    def previous_version(self) -> str | None:
        return self._pointer("previous")

    def folder(self, version: str) -> Path:
        return self.versions_dir / safe_version_name(version)

    def current_folder(self) -> Path | None:
        v = self.current_version()
        return self.folder(v) if v else None

    def versions(self) -> list[str]:
        folders = [p for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime_ns)]

    # -- writing ---------------------------------------------------------------------------
    def install(self, onnx_path: str | os.PathLike, manifest: Manifest) -> Path:
        """Copy a verified model into ``versions/<version>/`` (atomically); returns the folder."""
        dest = self.folder(manifest.version)
        with self._lock:
            if dest.is_dir():
                existing = Manifest.load(dest / "manifest.json")
                if existing.sha256 == manifest.sha256:
                    return dest
                raise UserError(f"model version {manifest.version} is already in the store with different content")
            tmp = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=f".{dest.name}."))
            try:
                shutil.copyfile(onnx_path, tmp / "model.onnx")
                with open(tmp / "model.onnx", "rb") as fh:
                    os.fsync(fh.fileno())
                # the manifest is kept as signed (onnx_file too): the folder's model is model.onnx
                manifest.save(tmp / "manifest.json")
                os.replace(tmp, dest)
                fsync_dir(self.versions_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dest

    def set_current(self, version: str) -> None:
        """Point ``current`` at ``version``; the old current becomes ``previous``."""
        if not self.folder(version).is_dir():
            raise UserError(f"model version {version} is not in the store")
        with self._lock:
            old = self.current_version()
            if old and old != version:
                atomic_write_text(self.root / "previous", old + "\n")
            atomic_write_text(self.root / "current", version + "\n")
            self._prune()

    def rollback(self) -> str | None:
        """Point ``current`` back at ``previous``; returns the version now current (or None)."""
        with self._lock:
            prev, cur = self.previous_version(), self.current_version()
            if not prev or not self.folder(prev).is_dir():
                return None
            atomic_write_text(self.root / "current", prev + "\n")
            if cur:
                atomic_write_text(self.root / "previous", cur + "\n")
            return prev

    # -- models never to try again -----------------------------------------------------------
    def rejected(self) -> dict[str, dict]:
        """sha256 -> {"version", "reason"} of models rolled back or refused (survives a restart)."""
        try:
            data = json.loads((self.root / "rejected.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def mark_rejected(self, sha256: str, version: str | None, reason: str) -> None:
        with self._lock:
            data = self.rejected()
            data[sha256] = {"version": version, "reason": reason[:300]}
            atomic_write_json(self.root / "rejected.json", data)

    def _prune(self) -> None:
        protected = {self.current_version(), self.previous_version()}
        names = self.versions()
        excess = len(names) - self.keep
        for name in names:
            if excess <= 0:
                break
            if name not in protected:
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)
                excess -= 1
