"""Model store, hot-swap without losing a frame (under load), rollback, and --watch."""
import shutil
import threading
import time

import numpy as np
import pytest

from device.capture import ArraySource
from device.engine import load_model
from device.runtime import HeadsetRuntime, RuntimeConfig
from device.store import ModelStore
from device.watch import FolderWatcher
from shared.errors import UserError
from shared.manifest import Manifest
from tests.device.conftest import gray_frames


def test_store_installs_versions_moves_current_and_rolls_back(toy, tmp_path):
    store = ModelStore(tmp_path / "store", keep=3)
    for name in ("v1", "v2", "v3", "v4"):
        engine = load_model(toy(name))
        folder = store.install(engine.onnx_path, engine.manifest)
        assert (folder / "model.onnx").is_file() and Manifest.load(folder / "manifest.json").version == name
        store.set_current(name)
        time.sleep(0.01)  # distinct mtimes for pruning order
    assert store.current_version() == "v4" and store.previous_version() == "v3"
    assert store.versions() == ["v2", "v3", "v4"]  # pruned oldest beyond keep, never current/previous
    assert (tmp_path / "store" / "current").read_text() == "v4\n"
    assert store.rollback() == "v3"
    assert store.current_version() == "v3" and store.previous_version() == "v4"
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]
    engine = load_model(toy("v3", blue=0.1))  # same version, different bytes
    with pytest.raises(UserError, match="already in the store with different content"):
        store.install(engine.onnx_path, engine.manifest)


def _busy(stop: threading.Event) -> None:
    a = np.random.default_rng(0).random((200, 200))
    while not stop.is_set():
        a @ a  # competes with the frame loop and the loader for the CPU


def test_hot_swap_under_load_loses_no_frame(toy, real_models, tmp_path):
    """Serve a toy model, offer a real MultiTaskNet mid-run while another thread loads the CPU:
    every frame is shown with a prediction, the loop kept serving while the candidate was
    verified and warmed, and the switch happens between two consecutive frames."""
    n = 150
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(n)]
    seen: list[tuple[int, str | None]] = []
    offered_at, tickets = [], []
    rt = None

    def on_frame(index, shown, pred):
        seen.append((index, pred.version if pred is not None else None))
        if index == 20:
            offered_at.append(len(seen))
            tickets.append(rt.offer_model(real_models["fp32"]))
        if index == n - 20:  # on a loaded machine loading may outlast 130 toy frames: let it finish
            assert tickets[0].wait(timeout=120)

    stop = threading.Event()
    load = threading.Thread(target=_busy, args=(stop,), daemon=True)
    load.start()
    try:
        rt = HeadsetRuntime(ArraySource(frames), toy("v1"),
                            RuntimeConfig(headless=True, lockstep=True, store_dir=str(tmp_path / "store")),
                            on_frame=on_frame)
        summary = rt.run()
    finally:
        stop.set()
    assert [i for i, _ in seen] == list(range(n))  # every camera frame shown, in order
    versions = [v for _, v in seen]
    assert None not in versions and summary["frames_without_overlay"] == 0
    first_new = versions.index("real-fp32")
    assert versions == ["v1"] * first_new + ["real-fp32"] * (n - first_new)  # one clean switch
    assert first_new > offered_at[0]  # frames kept coming while it loaded in the background
    swap = [e for e in summary["model"]["events"] if e["kind"] == "swapped"]
    assert len(swap) == 1 and swap[0]["frame"] == first_new
    assert summary["camera_frames_dropped"] == 0 and summary["model_versions"] == ["v1", "real-fp32"]
    assert ModelStore(tmp_path / "store").current_version() == "real-fp32"


def test_nan_after_swap_rolls_back_on_the_same_frame(toy, tmp_path):
    # v2 is finite on the probe (mean brightness ~0.5) but NaN on bright frames (mean > 0.6)
    dark, bright = gray_frames([50] * 30), gray_frames([220] * 30)
    seen, again = [], []
    rt = None

    def on_frame(index, shown, pred):
        seen.append(pred.version if pred else None)
        if index == 2:
            assert rt.offer_model(v2).wait(timeout=20)  # verified and warm: swapped before the next frame
        if index == 40:
            again.append(rt.offer_model(v2))
            assert again[0].wait(timeout=20)

    v2 = toy("v2", nan_above=0.6)
    rt = HeadsetRuntime(ArraySource(dark + bright), toy("v1"),
                        RuntimeConfig(headless=True, lockstep=True, store_dir=str(tmp_path / "store")),
                        on_frame=on_frame)
    summary = rt.run()
    assert len(seen) == 60 and None not in seen  # the failing frame was rerun on v1, not lost
    assert seen[3:30] == ["v2"] * 27 and seen[30:] == ["v1"] * 30
    kinds = [e["kind"] for e in summary["model"]["events"]]
    assert kinds.count("swapped") == 1 and kinds.count("rolled_back") == 1
    rolled = next(e for e in summary["model"]["events"] if e["kind"] == "rolled_back")
    assert rolled["version"] == "v2" and "non-finite" in rolled["reason"] and rolled["frame"] == 30
    assert summary["inference_errors"] == 1 and summary["model"]["active"] == "v1"
    store = ModelStore(tmp_path / "store")
    assert store.current_version() == "v1"
    assert "rolled back before" in again[0].error  # offered again at frame 40: refused
    assert "stopped" in rt.offer_model(v2).error  # after the run: refused at once


