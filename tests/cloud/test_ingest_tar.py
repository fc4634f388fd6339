"""The upload parser's own tar reader (cloud/ustar.py): members' exact bytes whatever the chunking
and the tar dialect, and every bad archive the tarfile-based parser refused is refused with the
same status and code (400 bad_archive), nothing left behind."""
from __future__ import annotations

import hashlib
import io
import json
import queue
import tarfile

import pytest

from cloud import ingest
from cloud.blobs import LocalBlobStore
from cloud.storage import SQLiteStorage
from cloud.ustar import TarError, TarReader
from shared.wire import build_upload_archive
from tests.cloud.conftest import jpeg_frames, tar_of


def _reader(body: bytes, chunk: int) -> TarReader:
    pieces = iter([body[i:i + chunk] for i in range(0, len(body), chunk)])
    return TarReader(lambda: next(pieces, None), 64 * 1024)


def _members(body: bytes, chunk: int) -> list[tuple[str, bytes]]:
    r = _reader(body, chunk)
    out = []
    while (m := r.next_member()) is not None:
        assert m.regular
        out.append((m.name, r.read_data()))
    return out


def _tar(members: list[tuple[str, bytes]], fmt: int, **info) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            for k, v in info.items():
                setattr(ti, k, v)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


SIZES = [0, 1, 511, 512, 513, 1024, 70_001]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_read_back_exactly_whatever_the_chunks(fmt):
    members = [(f"frames/{n:06d}.jpg", bytes((i * 7 + n) % 256 for i in range(n))) for n in SIZES]
    if fmt != tarfile.USTAR_FORMAT:  # a long name: a GNU long-name header, or a PAX path record
        members.append(("frames/" + "l" * 150 + ".jpg", b"long"))
    else:  # a name split into the ustar prefix and name fields
        members.append(("frames/" + "p" * 90 + "/" + "n" * 60 + ".jpg", b"prefixed"))
    body = _tar(members, fmt, mtime=1.5 if fmt == tarfile.PAX_FORMAT else 0)  # a float mtime: a PAX record
    for chunk in (1, 7, 511, 512, 4096, len(body)):
        assert _members(body, chunk) == members, chunk


def test_pax_size_and_global_headers_apply_and_a_checksum_may_be_signed():
    data = bytes(range(256)) * 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as t:
        ti = tarfile.TarInfo("frames/a.jpg")
        ti.size, ti.uname = len(data), "é" * 40  # a non-ASCII user name: a PAX record
        t.addfile(ti, io.BytesIO(data))
    assert _members(buf.getvalue(), 100) == [("frames/a.jpg", data)]
    # a header with a byte above 127, checksummed as signed bytes (some old tars did)
    ti = tarfile.TarInfo("frames/b.jpg")
    ti.size, ti.uname = 3, "\xff"
    header = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT, encoding="latin-1"))
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    header[148:156] = b"%06o\0 " % signed
    assert _members(bytes(header) + b"abc" + bytes(509) + bytes(1024), 64) == [("frames/b.jpg", b"abc")]


def test_the_archive_ends_at_its_zero_block_and_what_follows_is_not_read():
    body = tar_of({"frames/a.jpg": b"x" * 10}) + b"trailing bytes a client padded with"
    r = _reader(body, 512)
    assert r.next_member().name == "frames/a.jpg" and r.read_data() == b"x" * 10
    assert r.next_member() is None
    r.drain()
    assert r.eof


def _header(name: str, size: int = 0, kind: bytes = b"0", **fields) -> bytearray:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, kind
    for k, v in fields.items():
        setattr(ti, k, v)
    return bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))


def _rechecksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _pax(records: bytes, kind: bytes = b"x") -> bytes:
    return bytes(_header("././@PaxHeader", len(records), kind)) + records + bytes(-len(records) % 512)


