"""Upload ingest, streamed: the request body is parsed as a tar archive while it arrives.

The event loop only counts bytes against the size limit and hands the chunks to a parser thread
through a bounded queue. The parser reads the tar stream itself (:mod:`cloud.ustar`: a member is a
slice of the chunk that holds it), parses ``index.json`` as soon as it arrives (a headset's archive
sends it first), appends each frame to the upload's pack (one file: on the folder store, the
stored pack itself; for an object store, a spool file hashed as it is written) and hands the
frames in batches to a small pool of threads that hash and decode-check them while the rest of
the body is still arriving. When the body is complete the pack is finished while the pool works
on: the folder store's is fsynced there, an object store's PUT is started. Then the index is
checked against every member (names, sizes, sha256, decodability, dimensions), and the upload
committed in one database transaction that also records where each blob is in its pack.

Nothing of a rejected upload is kept: the pack is a temporary file until the commit step moves it
into place (folder) or records it (object store; a pack object put for an upload that is then
refused is deleted), and a pack is durable before the transaction that names it. A crash
before the commit leaves at most a pack no row names, removed at the next start (embedded) or
harmless (scaled).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable

import cv2
import numpy as np
import simplejpeg
from pydantic import ValidationError

from cloud.blobs import BlobStore
from cloud.limits import ReceivingSlots, ingest_memory_bound
from cloud.s3 import PART_BYTES
from cloud.storage import FrameRow, Storage, Upload
from cloud.ustar import ExtendedHeaderTooLarge, TarError, TarReader
from shared.errors import UserError
from shared.wire import FRAME_PATH, INDEX_NAME, UploadIndex

log = logging.getLogger("hmd.cloud.ingest")
INDEX_LIMIT = 8 * 1024 * 1024
DEFAULT_MAX_PIXELS = 3840 * 2160
DEFAULT_MAX_META_BYTES = 4096
_QUEUE_CHUNKS = 32  # body pieces buffered between the event loop and the parser thread
_PIECE = 64 * 1024  # the largest piece queued (a socket read can be larger: it is split)
_PENDING_DECODE_BYTES = 16 * 1024 * 1024  # frames handed to the decode pool and not yet checked
_PACK_WRITE = 1024 * 1024  # a pack is written in pieces of this size
_CHECK_BATCH_BYTES = 256 * 1024  # frames checked by one pool task (one task per frame cost locks per frame)
_DECODE_WORKERS = max(2, min(4, os.cpu_count() or 2))
_DECODE_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=_DECODE_WORKERS, thread_name_prefix="frame-check")
MAX_RECEIVING = 4  # uploads parsed at once by this process, all devices together; the others wait
# an object store's pack requests: its parts while it arrives (at most this many parts in memory at once),
# the rest when it is written (not after validation)
_PUT_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_RECEIVING, thread_name_prefix="pack-put")
RECEIVING_WAIT_S = 30.0  # an upload waiting longer for a parser answers 503 (the headset retries)
RECEIVING = ReceivingSlots(MAX_RECEIVING)


def memory_bound(max_frame_bytes: int, max_frame_pixels: int, connections: int = 0,
                 object_store: bool = False) -> dict[str, int]:
    """The ingest's memory bound in bytes, by term, for these limits (see ``ingest_memory_bound``);
    ``object_store``: packs are put to one in parts, a part in memory per request."""
    return ingest_memory_bound(receiving=RECEIVING.limit, queue_bytes=_QUEUE_CHUNKS * _PIECE,
                               pending_decode_bytes=_PENDING_DECODE_BYTES, max_frame_bytes=max_frame_bytes,
                               index_bytes=INDEX_LIMIT, decode_workers=_DECODE_WORKERS,
                               max_frame_pixels=max_frame_pixels, connections=connections,
                               pack_part_requests=MAX_RECEIVING if object_store else 0,  # the PUT pool's threads
                               pack_part_bytes=PART_BYTES)


class UploadRejected(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _bad(detail: str) -> UploadRejected:
    return UploadRejected(400, "bad_archive", detail)


def server_fault(exc: OSError) -> UploadRejected:
    """A fault of the server's storage while ingesting (disk full, file too large, too many open
    files, I/O error): never the client's fault, so a 5xx the headset retries, never a 400 it
    would skip. The exception text stays in the server log."""
    log.warning("storing an upload failed: %s: %s", type(exc).__name__, exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UploadRejected(507, "insufficient_storage", "the server is out of storage space; retry later")
    return UploadRejected(503, "storage_unavailable", "the server could not store the upload; retry later")


def validation_summary(exc: ValidationError | ValueError) -> str:
    """The first problem of a pydantic error as ``field: message`` (no internals, no input echo)."""
    errors = exc.errors(include_url=False, include_input=False) if isinstance(exc, ValidationError) else []
    if not errors:
        return "not valid JSON"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


# -- frame check ---------------------------------------------------------------------------------
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has_exif) from a JPEG's frame header, or None if there is none before the scan."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, exif = 2, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            return None
        seglen = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            exif = True
        if marker in _SOF:
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h, exif
        i += 2 + seglen
    return None


def png_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def check_frame(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a JPEG frame that decodes completely and cleanly, as
    ``cv2.imdecode(.., IMREAD_COLOR)`` sees it; raises :class:`UploadRejected` (400) otherwise.

    The size comes from the frame header and is checked against ``max_pixels`` before anything
    is decoded (an image bomb declares a huge size in a few bytes). The frame is then decoded
    strictly by libjpeg-turbo (simplejpeg, ``strict``: any warning such as a premature end of the
    entropy-coded data fails it, where OpenCV fills the rest with grey) at the smallest DCT
    scale, which still entropy-decodes every coefficient of every scan but skips the full-size
    inverse DCT and colour conversion. A frame with EXIF (whose orientation may swap the size)
    also gets OpenCV's full decode, bounded by the same pixel limit."""
    head = jpeg_header(data)
    if head is None:
        kind = "a PNG" if png_header(data) is not None else "not a JPEG"
        raise _bad(f"{kind}; frames must be JPEG")
    w, h, exif = head
    if w < 1 or h < 1:
        raise _bad(f"declares an empty {w}x{h} image")
    if w * h > max_pixels:
        raise _bad(f"declares {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, min_height=1, min_width=1, strict=True)
    except ValueError:
        raise _bad("is not a complete, decodable JPEG") from None
    if exif:
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
        if img is None:
            raise _bad("is not a decodable JPEG")
        return img.shape[1], img.shape[0]
    return w, h


# -- streaming parser -----------------------------------------------------------------------------
EXTENDED_HEADER_LIMIT = 64 * 1024  # a PAX or GNU long-name header is read whole: bound it (cloud/ustar.py)
_NOT_META = {"file", "sha256", "bytes", "width", "height"}  # an index entry's fields that are not its metadata
_META_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps(meta, separators=(",", ":")), one encoder


def _check_batch(frames: list[bytes], max_pixels: int, hashed: bool) -> list[tuple[str | None, tuple[int, int] | UploadRejected]]:
    """Each frame's sha256 (unless ``hashed``: the parser has it) and decode check, in the pool:
    hashing here, not in the parser, keeps the parser's thread on the tar stream."""
    out: list[tuple[str | None, tuple[int, int] | UploadRejected]] = []
    for data in frames:
        sha = None if hashed else hashlib.sha256(data).hexdigest()
        try:
            out.append((sha, check_frame(data, max_pixels)))
        except UploadRejected as exc:
            out.append((sha, exc))
    return out


@dataclasses.dataclass
class Received:
    """A fully received and validated upload whose frames wait in temporary files."""

    index: UploadIndex
    index_bytes: bytes
    rows: list[FrameRow]
    temps: list[tuple[str, Path]]  # (sha256, temporary file)
    size: int = 0
    pack: Path | None = None  # a packing store's upload: every frame in this one file...
    pack_rows: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # ...(sha256, offset, length),
    # the index's last: the whole pack, written and closed
    pack_synced: bool = False  # the pack is durable already (fsynced by the parser)
    pack_upload: Any = None  # an object store's pack, put while it arrived (cloud.s3.PackUpload)
    pack_put: concurrent.futures.Future | None = None  # ...done once the object is stored
    prepared: Any = None  # the upload's transaction, opened early by the parser (cloud.postgres.PreparedUpload)


# (content sha256, index sha256, the frames' rows as the index declares them) -> an open
# transaction holding them (cloud.postgres.PreparedUpload), or None; see _Parser._prepare
Prepare = Callable[[str, str, list[FrameRow]], Any]


class _Parser:
    def __init__(self, q: "queue.Queue[bytes | None]", blobs: BlobStore, spool_dir: Path, *, max_frames: int,
                 max_frame_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_meta_bytes: int = DEFAULT_MAX_META_BYTES, prepare: Prepare | None = None):
        self.tar = TarReader(q.get, EXTENDED_HEADER_LIMIT)
        self.prepare = prepare
        self.prepared: Any = None  # the upload's early transaction, until the Received holds it
        self.blobs, self.spool_dir = blobs, spool_dir
        self.max_frames, self.max_frame_bytes = max_frames, max_frame_bytes
        self.max_pixels, self.max_meta_bytes = max_pixels, max_meta_bytes
        self.temps: list[Path] = []
        self.result: concurrent.futures.Future = concurrent.futures.Future()
        # skip frames stored already: a stat on a folder store; an object store (a request per
        # frame) skips them when it stores the upload, with one query for all (cloud/s3.py)
        self.lookup_each = getattr(blobs, "cheap_exists", True)
        # a store that packs: the frames go one after the other into one file, which becomes the
        # pack (one file created per upload, not one per frame); they are hashed in the decode
        # pool, so a frame sent twice in one upload is in the pack twice (located once)
        self.packing = bool(getattr(blobs, "packing", False))
        self.pack: Path | None = None
        self._pack_fh: BinaryIO | None = None
        self._pack_buf: list[bytes] = []
        self._pack_buffered = 0
        self._pack_size = 0
        self.index_row: tuple[str, int, int] | None = None  # the index's (sha256, offset, length) in the pack
        # the folder store's pack is the stored file itself: fsynced when written; an object
        # store's is a spool file, put while it is written (PackUpload: in parts as they fill)
        self.sync_pack = self.packing and getattr(blobs, "temp_file", None) is not None
        self.pack_upload: Any = None  # cloud.s3.PackUpload
        self._index: tuple[UploadIndex, list[tuple[dict, str]]] | UploadRejected | None = None
        self.pack_put: concurrent.futures.Future | None = None
        # the frames, in archive order: name -> position, and by position
        self.names: dict[str, int] = {}
        self.sizes: list[int] = []
        self.offsets: list[int] = []  # in the pack
        self.shas: list[str] = []  # hashed by the parser (an unpacked store)
        self.tmps: list[Path | None] = []  # an unpacked store's temporary files (None: stored already)
        self.batches: list[concurrent.futures.Future] = []  # decode-pool answers, in archive order

    def _open_pack(self) -> None:
        make = getattr(self.blobs, "temp_file", None)
        if make is not None:  # the folder store: on its filesystem, so the pack is moved in, not copied
            self._pack_fh, self.pack = make()
        else:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".pack")
            self._pack_fh, self.pack = os.fdopen(fd, "wb"), Path(name)
            make_upload = getattr(self.blobs, "pack_upload", None)
            if make_upload is not None:  # an object store: put while it is written
                self.pack_upload = make_upload(self.pack, _PUT_POOL.submit)
        self.temps.append(self.pack)

    def _flush_pack(self) -> None:
        if self._pack_buf:
            self._pack_fh.write(b"".join(self._pack_buf))  # type: ignore[union-attr]
            self._pack_buf.clear()
            self._pack_buffered = 0
            if self.pack_upload is not None:  # a part full: it goes up now
                self._pack_fh.flush()  # type: ignore[union-attr]
                try:
                    self.pack_upload.written(self._pack_size)
                except Exception as exc:  # noqa: BLE001 - the object store, not the archive: retried later
                    log.warning("starting a pack upload failed: %s: %s", type(exc).__name__, exc)
                    raise UploadRejected(503, "storage_unavailable", "the server could not store the upload; "
                                                                     "retry later") from None

    def _temp(self):
        make = getattr(self.blobs, "temp_file", None)
        if make is not None:
            fh, path = make()
        else:  # a store without local temporary files: spool here, put_file at commit
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".frame")
            fh, path = os.fdopen(fd, "wb"), Path(name)
        self.temps.append(path)
        return fh, path

    def _store_unpacked(self, data: bytes) -> None:
        """An unpacked store: hashed here (to skip a frame stored already), a temporary file each."""
        sha = hashlib.sha256(data).hexdigest()
        tmp = None
        if not self.lookup_each or not self.blobs.exists(sha):
            try:
                fh, tmp = self._temp()
                with fh:
                    fh.write(data)
            except OSError as exc:  # the server's disk, not the archive
                raise server_fault(exc) from None
        self.shas.append(sha)
        self.tmps.append(tmp)

    def run(self) -> None:
        try:
            try:
                received = self._parse()
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                self.cleanup()
                if not self.result.cancelled():
                    self.result.set_exception(exc)
                return
            try:
                self.result.set_result(received)
            except concurrent.futures.InvalidStateError:  # the request was cancelled meanwhile: nobody
                release(received)  # will commit it, so its transaction, pack and files are given back
        finally:
            self.tar.drain()  # never leave the event loop blocked on a full queue

    def cleanup(self) -> None:
        if self._pack_fh is not None:
            self._pack_fh.close()
        prepared, self.prepared = self.prepared, None
        if prepared is not None:  # refused: nothing of its transaction is committed
            prepared.abandon()
        upload, self.pack_upload, self.pack_put = self.pack_upload, None, None
        if upload is not None:  # refused after (some of) its pack was put: that goes too
            shas = [sha for fut in self.batches if not fut.exception() for sha, _ in fut.result() if sha]
            _discard_pack(upload, shas + ([self.index_row[0]] if self.index_row is not None else []))
        for path in self.temps:
            path.unlink(missing_ok=True)

    def _parse(self) -> Received:
        tar, names, sizes, offsets = self.tar, self.names, self.sizes, self.offsets
        pending: collections.deque = collections.deque()  # (batch future, bytes) submitted, not known done
        pending_bytes = 0  # submitted and not yet checked, and in the batch being filled
        batch: list[bytes] = []
        batch_bytes = 0
        index_bytes: bytes | None = None
        packing, hashed = self.packing, not self.packing

        def submit() -> None:
            nonlocal batch, batch_bytes, pending_bytes
            fut = _DECODE_POOL.submit(_check_batch, batch, self.max_pixels, hashed)
            self.batches.append(fut)
            pending.append((fut, batch_bytes))
            batch, batch_bytes = [], 0
            while pending_bytes > _PENDING_DECODE_BYTES or (pending and pending[0][0].done()):
                done, nbytes = pending.popleft()
                done.exception()  # waits; a bad frame is reported by _validate, in index order
                pending_bytes -= nbytes
        try:
            while (m := tar.next_member()) is not None:
                name = m.name
                # only plain files: no links, devices, FIFOs, and no sparse members, whose
                # declared (expanded) size is not what crossed the wire and the size limit
                if not m.regular:
                    kind = "a sparse file" if m.sparse else "not a regular file"
                    raise _bad(f"member {name[:100]!r} is {kind}")
                if name in names or (name == INDEX_NAME and index_bytes is not None):
                    raise _bad(f"member {name!r} appears twice")
                if len(names) >= self.max_frames:
                    raise _bad(f"more than {self.max_frames} frames in one upload")
                if name == INDEX_NAME:
                    if m.size > INDEX_LIMIT:
                        raise _bad(f"{INDEX_NAME} is larger than 8 MiB")
                    index_bytes = tar.read_data()
                    self._index = self._read_index(index_bytes)  # now, not after the last frame
                    continue
                if not FRAME_PATH.match(name):
                    raise _bad(f"archive member {name!r} is not frames/NAME.jpg")
                if m.size > self.max_frame_bytes:
                    raise _bad(f"{name} is larger than {self.max_frame_bytes} bytes")
                data = tar.read_data()
                names[name] = len(sizes)
                sizes.append(len(data))
                if packing:
                    if self._pack_fh is None:
                        try:
                            self._open_pack()
                        except OSError as exc:
                            raise server_fault(exc) from None
                    offsets.append(self._pack_size)
                    self._pack_size += len(data)
                    self._pack_buf.append(data)  # written 1 MB at a time: a write per frame showed in profiles
                    self._pack_buffered += len(data)
                    if self._pack_buffered >= _PACK_WRITE:
                        try:
                            self._flush_pack()
                        except OSError as exc:
                            raise server_fault(exc) from None
                else:
                    self._store_unpacked(data)
                batch.append(data)
                batch_bytes += len(data)
                pending_bytes += len(data)
                if batch_bytes >= _CHECK_BATCH_BYTES or pending_bytes > _PENDING_DECODE_BYTES:
                    submit()
            if batch:
                submit()
            self._finish_pack(index_bytes)  # while the pool still decodes
        except ExtendedHeaderTooLarge as exc:
            raise _bad(f"an extended tar header of {exc.size} bytes; the limit is {EXTENDED_HEADER_LIMIT}") from None
        except TarError:
            if tar.members == 0:
                raise _bad("not an uncompressed tar archive") from None
            raise _bad("the archive is truncated or corrupt") from None
        finally:
            concurrent.futures.wait([f for f, _ in pending])
        return self._validate(index_bytes)

    def _finish_pack(self, index_bytes: bytes | None) -> None:
        """The pack's last bytes written, the index after the frames; on the folder store, made
        durable now, while the decode pool still works (fsync releases the GIL), not at commit."""
        if self._pack_fh is None:
            return
        try:
            if index_bytes is not None:
                self.index_row = (hashlib.sha256(index_bytes).hexdigest(), self._pack_size, len(index_bytes))
                self._pack_buf.append(index_bytes)
                self._pack_size += len(index_bytes)
            self._flush_pack()
            if self.sync_pack:
                self._pack_fh.flush()
                os.fsync(self._pack_fh.fileno())
            self._pack_fh.close()
        except OSError as exc:
            raise server_fault(exc) from None
        if self.pack_upload is not None and isinstance(self._index, tuple):  # an object store
            # the rest put while the pool still decodes; the object is deleted if the upload is refused
            self.pack_put = self.pack_upload.finish(self._pack_size)
            pack_name = self.pack_upload.name
            if self.prepared is not None:  # the locations, as the index declares the frames, inserted now
                # (worked out on the transaction's thread: off the parser's, which the upload waits for)
                self.prepared.add_locations(functools.partial(
                    _declared_locations, self.blobs, pack_name, self._index[0], dict(self.names), list(self.offsets),
                    list(self.sizes), self.index_row))

    def _read_index(self, index_bytes: bytes) -> tuple[UploadIndex, list[tuple[dict, str]]] | UploadRejected:
        """The index parsed and each frame's metadata encoded, as soon as the index arrives (it comes
        first in a headset's archive): off the upload's tail. A problem is kept, and reported by
        :meth:`_validate` in the order it always was."""
        try:
            index = UploadIndex.model_validate_json(index_bytes)
        except (ValidationError, ValueError) as exc:
            return _bad(f"{INDEX_NAME} is not a valid upload index: {validation_summary(exc)}")
        if len(index.frames) > self.max_frames:
            return _bad(f"{len(index.frames)} frames in one upload; the limit is {self.max_frames}")
        # one dump of every frame's metadata (not one call per frame), each encoded as json.dumps
        # with separators=(",", ":") encodes it
        metas = index.model_dump(include={"frames"}, exclude={"frames": {"__all__": _NOT_META}})["frames"]
        encoded = [(meta, _META_JSON.encode(meta)) for meta in metas]
        self._prepare(index, index_bytes, encoded)
        return index, encoded

    def _prepare(self, index: UploadIndex, index_bytes: bytes, metas: list[tuple[dict, str]]) -> None:
        """Open the upload's transaction now (a database that can, :data:`Prepare`), with the
        frames' rows as the index declares them: the rows a valid upload stores, when the index
        gives every frame's size (the check then requires the decoded size to match it)."""
        if self.prepare is None or any(f.width is None or f.height is None for f in index.frames):
            return
        rows = [FrameRow(f.sha256, f.width, f.height, meta, meta_json=meta_json)
                for f, (meta, meta_json) in zip(index.frames, metas)]
        self.prepared = self.prepare(index.content_sha256(), hashlib.sha256(index_bytes).hexdigest(), rows)

    def _validate(self, index_bytes: bytes | None) -> Received:
        if index_bytes is None:
            raise _bad(f"the archive has no {INDEX_NAME}")
        if isinstance(self._index, UploadRejected):
            raise self._index
        index, metas = self._index  # type: ignore[misc]
        listed = [f.file for f in index.frames]
        if len(set(listed)) != len(listed):
            raise _bad("the index lists a frame file twice")
        names, sizes = self.names, self.sizes
        extra = set(names) - set(listed)
        if extra:
            raise _bad(f"archive members not in the index: {sorted(extra)[:3]}")
        answers = [answer for fut in self.batches for answer in fut.result()]  # (sha256 | None, check) by position
        shas = [sha for sha, _ in answers] if self.packing else self.shas
        rows: list[FrameRow] = []
        temps: list[tuple[str, Path]] = []
        for i, f in enumerate(index.frames):
            if not FRAME_PATH.match(f.file):
                raise _bad(f"frame {i}: file name {f.file!r} is not frames/NAME.jpg")
            at = names.get(f.file)
            if at is None:
                raise _bad(f"frame {i}: {f.file} is in the index but not in the archive")
            if sizes[at] != f.bytes:
                raise _bad(f"frame {i}: {f.file} has {sizes[at]} bytes, the index says {f.bytes}")
            if shas[at] != f.sha256:
                raise _bad(f"frame {i}: {f.file} does not match its sha256 in the index")
            check = answers[at][1]
            if isinstance(check, UploadRejected):
                raise _bad(f"frame {i}: {f.file} {check.detail}")
            w, h = check
            if (f.width is not None and f.width != w) or (f.height is not None and f.height != h):
                raise _bad(f"frame {i}: {f.file} is {w}x{h}, the index says {f.width}x{f.height}")
            meta, meta_json = metas[i]
            meta_bytes = len(meta_json)
            if meta_bytes > self.max_meta_bytes:
                raise _bad(f"frame {i}: {meta_bytes} bytes of metadata; the limit is {self.max_meta_bytes}")
            rows.append(FrameRow(f.sha256, w, h, meta, meta_json=meta_json))
            if not self.packing and self.tmps[at] is not None:
                temps.append((f.sha256, self.tmps[at]))  # type: ignore[arg-type]
        pack_rows = _pack_rows(shas, self.offsets, sizes, self.index_row) if self.pack is not None else []
        received = Received(index, index_bytes, rows, temps, pack=self.pack, pack_rows=pack_rows,
                            pack_synced=self.sync_pack, pack_put=self.pack_put, prepared=self.prepared,
                            pack_upload=self.pack_upload)
        self.pack_put = self.prepared = self.pack_upload = None  # the commit's now
        return received


