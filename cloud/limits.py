"""Per-device limits on concurrent work (uploads being received, open event streams).

In-process counters: the embedded deployment is one process. With several API processes the
same two methods would sit on the shared database or a cache.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class PerDeviceSlots:
    """At most ``limit`` concurrent holders per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[int, int] = {}

    def try_enter(self, device_id: int, limit: int) -> bool:
        with self._lock:
            n = self._count.get(device_id, 0)
            if n >= limit:
                return False
            self._count[device_id] = n + 1
            return True

    def leave(self, device_id: int) -> None:
        with self._lock:
            n = self._count.get(device_id, 0) - 1
            if n > 0:
                self._count[device_id] = n
            else:
                self._count.pop(device_id, None)

    def held(self, device_id: int) -> int:
        with self._lock:
            return self._count.get(device_id, 0)

    @contextlib.contextmanager
    def hold(self, device_id: int) -> Iterator[None]:
        try:
            yield
        finally:
            self.leave(device_id)
