"""Regression tests for the attacks of issue 13 on the cloud: each test performs one attack against
the in-process service and asserts the answer and that nothing was stored (or lost)."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile

import cv2
import numpy as np
import pytest

from cloud.blobs import LocalBlobStore
from cloud.storage import SQLiteStorage
from shared.wire import build_upload_archive
from tests.cloud.conftest import jpeg_frames, provision, tar_of
from tests.cloud.test_api import auth, make_client, post_upload, stored_state


def index_for(members: dict[str, bytes], **meta) -> bytes:
    return json.dumps({"format": 1, "frames": [
        {"file": name, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d), **meta}
        for name, d in members.items()]}).encode()


def patch_sof(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header claiming another size (an image bomb's few bytes)."""
    data = bytearray(jpeg)
    i = 2
    while True:
        marker, seglen = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 7] = height.to_bytes(2, "big")
            data[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + seglen


def progressive_jpeg(size: int = 32) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
    ok, jpg = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    return jpg.tobytes()


def gnu_sparse_member(name: str, data: bytes, real_size: int) -> bytes:
    """A GNU sparse tar member: ``data`` then a hole up to ``real_size`` bytes (zeros when read)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[-512:])
    header[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)
    header[398:410] = tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def assert_rejected(data_dir, client, token, body, status, code, *, contains=None):
    before = stored_state(data_dir)
    r = post_upload(client, token, body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    if contains:
        assert contains in r.json()["detail"], r.json()["detail"]
    assert stored_state(data_dir) == before, "a refused upload stored something"
    assert not list((data_dir / "spool").glob("*")) and not list((data_dir / "blobs" / ".tmp").glob("*"))
    return r


# -- 1. sparse members -----------------------------------------------------------------------
def test_attack_sparse_tar_member_cannot_expand_past_the_size_limit(data_dir):
    token = provision(data_dir, "wearer1")
    (_, jpg), = jpeg_frames(1)
    real = 4_000_000
    expanded = jpg + b"\0" * (real - len(jpg))
    index = json.dumps({"format": 1, "frames": [{"file": "frames/0.jpg", "sha256": hashlib.sha256(expanded).hexdigest(),
                                                  "bytes": real}]}).encode()
    info = tarfile.TarInfo("index.json")
    info.size = len(index)
    body = info.tobuf() + index + b"\0" * (-len(index) % 512) + gnu_sparse_member("frames/0.jpg", jpg, real) + \
        b"\0" * 1024
    assert len(body) < 20_000
    with make_client(data_dir) as c:
        assert_rejected(data_dir, c, token, body, 400, "bad_archive", contains="sparse")


# -- 2, 3. image bombs ------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(16000, 16000), (65000, 65000)])  # the second is above 2**30 pixels
def test_attack_progressive_jpeg_bomb_is_refused_from_its_header(data_dir, width, height):
    token = provision(data_dir, "wearer1")
    bomb = patch_sof(progressive_jpeg(), width, height)
    assert len(bomb) < 3000
    members = {"frames/0.jpg": bomb}
    with make_client(data_dir) as c:
        assert_rejected(data_dir, c, token, tar_of({"index.json": index_for(members), **members}), 400, "bad_archive",
                        contains="pixels")


def test_attack_png_under_a_jpg_name_is_refused(data_dir):
    token = provision(data_dir, "wearer1")
    ok, png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))
    png = bytearray(png.tobytes())
    png[16:24] = (12000).to_bytes(4, "big") * 2  # IHDR: 12000 x 12000
    members = {"frames/0.jpg": bytes(png)}
    with make_client(data_dir) as c:
        assert_rejected(data_dir, c, token, tar_of({"index.json": index_for(members), **members}), 400, "bad_archive",
                        contains="PNG")


def test_decoded_size_limit_is_configurable(data_dir):
    token = provision(data_dir, "wearer1")
    frames = jpeg_frames(2, size=64)
    with make_client(data_dir, max_frame_pixels=32 * 32) as c:
        assert_rejected(data_dir, c, token, build_upload_archive(frames), 400, "bad_archive", contains="4096 pixels")
    with make_client(data_dir, max_frame_pixels=64 * 64) as c:
        assert post_upload(c, token, build_upload_archive(frames)).status_code == 201


def test_worker_never_decodes_a_frame_above_the_limit(tmp_path):
    from cloud.ingest import decode_frames
    from cloud.storage import FrameRow
    from shared.errors import UserError

    blobs = LocalBlobStore(tmp_path / "blobs")
    sha = blobs.put_bytes(patch_sof(progressive_jpeg(), 16000, 16000))
    with pytest.raises(UserError, match="pixels"):
        decode_frames(blobs, [FrameRow(sha, 16000, 16000, {})], (32, 32))


# -- 4. server-side storage faults -------------------------------------------------------------
@pytest.mark.parametrize("err,status,code", [(errno.ENOSPC, 507, "insufficient_storage"),
                                              (errno.EFBIG, 507, "insufficient_storage"),
                                              (errno.EMFILE, 503, "storage_unavailable")])
def test_attack_disk_error_during_ingest_is_5xx_not_the_clients_fault(data_dir, monkeypatch, err, status, code):
    token = provision(data_dir, "wearer1")

    def broken(self):
        raise OSError(err, "simulated")
    monkeypatch.setattr(LocalBlobStore, "temp_file", broken)
    with make_client(data_dir) as c:
        r = assert_rejected(data_dir, c, token, build_upload_archive(jpeg_frames(3)), status, code)
    assert "simulated" not in r.text and "Errno" not in r.text and r.headers["retry-after"]


def test_attack_disk_full_does_not_make_the_headset_drop_frames(data_dir, tmp_path, monkeypatch):
    """The sync client keeps a batch the server could not store, and sends it once the disk is back."""
    from device.journal import Journal
    from device.sync import SyncClient, UploadRefused
    from tests.cloud.conftest import public_key
    from shared.worlds import render_scene

    token = provision(data_dir, "wearer1")
    journal = Journal(tmp_path / "journal").start()
    for i in range(5):
        assert journal.submit(render_scene("forest", 3, i, 32)[0], {"frame_index": i})
    journal.close()
    real = LocalBlobStore.temp_file

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(LocalBlobStore, "temp_file", full)
    with make_client(data_dir) as c:
        sync = SyncClient("http://testserver", token, trust_key=public_key(data_dir), download_dir=tmp_path / "dl",
                          journal=journal, http=c, log=lambda m: None)
        with pytest.raises(UploadRefused) as exc:
            sync.upload_pending()
        assert exc.value.status == 507
        assert sync.stats.refused_batches == 0 and journal.uploaded_through() == -1
        monkeypatch.setattr(LocalBlobStore, "temp_file", real)
        assert sync.upload_pending() == 1
    assert journal.uploaded_through() == 4
    assert stored_state(data_dir)[0] == (1, 5)


# -- 5. Range ---------------------------------------------------------------------------------
def test_attack_range_with_a_5000_digit_number_is_416(data_dir):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        for method in ("GET", "HEAD"):
            for rng in (f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}", f"bytes=-{'9' * 5000}"):
                r = c.request(method, "/v1/models/base-v1/model.onnx", headers={**auth(token), "Range": rng})
                assert r.status_code == 416, (method, rng[:20], r.status_code)


# -- 9. the smaller ones -----------------------------------------------------------------------
def test_attack_jpeg_cut_in_half_with_an_end_marker_is_refused(data_dir):
    token = provision(data_dir, "wearer1")
    (_, jpg), = jpeg_frames(1, size=128)
    scan = jpg.index(b"\xff\xda")
    cut = jpg[: (scan + len(jpg)) // 2] + b"\xff\xd9"  # half of the entropy-coded data, then end-of-image
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV alone accepts it
    members = {"frames/0.jpg": cut}
    with make_client(data_dir) as c:
        assert_rejected(data_dir, c, token, tar_of({"index.json": index_for(members), **members}), 400, "bad_archive",
                        contains="complete")


def test_attack_megabytes_of_frame_metadata_are_refused(data_dir):
    token = provision(data_dir, "wearer1")
    frames = jpeg_frames(2)
    frames[1][0]["note"] = "x" * 7_000_000
    with make_client(data_dir) as c:
        assert_rejected(data_dir, c, token, build_upload_archive(frames), 400, "bad_archive", contains="metadata")


def test_attack_reupload_with_different_metadata_is_409_and_the_first_kept(data_dir):
    token = provision(data_dir, "wearer1")
    frames = jpeg_frames(3)
    with make_client(data_dir) as c:
        first = post_upload(c, token, build_upload_archive(frames))
        assert first.status_code == 201
        forged = [({**meta, "reason": "forged"}, d) for meta, d in frames]
        r = assert_rejected(data_dir, c, token, build_upload_archive(forged), 409, "conflict")
        assert first.json()["upload_id"] in r.json()["detail"]
        again = post_upload(c, token, build_upload_archive(frames))  # an honest retry is still a repeat
        assert again.status_code == 200 and again.json()["duplicate"]


@pytest.mark.parametrize("body,expect", [
    (b"hello, this is not an archive" * 100, "not an uncompressed tar archive"),
    (tar_of({"index.json": b'{"format": 1, "frames": [{"file": "frames/0.jpg", "sha256": "zz", "bytes": 0}]}'}),
     "frames.0.sha256"),
    (tar_of({"index.json": b"{nope"}), "Invalid JSON"),
])
def test_attack_400_messages_carry_no_server_internals(data_dir, body, expect):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        r = assert_rejected(data_dir, c, token, body, 400, "bad_archive", contains=expect)
    for leak in ("Errno", "errors.pydantic.dev", "input_value", "Traceback", "ReadError", "tarfile"):
        assert leak not in r.text, leak


def test_attack_kill_mid_upload_leaves_no_files_after_restart(data_dir):
    """What a SIGKILL mid-upload leaves (temporary and spooled frames, frames renamed into the store
    whose upload never committed) is removed at the next start; committed blobs stay."""
    token = provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        assert post_upload(c, token, build_upload_archive(jpeg_frames(2))).status_code == 201
    kept = stored_state(data_dir)
    blobs = LocalBlobStore(data_dir / "blobs")
    (blobs.tmp / "tmpabc").write_bytes(b"half a frame")
    (data_dir / "spool").mkdir(exist_ok=True)
    (data_dir / "spool" / "x.frame").write_bytes(b"spooled")
    orphan = blobs.put_bytes(b"a frame renamed into the store, never committed")
    (data_dir / "runs" / ".wearer1-j_1.abc").mkdir(parents=True)
    with make_client(data_dir) as c:
        assert c.get("/healthz").status_code == 200
    assert not blobs.exists(orphan)
    assert not list(blobs.tmp.iterdir()) and not list((data_dir / "spool").iterdir())
    assert not list((data_dir / "runs").glob(".*"))
    assert stored_state(data_dir) == kept


# -- found by reading ------------------------------------------------------------------------
def test_attack_job_that_kills_its_process_is_not_requeued_forever(data_dir):
    token = provision(data_dir, "wearer1")
    with make_client(data_dir, worker=False) as c:
        post_upload(c, token, build_upload_archive(jpeg_frames(3)))
        job_id = c.post("/v1/jobs", headers=auth(token)).json()["job_id"]
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        for attempt in (1, 2, 3):
            assert s.claim_next_job().id == job_id  # the worker takes it ... and the process dies
            requeued, failed = s.requeue_interrupted(max_attempts=3)
            assert (requeued, failed) == (([job_id], []) if attempt < 3 else ([], [job_id]))
        job = s.job(job_id)
        assert job.state == "failed" and "interrupted 3 times" in job.reason and job.attempts == 3
        assert s.claim_next_job() is None
    finally:
        s.close()


def test_attack_per_device_quotas(data_dir):
    token, other = provision(data_dir, "wearer1"), provision(data_dir, "wearer2")
    with make_client(data_dir, max_device_bytes=12_000, max_uploads_in_flight=1, max_streams_per_device=1,
                     job_max_frames=64) as c:
        services = c.app.state.services
        dev = services.storage.device_by_name("wearer1")
        # stored bytes: the upload that crosses the quota is the last one taken
        assert post_upload(c, token, build_upload_archive(jpeg_frames(4, size=64))).status_code == 201
        assert services.storage.device_bytes(dev.id) >= 12_000
        assert_rejected(data_dir, c, token, build_upload_archive(jpeg_frames(2, start=9)), 507, "quota_exceeded")
        assert post_upload(c, other, build_upload_archive(jpeg_frames(2, start=9))).status_code == 201
        # uploads in flight and event streams, while one is held
        other_dev = services.storage.device_by_name("wearer2")
        assert services.uploads_in_flight.try_enter(other_dev.id, 1)
        r = post_upload(c, other, build_upload_archive(jpeg_frames(2, start=20)))
        assert r.status_code == 429 and r.json()["error"] == "too_many_uploads"
        services.uploads_in_flight.leave(other_dev.id)
        assert services.event_streams.try_enter(dev.id, 1)
        r = c.get("/v1/events", headers=auth(token))
        assert r.status_code == 429 and r.json()["error"] == "too_many_streams"
        services.event_streams.leave(dev.id)
        # a job's frames
        r = c.post("/v1/jobs", headers=auth(token), json={"max_frames": 10_000})
        assert r.status_code == 422 and "64" in r.json()["detail"]


def test_signing_key_can_live_outside_the_data_folder(tmp_path, base_run):
    from cloud.keys import write_new_key
    from cloud.services import Services
    from cloud.settings import Settings
    from shared.hashing import verify

    key_file = tmp_path / "keys" / "signing.key"
    key_file.parent.mkdir()
    public = write_new_key(key_file)
    data = tmp_path / "data"
    services = Services.open(Settings(data_dir=data, worker=False, signing_key=key_file))
    try:
        assert services.key.public == public
        v = services.registry.import_base(base_run, version="base-x")
        manifest = services.registry.manifest(v)
    finally:
        services.storage.close()
    assert not (data / "signing.key").exists()
    assert manifest.sequence == 1 and manifest.device is None
    assert verify(public, manifest.canonical_bytes(), manifest.signature)


def test_missing_signing_key_file_is_one_clear_error(tmp_path):
    from cloud.services import Services
    from cloud.settings import Settings
    from shared.errors import UserError

    with pytest.raises(UserError, match="signing key .* not found"):
        Services.open(Settings(data_dir=tmp_path / "data", worker=False, signing_key=tmp_path / "nope.key"))


def test_new_versions_carry_a_rising_sequence_and_their_device(data_dir):
    from tests.cloud.conftest import wait_for

    token = provision(data_dir, "wearer1")
    with make_client(data_dir) as c:
        post_upload(c, token, build_upload_archive(jpeg_frames(3)))
        seqs = []
        for _ in range(2):
            job_id = c.post("/v1/jobs", headers=auth(token)).json()["job_id"]
            job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers=auth(token)).json())["state"] ==
                           "accepted" and j, what="the job")
            m = json.loads(c.get(f"/v1/models/{job['result_version']}/manifest", headers=auth(token)).content)
            assert m["device"] == "wearer1"
            seqs.append(m["sequence"])
    assert seqs[1] > seqs[0] >= 1