async def receive_upload(body: AsyncIterator[bytes], blobs: BlobStore, spool_dir: Path, *, limit: int,
                         max_frames: int, max_frame_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                         max_meta_bytes: int = DEFAULT_MAX_META_BYTES, prepare: Prepare | None = None) -> Received:
    """Stream, parse and validate an upload as it arrives; 413 past ``limit`` bytes, 400 if invalid,
    5xx if the server cannot store it. ``prepare``: open the upload's database transaction as
    soon as its index arrives (:data:`Prepare`; PostgreSQL's ``prepare_upload`` for a device).

    At most ``MAX_RECEIVING`` uploads are parsed at once (the others wait, unread, for a slot),
    which with the limits above bounds the memory any uploads can make the server hold. The
    whole body is read even after the archive is found invalid, so the client always gets the
    answer (not a reset connection)."""
    async with RECEIVING.slot(RECEIVING_WAIT_S) as slot:
        if not slot:
            raise UploadRejected(503, "busy", f"{RECEIVING.limit} uploads are being received; retry later")
        return await _receive(body, blobs, spool_dir, limit=limit, max_frames=max_frames,
                              max_frame_bytes=max_frame_bytes, max_pixels=max_pixels, max_meta_bytes=max_meta_bytes,
                              prepare=prepare)