def _good_upload() -> tuple[bytes, bytes, dict[str, bytes]]:
    frames = jpeg_frames(2)
    members = {f"frames/{i}.jpg": d for i, (_, d) in enumerate(frames)}
    index = json.dumps({"format": 1, "frames": [{"file": n, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                                               for n, d in members.items()]}).encode()
    return tar_of({"index.json": index, **members}), index, members


def _frame_block(name: str, data: bytes, kind: bytes = b"0") -> bytes:
    return bytes(_header(name, len(data), kind)) + data + bytes(-len(data) % 512)


def _bad_archives() -> dict[str, bytes]:
    good, index, members = _good_upload()
    (n0, d0), (n1, d1) = members.items()
    head = bytes(_header("index.json", len(index))) + index + bytes(-len(index) % 512)
    bad_sum = bytearray(good[:512])
    bad_sum[0] ^= 1  # the name changed, the checksum not
    bad_uid = bytearray(good[:512])
    bad_uid[108:116] = b"zz\0\0\0\0\0\0"
    sparse = bytearray(_header(n0, len(d0), b"S"))
    return {
        "not a tar": b"hello, this is not an archive" * 100,
        "gzip": b"\x1f\x8b\x08\x00" + bytes(600),
        "zero block first": bytes(1024) + good,
        "truncated first header": good[:300],
        "bad checksum": bytes(bad_sum) + good[512:],
        "a number field not a number": _rechecksum(bad_uid) + good[512:],
        "truncated in a member": good[:len(head) + 512 + 100],
        "truncated in a header": good[:len(head) + 100],
        "symlink": head + bytes(_header(n0, 0, b"2", linkname="/etc/passwd")) + bytes(1024),
        "hard link": head + bytes(_header(n0, 0, b"1", linkname="index.json")) + bytes(1024),
        "directory": head + bytes(_header("frames/", 0, b"5")) + bytes(1024),
        "old-style directory": head + bytes(_header("frames/x/", 0, b"\0")) + bytes(1024),
        "fifo": head + bytes(_header(n0, 0, b"6")) + bytes(1024),
        "character device": head + bytes(_header(n0, 0, b"3")) + bytes(1024),
        "contiguous file": head + _frame_block(n0, d0, b"7") + bytes(1024),
        "GNU sparse": head + _rechecksum(sparse) + d0 + bytes(-len(d0) % 512) + bytes(1024),
        "PAX sparse": head + _pax(b"22 GNU.sparse.map=0,4\n") + _frame_block(n0, d0) + bytes(1024),
        "PAX record of length 0": _pax(b"0 path=x\n") + good,
        "PAX extended header with nothing after it": head + _pax(b"16 path=frames/x\n"),
        "huge PAX header": bytes(_header("././@PaxHeader", 1 << 20, b"x")) + good,
        "huge GNU long name": bytes(_header("././@LongLink", 1 << 20, b"L")) + good,
        "member twice": head + _frame_block(n0, d0) + _frame_block(n0, d0) + bytes(1024),
        "index twice": head + head + _frame_block(n0, d0) + bytes(1024),
        "not a frame name": head + _frame_block("frames/../../etc/x.jpg", d0) + bytes(1024),
        "a frame not listed": head + _frame_block(n0, d0) + _frame_block(n1, d1) + _frame_block("frames/9.jpg", d1)
        + bytes(1024),
        "no index": tar_of(members),
        "index not JSON": tar_of({"index.json": b"{nope", **members}),
    }


def _parse(body: bytes, blobs, spool, chunk: int = 4096, **limits):
    q: queue.Queue = queue.Queue()
    for i in range(0, len(body), chunk):
        q.put(body[i:i + chunk])
    q.put(None)
    parser = ingest._Parser(q, blobs, spool, **{"max_frames": 64, "max_frame_bytes": 1 << 20, **limits})
    parser.run()  # as the service runs it: on failure its files are removed, the body read to its end
    return parser.result.exception() or parser.result.result()


@pytest.fixture
def packing_store(tmp_path):
    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    blobs = LocalBlobStore(tmp_path / "blobs")
    blobs.attach_index(storage)
    yield blobs
    storage.close()


def test_every_bad_archive_is_400_bad_archive_and_leaves_nothing(packing_store, tmp_path):
    cases = _bad_archives()
    for name, body in cases.items():
        for store in (packing_store, LocalBlobStore(tmp_path / "unpacked")):
            answer = _parse(body, store, tmp_path / "spool")
            assert isinstance(answer, ingest.UploadRejected), name
            assert (answer.status, answer.code) == (400, "bad_archive"), (name, answer.detail)
            assert not [p for p in tmp_path.rglob("*") if p.is_file() and "sqlite3" not in p.name], name
    assert "extended tar header of 1048576 bytes" in _parse(cases["huge GNU long name"], packing_store, tmp_path).detail
    assert "sparse" in _parse(cases["PAX sparse"], packing_store, tmp_path).detail
    assert "not an uncompressed tar archive" in _parse(cases["zero block first"], packing_store, tmp_path).detail
    assert "truncated or corrupt" in _parse(cases["truncated in a member"], packing_store, tmp_path).detail


def test_limits_on_members_hold(packing_store, tmp_path):
    good, index, members = _good_upload()
    assert "more than 1 frames" in _parse(good, packing_store, tmp_path, max_frames=1).detail
    assert "is larger than 100 bytes" in _parse(good, packing_store, tmp_path, max_frame_bytes=100).detail
    big_index = tar_of({"index.json": b" " * (ingest.INDEX_LIMIT + 1)})
    assert "larger than 8 MiB" in _parse(big_index, packing_store, tmp_path, chunk=1 << 20).detail


def test_a_corrupt_header_after_the_frames_is_refused_where_tarfile_ended_the_archive(packing_store, tmp_path):
    _, index, members = _good_upload()
    junk = bytearray(_header("frames/z.jpg", 4))
    junk[0] ^= 1  # a bad checksum
    body = b"".join(_frame_block(n, d) for n, d in [("index.json", index), *members.items()]) + bytes(junk) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r|") as t:
        assert [m.name for m in t] == ["index.json", "frames/0.jpg", "frames/1.jpg"]  # tarfile: the end
    answer = _parse(body, packing_store, tmp_path)
    assert (answer.status, answer.code) == (400, "bad_archive") and "truncated or corrupt" in answer.detail


def test_an_upload_parses_the_same_whatever_the_chunks(packing_store, tmp_path):
    frames = jpeg_frames(5)
    body = build_upload_archive(frames)
    answers = [_parse(body, packing_store, tmp_path / "spool", chunk=chunk) for chunk in (1, 511, 513, 65536)]
    shas = [hashlib.sha256(d).hexdigest() for _, d in frames]
    for received in answers:
        assert [r.sha256 for r in received.rows] == shas and [(r.width, r.height) for r in received.rows] == [(32, 32)] * 5
        assert received.pack.read_bytes() == b"".join(d for _, d in frames) + received.index_bytes
        assert received.pack_rows[-1] == (hashlib.sha256(received.index_bytes).hexdigest(),
                                          sum(len(d) for _, d in frames), len(received.index_bytes))


def test_a_frame_sent_twice_in_one_upload_is_located_at_its_first_copy(packing_store, tmp_path):
    (meta, jpg), = jpeg_frames(1)
    body = build_upload_archive([(meta, jpg), ({**meta, "seq": 1}, jpg)])
    received = _parse(body, packing_store, tmp_path)
    sha = hashlib.sha256(jpg).hexdigest()
    assert [r.sha256 for r in received.rows] == [sha, sha]
    assert received.pack_rows[0] == (sha, 0, len(jpg)) and [r[0] for r in received.pack_rows].count(sha) == 1


def test_the_reader_refuses_a_negative_size():
    header = _header("frames/a.jpg", 0)
    header[124:136] = b"\xff" * 12  # base-256: -1
    with pytest.raises(TarError):
        _members(_rechecksum(header) + bytes(1024), 512)
