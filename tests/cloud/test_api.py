"""The HTTP API in-process (TestClient), with a fast fake job runner."""
from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from cloud.app import create_app
from cloud.settings import Settings
from shared.hashing import verify
from shared.manifest import Manifest
from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive
from tests.cloud import fakes
from tests.cloud.conftest import jpeg_frames, provision, public_key, tar_of, wait_for


def make_client(data_dir, runner=fakes.accept_job, **overrides) -> TestClient:
    settings = Settings(data_dir=data_dir, auto_job_frames=overrides.pop("auto_job_frames", 0), **overrides)
    return TestClient(create_app(settings, runner=runner))


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def post_upload(client: TestClient, token: str, body: bytes):
    return client.post("/v1/uploads", content=body, headers={**auth(token), "Content-Type": UPLOAD_CONTENT_TYPE})


def stored_state(data_dir):
    """What a rejected upload must not change: upload rows, frame rows, blobs."""
    from cloud.storage import SQLiteStorage

    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        rows = (s.upload_count(), s.frame_count())
    finally:
        s.close()
    blobs = sorted(p.name for p in (data_dir / "blobs").rglob("*") if p.is_file())
    return rows, blobs


def test_healthz_needs_no_token(data_dir):
    with make_client(data_dir) as c:
        r = c.get("/healthz")
    assert r.status_code == 200 and r.json()["ok"] and r.json()["base_version"] == "base-v1"


@pytest.mark.parametrize("header", [None, "Bearer nope", "Bearer wearer1.wrong-secret", "Basic abc",
                                    "Bearer ghost.secret"])
def test_bad_token_is_401_everywhere(data_dir, header):
    provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        headers = {"Authorization": header} if header else {}
        for method, path in [("GET", "/v1/models/current"), ("POST", "/v1/uploads"), ("GET", "/v1/jobs/j_1"),
                             ("GET", "/v1/events"), ("GET", "/v1/models/base-v1/model.onnx")]:
            r = c.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"] == "unauthorised"


def test_tokens_are_stored_hashed(data_dir):
    token = provision(data_dir, "wearer1")
    raw = (data_dir / "cloud.sqlite3").read_bytes()
    assert token.encode() not in raw and token.split(".")[1].encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw


def test_upload_is_idempotent_by_content(data_dir):
    token = provision(data_dir, "wearer1")
    frames = jpeg_frames(4)
    with make_client(data_dir) as c:
        r1 = post_upload(c, token, build_upload_archive(frames, 0, 3))
        assert r1.status_code == 201, r1.text
        # the same frames and metadata re-packed (other member names, other archive bytes) are the same upload
        r2 = post_upload(c, token, tar_of({"index.json": json.dumps({"format": 1, "frames": [
            {"file": f"frames/x{i}.jpg", "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d), **meta}
            for i, (meta, d) in enumerate(frames)]}).encode(), **{f"frames/x{i}.jpg": d for i, (_, d) in enumerate(frames)}}))
        assert r2.status_code == 200 and r2.json()["duplicate"]
        assert r2.json()["upload_id"] == r1.json()["upload_id"]
        assert c.get(f"/v1/uploads/{r1.json()['upload_id']}", headers=auth(token)).json()["frames"] == 4
    (uploads, nframes), _ = stored_state(data_dir)
    assert (uploads, nframes) == (1, 4)


def test_oversized_upload_is_413_and_nothing_stored(data_dir):
    token = provision(data_dir, "wearer1")
    before = stored_state(data_dir)
    with make_client(data_dir, max_upload_bytes=20_000) as c:
        body = build_upload_archive(jpeg_frames(40, size=64))
        assert len(body) > 20_000
        r = post_upload(c, token, body)
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        def chunks():  # no Content-Length: the limit must hold while streaming
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]
        r = c.post("/v1/uploads", content=chunks(), headers={**auth(token), "Content-Type": UPLOAD_CONTENT_TYPE})
        assert r.status_code == 413
    assert stored_state(data_dir) == before
    assert not list((data_dir / "spool").glob("*"))