async def _receive(body: AsyncIterator[bytes], blobs: BlobStore, spool_dir: Path, *, limit: int, max_frames: int,
                   max_frame_bytes: int, max_pixels: int, max_meta_bytes: int, prepare: Prepare | None) -> Received:
    q: "queue.Queue[bytes | None]" = queue.Queue(maxsize=_QUEUE_CHUNKS)
    parser = _Parser(q, blobs, spool_dir, max_frames=max_frames, max_frame_bytes=max_frame_bytes,
                     max_pixels=max_pixels, max_meta_bytes=max_meta_bytes, prepare=prepare)
    thread = threading.Thread(target=parser.run, name="upload-parser", daemon=True)
    thread.start()
    size = 0
    ok = False
    try:
        async for chunk in body:
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise UploadRejected(413, "too_large", f"upload exceeds the limit of {limit} bytes")
            for start in range(0, len(chunk), _PIECE):
                piece = chunk if len(chunk) <= _PIECE else chunk[start:start + _PIECE]
                try:
                    q.put_nowait(piece)
                except queue.Full:
                    await asyncio.to_thread(q.put, piece)
        ok = True
    finally:
        try:
            q.put_nowait(None)
        except queue.Full:
            await asyncio.to_thread(q.put, None)
        if not ok:  # 413 or a dropped connection: wait for the parser, throw its work away
            await asyncio.to_thread(thread.join)
            parser.cleanup()
    if size == 0:
        await asyncio.to_thread(thread.join)
        parser.cleanup()
        raise _bad("the upload is empty")
    try:
        received = await asyncio.wrap_future(parser.result)
    except BaseException:
        parser.cleanup()
        raise
    received.size = size
    return received


