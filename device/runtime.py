"""The headset's frame loop, and the programmatic API others call (the CLI, the demo, sync).

    rt = HeadsetRuntime("synthetic:forest", "model.onnx", RuntimeConfig(max_frames=300, headless=True))
    ticket = rt.offer_model("new_model_folder/")   # from any thread: verified and warmed in the background
    summary = rt.run()                             # blocks; returns the summary dict

One frame: take the newest camera frame -> preprocess -> ONNX Runtime -> overlay + HUD ->
window / recording -> (journal). Two loops: the sequential one runs each frame start to end on one
thread; the pipelined one (``RuntimeConfig(pipelined=True)``, ``--pipelined``) overlaps consecutive
frames: an inference thread preprocesses and infers frame N+1 while the calling thread draws and
outputs frame N (:meth:`HeadsetRuntime._run_pipelined`). By default (``pipelined=None``) the loop is
chosen by measurement: the first AUTO_PROBE_FRAMES frames run sequentially, then the run goes on
pipelined when the model's inference dominates the frame (see :meth:`HeadsetRuntime._auto_loop`).
Models are swapped only between frames (see device.hotswap), at the same frame in both loops.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from device import overlay
from device.capture import CaptureThread, Frame, FrameSource, open_source
from device.engine import InferenceEngine, Prediction, load_model
from device.health import HealthMeter
from device.hotswap import ModelManager, SwapTicket
from device.journal import Journal, JournalSampler
from device.metrics import StageTimer, peak_rss_mb
from device.output import Recorder, Window, display_available
from device.store import ModelStore
from device.watch import FolderWatcher
from shared.atomic import atomic_write_bytes, atomic_write_json
from shared.errors import UserError


@dataclasses.dataclass
class RuntimeConfig:
    mode: str = "edges"  # one of overlay.MODES
    hud: bool = True
    headless: bool | None = None  # None: a window when a display is there
    record: str | None = None  # OUT.mp4
    max_frames: int | None = None
    duration: float | None = None  # seconds
    lockstep: bool = False  # the capture thread waits for the loop: no frame dropped (offline runs)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: device.engine.default_threads)
    metrics_path: str | None = None
    store_dir: str | None = None  # a model store: accepted models are installed, `current` follows swaps
    watch_dir: str | None = None
    watch_interval: float = 0.5
    public_key: bytes | None = None  # trusted Ed25519 key: when set, every model must be signed by it
    journal_dir: str | None = None
    journal_mb: float = 64.0
    journal_every: int = 30
    journal_scene_threshold: float = 0.12
    journal_queue: int = 16
    frame_timeout: float = 10.0  # no frame for this long ends the run (a stalled source)
    snapshot_path: str | None = None  # PNG of the last frame shown (HUD included), written at the end
    # True (--pipelined): drawing frame N overlaps inferring frame N+1 on a second thread; False
    # (--sequential): one thread; None (the default): chosen after AUTO_PROBE_FRAMES frames (below)
    pipelined: bool | None = None


HUD_REFRESH_FRAMES = 10  # the HUD's FPS and latency figures are refreshed every this many frames
# Why the loop is chosen by measurement: pipelining hides the drawing (~1 ms at 320x240) behind
# inference, which runs without the GIL; but preprocess, interpret and the drawing are Python holding
# the GIL, the two threads take turns with it, and the hand-off costs a thread switch a frame. With a
# model whose inference is about as cheap as the drawing (the first room model: ~1 ms), `hmd bench
# device` (2 shared cores) measured pipelined/sequential FPS 0.55-0.63 at load 2-8; with one whose
# inference is 4-5x the drawing (the 160x120 room model), 1.14 (README, "The headset"). So: probe
# sequentially, then pipeline when inference is at least AUTO_INFERENCE_SHARE x the rest of the frame
# and there are two cores to overlap on.
AUTO_PROBE_FRAMES = 30
AUTO_INFERENCE_SHARE = 2.0


@dataclasses.dataclass
class _Inferred:
    """A frame with its prediction and the timings so far, on its way to be shown."""

    frame: Frame
    pred: Prediction | None
    wait_ms: float
    pre_ms: float
    inf_ms: float
    t_got: float  # perf_counter when the loop took the frame from the capture thread
    t_inferred: float
    swaps: int = 0  # the runtime's swap count when it was inferred (pipelined loop)
    t_handed: float | None = None  # when the drawing thread took it (pipelined loop)


@dataclasses.dataclass
class _StageEnd:
    """The inference thread ended: the source ended or stalled (``reason``), or it failed (``error``)."""

    reason: str
    error: BaseException | None = None


class HeadsetRuntime:
    def __init__(self, source: FrameSource | str, model: str | os.PathLike | InferenceEngine | None = None,
                 config: RuntimeConfig | None = None, *,
                 on_frame: Callable[[int, np.ndarray, Prediction | None], None] | None = None,
                 on_start: Callable[["HeadsetRuntime"], None] | None = None):
        self.config = cfg = config or RuntimeConfig()
        if cfg.mode not in overlay.MODES:
            raise UserError(f"unknown overlay mode {cfg.mode!r} (choose from {', '.join(overlay.MODES)})")
        self.store = ModelStore(cfg.store_dir) if cfg.store_dir else None
        if model is None:
            folder = self.store.current_folder() if self.store else None
            if folder is None:
                raise UserError("no model: give --model FILE.onnx (or a --store with a current version)")
            model = folder
        if isinstance(model, InferenceEngine):
            engine = model
        else:
            engine = load_model(model, public_key=cfg.public_key, threads=cfg.threads,
                                cache_dir=self.store.cache_dir if self.store else None)
        if self.store is not None:
            folder = self.store.install(engine.onnx_path, engine.manifest)
            self.store.set_current(engine.version)
            engine.onnx_path = folder / "model.onnx"
        self.models = ModelManager(engine, store=self.store, public_key=cfg.public_key, threads=cfg.threads)
        # the source last: a bad model must not leave a camera open
        self.source = open_source(source) if isinstance(source, str) else source
        self.mode = cfg.mode
        self.hud = cfg.hud
        self.on_frame = on_frame
        self.on_start = on_start  # called once the display is decided, just before the first frame
        self.display = "not started"  # "window" or "headless"
        self.headless_reason: str | None = None  # why there is no window
        self.timer = StageTimer()
        self.frames_shown = 0
        self.inference_errors = 0
        self.frames_without_overlay = 0
        self.health = HealthMeter()  # per-version counts the sync client reports (POST /v1/health)
        self._stop = threading.Event()
        # the pipelined loop: the inference thread and a swap on the drawing thread take turns with the
        # model manager under this lock; _swaps counts swaps, so a frame run on an older model is known
        self._engine_lock = threading.Lock()
        self._swaps = 0
        self._hud: overlay.HudInfo | None = None
        self._hud_frame = 0
        self._shown: np.ndarray | None = None
        self._outputs: tuple = (None, None, None)
        self.loop = "not started"  # "pipelined" or "sequential": the loop most frames ran through
        self.loop_choice: dict | None = None  # how the loop was chosen (the summary's "loop_choice")
        self.exit_reason = "not started"
        self.journal: Journal | None = None
        self.watcher: FolderWatcher | None = None
        self.summary: dict | None = None

    # -- API for other threads ---------------------------------------------------------------
    def offer_model(self, path: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> SwapTicket:
        """Offer a new model (ONNX file with its manifest beside it, or a model folder) for hot-swap."""
        return self.models.offer(path, manifest_path)

    def stop(self) -> None:
        self._stop.set()

    def set_mode(self, mode: str) -> None:
        if mode not in overlay.MODES:
            raise ValueError(mode)
        self.mode = mode

    @property
    def shown_mode(self) -> str:
        """The mode drawn: the requested one if the running model has it, else its task set's first."""
        return overlay.mode_for(self.mode, self.models.active.task_set)

    @property
    def model_version(self) -> str:
        return self.models.active.version

    # -- the frame loop ----------------------------------------------------------------------
    def _predict(self, image: np.ndarray) -> tuple[Prediction | None, float, float]:
        engine = self.models.active
        for _ in range(2):  # a failing new model is rolled back and the same frame rerun on the old
            t0 = time.perf_counter()
            try:
                x = engine.preprocess(image)
                t1 = time.perf_counter()
                outs = engine.infer(x)
                t2 = time.perf_counter()
                return engine.interpret(outs), (t1 - t0) * 1000, (t2 - t1) * 1000
            except Exception as exc:
                self.inference_errors += 1
                self.health.inference_error(engine.version)
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                retry = self.models.report_failure(engine, reason)
                if retry is None:
                    break
                self.health.rollback(engine.version)
                engine = retry
        return None, 0.0, 0.0

    def _handle_key(self, key: int) -> None:
        if key in (ord("q"), 27):
            self.exit_reason = "quit key"
            self._stop.set()
        elif overlay.mode_key(key, self.models.active.task_set) is not None:
            self.mode = overlay.mode_key(key, self.models.active.task_set)
        elif key == ord("m"):
            modes = overlay.modes_for(self.models.active.task_set)
            self.mode = modes[(modes.index(self.shown_mode) + 1) % len(modes)]
        elif key == ord("h"):
            self.hud = not self.hud

    def run(self) -> dict:
        """Run until --max-frames, --duration, the source's end, a quit key or :meth:`stop`; returns the summary."""
        cfg = self.config
        window = None
        if cfg.headless:
            self.headless_reason = "--headless"
        elif cfg.headless is None and not display_available():
            self.headless_reason = "no display: DISPLAY and WAYLAND_DISPLAY are not set"
        else:
            try:
                window = Window()
            except Exception as exc:  # no usable GUI backend: carry on headless, and say so
                self.headless_reason = f"no window: {str(exc).splitlines()[0][:120]}"
        self.display = "window" if window is not None else "headless"
        recorder = Recorder(cfg.record, self.source.fps) if cfg.record else None
        sampler = None
        if cfg.journal_dir:
            self.journal = Journal(cfg.journal_dir, max_bytes=int(cfg.journal_mb * 1024 * 1024),
                                   queue_size=cfg.journal_queue).start()
            sampler = JournalSampler(cfg.journal_every, cfg.journal_scene_threshold)
        if cfg.watch_dir:
            self.watcher = FolderWatcher(cfg.watch_dir, self.offer_model, cfg.watch_interval).start()
        if cfg.pipelined is None:
            self.loop = "sequential"  # until the probe decides
            self.loop_choice = {"by": "auto", "probe_frames": AUTO_PROBE_FRAMES}
        else:
            self.loop = "pipelined" if cfg.pipelined else "sequential"
            self.loop_choice = {"by": "--pipelined" if cfg.pipelined else "--sequential"}
        if self.on_start is not None:
            self.on_start(self)
        capture = CaptureThread(self.source, lockstep=cfg.lockstep).start()
        self.exit_reason = "stopped"
        self._shown = None
        self._outputs = (window, recorder, sampler)
        t_start = time.perf_counter()
        try:
            if self.loop == "pipelined":
                self._run_pipelined(capture, t_start)
            elif cfg.pipelined is None:  # auto: probe, then go on through the loop that suits the model
                if self._run_sequential(capture, t_start, until=AUTO_PROBE_FRAMES):
                    self.loop, why = self._auto_loop()
                    self.loop_choice.update(loop=self.loop, reason=why)
                    (self._run_pipelined if self.loop == "pipelined" else self._run_sequential)(capture, t_start)
            else:
                self._run_sequential(capture, t_start)
        except KeyboardInterrupt:
            self.exit_reason = "interrupted"
        finally:
            elapsed = time.perf_counter() - t_start
            capture.stop()
            if self.watcher is not None:
                self.watcher.stop()
            if recorder is not None:
                recorder.close()
            if window is not None:
                window.close()
            if self.journal is not None:
                self.journal.close()
            self.models.close()
            self.health.flush()  # a failed inference whose frame was never shown still counts
        self.summary = self._summary(capture, elapsed, window is not None, recorder)
        shown = self._shown
        if cfg.snapshot_path and shown is not None:
            ok, png = cv2.imencode(".png", shown)
            if ok:
                atomic_write_bytes(cfg.snapshot_path, png.tobytes())
                self.summary["snapshot"] = str(cfg.snapshot_path)
        if cfg.metrics_path:
            atomic_write_json(cfg.metrics_path, self.summary)
        return self.summary

    def _limit_reached(self, t_start: float) -> bool:
        """--max-frames or --duration reached (exit_reason set), checked before each frame."""
        cfg = self.config
        if cfg.max_frames is not None and self.frames_shown >= cfg.max_frames:
            self.exit_reason = "max frames"
            return True
        if cfg.duration is not None and time.perf_counter() - t_start >= cfg.duration:
            self.exit_reason = "duration"
            return True
        return False

    def _frames(self, capture: CaptureThread):
        """A frame taker: ``take()`` -> (frame, ms waited for it, when it came); the frame is None when
        none came yet (ask again), or a string when the run ends, for that reason."""
        cfg = self.config
        since: list[float | None] = [None]  # from the first ask for this frame

        def take() -> tuple[Frame | str | None, float, float]:
            now = time.perf_counter()
            if since[0] is None:
                since[0] = now
            frame = capture.get(timeout=0.2)
            if frame is None:
                if capture.ended:
                    return f"source ended ({capture.end_reason})", 0.0, now
                if time.perf_counter() - since[0] > cfg.frame_timeout:
                    return f"no frame from the source for {cfg.frame_timeout:g} s", 0.0, now
                return None, 0.0, now
            got = time.perf_counter()
            wait_ms, since[0] = (got - since[0]) * 1000, None
            return frame, wait_ms, got
        return take

    def _auto_loop(self) -> tuple[str, str]:
        """The loop for the rest of the run, from the probe's medians: pipelined when inference takes
        at least AUTO_INFERENCE_SHARE x the rest of the frame (preprocess, overlay, output) and the
        machine has two cores, else sequential; and why."""
        t = self.timer
        inf = t.median("inference", AUTO_PROBE_FRAMES)
        rest = sum(t.median(s, AUTO_PROBE_FRAMES) or 0.0 for s in ("preprocess", "overlay", "output"))
        cores = os.cpu_count() or 1
        if inf is None:
            return "sequential", "no inference measured"
        figures = f"inference p50 {inf:.2f} ms, preprocess+overlay+output {rest:.2f} ms"
        if cores < 2:
            return "sequential", f"one CPU core ({figures})"
        if inf <= 0:  # a failed inference is timed as 0: nothing to overlap
            return "sequential", f"{figures}: the model failed on most probe frames"
        if inf >= AUTO_INFERENCE_SHARE * rest:
            return "pipelined", f"{figures}: inference >= {AUTO_INFERENCE_SHARE:g}x the rest"
        return "sequential", f"{figures}: inference < {AUTO_INFERENCE_SHARE:g}x the rest"

    def _run_sequential(self, capture: CaptureThread, t_start: float, until: int | None = None) -> bool:
        """One thread takes a frame, infers, draws and outputs it, then the next. With ``until``, it
        returns True once that many frames are shown and the run should go on (the auto probe)."""
        take = self._frames(capture)
        while not self._stop.is_set() and not self._limit_reached(t_start):
            if until is not None and self.frames_shown >= until:
                return True
            self.models.between_frames()
            frame, wait_ms, t1 = take()
            if isinstance(frame, str):
                self.exit_reason = frame
                return False
            if frame is None:
                continue
            pred, pre_ms, inf_ms = self._predict(frame.image)
            self._show(_Inferred(frame, pred, wait_ms, pre_ms, inf_ms, t1, time.perf_counter()))
            self.models.frames_shown = self.frames_shown
        return False

    # -- the pipelined loop ------------------------------------------------------------------
    def _run_pipelined(self, capture: CaptureThread, t_start: float) -> None:
        """``--pipelined``: an inference thread takes frame N+1, preprocesses and infers it while
        this thread draws and outputs frame N (ONNX Runtime and OpenCV release the GIL, so the two
        overlap). The hand-off holds one frame: frames stay in order and, with ``lockstep``, none is
        dropped. The window, its keys, the recorder, the journal and ``on_frame`` stay on the calling
        thread (a GUI toolkit wants one thread; Ctrl+C arrives on the main one).

        Models are swapped here, between two shown frames, as the sequential loop does; a frame the
        inference thread had already run on the old model is run again on the new one (at most the
        frame in the hand-off and the one in flight, once per swap), so the switch falls exactly
        where it would without the pipeline. A rollback happens on the inference thread, on the
        failing frame, as before. An exception on either thread ends the run and is raised here."""
        handoff: queue.Queue[_Inferred | _StageEnd] = queue.Queue(maxsize=1)
        halt = threading.Event()
        worker = threading.Thread(target=self._inference_stage, args=(capture, handoff, halt),
                                  name="inference", daemon=True)
        worker.start()
        try:
            while not self._stop.is_set() and not self._limit_reached(t_start):
                try:
                    item = handoff.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, _StageEnd):
                    if item.error is not None:
                        raise item.error
                    self.exit_reason = item.reason
                    return
                if self.models.candidate_ready or item.swaps != self._swaps:
                    item = self._swap_between_frames(item)
                item.t_handed = time.perf_counter()
                self._show(item)
        finally:
            halt.set()
            while worker.is_alive():  # a full hand-off must not keep the inference thread waiting
                try:
                    handoff.get_nowait()
                except queue.Empty:
                    pass
                worker.join(timeout=0.05)

    def _inference_stage(self, capture: CaptureThread, handoff: queue.Queue, halt: threading.Event) -> None:
        """The inference thread: frame -> preprocess -> ONNX Runtime -> interpret -> hand-off."""
        cfg = self.config
        inferred = self.frames_shown  # frames already shown (an auto run switching loops after its probe)
        take = self._frames(capture)

        def put(item) -> bool:
            while not halt.is_set():
                try:
                    handoff.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not halt.is_set() and not self._stop.is_set():
                if cfg.max_frames is not None and inferred >= cfg.max_frames:
                    return  # the drawing side ends the run once it has shown them
                frame, wait_ms, t1 = take()
                if isinstance(frame, str):
                    put(_StageEnd(frame))
                    return
                if frame is None:
                    continue
                with self._engine_lock:
                    swaps = self._swaps
                    self.models.frames_shown = inferred  # a rollback's frame number: frames before this one
                    pred, pre_ms, inf_ms = self._predict(frame.image)
                inferred += 1
                if not put(_Inferred(frame, pred, wait_ms, pre_ms, inf_ms, t1, time.perf_counter(), swaps)):
                    return
        except BaseException as exc:  # surfaces on the drawing thread, which ends the run with it
            put(_StageEnd("inference thread failed", exc))

    def _swap_between_frames(self, item: "_Inferred") -> "_Inferred":
        """Swap in a ready candidate before ``item`` is shown; rerun ``item`` if an older model ran it."""
        with self._engine_lock:
            self.models.frames_shown = self.frames_shown
            before = self.models.active
            if self.models.between_frames() is not before:
                self._swaps += 1
            if item.swaps != self._swaps:
                t1 = time.perf_counter()
                pred, pre_ms, inf_ms = self._predict(item.frame.image)
                item = dataclasses.replace(item, pred=pred, pre_ms=pre_ms, inf_ms=inf_ms, t_got=t1,
                                           t_inferred=time.perf_counter(), swaps=self._swaps)
        return item

    # -- one frame shown (both loops) --------------------------------------------------------
    def _hud_info(self, version: str, mode: str, note: str) -> overlay.HudInfo:
        """The HUD's figures, refreshed every HUD_REFRESH_FRAMES frames (or when the version, mode or
        note changes): the band is then redrawn once per refresh, not once per frame."""
        hud = self._hud
        if (hud is None or self.frames_shown - self._hud_frame >= HUD_REFRESH_FRAMES
                or (hud.version, hud.mode, hud.note) != (version, mode, note)):
            p50, p95 = self.timer.recent_p50_p95()
            hud = self._hud = overlay.HudInfo(self.timer.fps(), p50, p95, version, mode, note)
            self._hud_frame = self.frames_shown
        return hud

    def _show(self, item: "_Inferred") -> None:
        """Draw ``item`` (overlay + HUD), show / record / journal it, call on_frame, count it."""
        window, recorder, sampler = self._outputs
        frame, pred = item.frame, item.pred
        t2 = time.perf_counter()
        version = pred.version if pred is not None else self.models.active.version
        mode = overlay.mode_for(self.mode, pred.task_set if pred is not None else self.models.active.task_set)
        shown = overlay.render(frame.image, pred, mode)
        if self.hud:
            shown = overlay.with_hud(shown, self._hud_info(version, mode, "" if pred is not None else "NO MODEL OUTPUT"))
        t3 = time.perf_counter()
        if window is not None:
            key = window.show(shown)
            if key >= 0:
                self._handle_key(key)
        if recorder is not None:
            recorder.write(shown)
        if self.journal is not None and sampler is not None:
            why = sampler.reason(frame.image)
            if why is not None:
                meta = {"frame_index": frame.index, "reason": why, "model_version": version,
                        "outputs": pred.summary() if pred is not None else None}
                self.journal.submit(frame.image, meta)
        if self.on_frame is not None:
            self.on_frame(frame.index, shown, pred)
        t4 = time.perf_counter()
        self._shown = shown
        self.frames_shown += 1
        if pred is None:
            self.frames_without_overlay += 1
        timer = self.timer
        timer.add("capture_wait", item.wait_ms)
        timer.add("preprocess", item.pre_ms)
        timer.add("inference", item.inf_ms)
        if item.t_handed is not None:  # pipelined: how long the inferred frame waited for this thread
            timer.add("handoff", (item.t_handed - item.t_inferred) * 1000)
        timer.add("overlay", (t3 - t2) * 1000)
        timer.add("output", (t4 - t3) * 1000)
        timer.add("total", (t4 - item.t_got) * 1000)
        timer.add("capture_to_shown", (t4 - frame.t_capture) * 1000)
        timer.frame_done(t4)
        self.health.frame(version, item.inf_ms)

    def _summary(self, capture: CaptureThread, elapsed: float, windowed: bool, recorder: Recorder | None) -> dict:
        models = self.models.summary()
        return {
            "frames_shown": self.frames_shown,
            "camera_frames_captured": capture.captured,
            "camera_frames_dropped": capture.dropped,
            "duration_s": round(elapsed, 3),
            "fps": round(self.frames_shown / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms": self.timer.summary(),
            "model_versions": models["versions_used"],
            "model": models,
            "inference_errors": self.inference_errors,
            "frames_without_overlay": self.frames_without_overlay,
            "source": dict(self.source.info(), end=capture.end_reason if capture.ended else None),
            "exit_reason": self.exit_reason,
            "loop": self.loop,
            "loop_choice": self.loop_choice,
            "mode": self.shown_mode,
            "display": "window" if windowed else "headless",
            "headless_reason": None if windowed else self.headless_reason,
            "record": {"path": str(recorder.path), "frames": recorder.frames} if recorder else None,
            "journal": self.journal.stats() if self.journal else None,
            "watch": {"dir": str(self.watcher.folder), "offered": self.watcher.offered_count} if self.watcher else None,
            "store": str(self.store.root) if self.store else None,
            "peak_rss_mb": peak_rss_mb(),
        }