def _corruptions():
    frames = jpeg_frames(3)
    good = build_upload_archive(frames)
    index = {"format": 1, "frames": [{"file": f"frames/{i}.jpg", "sha256": hashlib.sha256(d).hexdigest(),
                                      "bytes": len(d)} for i, (_, d) in enumerate(frames)]}
    members = {f"frames/{i}.jpg": d for i, (_, d) in enumerate(frames)}
    not_jpeg = b"\xff\xd8 definitely not a jpeg" * 10
    bad_jpeg_index = json.loads(json.dumps(index))
    bad_jpeg_index["frames"][1].update(sha256=hashlib.sha256(not_jpeg).hexdigest(), bytes=len(not_jpeg))
    wrong_size = json.loads(json.dumps(index))
    wrong_size["frames"][0]["width"] = 999
    return {
        "not a tar": b"hello, this is not an archive" * 100,
        "truncated": good[: len(good) // 2],
        "no index": tar_of(members),
        "index not json": tar_of({"index.json": b"{nope", **members}),
        "missing frame": tar_of({"index.json": json.dumps(index).encode(), "frames/0.jpg": members["frames/0.jpg"]}),
        "extra member": tar_of({"index.json": json.dumps(index).encode(), **members, "frames/9.jpg": b"x"}),
        "sha mismatch": tar_of({"index.json": json.dumps(index).encode(), **members,
                                "frames/2.jpg": members["frames/1.jpg"]}),
        "undecodable frame": tar_of({"index.json": json.dumps(bad_jpeg_index).encode(), **members,
                                     "frames/1.jpg": not_jpeg}),
        "size mismatch": tar_of({"index.json": json.dumps(wrong_size).encode(), **members}),
        "path traversal": tar_of({"index.json": json.dumps({"format": 1, "frames": [
            {**index["frames"][0], "file": "../0.jpg"}]}).encode(), "../0.jpg": members["frames/0.jpg"]}),
    }


def test_corrupt_archives_are_400_and_nothing_stored(data_dir):
    token = provision(data_dir, "wearer1")
    before = stored_state(data_dir)
    with make_client(data_dir) as c:
        for name, body in _corruptions().items():
            r = post_upload(c, token, body)
            assert r.status_code == 400, (name, r.status_code, r.text)
            assert r.json()["error"] == "bad_archive" and r.json()["detail"], name
    assert stored_state(data_dir) == before, "a rejected upload left something behind"
    assert not list((data_dir / "spool").glob("*"))


def test_devices_see_only_their_own(data_dir):
    a, b = provision(data_dir, "alice"), provision(data_dir, "bob")
    with make_client(data_dir, auto_job_frames=4) as c:
        r = post_upload(c, a, build_upload_archive(jpeg_frames(4)))
        job_id = r.json()["job_id"]
        assert job_id
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(a)).json())["state"] == "accepted" and j,
                       what="the fake job")
        version = job["result_version"]
        assert c.get("/v1/models/current", headers=auth(a)).json()["version"] == version
        assert c.get("/v1/models/current", headers=auth(b)).json()["version"] == "base-v1"
        for path in [f"/v1/uploads/{r.json()['upload_id']}", f"/v1/jobs/{job_id}", f"/v1/models/{version}/manifest",
                     f"/v1/models/{version}/model.onnx"]:
            assert c.get(path, headers=auth(b)).status_code == 404, path
            assert c.get(path, headers=auth(a)).status_code == 200, path
        assert c.get("/v1/models/base-v1/manifest", headers=auth(b)).status_code == 200
        # bob's identical frames are his own upload, not alice's
        rb = post_upload(c, b, build_upload_archive(jpeg_frames(4)))
        assert rb.status_code == 201 and rb.json()["upload_id"] != r.json()["upload_id"]


def test_job_records_evaluation_and_new_version_is_signed(data_dir):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir, auto_job_frames=6) as c:
        r1 = post_upload(c, token, build_upload_archive(jpeg_frames(4)))
        assert r1.json()["job_id"] is None  # 4 < 6 new frames
        r2 = post_upload(c, token, build_upload_archive(jpeg_frames(4, start=4)))
        job_id = r2.json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(token)).json())["state"] == "accepted"
                       and j, what="the job")
        assert job["frames"] == 8 and job["attempts"] == 1 and job["trigger"] == "auto"
        assert job["evaluation"]["wearer"]["after"] and job["evaluation"]["base"]["before"]
        assert job["progress"]["fraction"] == 1.0
        m = Manifest.from_bytes(c.get(f"/v1/models/{job['result_version']}/manifest", headers=auth(token)).content)
        assert m.parent_version == "base-v1"
        assert verify(public_key(data_dir), m.canonical_bytes(), m.signature)
        # no new frames: no new automatic job; an explicit one is allowed
        r3 = post_upload(c, token, build_upload_archive(jpeg_frames(4, start=4)))
        assert r3.json()["duplicate"] and r3.json()["job_id"] is None
        r4 = c.post("/v1/jobs", headers=auth(token), json={})
        assert r4.status_code == 201 and r4.json()["trigger"] == "api"
        assert c.post("/v1/jobs", headers=auth(token)).status_code in (201, 409)