def commit(received: Received, device_id: int, storage: Storage, blobs: BlobStore) -> tuple[Upload, bool]:
    """Store a validated upload's frames and commit it; (upload, created). Temporary files are removed.

    An upload whose transaction the parser opened early (``received.prepared``) is committed by
    it, unless what it inserted differs from the checked upload or it failed: then, as every other
    upload, in one transaction here."""
    temps = list(received.temps)
    put, committed = received.pack_put, False
    prepared, received.prepared = received.prepared, None
    try:
        content = received.index.content_sha256()
        # an early transaction that holds the upload's new row: no upload with this content was
        # there when it inserted it, and none can be committed while it holds that key
        if prepared is None or not prepared.started():
            existing = storage.find_upload(device_id, content)
            if existing is not None:
                _check_same_metadata(received.index, existing, blobs)
                return existing, False
        locations: list[tuple[str, str, int, int]] = []
        if received.pack is not None:  # a packing store: the spooled frames and the index are the pack
            index_sha = received.pack_rows[-1][0]
            # durable first; where its blobs are is recorded with the upload, in one transaction
            if put is not None:  # an object store's pack, which the parser put while it arrived
                try:
                    put.result()
                except Exception as exc:  # noqa: BLE001 - the object store, not the upload: retried later
                    log.warning("storing an upload's pack failed: %s: %s", type(exc).__name__, exc)
                    raise UploadRejected(503, "storage_unavailable", "the server could not store the upload; "
                                                                     "retry later") from None
                locations = blobs.pack_locations(received.pack_upload.name, received.pack_rows)  # type: ignore[attr-defined]
            else:
                locations = blobs.store_pack(received.pack, received.pack_rows,  # type: ignore[attr-defined]
                                             synced=received.pack_synced)
        elif getattr(blobs, "adopt", None) is not None and hasattr(blobs, "sync"):  # the folder store, unpacked
            fh, tmp = blobs.temp_file()  # type: ignore[attr-defined]
            with fh:
                fh.write(received.index_bytes)
            temps.append((hashlib.sha256(received.index_bytes).hexdigest(), tmp))
            index_sha = temps[-1][0]
            while temps:  # each one adopted is no longer ours to remove
                sha, path = temps[-1]
                blobs.adopt(path, sha)  # type: ignore[attr-defined]
                temps.pop()
            blobs.sync()  # type: ignore[attr-defined]  # every frame durable before the row that names it
        elif hasattr(blobs, "put_files"):  # an object store without packs: several requests in flight
            index_sha = hashlib.sha256(received.index_bytes).hexdigest()
            blobs.put_files([*temps, (index_sha, received.index_bytes)])  # type: ignore[attr-defined]
        else:
            for sha, path in temps:
                blobs.put_file(path, sha)
            index_sha = blobs.put_bytes(received.index_bytes)
        answer = prepared.commit(received.size, received.rows, locations) if prepared is not None else None
        if answer is None:
            if prepared is not None:  # not committed early: as every other upload (a repeat meanwhile?)
                existing = storage.find_upload(device_id, content)
                if existing is not None:
                    _check_same_metadata(received.index, existing, blobs)
                    return existing, False
            answer = storage.commit_upload(device_id, content, index_sha, received.size, received.rows, locations)
        committed = True
        return answer
    except OSError as exc:
        raise server_fault(exc) from None
    finally:
        if prepared is not None:  # committed (then this does nothing) or not: its connection back
            prepared.abandon()
        if put is not None and not committed:  # a repeat, or a failure: the object put is not needed
            _discard_pack(received.pack_upload, [sha for sha, _, _ in received.pack_rows])
        received.pack_upload = None  # stored, or discarded: nothing left for release()
        for _, path in temps:
            path.unlink(missing_ok=True)
        if received.pack is not None:
            received.pack.unlink(missing_ok=True)


