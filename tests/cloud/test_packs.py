"""An object store keeps an upload's frames in one object with an offset index in the database
(cloud/s3.py, schema v5), on a real S3 HTTP API (moto in server mode): a frame reads back as a
byte range, and blobs stored one object each before packing still read back."""
from __future__ import annotations

import hashlib
import secrets

from cloud.s3 import S3BlobStore
from cloud.storage import SQLiteStorage
from tests.cloud.conftest import jpeg_frames


def test_frames_are_packed_and_old_single_objects_still_read(s3_server, tmp_path):
    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    blobs = S3BlobStore(f"s3://hmd-packs-{secrets.token_hex(4)}/b", endpoint_url=s3_server.endpoint)
    old, new = [jpg for _, jpg in jpeg_frames(2)], [jpg for _, jpg in jpeg_frames(3, start=2)]
    spooled = []
    for i, data in enumerate(new):
        path = tmp_path / f"frame{i}.jpg"
        path.write_bytes(data)
        spooled.append((hashlib.sha256(data).hexdigest(), path))
    blobs.put_files([(hashlib.sha256(d).hexdigest(), d) for d in old])  # as stored before packing
    assert len(blobs.objects()) == 2

    blobs.attach_index(storage)
    index = b'{"frames": "the upload index"}'
    blobs.put_files([*spooled, spooled[0], (hashlib.sha256(index).hexdigest(), index)])
    objects = blobs.objects()
    packs = [key for key in objects if key.startswith("b/packs/")]
    assert len(objects) == 3 and len(packs) == 1  # three frames and the index: one object
    pack = blobs.client.get_object(Bucket=blobs.bucket, Key=packs[0])["Body"].read()
    assert pack == b"".join(new) + index  # the repeated frame once

    locations = storage.blob_locations([sha for sha, _ in spooled])
    assert [locations[sha][1:] for sha, _ in spooled] == [(0, len(new[0])), (len(new[0]), len(new[1])),
                                                          (len(new[0]) + len(new[1]), len(new[2]))]
    for data in old + new + [index]:
        sha = hashlib.sha256(data).hexdigest()
        assert blobs.exists(sha) and blobs.size(sha) == len(data)
        with blobs.open(sha) as fh:
            assert fh.read() == data
    wanted = [hashlib.sha256(d).hexdigest() for d in (new[2], old[1], new[0])]
    assert blobs.read_many(wanted) == {hashlib.sha256(d).hexdigest(): d for d in (new[2], old[1], new[0])}
    assert sorted(blobs.names()) == sorted(hashlib.sha256(d).hexdigest() for d in old + new + [index])
    assert not blobs.exists("0" * 64)

    later = jpeg_frames(1, start=5)[0][1]  # a resent frame is not packed again
    blobs.put_files([spooled[1], (hashlib.sha256(later).hexdigest(), later)])
    (newest,) = set(blobs.objects()) - set(objects)
    assert blobs.client.get_object(Bucket=blobs.bucket, Key=newest)["Body"].read() == later
    storage.close()


def _ingest(body: bytes, blobs, tmp_path):
    """The service's parser over an upload body, as the API runs it."""
    import queue

    from cloud.ingest import _Parser

    q: queue.Queue = queue.Queue()
    for i in range(0, len(body), 4096):
        q.put(body[i:i + 4096])
    q.put(None)
    received = _Parser(q, blobs, tmp_path / "spool", max_frames=64, max_frame_bytes=1 << 20)._parse()
    received.size = len(body)
    return received


