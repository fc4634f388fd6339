"""Headsets report their models' health to the cloud (``POST /v1/health``) and a staged
release's canary halts by itself on those reports: real headset runtimes (ONNX Runtime frame
loop, the sync client started as ``hmd device --cloud`` starts it) against the real service
over HTTP on 127.0.0.1."""
from __future__ import annotations

import time

import numpy as np

from cloud import rollout
from cloud.app import create_app
from cloud.keys import new_token, token_sha256
from cloud.settings import Settings
from cloud.storage import Version, in_canary
from device import sync as device_sync
from device.capture import ArraySource
from device.runtime import HeadsetRuntime, RuntimeConfig
from shared.manifest import Manifest
from tests.cloud import fakes
from tests.cloud.conftest import ThreadedServer, public_key
from tests.device.conftest import make_toy_model

BRIGHT = np.full((48, 64, 3), 220, np.uint8)  # mean 0.86: the toy canary model's logits are NaN above 0.6


def register_failing_base(services, tmp_path, name: str) -> None:
    """A base version whose graph passes the load checks (finite on the probe frame) but gives
    NaN on bright camera frames, signed by the cloud like any base."""
    folder = make_toy_model(tmp_path / "toy", name, nan_above=0.6)
    onnx_sha = services.blobs.put_bytes((folder / "model.onnx").read_bytes())
    signed = services.registry.sign(Manifest.load(folder / "manifest.json"), None)
    run_dir = services.storage.version("base-v1").run_dir
    services.storage.add_version(Version(name, None, None, onnx_sha, services.blobs.put_bytes(signed.to_json().encode()),
                                         (folder / "model.onnx").stat().st_size, run_dir, None, time.time()))


def device_names(release, n_each: int = 1) -> tuple[list[str], list[str]]:
    inside, outside, i = [], [], 0
    while len(inside) < n_each or len(outside) < n_each:
        name = f"hs{i:03d}"
        (inside if in_canary(release, name) else outside).append(name)
        i += 1
    return inside[:n_each], outside[:n_each]


def headset(server, token, trust_key, tmp_path, name, on_frame=None, **config):
    """A headset booted the way a fresh one boots: its current model fetched from the cloud and
    verified, then the frame loop with the sync client (health every 0.1 s)."""
    boot = device_sync.SyncClient(server.url, token, trust_key=trust_key, download_dir=tmp_path / name / "boot",
                                  log=lambda m: None)
    folder = boot.check_for_model()
    boot.stop()
    rt = HeadsetRuntime(ArraySource([BRIGHT], loop=True), folder,
                        RuntimeConfig(headless=True, lockstep=True, hud=False, public_key=trust_key,
                                      store_dir=str(tmp_path / name / "store"), **config), on_frame=on_frame)
    client = device_sync.start(rt, server.url, token, download_dir=tmp_path / name / "dl", health_interval=0.1,
                               backoff_initial=0.1, backoff_max=0.5, log=lambda m: None)
    return rt, client


def test_headsets_report_health_and_a_failing_canary_halts_and_rolls_back(data_dir, tmp_path):
    trust_key = public_key(data_dir)
    app = create_app(Settings(data_dir=data_dir, auto_job_frames=0), runner=fakes.accept_job)
    with ThreadedServer(app) as server:
        services = app.state.services
        storage = services.storage
        rollout.begin_staging(storage)
        register_failing_base(services, tmp_path, "base-v2")
        release = rollout.stage(storage, "base-v2", 50)
        (canary_name,), (stable_name,) = device_names(release)
        tokens = {n: new_token(n) for n in (canary_name, stable_name)}
        for n, t in tokens.items():
            storage.add_device(n, token_sha256(t))

        # a headset outside the canary: its 40 frames on base-v1 reach the cloud (the last
        # report is sent when its sync client stops)
        rt, client = headset(server, tokens[stable_name], trust_key, tmp_path, stable_name, max_frames=40)
        summary = rt.run()
        client.stop()
        assert summary["model_versions"] == ["base-v1"] and summary["inference_errors"] == 0
        stored = storage.health_summary(["base-v1"])
        assert (stored["frames"], stored["errors"], stored["rollbacks"], stored["devices"]) == (40, 0, 0, 1)
        assert stored["fps"] > 0 and stored["latency_ms"] > 0
        assert client.stats.health_reports == stored["reports"] >= 1

        # a canary headset: every bright frame fails on base-v2; its reports halt the release,
        # the cloud rolls it back to base-v1 re-signed, and the headset swaps to that by itself
        versions = []

        def on_frame(index, shown, pred):
            versions.append(pred.version if pred is not None else None)
            if pred is not None and pred.version != "base-v2" and versions.count(pred.version) >= 20:
                rt.stop()

        rt, client = headset(server, tokens[canary_name], trust_key, tmp_path, canary_name, on_frame=on_frame,
                             duration=60)
        summary = rt.run()
        client.stop()
        halted = storage.release("base-v2")
        assert halted.state == "halted", (halted, summary["exit_reason"])
        assert "inference error rate 1.000 over" in halted.reason
        back = halted.rollback_version
        assert back.startswith("base-v1-rollback-")
        assert summary["model_versions"] == ["base-v2", back] and summary["exit_reason"] == "stopped"
        assert versions[-20:] == [back] * 20  # the headset serves again, on the rolled-back base
        assert storage.current_version(storage.device_by_name(canary_name).id).version == back
        canary = storage.health_summary(["base-v2"])
        assert canary["errors"] == canary["frames"] == summary["inference_errors"] >= rollout.MIN_FRAMES_FOR_ERROR_RATE
        after = storage.health_summary([back])
        assert after["frames"] == 20 and after["errors"] == 0
