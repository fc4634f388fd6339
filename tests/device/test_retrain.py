"""On-device retraining: trains in a separate process while idle, yields to the wearer at once,
and hands an accepted model to the same verified hot-swap."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from device.capture import SyntheticSource
from device.retrain import LocalRetrainer
from device.runtime import HeadsetRuntime, RuntimeConfig
from shared.errors import UserError
from tests.device.conftest import make_toy_model

BASE_RUN = Path(__file__).resolve().parents[2] / "hmd" / "assets" / "base-studio"


def _runtime(tmp_path, **kw):
    model = make_toy_model(tmp_path / "toy", "toy-v1", size=64)
    cfg = RuntimeConfig(headless=True, journal_dir=str(tmp_path / "journal"), journal_every=1, threads=1, **kw)
    return HeadsetRuntime(SyntheticSource("forest", size=(96, 128), fps=30, seed=1), model, cfg)


@pytest.mark.slow(seconds=45)
def test_local_retraining_swaps_in_a_better_model_without_stalling_frames(tmp_path):
    rt = _runtime(tmp_path)
    retrainer = LocalRetrainer(rt, BASE_RUN, tmp_path / "work", charging=True, min_new_frames=40, epochs=1,
                               max_steps=6, lr=1e-4, tolerance=1.0, base_data="synthetic:64:studio", poll=0.2)
    frames_during_training = []

    def watch():
        deadline = time.time() + 240
        while time.time() < deadline and rt.model_version == "toy-v1":
            if retrainer.training:
                n0 = rt.frames_shown
                time.sleep(1.0)
                if retrainer.training:
                    frames_during_training.append(rt.frames_shown - n0)
            time.sleep(0.1)
        time.sleep(0.5)
        rt.stop()

    retrainer.start()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    summary = rt.run()
    retrainer.stop()
    t.join(5)
    accepted = [h for h in retrainer.history if h.get("state") == "accepted"]
    assert accepted, retrainer.history
    assert summary["model_versions"][0] == "toy-v1" and summary["model_versions"][-1].endswith("-local1")
    assert summary["frames_without_overlay"] == 0
    # the frame loop kept running while the worker trained (it never waits for training)
    # (every 1 s window while training showed frames; how many depends on the load beside the test)
    assert frames_during_training and min(frames_during_training) > 0
    assert accepted[0]["evaluation"]["wearer"]["after"]["rmse_colour"] > 0


def test_training_yields_as_soon_as_the_wearer_is_active(tmp_path):
    rt = _runtime(tmp_path)
    for i in range(30):  # journal frames directly (no frame loop needed for this test)
        (Path(rt.config.journal_dir) / "frames").mkdir(parents=True, exist_ok=True)
    import cv2
    import numpy as np
    for i in range(30):
        cv2.imwrite(str(Path(rt.config.journal_dir) / "frames" / f"{i:010d}.jpg"),
                    np.full((48, 64, 3), i * 8, np.uint8))
    active = threading.Event()
    retrainer = LocalRetrainer(rt, BASE_RUN, tmp_path / "work", min_new_frames=0, epochs=50,
                               base_data="synthetic:64:studio", is_active=active.is_set, poll=0.1)
    retrainer._trained_through = 0
    retrainer.start()
    deadline = time.time() + 30
    while not retrainer.training and time.time() < deadline:
        time.sleep(0.05)
    assert retrainer.training
    time.sleep(1.0)
    active.set()  # the wearer puts the headset back on
    t0 = time.time()
    while retrainer.training and time.time() - t0 < 15:
        time.sleep(0.05)
    assert not retrainer.training and time.time() - t0 < 12
    retrainer.stop()
    assert retrainer.history[0]["state"] == "yielded"
    assert rt.model_version == "toy-v1"  # nothing was offered


def test_local_retraining_refuses_bad_setups(tmp_path):
    rt = _runtime(tmp_path)
    with pytest.raises(UserError, match="no training checkpoint"):
        LocalRetrainer(rt, tmp_path / "nope", tmp_path / "work")
    rt.config.journal_dir = None
    with pytest.raises(UserError, match="needs --journal"):
        LocalRetrainer(rt, BASE_RUN, tmp_path / "work")
