"""``--watch DIR``: models dropped into a folder are offered for hot-swap.

A candidate is a sub-folder with ``manifest.json`` (and its ONNX file), or ``X.onnx`` with
``X.manifest.json`` beside it. It is offered once its files have stopped changing for one poll
(a copy in progress is not offered half-written), and offered again only if its files change
(e.g. a rejected partial copy that was then completed). What is there at start-up is ignored:
only new arrivals are offered. Polling, not inotify: portable and cheap at a 0.5 s period.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable


def _candidates(folder: Path) -> dict[str, tuple]:
    """path -> a fingerprint of its files (name, size, mtime), for every complete-looking candidate."""
    found: dict[str, tuple] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir():
                if not (path / "manifest.json").is_file() or not any(path.glob("*.onnx")):
                    continue
                files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            elif entry.name.endswith(".onnx") and path.with_suffix(".manifest.json").is_file():
                files = [path, path.with_suffix(".manifest.json")]
            else:
                continue
            found[str(path)] = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        except FileNotFoundError:  # removed while we looked
            continue
    return found


class FolderWatcher:
    def __init__(self, folder: str | os.PathLike, offer: Callable[[str], object], interval: float = 0.5):
        self.folder, self.offer, self.interval = Path(folder), offer, interval
        if not self.folder.is_dir():
            from shared.errors import UserError
            raise UserError(f"watch folder not found: {self.folder}")
        self._offered: dict[str, tuple] = _candidates(self.folder)  # present at start: ignored
        self._last_seen: dict[str, tuple] = dict(self._offered)
        self.offered_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> "FolderWatcher":
        self._thread.start()
        return self

    def poll(self) -> list[str]:
        """One scan; offers what is new and stable; returns the paths offered."""
        now = _candidates(self.folder)
        offered = []
        for path, fp in sorted(now.items()):
            stable = self._last_seen.get(path) == fp
            if stable and self._offered.get(path) != fp:
                self._offered[path] = fp
                self.offer(path)
                self.offered_count += 1
                offered.append(path)
        self._last_seen = now
        return offered

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except OSError:
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
