"""The push channel: per-device subscribers of server-sent events.

:class:`EventBroker` fans an event out to every open ``/v1/events`` stream of one device. It is
in-process (the embedded single-process deployment). With several API and worker processes
(a PostgreSQL database) it is given a ``relay``: ``publish`` then sends the event through the
database (NOTIFY, :mod:`cloud.postgres`), and each API process's listener hands it to its own
broker's :meth:`EventBroker.deliver`. Events are not stored: a stream starts with the device's
current model, so a device that was offline catches up on reconnect.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, Callable


class EventBroker:
    def __init__(self, relay: Callable[[int, str, dict[str, Any]], None] | None = None) -> None:
        self.relay = relay
        self._lock = threading.Lock()
        self._subscribers: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._ids = itertools.count(1)
        self.closed = False

    def subscribe(self, device_id: int) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=64)
        with self._lock:
            self._subscribers.setdefault(device_id, set()).add((asyncio.get_running_loop(), q))
        return q

    def unsubscribe(self, device_id: int, q: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subscribers.get(device_id, set())
            for item in [s for s in subs if s[1] is q]:
                subs.discard(item)

    def subscriber_count(self, device_id: int) -> int:
        with self._lock:
            return len(self._subscribers.get(device_id, ()))

    def publish(self, device_id: int, event: str, data: dict[str, Any]) -> int:
        """Thread-safe (the worker thread calls it); returns how many local streams it was sent to
        (0 with a relay: every process's listener delivers it)."""
        if self.relay is not None:
            self.relay(device_id, event, data)
            return 0
        return self.deliver(device_id, event, data)

    def deliver(self, device_id: int, event: str, data: dict[str, Any]) -> int:
        """Hand an event to this process's streams of the device."""
        item = (next(self._ids), event, data)
        with self._lock:
            subs = list(self._subscribers.get(device_id, ()))
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(_put, q, item)
            except RuntimeError:  # that stream's loop is gone
                pass
        return len(subs)

    def close(self) -> None:
        """End every open stream (shutdown)."""
        self.closed = True
        with self._lock:
            subs = [s for group in self._subscribers.values() for s in group]
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(_put, q, None)
            except RuntimeError:
                pass


def _put(q: asyncio.Queue, item: Any) -> None:
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:  # a stalled client: it gets the current model when it reconnects
        pass