def release(received: Received) -> None:
    """Give back what a received upload holds when :func:`commit` will not run (the request was
    cancelled between the two): its early transaction (rolled back, its connection back in the
    pool), what was put of its pack (deleted, or the multipart upload aborted), its temporary
    files. After :func:`commit` there is nothing left, and this does nothing."""
    prepared, received.prepared = received.prepared, None
    if prepared is not None:
        prepared.abandon()
    upload, received.pack_upload = received.pack_upload, None
    if upload is not None:
        _discard_pack(upload, [sha for sha, _, _ in received.pack_rows])
    for _, path in received.temps:
        path.unlink(missing_ok=True)
    if received.pack is not None:
        received.pack.unlink(missing_ok=True)


def _pack_rows(shas: list[str], offsets: list[int], sizes: list[int],
               index_row: tuple[str, int, int] | None) -> list[tuple[str, int, int]]:
    """(sha256, offset, length) of each blob in a pack, members in archive order (a frame sent
    twice is located at its first copy), the index last."""
    rows, seen = [], set()
    for sha, offset, size in zip(shas, offsets, sizes):
        if sha not in seen:
            seen.add(sha)
            rows.append((sha, offset, size))
    if index_row is not None:
        rows.append(index_row)
    return rows


def _declared_locations(blobs: BlobStore, pack: str, index: UploadIndex, names: dict[str, int],
                        offsets: list[int], sizes: list[int],
                        index_row: tuple[str, int, int] | None) -> list[tuple[str, str, int, int]] | None:
    """Where a pack holds each blob, by the sha256 the index declares for each member (what
    :meth:`_Parser._validate` finds for a valid upload); None if a member is not in the index."""
    declared = {f.file: f.sha256 for f in index.frames}
    by_position = sorted(names, key=names.__getitem__)
    if not all(name in declared for name in by_position):
        return None
    rows = _pack_rows([declared[name] for name in by_position], offsets, sizes, index_row)
    return blobs.pack_locations(pack, rows)  # type: ignore[attr-defined]


