"""On PostgreSQL an upload's transaction is opened as soon as its index arrives and its rows are
inserted while the frames are still received and checked (cloud/postgres.py ``PreparedUpload``):
what commits is exactly what the usual transaction would have stored, a refused upload leaves
nothing, a concurrent repeat is a repeat, and any failure of the early transaction falls back to
the usual commit. On a real PostgreSQL server and a real S3 HTTP API (moto in server mode)."""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import queue
import secrets
import time

import pytest

from cloud import postgres
from cloud.ingest import UploadRejected, _Parser, commit
from cloud.keys import new_token, token_sha256
from cloud.s3 import S3BlobStore
from shared.wire import build_upload_archive
from tests.cloud.conftest import jpeg_frames


@pytest.fixture
def scaled(pg_server, s3_server, tmp_path):
    storage = postgres.PostgresStorage(pg_server.new_database("prep"))
    blobs = S3BlobStore(f"s3://hmd-prep-{secrets.token_hex(4)}/b", endpoint_url=s3_server.endpoint)
    blobs.attach_index(storage)
    device = storage.add_device("wearer1", token_sha256(new_token("wearer1")))
    yield storage, blobs, device
    storage.close()


def _parser(body: bytes, storage, blobs, device, tmp_path, prepare=True) -> _Parser:
    """The service's parser over an upload body, not run yet."""
    q: queue.Queue = queue.Queue()
    for i in range(0, len(body), 4096):
        q.put(body[i:i + 4096])
    q.put(None)
    return _Parser(q, blobs, tmp_path / "spool", max_frames=64, max_frame_bytes=1 << 20,
                   prepare=functools.partial(storage.prepare_upload, device.id) if prepare else None)


def _receive(body: bytes, storage, blobs, device, tmp_path, prepare=True):
    parser = _parser(body, storage, blobs, device, tmp_path, prepare)
    parser.run()
    received = parser.result.result()
    received.size = len(body)
    return received


def _stored(storage, device_id: int) -> tuple[list, list, list]:
    uploads = [tuple(r) for r in storage._query("SELECT id, frames, bytes, content_sha256 FROM uploads "
                                                "WHERE device_id=? ORDER BY created", (device_id,))]
    frames = [tuple(r) for r in storage._query("SELECT upload_id, ord, sha256, width, height, meta FROM frames "
                                               "WHERE device_id=? ORDER BY row", (device_id,))]
    located = [tuple(r) for r in storage._query("SELECT sha256, pack, pack_offset, pack_length FROM blob_packs "
                                                "ORDER BY pack, pack_offset")]
    return uploads, frames, located


def _idle(storage) -> bool:
    """Every early transaction ended and its connection back in the pool."""
    sem = storage._prepared
    got = [sem.acquire(blocking=False) for _ in range(postgres.PREPARED_UPLOADS)]
    for ok in got:
        if ok:
            sem.release()
    return all(got) and storage._pool.get_stats().get("requests_waiting", 0) == 0


def _wait_idle(storage) -> None:
    """Until every early transaction has ended (a rollback runs on the transaction's own thread)."""
    deadline = time.monotonic() + 10
    while not _idle(storage) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _idle(storage)


def test_the_early_transaction_commits_what_the_usual_one_stores(scaled, tmp_path, monkeypatch):
    storage, blobs, device = scaled
    frames = jpeg_frames(4)
    body = build_upload_archive(frames)
    # the usual commit, on a second device, for the rows to compare with
    other = storage.add_device("wearer2", token_sha256(new_token("wearer2")))
    usual = _receive(body, storage, blobs, other, tmp_path, prepare=False)
    assert usual.prepared is None
    commit(usual, other.id, storage, blobs)

    received = _receive(body, storage, blobs, device, tmp_path)
    prepared = received.prepared
    assert prepared is not None
    calls = []
    monkeypatch.setattr(type(storage), "commit_upload", lambda *a, **k: calls.append(a))  # must not be needed
    upload, created = commit(received, device.id, storage, blobs)
    assert created and calls == []
    assert (upload.frames, upload.bytes) == (4, len(body))
    # the pack's locations were inserted early too, as the index declared them
    assert [loc[0] for loc in prepared._locations] == [hashlib.sha256(jpg).hexdigest() for _, jpg in frames] + \
        [hashlib.sha256(received.index_bytes).hexdigest()]

    uploads, rows, located = _stored(storage, device.id)
    assert uploads == [(upload.id, 4, len(body), upload.content_sha256)]
    usual_uploads, usual_rows, _ = _stored(storage, other.id)
    assert [r[1:] for r in rows] == [r[1:] for r in usual_rows]  # ord, sha256, width, height, meta
    assert {r[0] for r in rows} == {upload.id}
    # the frames read back from their pack (the usual upload's pack holds them: located first)
    for _, jpg in frames:
        with blobs.open(hashlib.sha256(jpg).hexdigest()) as fh:
            assert fh.read() == jpg
    assert _idle(storage)