def test_explicit_job_needs_frames(data_dir):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        r = c.post("/v1/jobs", headers=auth(token))
        assert r.status_code == 409 and r.json()["error"] == "no_frames"
        assert c.get("/v1/jobs/j_doesnotexist", headers=auth(token)).status_code == 404


def test_rejected_candidate_is_kept_with_reason(data_dir):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir, runner=fakes.reject_job, auto_job_frames=2) as c:
        job_id = post_upload(c, token, build_upload_archive(jpeg_frames(2))).json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(token)).json())["state"] == "rejected"
                       and j, what="the job")
        assert "not better" in job["reason"] and job["evaluation"]["base"]
        assert job["result_version"] is None
        assert c.get("/v1/models/current", headers=auth(token)).json()["version"] == "base-v1"


def test_failed_job_is_recorded_and_worker_goes_on(data_dir):
    token = provision(data_dir, "wearer1")

    def broken(ctx):
        raise RuntimeError("the GPU caught fire")
    with make_client(data_dir, runner=broken, auto_job_frames=2) as c:
        job_id = post_upload(c, token, build_upload_archive(jpeg_frames(2))).json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(token)).json())["state"] == "failed"
                       and j, what="the job")
        assert "caught fire" in job["reason"]
        assert c.get("/healthz").json()["worker"] == "running"


def test_model_download_etag_and_range(data_dir):
    token = provision(data_dir, "wearer1")
    blob = None
    with make_client(data_dir) as c:
        info = c.get("/v1/models/current", headers=auth(token)).json()
        full = c.get(info["model_url"], headers=auth(token))
        assert full.status_code == 200 and hashlib.sha256(full.content).hexdigest() == info["sha256"]
        etag = full.headers["etag"]
        assert etag == f'"{info["sha256"]}"' and full.headers["accept-ranges"] == "bytes"
        part = c.get(info["model_url"], headers={**auth(token), "Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == full.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(full.content)}"
        tail = c.get(info["model_url"], headers={**auth(token), "Range": "bytes=-10"})
        assert tail.content == full.content[-10:]
        resumed = c.get(info["model_url"], headers={**auth(token), "Range": "bytes=1000-", "If-Range": etag})
        assert resumed.status_code == 206 and resumed.content == full.content[1000:]
        stale = c.get(info["model_url"], headers={**auth(token), "Range": "bytes=1000-", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == full.content
        assert c.get(info["model_url"], headers={**auth(token), "If-None-Match": etag}).status_code == 304
        bad = c.get(info["model_url"], headers={**auth(token), "Range": f"bytes={len(full.content)}-"})
        assert bad.status_code == 416
        assert c.get("/v1/models/nope/model.onnx", headers=auth(token)).status_code == 404
        blob = full.content
    assert blob


def test_restart_requeues_interrupted_job_once(data_dir):
    """A job left 'running' by a dead process runs again after a restart, and completes once."""
    from cloud.storage import SQLiteStorage

    token = provision(data_dir, "wearer1")
    with make_client(data_dir, auto_job_frames=0, worker=False) as c:
        post_upload(c, token, build_upload_archive(jpeg_frames(3)))
        job_id = c.post("/v1/jobs", headers=auth(token)).json()["job_id"]
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    claimed = s.claim_next_job()  # a worker took it ... and the process died
    assert claimed.id == job_id and claimed.state == "running"
    s.close()
    with make_client(data_dir) as c:
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(token)).json())["state"] == "accepted"
                       and j, what="the re-run")
        assert job["attempts"] == 2
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        with pytest.raises(RuntimeError):  # finishing twice is refused
            s.finish_job(job_id, "accepted")
        assert len(s.jobs(state="accepted")) == 1
    finally:
        s.close()
