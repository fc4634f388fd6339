"""Staged rollout of a base version: a stable canary fraction, personalised versions on top,
health reports that halt the canary and roll its devices back (re-signed, newer sequence),
and promotion to every device."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from cloud import rollout
from cloud.app import create_app
from cloud.keys import new_token, token_sha256
from cloud.settings import Settings
from cloud.storage import SQLiteStorage, Version, in_canary
from shared.errors import UserError
from shared.manifest import Manifest
from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive
from tests.cloud import fakes
from tests.cloud.conftest import jpeg_frames, wait_for

DEVICES = 24


def new_base(services, name: str) -> Version:
    """A base version with other model bytes (no ONNX export: the test never runs it)."""
    base = services.storage.version("base-v1")
    onnx = services.blobs.put_bytes(f"model {name}".encode())
    manifest = services.registry.manifest(base).model_copy(update={"version": name, "sha256": onnx})
    signed = services.registry.sign(manifest, None)
    v = Version(name, None, None, onnx, services.blobs.put_bytes(signed.to_json().encode()), 10, base.run_dir,
                None, time.time())
    services.storage.add_version(v)
    return v


@pytest.fixture
def fleet(data_dir):
    storage = SQLiteStorage(data_dir / "cloud.sqlite3")
    tokens = {}
    for i in range(DEVICES):
        tokens[f"hs{i:02d}"] = new_token(f"hs{i:02d}")
        storage.add_device(f"hs{i:02d}", token_sha256(tokens[f"hs{i:02d}"]))
    storage.close()
    app = create_app(Settings(data_dir=data_dir, auto_job_frames=0), runner=fakes.accept_job)
    with TestClient(app) as client:
        yield client, app.state.services, tokens


def current(client, token) -> str:
    return client.get("/v1/models/current", headers={"Authorization": f"Bearer {token}"}).json()["version"]


def personalise(client, token) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    r = client.post("/v1/uploads", content=build_upload_archive(jpeg_frames(2)),
                    headers={**headers, "Content-Type": UPLOAD_CONTENT_TYPE})
    assert r.status_code in (200, 201), r.text  # 200: the same frames again (this device uploaded before)
    job_id = client.post("/v1/jobs", headers=headers).json()["job_id"]
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["state"] == "accepted"
                   and j, what="the fake job")
    return job["result_version"]


def health(client, token, version, **fields) -> dict:
    body = {"version": version, "frames": 200, "fps": 30.0, "latency_ms": 20.0, "rollbacks": 0,
            "inference_errors": 0, **fields}
    r = client.post("/v1/health", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text
    return r.json()


def test_canary_personalisation_on_top_auto_halt_and_promote(fleet):
    client, services, tokens = fleet
    storage = services.storage
    rollout.begin_staging(storage)
    new_base(services, "base-v2")
    assert {current(client, t) for t in tokens.values()} == {"base-v1"}  # staged: nobody has it yet
    outside = "hs00"
    before = personalise(client, tokens[outside])  # personalised on base-v1

    release = rollout.stage(storage, "base-v2", 25)
    canary = {name for name in tokens if in_canary(release, name)}
    assert 0 < len(canary) < DEVICES
    outside = next(n for n in sorted(tokens) if n not in canary)
    if outside != "hs00":
        before = personalise(client, tokens[outside])
    assert {n for n, t in tokens.items() if current(client, t) == "base-v2"} == canary
    assert current(client, tokens[outside]) == before  # outside the canary: its personalised model stays

    wider = rollout.stage(storage, "base-v2", 50)
    widened = {name for name in tokens if in_canary(wider, name)}
    assert canary < widened  # widening keeps every device already in
    inside = sorted(canary)[0]
    mine = personalise(client, tokens[inside])  # personalised on top of the canary base
    assert current(client, tokens[inside]) == mine and storage.version(mine).parent_version == "base-v2"

    # healthy reports change nothing; an error rate over 1 % halts the canary by itself
    assert health(client, tokens[inside], "base-v2") == {"release": "base-v2", "state": "canary"}
    answer = health(client, tokens[sorted(widened)[-1]], "base-v2", inference_errors=30)
    assert answer == {"release": "base-v2", "state": "halted"}
    halted = storage.release("base-v2")
    assert "inference error rate 0.075 over 400 frames" in halted.reason
    back = halted.rollback_version
    assert back.startswith("base-v1-rollback-")
    assert {current(client, tokens[n]) for n in widened} == {back}  # every canary device, personalised or not
    assert current(client, tokens[outside]) == before
    seq = {v: Manifest.from_bytes(services.blobs.open(storage.version(v).manifest_sha256).read()).sequence
           for v in ("base-v2", back)}
    assert seq[back] > seq["base-v2"]  # headsets refuse an older signed sequence: the step back is newer
    assert storage.version(back).onnx_sha256 == storage.version("base-v1").onnx_sha256
    assert health(client, tokens[inside], "base-v2", inference_errors=99)["state"] == "halted"  # once

    # the next base: promoted to everyone; personalised versions on older bases give way to it
    new_base(services, "base-v3")
    rollout.stage(storage, "base-v3", 10)
    assert rollout.promote(storage, "base-v3").state == "promoted"
    assert {current(client, t) for t in tokens.values()} == {"base-v3"}
    assert client.get("/healthz").json()["base_version"] == "base-v3"


def test_a_report_at_tens_of_thousands_of_fps_is_taken_with_its_errors(fleet):
    """A model failing at once is shown with no inference at all, far above any camera's frame
    rate; its report must still count (a 422 made the headset drop it: its errors never counted)."""
    client, services, tokens = fleet
    token = next(iter(tokens.values()))
    health(client, token, "base-v1", frames=1400, fps=25_000.0, latency_ms=0.0, inference_errors=1400)
    assert services.storage.health_summary(["base-v1"])["errors"] == 1400


def test_release_refuses_what_it_cannot_do(fleet):
    _, services, _ = fleet
    storage = services.storage
    with pytest.raises(UserError, match="not a registered base"):
        rollout.stage(storage, "nope", 10)
    with pytest.raises(UserError, match="percentage"):
        rollout.parse_percent("ten")
    with pytest.raises(UserError, match="between"):
        rollout.parse_percent("0%")
    rollout.begin_staging(storage)
    new_base(services, "base-v2")
    new_base(services, "base-v3")
    rollout.stage(storage, "base-v2", 20)
    with pytest.raises(UserError, match="still a canary"):
        rollout.stage(storage, "base-v3", 10)
    with pytest.raises(UserError, match="only widens"):
        rollout.stage(storage, "base-v2", 10)
    # FPS far below the stable base's halts it too
    stable_dev = storage.add_device("slowcheck-a", "0" * 64)
    for _ in range(3):
        storage.add_health(stable_dev.id, "base-v1", 100, 30.0, 10.0, 0, 0)
        storage.add_health(stable_dev.id, "base-v2", 100, 12.0, 40.0, 0, 0)
    assert "canary FPS 12.0 is 0.40x" in rollout.check(storage, storage.release("base-v2"))