def test_a_refused_upload_leaves_nothing_of_its_early_transaction(scaled, tmp_path):
    storage, blobs, device = scaled
    bad = build_upload_archive(jpeg_frames(2, start=10))  # a frame's declared width is wrong
    at = bad.index(b'"width": 32')
    bad = bad[:at] + b'"width": 33' + bad[at + len(b'"width": 32'):]  # the same length: tar sizes unchanged
    # ...which the index-declared rows carry, so the early transaction inserted a row with width 33
    parser = _parser(bad, storage, blobs, device, tmp_path)
    parser.run()
    exc = parser.result.exception()
    assert isinstance(exc, UploadRejected) and exc.status == 400 and "is 32x32, the index says 33x32" in exc.detail
    _wait_idle(storage)
    assert _stored(storage, device.id) == ([], [], [])
    assert not [k for k in blobs.objects() if "/packs/" in k]  # the early PUT deleted too


def test_a_concurrent_repeat_waits_for_the_first_and_is_a_repeat(scaled, tmp_path):
    storage, blobs, device = scaled
    body = build_upload_archive(jpeg_frames(3))
    first = _receive(body, storage, blobs, device, tmp_path)  # its transaction holds the upload's key
    second = _receive(body, storage, blobs, device, tmp_path)  # ...so this one's waits on it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        later = pool.submit(commit, second, device.id, storage, blobs)
        upload, created = commit(first, device.id, storage, blobs)
        assert created
        assert later.result(timeout=30) == (upload, False)
    uploads, rows, _ = _stored(storage, device.id)
    assert [u[0] for u in uploads] == [upload.id] and len(rows) == 3
    assert _idle(storage)


def test_an_early_transaction_that_fails_falls_back_to_the_usual_commit(scaled, tmp_path, monkeypatch):
    storage, blobs, device = scaled

    def broken(self, size, locations):
        raise postgres._psycopg()[0].OperationalError("the connection was lost")
    monkeypatch.setattr(postgres.PreparedUpload, "_commit", broken)
    body = build_upload_archive(jpeg_frames(3))
    received = _receive(body, storage, blobs, device, tmp_path)
    upload, created = commit(received, device.id, storage, blobs)
    assert created
    uploads, rows, located = _stored(storage, device.id)
    assert [u[0] for u in uploads] == [upload.id] and [r[1] for r in rows] == [0, 1, 2]  # stored once
    assert len(located) == 4  # three frames and the index
    assert _idle(storage)


def test_an_index_without_frame_sizes_commits_the_usual_way(scaled, tmp_path):
    storage, blobs, device = scaled
    frames = [({k: v for k, v in meta.items() if k not in ("width", "height")}, jpg) for meta, jpg in jpeg_frames(2)]
    received = _receive(build_upload_archive(frames), storage, blobs, device, tmp_path)
    assert received.prepared is None  # the rows' sizes come from decoding: nothing to insert early
    upload, created = commit(received, device.id, storage, blobs)
    assert created and [r[3:5] for r in _stored(storage, device.id)[1]] == [(32, 32), (32, 32)]


def test_the_settings_turn_the_early_transaction_off_and_set_the_multipart_size(scaled, s3_server):
    import types

    from cloud.backends import open_blob_store
    from cloud.routers.uploads import _prepare
    from cloud.settings import Settings

    storage, _, device = scaled
    on = types.SimpleNamespace(storage=storage, settings=Settings(data_dir="x"))
    off = types.SimpleNamespace(storage=storage, settings=Settings.from_sources(
        {"data_dir": "x"}, env={"HMD_CLOUD_EARLY_TRANSACTION": "0", "HMD_CLOUD_S3_MULTIPART_MB": "16"}))
    assert _prepare(on, device.id) is not None and _prepare(off, device.id) is None
    assert off.settings.s3_multipart_mb == 16
    blobs = open_blob_store(f"s3://hmd-set-{secrets.token_hex(4)}/b", s3_server.endpoint, off.settings.s3_multipart_mb)
    assert blobs.multipart_bytes == 16 * 1024 * 1024
    with pytest.raises(Exception, match="s3_multipart_mb must be >= 0"):
        Settings.from_sources({"data_dir": "x"}, env={"HMD_CLOUD_S3_MULTIPART_MB": "-1"})


def test_an_upload_received_but_never_committed_gives_everything_back(scaled, tmp_path):
    """A request cancelled between receiving and committing: release() rolls the early transaction
    back (its connection and its slot back), deletes the pack object and the spool file."""
    from cloud.ingest import release

    storage, blobs, device = scaled
    received = _receive(build_upload_archive(jpeg_frames(3)), storage, blobs, device, tmp_path)
    assert received.prepared is not None and received.pack_put.result(timeout=30) is None
    assert [k for k in blobs.objects() if "/packs/" in k]  # put while it arrived
    release(received)
    _wait_idle(storage)
    assert _stored(storage, device.id) == ([], [], [])
    assert not [k for k in blobs.objects() if "/packs/" in k]
    assert not received.pack.exists()
    release(received)  # twice: nothing left to give back


def test_a_request_cancelled_while_its_upload_is_checked_gives_everything_back(scaled, tmp_path):
    """The answer's future is cancelled (the client went away) before the parser finishes: the
    parser gives back what the finished upload would have held, as release() does."""
    storage, blobs, device = scaled
    parser = _parser(build_upload_archive(jpeg_frames(3)), storage, blobs, device, tmp_path)
    assert parser.result.cancel()  # as asyncio.wrap_future does when the awaiting request is cancelled
    parser.run()
    _wait_idle(storage)
    assert _stored(storage, device.id) == ([], [], [])
    assert not [k for k in blobs.objects() if "/packs/" in k]
    assert not list((tmp_path / "spool").iterdir())