def _discard_pack(upload: Any, shas: list[str]) -> None:
    """Once its requests are over, remove the pack object (or the parts) of an upload that was not
    committed (cloud.s3.PackUpload.discard)."""
    try:
        upload.discard(shas)
    except Exception as exc:  # noqa: BLE001 - the answer to the headset stands; an orphan object is logged
        log.warning("the pack object %s of an upload not committed was not deleted: %s", upload.name, exc)


def metadata_digest(index: UploadIndex) -> str:
    """What the device said about its frames, whatever the archive's member names: a repeat of an
    upload must say the same."""
    frames = [f.model_dump(exclude={"file"}) for f in index.frames]
    return hashlib.sha256(json.dumps(frames, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_same_metadata(index: UploadIndex, existing: Upload, blobs: BlobStore) -> None:
    with blobs.open(existing.index_sha256) as fh:
        stored = UploadIndex.model_validate_json(fh.read())
    if metadata_digest(stored) != metadata_digest(index):
        raise UploadRejected(409, "conflict", f"these frames were uploaded before (upload {existing.id}) with "
                                              "different metadata; the first upload is kept")


def decode_frames(blobs: BlobStore, frames: list[FrameRow], size: tuple[int, int],
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """N x H x W x 3 uint8 RGB at ``size`` (h, w) from stored JPEG blobs. A blob whose header
    declares more than ``max_pixels`` is never decoded (ingest refused it; this guards the store)."""
    h, w = size
    out = np.empty((len(frames), h, w, 3), np.uint8)
    read_many = getattr(blobs, "read_many", None)  # an object store: one ranged GET per pack
    fetched = read_many([f.sha256 for f in frames]) if read_many is not None else None
    for i, f in enumerate(frames):
        if fetched is not None:
            data = fetched[f.sha256]
        else:
            with blobs.open(f.sha256) as fh:
                data = fh.read()
        head = jpeg_header(data)
        if head is None or head[0] * head[1] > max_pixels:
            raise UserError(f"stored frame {f.sha256[:12]}... is not a JPEG within {max_pixels} pixels; not decoded")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"stored frame {f.sha256[:12]}... does not decode")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (h, w):
            interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        out[i] = img
    return out

