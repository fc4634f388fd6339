"""One contract for every storage back-end: the same tests on SQLite and on a real PostgreSQL
server, on a blob folder and on a real S3 HTTP API (moto in server mode). Servers start once per
session (tests/cloud/conftest.py) and each test gets an empty database or bucket."""
from __future__ import annotations

import concurrent.futures
import hashlib
import sqlite3
import time

import pytest

from cloud.backends import open_blob_store, open_storage
from cloud.storage import MIGRATIONS, SCHEMA_VERSION, FrameRow, SQLiteStorage, Version
from shared.errors import UserError


@pytest.fixture
def storage(database_url):
    s = open_storage(database_url)
    yield s
    s.close()


def frames(n: int, start: int = 0) -> list[FrameRow]:
    return [FrameRow(hashlib.sha256(str(i).encode()).hexdigest(), 32, 24, {"seq": i}) for i in range(start, start + n)]


def version(name: str, device_id: int | None, parent: str | None = None) -> Version:
    return Version(name, device_id, parent, "a" * 64, "b" * 64, 123, f"/runs/{name}", None, time.time())


def test_devices_uploads_and_frames(storage):
    d = storage.add_device("wearer1", "0" * 64)
    assert storage.device(d.id) == d and storage.device_by_name("wearer1") == d and storage.device(999) is None
    with pytest.raises(UserError, match="exists already"):
        storage.add_device("wearer1", "1" * 64)
    up, created = storage.commit_upload(d.id, "c" * 64, "i" * 64, 1000, frames(5))
    again, created_again = storage.commit_upload(d.id, "c" * 64, "i" * 64, 1000, frames(5))
    assert created and not created_again and again.id == up.id
    assert storage.find_upload(d.id, "c" * 64) == up == storage.upload(d.id, up.id)
    storage.commit_upload(d.id, "e" * 64, "j" * 64, 500, frames(3, start=5))
    assert (storage.upload_count(), storage.upload_count(d.id), storage.frame_count(d.id)) == (2, 2, 8)
    assert storage.device_bytes(d.id) == 1500
    recent = storage.frames_for_job(d.id, through_row=10 ** 9, limit=4)
    assert [f.meta["seq"] for f in recent] == [4, 5, 6, 7]  # the most recent, oldest first
    assert recent[0].width == 32 and recent[0].height == 24
    assert storage.set_device_token("wearer1", "2" * 64) and not storage.set_device_token("ghost", "2" * 64)
    assert storage.device(d.id).token_sha256 == "2" * 64
    assert "i" * 64 in storage.referenced_blobs() and frames(1)[0].sha256 in storage.referenced_blobs()


def test_a_resent_batch_that_overlaps_stores_each_frame_once(storage):
    """The answer to an upload was cut; the headset resends those frames inside a larger batch
    (its journal grew meanwhile): a new upload, but each frame is stored once (the soak found 1-4
    frames stored twice before)."""
    d = storage.add_device("wearer1", "0" * 64)
    other = storage.add_device("wearer2", "1" * 64)
    storage.commit_upload(d.id, "c" * 64, "i" * 64, 100, frames(3))
    up, created = storage.commit_upload(d.id, "e" * 64, "j" * 64, 100, frames(5))  # frames 0-2 again + 3-4
    assert created and up.frames == 5
    assert storage.frame_count(d.id) == 5
    assert [f.meta["seq"] for f in storage.frames_for_job(d.id, 10 ** 9, 10)] == [0, 1, 2, 3, 4]
    # another device's identical frames are its own
    storage.commit_upload(other.id, "c" * 64, "i" * 64, 100, frames(3))
    assert storage.frame_count(other.id) == 3