def test_the_folder_store_packs_an_upload_and_recovery_removes_only_dead_packs(tmp_path):
    from cloud.blobs import LocalBlobStore
    from cloud.ingest import commit
    from cloud.keys import new_token, token_sha256
    from shared.wire import build_upload_archive

    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    device = storage.add_device("wearer1", token_sha256(new_token("wearer1")))
    blobs = LocalBlobStore(tmp_path / "blobs")
    old = jpeg_frames(1, start=9)[0][1]
    old_sha = blobs.put_bytes(old)  # stored one file each, before packing
    blobs.attach_index(storage)
    frames = jpeg_frames(3)
    body = build_upload_archive([*frames, ({"seq": 9}, old)])
    upload, created = commit(_ingest(body, blobs, tmp_path), device.id, storage, blobs)
    assert created and upload.frames == 4
    (pack,) = list((tmp_path / "blobs" / "packs").iterdir())  # one file for the upload...
    singles = [p.name for d in (tmp_path / "blobs").iterdir() if len(d.name) == 2 for p in d.iterdir()]
    assert singles == [old_sha]  # ...and no file per frame
    with blobs.open(upload.index_sha256) as fh:
        index = fh.read()
    assert pack.read_bytes() == b"".join(jpg for _, jpg in frames) + old + index
    shas = [hashlib.sha256(jpg).hexdigest() for _, jpg in frames]
    assert set(storage.blob_locations(shas)) == set(shas)  # located with the upload's commit
    for sha, (_, jpg) in zip(shas, frames):
        assert blobs.exists(sha) and blobs.size(sha) == len(jpg)
        with blobs.open(sha) as fh:
            assert fh.read() == jpg
    assert blobs.read_many([shas[2], old_sha, shas[0]]) == {shas[2]: frames[2][1], old_sha: old, shas[0]: frames[0][1]}
    assert upload.index_sha256 in blobs.names() and set(shas) <= set(blobs.names())

    # a crash after the pack was made durable and before the upload committed: a pack no row
    # locates; and a pack whose located frames no upload names
    crashed = _ingest(build_upload_archive(jpeg_frames(2, start=20)), blobs, tmp_path)
    blobs.store_pack(crashed.pack, crashed.pack_rows)
    orphan = _ingest(build_upload_archive(jpeg_frames(2, start=30)), blobs, tmp_path)
    blobs.put_pack(orphan.pack, orphan.pack_rows)
    assert len(list((tmp_path / "blobs" / "packs").iterdir())) == 3
    removed = blobs.remove_unreferenced(storage.referenced_blobs())
    # the orphan's two frames and its index (the parser writes the index into the pack, after the frames)
    assert removed == 3 and [p.name for p in (tmp_path / "blobs" / "packs").iterdir()] == [pack.name]
    assert not storage.blob_locations([sha for sha, _, _ in orphan.pack_rows])
    with blobs.open(shas[1]) as fh:  # what was committed is untouched
        assert fh.read() == frames[1][1]
    storage.close()


def test_an_object_store_pack_put_early_is_deleted_when_the_upload_is_refused_or_a_repeat(s3_server, tmp_path):
    """The ingest PUTs an object store's pack as soon as it is written (while the last frames
    decode): committed, it is the upload's; refused at validation, or a repeat of a stored upload,
    the object is deleted."""
    from cloud.ingest import UploadRejected, _Parser, commit
    from cloud.keys import new_token, token_sha256
    from shared.wire import build_upload_archive

    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    device = storage.add_device("wearer1", token_sha256(new_token("wearer1")))
    blobs = S3BlobStore(f"s3://hmd-early-{secrets.token_hex(4)}/b", endpoint_url=s3_server.endpoint)
    blobs.attach_index(storage)

    def packs():
        return sorted(k for k in blobs.objects() if k.startswith("b/packs/"))
    puts: list[str] = []
    put = blobs.put_pack_file
    blobs.put_pack_file = lambda path, name: (puts.append(name), put(path, name))[1]  # type: ignore[method-assign]

    frames = jpeg_frames(3)
    received = _ingest(build_upload_archive(frames), blobs, tmp_path)
    assert received.pack_put is not None and received.pack_put.result() is None
    name = received.pack_upload.name
    upload, created = commit(received, device.id, storage, blobs)
    assert received.pack_upload is None  # the commit's now
    assert created and packs() == [f"b/packs/{name}"]
    for _, jpg in frames:
        with blobs.open(hashlib.sha256(jpg).hexdigest()) as fh:
            assert fh.read() == jpg

    repeat = _ingest(build_upload_archive(frames, first_seq=0), blobs, tmp_path)  # the same frames, another index
    repeat_name = repeat.pack_upload.name
    assert repeat_name != name
    assert commit(repeat, device.id, storage, blobs) == (upload, False)
    assert puts == [name, repeat_name]
    assert packs() == [f"b/packs/{name}"]  # the repeat's object is gone

    bad = build_upload_archive(jpeg_frames(2, start=10))  # refused at validation: a frame's sha256 is wrong
    at = bad.index(b'"sha256": "') + len(b'"sha256": "')
    bad = bad[:at] + (b"1" if bad[at:at + 1] == b"0" else b"0") + bad[at + 1:]  # the tar sizes unchanged
    parser = _Parser(_queue(bad), blobs, tmp_path / "spool", max_frames=64, max_frame_bytes=1 << 20)
    parser.run()
    assert isinstance(parser.result.exception(), UploadRejected) and parser.result.exception().status == 400
    assert len(puts) == 3 and packs() == [f"b/packs/{name}"]  # put, then deleted
    assert not list((tmp_path / "spool").iterdir())
    storage.close()


def _queue(body: bytes):
    import queue

    q: queue.Queue = queue.Queue()
    for i in range(0, len(body), 4096):
        q.put(body[i:i + 4096])
    q.put(None)
    return q