def test_rejected_candidates_never_interrupt_serving(toy, tmp_path):
    bad = toy("bad")
    with open(bad / "model.onnx", "ab") as fh:
        fh.write(b"x")
    tickets = {}
    rt = None

    def on_frame(index, shown, pred):
        if index == 1:
            tickets["bad"] = rt.offer_model(bad)
            tickets["nan"] = rt.offer_model(toy("nan", nan=True))
            tickets["missing"] = rt.offer_model(tmp_path / "nope.onnx")
            for t in tickets.values():
                assert t.wait(timeout=20)

    rt = HeadsetRuntime(ArraySource(gray_frames([80] * 10)), toy("v1"), RuntimeConfig(headless=True, lockstep=True),
                        on_frame=on_frame)
    summary = rt.run()
    assert summary["frames_shown"] == 10 and summary["frames_without_overlay"] == 0
    assert summary["model_versions"] == ["v1"]
    assert "does not match its manifest" in tickets["bad"].error
    assert "not finite" in tickets["nan"].error
    assert "not found" in tickets["missing"].error
    assert not any(t.accepted for t in tickets.values())
    assert [e["kind"] for e in summary["model"]["events"]].count("rejected") == 3


def test_watch_folder_offers_new_stable_models_once(toy, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copytree(toy("old"), watch / "old")  # present at start: ignored
    offered = []
    watcher = FolderWatcher(watch, offered.append, interval=60)
    shutil.copytree(toy("new"), watch / "new")
    assert watcher.poll() == []  # seen once: not yet known to be stable
    assert watcher.poll() == [str(watch / "new")]
    assert watcher.poll() == []  # offered once
    (watch / "junk.txt").write_text("x")
    (watch / "half.onnx").write_bytes(b"partial")  # no manifest beside it: not a candidate
    watcher.poll()
    assert watcher.poll() == []
    assert offered == [str(watch / "new")]


def test_watch_feeds_hot_swap_in_a_live_run(toy, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    new = toy("v2")
    versions = []
    rt = None

    def on_frame(index, shown, pred):
        versions.append(pred.version)
        if len(versions) == 4:  # (frame indices may skip: this source is paced, not lockstep)
            shutil.copytree(new, watch / "v2")
        if versions[-1] == "v2" and versions.count("v2") >= 3:
            rt.stop()

    rt = HeadsetRuntime(ArraySource(gray_frames([90]), fps=100, loop=True), toy("v1"),
                        RuntimeConfig(headless=True, watch_dir=str(watch), watch_interval=0.05, duration=20),
                        on_frame=on_frame)
    summary = rt.run()
    assert summary["model_versions"] == ["v1", "v2"] and summary["watch"]["offered"] == 1
    assert summary["exit_reason"] == "stopped"


def _with_sequence(folder, sequence):
    """Give a toy model's manifest a signed-style sequence number (unsigned toy: no key involved)."""
    m = Manifest.load(folder / "manifest.json")
    m.sequence = sequence
    m.save(folder / "manifest.json")
    return folder


def test_attack_downgrade_offer_is_refused_unless_rolled_back_explicitly(toy):
    from device.hotswap import ModelManager

    manager = ModelManager(load_model(_with_sequence(toy("v7"), 7)), log=lambda m: None)
    try:
        older = manager.offer(_with_sequence(toy("v3"), 3))
        unsequenced = manager.offer(toy("plain"))
        assert older.wait(20) and unsequenced.wait(20)
        assert "older than the running v7" in older.error and "sequence None" in unsequenced.error
        explicit = manager.offer(toy("v3"), allow_older=True)
        assert explicit.wait(20) and explicit.error is None
        assert manager.between_frames().version == "v3"
    finally:
        manager.close()


def test_rolled_back_model_stays_refused_after_a_restart(toy, tmp_path):
    from device.hotswap import ModelManager

    store = ModelStore(tmp_path / "store")
    bad = load_model(toy("bad"))
    manager = ModelManager(load_model(toy("good")), store=store, log=lambda m: None)
    store.install(manager.active.onnx_path, manager.active.manifest)
    store.set_current("good")
    ticket = manager.offer(toy("bad"))
    assert ticket.wait(20) and ticket.error is None
    engine = manager.between_frames()
    assert manager.report_failure(engine, "NaN on a frame").version == "good"
    manager.close()
    restarted = ModelManager(load_model(toy("good")), store=ModelStore(tmp_path / "store"), log=lambda m: None)
    try:
        assert restarted.is_bad(bad.manifest.sha256)
        again = restarted.offer(toy("bad"))
        assert again.wait(20) and "rolled back before" in again.error
    finally:
        restarted.close()


def test_attack_tampered_optimised_graph_cache_is_not_loaded(toy, tmp_path):
    folder = toy("cached")
    first = load_model(folder, cache_dir=tmp_path / "cache")
    cached, = (tmp_path / "cache").glob("*.onnx")
    good = cached.read_bytes()
    cached.write_bytes(good[:100] + b"tampered" + good[108:])
    second = load_model(folder, cache_dir=tmp_path / "cache")  # ignores the tampered cache and writes it again
    x = np.full((1, 1, 32, 32), 0.25, np.float32)
    assert np.allclose(first.infer(x)[0], second.infer(x)[0])
    assert cached.read_bytes() != good[:100] + b"tampered" + good[108:]
