"""The frame loop, --pipelined (frame N drawn while frame N+1 is inferred) and --sequential: every
frame shown once and in order, the same pictures from both, hot swaps between the same two frames,
errors on either thread surface and end the run with nothing left running."""
import threading

import numpy as np
import pytest

from device import overlay
from device.capture import ArraySource
from device.runtime import HeadsetRuntime, RuntimeConfig
from hmd.cli import main
from tests.device.conftest import gray_frames

LEVELS = [(7 * i) % 250 + 3 for i in range(40)]  # a different gray level for every frame


def _run(toy_model, frames, *, sequential=False, on_frame=None, **cfg):
    rt = HeadsetRuntime(ArraySource(frames), toy_model,
                        RuntimeConfig(headless=True, lockstep=True, pipelined=not sequential, **cfg), on_frame=on_frame)
    return rt, rt.run()


@pytest.fixture
def loop_threads():
    """loop_threads() -> the names of the loop's threads started during the test and still alive."""
    before = set(threading.enumerate())
    return lambda: [t.name for t in set(threading.enumerate()) - before
                    if t.name in ("inference", "capture", "model-loader")]


@pytest.mark.parametrize("sequential", [False, True], ids=["pipelined", "sequential"])
def test_every_frame_is_shown_once_in_order_with_its_own_prediction(toy, sequential, loop_threads):
    seen = []

    def on_frame(index, shown, pred):
        # the toy's denoised output is 1 - x: it says which frame the prediction was made on
        seen.append((index, round(255 * (1 - float(pred.denoised.mean()))), shown.copy()))

    _, summary = _run(toy("v1"), gray_frames(LEVELS), sequential=sequential, on_frame=on_frame,
                      mode="denoised", hud=False)
    assert [i for i, _, _ in seen] == list(range(len(LEVELS)))
    assert [level for _, level, _ in seen] == LEVELS
    assert summary["frames_shown"] == len(LEVELS) and summary["camera_frames_dropped"] == 0
    assert summary["exit_reason"].startswith("source ended") and summary["frames_without_overlay"] == 0
    lat = summary["latency_ms"]
    assert lat["capture_to_shown"]["n"] == lat["total"]["n"] == len(LEVELS)
    assert lat["capture_to_shown"]["p50"] >= lat["overlay"]["p50"]
    assert ("handoff" in lat) is not sequential  # the wait between the two threads, pipelined only
    assert loop_threads() == []
    if not sequential:  # both loops draw the same pictures
        pictures = [s for _, _, s in seen]
        seen.clear()
        _run(toy("v1"), gray_frames(LEVELS), sequential=True, on_frame=on_frame, mode="denoised", hud=False)
        assert all(np.array_equal(a, s) for a, (_, _, s) in zip(pictures, seen))


@pytest.mark.parametrize("sequential", [False, True], ids=["pipelined", "sequential"])
def test_a_hot_swap_falls_between_the_same_two_frames_in_both_loops(toy, sequential):
    """A model made ready while frame 9 is drawn serves from frame 10 on, as in the sequential loop,
    although the pipelined loop had already inferred frames 10 (and 11) on the old model."""
    v2 = toy("v2")
    rt = None
    versions = []

    def on_frame(index, shown, pred):
        versions.append(pred.version)
        if index == 9:
            assert rt.offer_model(v2).wait(timeout=20)

    rt = HeadsetRuntime(ArraySource(gray_frames(LEVELS[:24])), toy("v1"),
                        RuntimeConfig(headless=True, lockstep=True, pipelined=not sequential), on_frame=on_frame)
    summary = rt.run()
    assert versions == ["v1"] * 10 + ["v2"] * 14
    swap = [e for e in summary["model"]["events"] if e["kind"] == "swapped"]
    assert len(swap) == 1 and swap[0]["frame"] == 10
    health = {r["version"]: r["frames"] for r in rt.health.take()}
    assert health == {"v1": 10, "v2": 14}  # counted as shown, not as inferred


def test_an_error_while_drawing_ends_the_run_and_surfaces(toy, loop_threads):
    shown = []

    def on_frame(index, shown_img, pred):
        shown.append(index)
        if index == 5:
            raise RuntimeError("the drawing thread broke")

    with pytest.raises(RuntimeError, match="drawing thread broke"):
        _run(toy("v1"), gray_frames(LEVELS), on_frame=on_frame)
    assert shown == list(range(6))
    assert loop_threads() == []  # the inference, capture and loader threads all stopped


def test_an_error_on_the_inference_thread_surfaces_on_the_caller(toy, loop_threads):
    rt = HeadsetRuntime(ArraySource(gray_frames(LEVELS)), toy("v1"),
                        RuntimeConfig(headless=True, lockstep=True, pipelined=True))
    calls = []

    def broken(image):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise MemoryError("out of memory in the inference thread")
        return type(rt)._predict(rt, image)

    rt._predict = broken
    with pytest.raises(MemoryError, match="inference thread"):
        rt.run()
    assert calls == ["inference"] * 3 and rt.frames_shown == 2
    assert loop_threads() == []