def test_jobs_versions_and_sequence(storage):
    d = storage.add_device("wearer1", "0" * 64)
    storage.commit_upload(d.id, "c" * 64, "i" * 64, 10, frames(4))
    assert storage.create_job_if_due(d.id, 8, "auto") is None  # too few new frames
    job = storage.create_job_if_due(d.id, 2, "auto", max_frames=3)
    assert job.state == "queued" and job.frames == 4 and job.max_frames == 3
    assert storage.create_job_if_due(d.id, 0, "api") is None  # one job per device at a time
    claimed = storage.claim_next_job("w1", lease_s=30)
    assert (claimed.id, claimed.state, claimed.attempts, claimed.lease_owner) == (job.id, "running", 1, "w1")
    assert claimed.lease_expires > time.time() + 20
    assert storage.claim_next_job("w2", 30) is None
    storage.update_job(job.id, progress={"stage": "training", "fraction": 0.5})
    assert storage.job(job.id).progress["stage"] == "training" and storage.job(job.id, device_id=d.id + 1) is None
    storage.add_version(version("base-v1", None))
    with pytest.raises(UserError, match="exists already"):
        storage.add_version(version("base-v1", None))
    with pytest.raises(RuntimeError, match="no longer"):
        storage.finish_job(job.id, "accepted", owner="w2")  # not the lease holder
    storage.finish_job(job.id, "accepted", version=version("wearer1-1", d.id, "base-v1"), owner="w1",
                       evaluation={"ok": True}, reason="better")
    done = storage.job(job.id)
    assert (done.state, done.result_version, done.evaluation, done.lease_owner) == ("accepted", "wearer1-1",
                                                                                    {"ok": True}, None)
    with pytest.raises(RuntimeError):
        storage.finish_job(job.id, "accepted", owner="w1")  # never twice
    assert storage.current_version(d.id).version == "wearer1-1" and storage.base_version().version == "base-v1"
    assert [j.id for j in storage.jobs(d.id, state="accepted")] == [job.id]
    seqs = [storage.next_manifest_sequence() for _ in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_expired_lease_requeues_then_fails_at_the_attempt_limit(storage):
    d = storage.add_device("wearer1", "0" * 64)
    storage.commit_upload(d.id, "c" * 64, "i" * 64, 10, frames(2))
    job = storage.create_job_if_due(d.id, 0, "api")
    assert storage.claim_next_job("w1", lease_s=30) is not None
    assert storage.requeue_expired(max_attempts=2) == ([], [])  # the lease holds
    assert storage.renew_lease(job.id, "w1", 0.01) and not storage.renew_lease(job.id, "w2", 30)
    time.sleep(0.05)
    assert storage.requeue_expired(max_attempts=2) == ([job.id], [])
    assert not storage.renew_lease(job.id, "w1", 30)  # the dead worker's heartbeat is refused
    assert storage.claim_next_job("w2", lease_s=0.01).attempts == 2
    time.sleep(0.05)
    assert storage.requeue_expired(max_attempts=2) == ([], [job.id])
    failed = storage.job(job.id)
    assert failed.state == "failed" and "interrupted 2 times" in failed.reason and "lease expired" in failed.reason
    assert storage.claim_next_job("w3", 30) is None


def test_concurrent_claims_take_different_jobs(storage):
    ids = []
    for i in range(4):
        d = storage.add_device(f"wearer{i}", "0" * 64)
        storage.commit_upload(d.id, f"{i}" * 64, "i" * 64, 10, frames(2, start=10 * i))
        ids.append(storage.create_job_if_due(d.id, 0, "api").id)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: storage.claim_next_job(f"w{w}", 30), range(6)))
    claimed = [j.id for j in got if j is not None]
    assert sorted(claimed) == sorted(ids)  # each job once, none twice, none left


def test_schema_is_migrated_from_version_1(database_url):
    """A database made by the previous release (schema 1, no job leases) opens and is migrated."""
    if database_url.startswith("sqlite"):
        path = database_url[len("sqlite:///"):]
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for sql in MIGRATIONS[0][1]:
            db.execute(sql.format(pk="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
        db.execute("INSERT INTO meta VALUES ('schema', '1')")
        db.execute("INSERT INTO devices (name, token_sha256, created) VALUES ('old', 'x', 1.0)")
        db.commit()
        db.close()
    else:
        import psycopg

        from cloud.postgres import PostgresStorage

        with psycopg.connect(database_url, autocommit=True) as db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            for sql in MIGRATIONS[0][1]:
                db.execute(sql.format(pk=PostgresStorage.PK, real=PostgresStorage.REAL))
            db.execute("INSERT INTO meta VALUES ('schema', '1')")
            db.execute("INSERT INTO devices (name, token_sha256, created) VALUES ('old', 'x', 1.0)")
    s = open_storage(database_url)
    try:
        assert s.schema_version() == SCHEMA_VERSION
        old = s.device_by_name("old")
        s.commit_upload(old.id, "c" * 64, "i" * 64, 1, frames(1))
        job = s.create_job_if_due(old.id, 0, "api")
        assert s.claim_next_job("w", 30).lease_owner == "w" and s.job(job.id).state == "running"
    finally:
        s.close()
    s = open_storage(database_url)  # opening again migrates nothing
    assert s.schema_version() == SCHEMA_VERSION and s.device_by_name("old") is not None
    s.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    SQLiteStorage(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer than this program"):
        SQLiteStorage(path)


@pytest.fixture
def blobs(blob_url):
    url, endpoint = blob_url
    return open_blob_store(url, endpoint)


def test_blob_store_contract(blobs, tmp_path):
    data = b"\xff\xd8frame bytes" * 100
    sha = blobs.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest() and blobs.put_bytes(data) == sha  # writing twice is harmless
    assert blobs.exists(sha) and blobs.size(sha) == len(data)
    with blobs.open(sha) as fh:
        fh.seek(10)
        assert fh.read(5) == data[10:15]
    src = tmp_path / "model.onnx"
    src.write_bytes(b"onnx" * 1000)
    file_sha = blobs.put_file(src)
    assert file_sha == hashlib.sha256(src.read_bytes()).hexdigest() and src.exists()
    with blobs.open(file_sha) as fh:
        assert fh.read() == src.read_bytes()
    missing = "0" * 64
    assert not blobs.exists(missing)
    with pytest.raises(FileNotFoundError):
        blobs.open(missing)
    with pytest.raises(ValueError):
        blobs.exists("../etc/passwd")
    assert sorted(blobs.names()) == sorted({sha, file_sha})
