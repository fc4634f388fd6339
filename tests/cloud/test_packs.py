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