def test_the_cli_exits_non_zero_when_drawing_fails(toy, tmp_path, monkeypatch, loop_threads):
    def boom(*args):
        raise ValueError("overlay failed")

    monkeypatch.setattr(overlay, "render", boom)
    with pytest.raises(ValueError, match="overlay failed"):  # uncaught by hmd: the process exits 1
        main(["device", "--model", str(toy("v1")), "--source", "synthetic", "--fps", "0", "--headless",
              "--max-frames", "5", "--pipelined", "-q"])
    assert loop_threads() == []


def test_stop_ends_the_pipelined_run_after_the_frame_being_shown(toy, loop_threads):
    rt = None

    def on_frame(index, shown, pred):
        if index == 3:
            rt.stop()  # as SIGTERM or the sync client do

    rt = HeadsetRuntime(ArraySource(gray_frames(LEVELS), loop=True), toy("v1"),
                        RuntimeConfig(headless=True, lockstep=True, pipelined=True), on_frame=on_frame)
    summary = rt.run()
    assert summary["exit_reason"] == "stopped" and summary["frames_shown"] == 4 and summary["loop"] == "pipelined"
    assert loop_threads() == []


def test_the_sequential_loop_is_the_default(toy):
    rt = HeadsetRuntime(ArraySource(gray_frames(LEVELS[:5])), toy("v1"), RuntimeConfig(headless=True, lockstep=True))
    summary = rt.run()
    assert summary["loop"] == "sequential" and summary["frames_shown"] == 5 and "handoff" not in summary["latency_ms"]


@pytest.mark.parametrize("share,expect", [(0.0, "pipelined"), (1e9, "sequential")])
def test_the_default_loop_probes_then_goes_on_through_the_one_the_timings_pick(toy, share, expect, monkeypatch):
    """pipelined=None (the default): the first AUTO_PROBE_FRAMES frames run sequentially, then the
    loop the measured inference share picks; every frame is still shown once, in order."""
    import device.runtime as runtime
    monkeypatch.setattr(runtime, "AUTO_PROBE_FRAMES", 10)
    monkeypatch.setattr(runtime, "AUTO_INFERENCE_SHARE", share)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    seen = []
    rt = HeadsetRuntime(ArraySource(gray_frames(LEVELS)), toy("v1"),
                        RuntimeConfig(headless=True, lockstep=True, mode="denoised", hud=False),
                        on_frame=lambda i, shown, pred: seen.append((i, round(255 * (1 - float(pred.denoised.mean()))))))
    summary = rt.run()
    assert seen == list(enumerate(LEVELS))
    assert summary["loop"] == expect
    choice = summary["loop_choice"]
    assert choice["by"] == "auto" and choice["loop"] == expect and choice["probe_frames"] == 10
    assert "inference p50" in choice["reason"]
    # the hand-off between the two threads is timed for the frames after the probe only, pipelined
    assert summary["latency_ms"].get("handoff", {}).get("n", 0) == (len(LEVELS) - 10 if expect == "pipelined" else 0)


def test_a_model_failing_on_every_probe_frame_stays_sequential(tmp_path, monkeypatch):
    """A failed inference is timed as 0 ms: with nothing to overlap, pipelining would only let the
    inference thread run ahead of the frames shown (errors reported before their frames)."""
    import device.runtime as runtime
    from tests.device.conftest import make_toy_model
    monkeypatch.setattr(runtime, "AUTO_PROBE_FRAMES", 5)
    monkeypatch.setattr(runtime, "AUTO_INFERENCE_SHARE", 0.0)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    folder = make_toy_model(tmp_path / "toy", "failing", nan_above=0.6)
    summary = HeadsetRuntime(ArraySource(gray_frames([220] * 12)), folder,
                             RuntimeConfig(headless=True, lockstep=True)).run()
    assert summary["inference_errors"] == summary["frames_shown"] == 12
    assert summary["loop"] == "sequential"
    assert summary["loop_choice"]["reason"].endswith("the model failed on most probe frames")


def test_one_core_or_an_explicit_flag_never_switches(toy, monkeypatch):
    import device.runtime as runtime
    monkeypatch.setattr(runtime, "AUTO_PROBE_FRAMES", 5)
    monkeypatch.setattr(runtime, "AUTO_INFERENCE_SHARE", 0.0)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 1)
    summary = HeadsetRuntime(ArraySource(gray_frames(LEVELS[:12])), toy("v1"),
                             RuntimeConfig(headless=True, lockstep=True)).run()
    assert summary["loop"] == "sequential" and summary["loop_choice"]["reason"].startswith("one CPU core")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    summary = HeadsetRuntime(ArraySource(gray_frames(LEVELS[:12])), toy("v1"),
                             RuntimeConfig(headless=True, lockstep=True, pipelined=False)).run()
    assert summary["loop"] == "sequential" and summary["loop_choice"] == {"by": "--sequential"}
    assert summary["frames_shown"] == 12
