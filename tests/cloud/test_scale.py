"""The cloud at fleet scale on real components: a PostgreSQL server, `hmd cloud worker` processes
(killed with SIGKILL mid-job), `hmd cloud serve --workers 2` behind the one database, and a device
on a server-sent event stream hearing about a model that a worker process trained."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from cloud.postgres import PostgresStorage
from cloud.storage import FrameRow, SQLiteStorage
from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive
from tests.cloud.conftest import free_port, jpeg_frames, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared(pg_server, registry_template, tmp_path):
    """(data dir, PostgreSQL URL, storage): the session's base version registered in a fresh database."""
    data = tmp_path / "data"
    shutil.copytree(registry_template, data)
    url = pg_server.new_database()
    template = SQLiteStorage(data / "cloud.sqlite3")
    base = template.version("base-v1")
    template.close()
    (data / "cloud.sqlite3").unlink()  # everything is in PostgreSQL from here on
    storage = PostgresStorage(url)
    storage.add_version(base)
    yield data, url, storage
    storage.close()


def hmd(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hmd", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                         **(env or {})})


def worker(data: Path, url: str, runner: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return hmd("cloud", "worker", "--data-dir", str(data), "--database-url", url, "-q", *flags,
               env={"HMD_CLOUD_RUNNER": runner, **(env or {})})


def queued_job(storage: PostgresStorage, name: str = "wearer1"):
    from cloud.keys import new_token, token_sha256

    device = storage.add_device(name, token_sha256(new_token(name)))
    storage.commit_upload(device.id, "c" * 64, "i" * 64, 10, [FrameRow("f" * 64, 32, 32, {"seq": 0})])
    return device, storage.create_job_if_due(device.id, 0, "api")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_worker_killed_mid_job_loses_its_lease_and_another_finishes_it(shared):
    data, url, storage = shared
    device, job = queued_job(storage)
    slow = {"HMD_TEST_FIRST_ATTEMPT_SECONDS": "120"}
    first = worker(data, url, "tests.cloud.fakes:slow_job", "--job-lease-s", "1", env=slow)
    try:
        wait_for(lambda: (data / f"attempt-{job.id}-1").exists(), timeout=60, what="the first worker's attempt")
        held_by = storage.job(job.id).lease_owner
        assert held_by and held_by.split(":")[1] == str(first.pid)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        stop(first, signal.SIGKILL)
    second = worker(data, url, "tests.cloud.fakes:slow_job", "--job-lease-s", "1", env=slow)
    try:
        done = wait_for(lambda: (j := storage.job(job.id)).state == "accepted" and j, timeout=60,
                        what="the second worker to finish the job")
        assert done.attempts == 2 and (data / f"attempt-{job.id}-2").exists()
        assert storage.current_version(device.id).version == done.result_version
        assert [j.id for j in storage.jobs(state="accepted")] == [job.id]  # completed once
        assert stop(second) == 0  # SIGTERM: a clean stop
    finally:
        stop(second, signal.SIGKILL)


def test_a_job_that_kills_its_worker_ends_at_the_attempt_limit_with_its_reason(shared):
    """Attempt limit 1 (the contract tests count attempts; here a real worker process dies)."""
    data, url, storage = shared
    _, job = queued_job(storage)
    proc = worker(data, url, "tests.cloud.scale_fakes:kill_worker", "--job-lease-s", "0.5", "--max-job-attempts", "1")
    try:
        assert proc.wait(60) == -signal.SIGKILL  # the job killed it
    finally:
        stop(proc, signal.SIGKILL)
    assert (data / f"attempt-{job.id}-1").exists() and storage.job(job.id).state == "running"
    wait_for(lambda: storage.requeue_expired(max_attempts=1)[1] == [job.id], timeout=10,
             what="the dead worker's lease to expire")  # what every worker's claim loop does
    failed = storage.job(job.id)
    assert failed.state == "failed" and failed.attempts == 1
    assert failed.reason == "interrupted 1 times (its worker died (lease expired) each time)"
    assert storage.claim_next_job("w", 30) is None


def read_events(url: str, token: str, into: list, ready: threading.Event, want: int) -> None:
    """Collect (event, data) from one SSE stream until ``want`` events arrived."""
    with httpx.stream("GET", f"{url}/v1/events", headers={"Authorization": f"Bearer {token}"}, timeout=60) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                into.append((event, json.loads(line[6:])))
                ready.set()
                if len(into) >= want:
                    return


def test_device_on_one_api_process_hears_of_a_model_a_worker_process_trained(shared):
    from cloud.keys import new_token, token_sha256

    data, url, storage = shared
    token = new_token("wearer1")
    storage.add_device("wearer1", token_sha256(token))
    port = free_port()
    api = hmd("cloud", "serve", "--workers", "2", "--no-worker", "--data-dir", str(data), "--database-url", url,
              "--port", str(port), "--auto-job-frames", "0", "-q")
    trainer = worker(data, url, "tests.cloud.fakes:accept_job")
    base_url = f"http://127.0.0.1:{port}"
    streams = []
    try:
        wait_for(lambda: _ok(f"{base_url}/healthz"), timeout=60, what="the API processes")
        for _ in range(3):  # the kernel spreads connections over both processes
            events, ready = [], threading.Event()
            threading.Thread(target=read_events, args=(base_url, token, events, ready, 2), daemon=True).start()
            assert ready.wait(30), "the stream opens with the current model"
            streams.append(events)
        assert all(s[0] == ("model_available", s[0][1]) and s[0][1]["version"] == "base-v1" for s in streams)
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base_url}/v1/uploads", content=build_upload_archive(jpeg_frames(3)),
                       headers={**headers, "Content-Type": UPLOAD_CONTENT_TYPE}, timeout=30)
        assert r.status_code == 201, r.text
        job_id = httpx.post(f"{base_url}/v1/jobs", headers=headers, timeout=30).json()["job_id"]
        wait_for(lambda: all(len(s) >= 2 for s in streams), timeout=60, what="the pushed model on every stream")
        job = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        assert job["state"] == "accepted"
        for s in streams:
            assert s[1][0] == "model_available" and s[1][1]["version"] == job["result_version"]
            assert s[1][1]["job_id"] == job_id
        assert storage.job(job_id).progress["worker"].split(":")[1] == str(trainer.pid)  # not an API process
    finally:
        assert stop(trainer) == 0
        stop(api)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_api_on_postgresql_and_s3_stores_uploads_once_and_serves_the_model(shared, s3_server):
    """The HTTP API in-process on both scaled back-ends: an upload's frames are S3 objects and
    its rows PostgreSQL's, a repeat is the same upload, and the model downloads with its ETag."""
    import hashlib
    import secrets

    from fastapi.testclient import TestClient

    from cloud.app import create_app
    from cloud.backends import open_blob_store
    from cloud.blobs import LocalBlobStore
    from cloud.keys import new_token, token_sha256
    from cloud.settings import Settings
    from tests.cloud import fakes

    data, url, storage = shared
    blob_url = f"s3://hmd-api-{secrets.token_hex(4)}/b"
    s3 = open_blob_store(blob_url, s3_server.endpoint)
    s3.attach_index(storage)
    base = storage.version("base-v1")
    local = LocalBlobStore(data / "blobs")
    for sha in (base.onnx_sha256, base.manifest_sha256):  # the base model moves to the object store
        assert s3.put_file(local._path(sha), sha) == sha
    token = new_token("wearer1")
    storage.add_device("wearer1", token_sha256(token))
    headers = {"Authorization": f"Bearer {token}"}
    frames = jpeg_frames(3)
    settings = Settings(data_dir=data, database_url=url, blob_url=blob_url, s3_endpoint_url=s3_server.endpoint,
                        auto_job_frames=0, worker=False)
    with TestClient(create_app(settings, runner=fakes.accept_job)) as client:
        body = build_upload_archive(frames)
        first = client.post("/v1/uploads", content=body, headers={**headers, "Content-Type": UPLOAD_CONTENT_TYPE})
        again = client.post("/v1/uploads", content=body, headers={**headers, "Content-Type": UPLOAD_CONTENT_TYPE})
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["upload_id"] == first.json()["upload_id"] and again.json()["duplicate"]
        model = client.get("/v1/models/base-v1/model.onnx", headers=headers)
        assert model.status_code == 200 and hashlib.sha256(model.content).hexdigest() == base.onnx_sha256
        assert model.headers["etag"] == f'"{base.onnx_sha256}"'
        part = client.get("/v1/models/base-v1/model.onnx", headers={**headers, "Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == model.content[10:20]
    assert storage.upload_count() == 1 and storage.frame_count() == 3
    assert all(s3.exists(hashlib.sha256(jpg).hexdigest()) for _, jpg in frames)
    packs = [key for key in s3.objects() if "/packs/" in key]
    assert len(packs) == 1  # the upload's three frames and its index: one object
    assert not (data / "spool").exists() or not list((data / "spool").iterdir())  # spooled frames removed
