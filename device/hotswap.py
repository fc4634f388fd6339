"""Hot-swapping models without losing a frame, and rolling back a bad one.

``offer(path)`` returns at once; a background thread verifies the candidate (sha256, optional
signature, declared inputs/outputs, finite outputs on a probe frame: :func:`device.engine.load_model`),
builds and warms its session while the old one keeps serving, and installs it in the model
store. The frame loop calls :meth:`ModelManager.between_frames` before each frame, which swaps
the reference when a warmed candidate is waiting: a swap costs one attribute assignment, never
a frame. If the new model then raises or produces NaN/inf, the loop calls
:meth:`ModelManager.report_failure`, which rolls back to the previous session (still loaded)
and the loop reruns that same frame on it, so the failure costs no frame either.

A rolled-back model is remembered in the model store (``rejected.json``), so it is not tried
again after a restart. A model whose signed sequence is older than the running one's is refused
unless the offer says ``allow_older=True`` (the user's explicit rollback).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from typing import Callable

from device.engine import InferenceEngine, load_model
from device.store import ModelStore
from shared.errors import UserError


@dataclasses.dataclass
class SwapEvent:
    kind: str  # "offered" | "rejected" | "ready" | "swapped" | "rolled_back" | "ignored"
    version: str | None
    reason: str = ""
    frame: int | None = None  # frames shown before it happened (swaps and rollbacks)
    t: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


class SwapTicket:
    """The outcome of one offer: ``wait()`` until it is verified (or rejected), ``swapped()`` until live."""

    def __init__(self, path: str):
        self.path = path
        self.version: str | None = None
        self.error: str | None = None
        self._verified = threading.Event()
        self._live = threading.Event()

    @property
    def accepted(self) -> bool:
        return self._verified.is_set() and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        """True once verification finished (accepted or not)."""
        return self._verified.wait(timeout)

    def wait_live(self, timeout: float | None = None) -> bool:
        """True once the model serves frames (False if rejected or timed out)."""
        self._verified.wait(timeout)
        return self.error is None and self._live.wait(timeout)


class ModelManager:
    """Owns the active inference session, the previous one (for rollback) and pending candidates."""

    def __init__(self, active: InferenceEngine, *, store: ModelStore | None = None,
                 public_key: bytes | None = None, threads: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.active = active
        self.previous: InferenceEngine | None = None
        self.store, self.public_key, self.threads = store, public_key, threads
        self.events: list[SwapEvent] = []
        self.versions_used: list[str] = [active.version]
        self.frames_shown = 0
        self._log = log or (lambda msg: print(f"hmd device: {msg}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._pending: tuple[InferenceEngine, SwapTicket] | None = None
        self._bad_sha: set[str] = set(store.rejected()) if store is not None else set()
        self._closed = False
        self._queue: queue.Queue[tuple[str, str | None, SwapTicket, bool] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="model-loader", daemon=True)
        self._worker.start()

    # -- any thread --------------------------------------------------------------------------
    def offer(self, path: str | os.PathLike, manifest_path: str | os.PathLike | None = None, *,
              allow_older: bool = False) -> SwapTicket:
        """Hand over a candidate (an ONNX file with its manifest beside it, or a model folder).
        ``allow_older``: the user rolls back on purpose (an older signed sequence is accepted)."""
        ticket = SwapTicket(str(path))
        if self._closed:
            ticket.error = "the runtime has stopped"
            ticket._verified.set()
            return ticket
        self._queue.put((str(path), str(manifest_path) if manifest_path else None, ticket, allow_older))
        return ticket

    def is_bad(self, sha256: str) -> bool:
        """The model with this ONNX sha256 was rolled back (now or in an earlier run)."""
        return sha256 in self._bad_sha

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _event(self, event: SwapEvent) -> None:
        with self._lock:
            self.events.append(event)
        if event.kind in ("rejected", "swapped", "rolled_back"):
            self._log(f"model {event.version or '?'} {event.kind.replace('_', ' ')}"
                      + (f": {event.reason}" if event.reason else ""))

    # -- the loader thread -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, manifest_path, ticket, allow_older = item
            self._event(SwapEvent("offered", None, path))
            try:
                engine = load_model(path, manifest_path=manifest_path, public_key=self.public_key,
                                    threads=self.threads,
                                    cache_dir=self.store.cache_dir if self.store else None)
                sha = engine.manifest.sha256
                if sha in self._bad_sha:
                    raise UserError(f"model {engine.version} was rolled back before; not trying it again")
                running = self.active.manifest.sequence
                new = engine.manifest.sequence
                if running is not None and not allow_older and (new is None or new < running):
                    raise UserError(f"model {engine.version} (sequence {new}) is older than the running "
                                    f"{self.active.version} (sequence {running}); a downgrade needs an explicit "
                                    "rollback")
                if sha == self.active.manifest.sha256:
                    ticket.version, ticket.error = engine.version, "already serving"
                    self._event(SwapEvent("ignored", engine.version, "already serving"))
                    ticket._verified.set()
                    continue
                if self.store is not None:
                    folder = self.store.install(engine.onnx_path, engine.manifest)
                    engine.onnx_path = folder / "model.onnx"
            except UserError as exc:
                ticket.error = str(exc)
                self._event(SwapEvent("rejected", ticket.version, str(exc)))
                ticket._verified.set()
                continue
            except Exception as exc:  # never let the loader die: the old model keeps serving
                ticket.error = f"{type(exc).__name__}: {exc}"
                self._event(SwapEvent("rejected", None, ticket.error))
                ticket._verified.set()
                continue
            ticket.version = engine.version
            with self._lock:
                old = self._pending
                self._pending = (engine, ticket)
            if old is not None:  # a newer candidate supersedes one not swapped in yet
                old[1].error = f"superseded by {engine.version}"
                self._event(SwapEvent("ignored", old[0].version, old[1].error))
            self._event(SwapEvent("ready", engine.version, f"loaded in {engine.load_ms:.0f} ms"))
            ticket._verified.set()

    # -- the frame loop's thread -------------------------------------------------------------
    @property
    def candidate_ready(self) -> bool:
        """A verified, warmed candidate waits for :meth:`between_frames` (a cheap read, no lock)."""
        return self._pending is not None

    def between_frames(self) -> InferenceEngine:
        """Swap in a waiting candidate (cheap when there is none); returns the engine to use."""
        if self._pending is not None:
            with self._lock:
                engine, ticket = self._pending
                self._pending = None
            self.previous, self.active = self.active, engine
            if engine.version not in self.versions_used:
                self.versions_used.append(engine.version)
            if self.store is not None:
                try:
                    self.store.set_current(engine.version)
                except (UserError, OSError) as exc:
                    self._log(f"model store: could not update the current pointer: {exc}")
            self._event(SwapEvent("swapped", engine.version, f"from {self.previous.version}",
                                  frame=self.frames_shown))
            ticket._live.set()
        return self.active

    def report_failure(self, engine: InferenceEngine, reason: str) -> InferenceEngine | None:
        """The active model failed on a frame: roll back if possible; returns the engine to retry
        the same frame with, or None (no rollback possible: the frame is shown without overlay)."""
        if engine is not self.active or self.previous is None:
            return None
        bad, self.active, self.previous = self.active, self.previous, None
        self._bad_sha.add(bad.manifest.sha256)
        if self.store is not None:
            try:
                self.store.mark_rejected(bad.manifest.sha256, bad.version, f"rolled back: {reason}")
                self.store.rollback()
            except (UserError, OSError) as exc:
                self._log(f"model store: rollback of the current pointer failed: {exc}")
        self._event(SwapEvent("rolled_back", bad.version, f"{reason}; back to {self.active.version}",
                              frame=self.frames_shown))
        return self.active

    def summary(self) -> dict:
        with self._lock:
            events = [e.to_dict() for e in self.events if e.kind != "offered"]
        return {"active": self.active.version, "previous": self.previous.version if self.previous else None,
                "versions_used": list(self.versions_used), "events": events}

