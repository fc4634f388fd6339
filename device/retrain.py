"""On-device retraining (the patent's local path), torch-free on this side.

:class:`LocalRetrainer` watches the journal and the wearer's activity. When enough new frames
were journalled and the headset is idle (``charging`` is set, or no camera frame for
``idle_seconds``), it starts ``python -m models.ondevice`` as a separate process -- the optional
extra that needs torch -- so the frame loop never waits for training. The moment the wearer is
active again it sends SIGTERM: the worker stops between steps and exports nothing. An accepted
candidate comes back as a model folder and goes through the same verified hot-swap as a cloud
model (:meth:`device.runtime.HeadsetRuntime.offer_model`), after the same evaluation gate.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from shared.errors import UserError


class LocalRetrainer:
    def __init__(self, runtime: Any, base_run: str | Path, work_dir: str | Path, *, charging: bool = False,
                 idle_seconds: float = 30.0, min_new_frames: int = 200, epochs: int = 3,
                 max_steps: int | None = None, tolerance: float = 0.05, base_data: str = "synthetic:2000:studio",
                 lr: float | None = None, is_active: Callable[[], bool] | None = None, poll: float = 0.5,
                 log: Callable[[str], None] | None = None):
        cfg = runtime.config
        if not cfg.journal_dir:
            raise UserError("--retrain-locally needs --journal DIR: it trains on the journalled frames")
        if not (Path(base_run) / "checkpoint.pt").is_file():
            raise UserError(f"--retrain-locally: no training checkpoint at {base_run} (--base-run RUN_DIR)")
        if cfg.public_key is not None:
            raise UserError("--retrain-locally makes unsigned models, which --trusted-key would refuse: "
                            "use one or the other")
        self.runtime, self.base_run, self.work = runtime, Path(base_run), Path(work_dir)
        self.charging, self.idle_seconds, self.min_new_frames = charging, idle_seconds, min_new_frames
        self.epochs, self.max_steps, self.tolerance, self.base_data = epochs, max_steps, tolerance, base_data
        self.lr = lr
        self.is_active = is_active or self._camera_active
        self.poll = poll
        self.log = log or (lambda m: print(f"hmd device retrain: {m}", file=sys.stderr, flush=True))
        self.history: list[dict] = []
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trained_through = self._journal_count()
        self._last_frames, self._last_change = -1, time.monotonic()

    # -- state -------------------------------------------------------------------------------
    def _journal_count(self) -> int:
        return len(list((Path(self.runtime.config.journal_dir) / "frames").glob("*.jpg")))

    def _camera_active(self) -> bool:
        """The wearer is active while camera frames keep arriving (unless the headset is charging)."""
        if self.charging:
            return False
        n = self.runtime.frames_shown
        if n != self._last_frames:
            self._last_frames, self._last_change = n, time.monotonic()
        return time.monotonic() - self._last_change < self.idle_seconds

    @property
    def training(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LocalRetrainer":
        self._thread = threading.Thread(target=self._loop, name="hmd-retrain", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._yield("headset stopping")
        if self._thread:
            self._thread.join(10)

    def _yield(self, why: str) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.history.append({"state": "yielded", "reason": why, "t": time.time()})
            self.log(f"training yielded: {why}")

    def _launch(self) -> None:
        n = len(self.history) + 1
        out = self.work / f"job-{n}"
        version = f"{self.runtime.model_version}-local{n}"
        cmd = [sys.executable, "-m", "models.ondevice", "--base-run", str(self.base_run), "--journal",
               str(self.runtime.config.journal_dir), "--out", str(out), "--parent-version",
               self.runtime.model_version, "--version", version, "--epochs", str(self.epochs),
               "--tolerance", str(self.tolerance), "--base-data", self.base_data]
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        if self.lr:
            cmd += ["--lr", str(self.lr)]
        out.mkdir(parents=True, exist_ok=True)
        self._log_file = open(out / "worker.log", "w")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_file, text=True)
        self._started = time.time()
        self._trained_through = self._journal_count()
        self.log(f"idle: training on the journal in the background ({out})")

    def _finish(self) -> None:
        proc = self._proc
        assert proc is not None
        out_text = proc.stdout.read() if proc.stdout else ""
        self._proc = None
        lines = [ln for ln in out_text.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"state": "failed", "reason": f"worker exit {proc.returncode}"}
        result["seconds"] = time.time() - self._started
        self.history.append(result)
        self.log(f"local job {result['state']}: {result.get('reason')}")
        folder = result.get("model_folder")
        if result.get("state") == "accepted" and folder:
            ticket = self.runtime.offer_model(folder)
            result["offered"] = True
            if ticket.wait(120) and ticket.accepted:
                self.base_run = Path(result["run_dir"])  # the next local job continues from this one

    def _loop(self) -> None:
        while not self._stop.is_set():
            active = self.is_active()
            if self.training:
                if active:
                    self._yield("the wearer is active again")
            elif self._proc is not None:
                self._finish()
            elif not active and self._journal_count() - self._trained_through >= self.min_new_frames:
                self._launch()
            self._stop.wait(self.poll)
