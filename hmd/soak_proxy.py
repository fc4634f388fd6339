"""A TCP proxy for the fault soak that cuts connections at random points.

The headsets of ``hmd bench soak`` talk to the server through it. Each accepted connection is,
with probability ``cut_fraction``, marked to be aborted once a random number of bytes has passed
in one direction: upstream (the request body is cut mid-upload: the server must throw the partial
upload away) or downstream (the response is cut, usually after the server committed the upload:
the headset must retry and the server must answer the repeat as a duplicate, storing nothing
twice). The abort resets both sockets, as a dropped Wi-Fi link would look to either side. The
headsets keep connections alive, so the cut point is drawn over a connection's life: within its
first MiB of requests (about 20 uploads of the soak's frames) or 16 KiB of responses.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import threading

_READ = 64 * 1024


@dataclasses.dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0  # the server was down (being restarted): the client's connection is closed
    cut_upstream: int = 0  # aborted while forwarding the request
    cut_downstream: int = 0  # aborted while forwarding the response

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class FlakyProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``; cut some connections part-way."""

    def __init__(self, target_port: int, *, cut_fraction: float = 0.5, upstream_cut_bytes: int = 1 << 20,
                 downstream_cut_bytes: int | None = None, seed: int = 0):
        if not 0.0 <= cut_fraction <= 1.0:
            raise ValueError("cut_fraction must be between 0 and 1")
        self.target_port = target_port
        self.cut_fraction = cut_fraction
        self.upstream_cut_bytes = upstream_cut_bytes
        self.downstream_cut_bytes = downstream_cut_bytes or max(1, upstream_cut_bytes // 64)
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Future] = set()  # strong references: asyncio keeps only weak ones

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FlakyProxy":
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            while tasks := asyncio.all_tasks(self._loop):  # connections still open: close them
                for task in tasks:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=main, name="soak-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(60)

    def _plan(self) -> tuple[str | None, int]:
        """(direction to cut or None, after how many bytes)."""
        if self.rng.random() >= self.cut_fraction:
            return None, 0
        if self.rng.random() < 0.5:
            return "up", self.rng.randrange(self.upstream_cut_bytes)
        return "down", self.rng.randrange(self.downstream_cut_bytes)

    def _keep(self, task: asyncio.Future) -> asyncio.Future:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._keep(asyncio.current_task())
        self.stats.connections += 1
        direction, at = self._plan()
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self.stats.refused += 1
            client_w.transport.abort()
            return
        cut = asyncio.Event()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
            sent = 0
            try:
                while not cut.is_set():
                    data = await reader.read(_READ)
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    if direction == name and sent + len(data) > at:
                        writer.write(data[:at - sent])
                        await writer.drain()
                        if name == "up":
                            self.stats.cut_upstream += 1
                        else:
                            self.stats.cut_downstream += 1
                        cut.set()
                        return
                    writer.write(data)
                    sent += len(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                cut.set()

        up = self._keep(asyncio.ensure_future(pipe(client_r, server_w, "up")))
        down = self._keep(asyncio.ensure_future(pipe(server_r, client_w, "down")))
        waiter = self._keep(asyncio.ensure_future(cut.wait()))
        pending = {up, down, waiter}
        try:
            while not cut.is_set() and not (up.done() and down.done()):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:  # no await here: the proxy's loop may be closing this coroutine
            for task in pending:
                task.cancel()
        if cut.is_set():
            client_w.transport.abort()
            server_w.transport.abort()
        else:
            client_w.close()
            server_w.close()