def _noise_frames(n: int, seed: int = 0) -> list[tuple[dict, bytes]]:
    """Frames that do not compress: ~0.4 MB each at 480x640."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ok, jpg = cv2.imencode(".jpg", rng.integers(0, 256, (480, 640, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
        out.append(({"seq": i, "width": 640, "height": 480}, jpg.tobytes()))
    return out


def test_a_large_pack_goes_up_in_parts_while_it_arrives_and_a_refused_one_leaves_nothing(s3_server, tmp_path,
                                                                                          monkeypatch):
    """A pack that reaches the multipart size is put as a multipart upload, a part as soon as it is written:
    committed, its frames read back; an upload refused half-way (parts already up) leaves no object
    and no unfinished multipart upload; one refused after its last part is deleted."""
    import cloud.s3
    from cloud.ingest import UploadRejected, _Parser, commit
    from cloud.keys import new_token, token_sha256
    from shared.wire import build_upload_archive

    monkeypatch.setattr(cloud.s3, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    device = storage.add_device("wearer1", token_sha256(new_token("wearer1")))
    blobs = S3BlobStore(f"s3://hmd-parts-{secrets.token_hex(4)}/b", endpoint_url=s3_server.endpoint,
                        multipart_bytes=0)  # parts from the first one
    blobs.attach_index(storage)

    def stored():
        unfinished = blobs.client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", [])
        return sorted(k for k in blobs.objects() if k.startswith("b/packs/")), len(unfinished)

    frames = _noise_frames(32)
    body = build_upload_archive(frames)
    assert len(body) > 11 * 1024 * 1024
    received = _ingest(body, blobs, tmp_path)
    pack_bytes = sum(len(jpg) for _, jpg in frames) + len(received.index_bytes)
    assert received.pack_upload.parts == -(-pack_bytes // (5 * 1024 * 1024))  # full parts, then the rest
    name = received.pack_upload.name
    upload, created = commit(received, device.id, storage, blobs)
    assert created and stored() == ([f"b/packs/{name}"], 0)
    pack = blobs.client.get_object(Bucket=blobs.bucket, Key=f"b/packs/{name}")["Body"].read()
    assert pack == b"".join(jpg for _, jpg in frames) + received.index_bytes
    for _, jpg in frames[::7]:
        with blobs.open(hashlib.sha256(jpg).hexdigest()) as fh:
            assert fh.read() == jpg

    truncated = build_upload_archive(_noise_frames(32, seed=1))[:9 * 1024 * 1024]  # a part is up, then it ends
    parser = _Parser(_queue(truncated), blobs, tmp_path / "spool", max_frames=64, max_frame_bytes=1 << 20)
    parser.run()
    exc = parser.result.exception()
    assert isinstance(exc, UploadRejected) and exc.status == 400 and "truncated" in exc.detail
    assert stored() == ([f"b/packs/{name}"], 0)

    bad = build_upload_archive(_noise_frames(32, seed=2))  # refused at validation: a frame's sha256 is wrong
    at = bad.index(b'"sha256": "') + len(b'"sha256": "')
    bad = bad[:at] + (b"1" if bad[at:at + 1] == b"0" else b"0") + bad[at + 1:]
    parser = _Parser(_queue(bad), blobs, tmp_path / "spool", max_frames=64, max_frame_bytes=1 << 20)
    parser.run()
    assert isinstance(parser.result.exception(), UploadRejected)
    assert stored() == ([f"b/packs/{name}"], 0)
    assert not list((tmp_path / "spool").iterdir())
    storage.close()


def test_a_pack_goes_up_in_parts_only_once_it_reaches_the_multipart_size(s3_server, tmp_path, monkeypatch):
    """Under the store's multipart size a pack is one PUT when it is complete; past it, the parts for what was
    written so far start at once, then one per PART_BYTES."""
    import concurrent.futures

    import cloud.s3

    monkeypatch.setattr(cloud.s3, "PART_BYTES", 5 * 1024 * 1024)
    blobs = S3BlobStore(f"s3://hmd-mpu-{secrets.token_hex(4)}/b", endpoint_url=s3_server.endpoint,
                        multipart_bytes=12 * 1024 * 1024)
    data = secrets.token_bytes(16 * 1024 * 1024)
    path = tmp_path / "pack"
    path.write_bytes(data)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        small = blobs.pack_upload(path, pool.submit)
        small.written(11 * 1024 * 1024)  # under the multipart size: nothing yet
        assert small.parts == 0
        big = blobs.pack_upload(path, pool.submit)
        big.written(13 * 1024 * 1024)  # past it: the two full parts written so far
        assert big.parts == 2
        big.written(14 * 1024 * 1024)  # the third part is not full yet
        assert big.parts == 2
        big.written(16 * 1024 * 1024)  # now it is
        assert big.parts == 3
        big.finish(len(data)).result(timeout=60)
        assert big.parts == 4
        small.finish(len(data)).result(timeout=60)  # one PUT
        assert small.parts == 0
    for upload in (small, big):
        got = blobs.client.get_object(Bucket=blobs.bucket, Key=upload.key)["Body"].read()
        assert got == data
