"""An S3-compatible :class:`cloud.blobs.BlobStore` (``s3://BUCKET[/PREFIX]`` URLs).

Objects are named as the folder store names files, ``PREFIX/ab/abcdef...`` (the sha256 of the
content), so a blob is written once and never changes and writing it again is harmless. The
endpoint (``HMD_CLOUD_S3_ENDPOINT_URL``, e.g. an S3-compatible server on your own machines) and
credentials (the AWS SDK's usual environment variables or files) come from the environment.
boto3 is imported only when an ``s3://`` URL is opened (the ``scale`` extra).

An upload's frames are not one object each: one request per frame is what an object store
charges for, in latency and in money. :meth:`S3BlobStore.put_files` writes them as one object,
``PREFIX/packs/<sha256 of the pack>``, their bytes one after the other, and records each frame's
(pack, offset, length) in the metadata database (table ``blob_packs``, schema v5) before the
upload that names them is committed (in the upload's own transaction when the ingest stores it);
reading a frame back is a ``Range`` GET of its bytes. The ingest puts an upload's pack while it
is still arriving (:meth:`S3BlobStore.pack_upload`, :class:`PackUpload`): a pack is named when
its first frame arrives (``PREFIX/packs/<64 random hex digits>``: its bytes are not hashed as a
whole, each frame in it is, against the upload's index), a pack that reaches
:data:`MULTIPART_BYTES` goes up in parts of :data:`PART_BYTES` as they fill (a multipart upload),
the rest when the last frame has arrived (a smaller pack: one PUT then), and the object is
deleted (or the multipart upload aborted) if the upload is then refused. Blobs stored one object each (manifests, models, and frames stored
before packing) are read as before: a blob with no pack location is looked up under its own key.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from cloud.blobs import PackIndex, read_packed
from shared.errors import UserError
from shared.hashing import sha256_file

PUT_THREADS = 8  # one request per object: several in flight hide the round trips
PACK_IN_MEMORY = 8 * 1024 * 1024  # a larger pack is put from a temporary file
# a pack that reaches MULTIPART_BYTES (the default of setting s3_multipart_mb) is put in parts of
# PART_BYTES while it arrives (S3: parts >= 5 MiB); a smaller one in one PUT when complete. Not
# smaller: with the S3 server on the same two cores, parts cost it more CPU than one PUT (a copy of
# the whole object when it is completed); at 48 MB the upload ratio fell from 0.557 to 0.517 with
# parts from the first 8 MiB (scripts/ab_upload.py; README, "Running at scale")
MULTIPART_BYTES = 64 * 1024 * 1024
PART_BYTES = 8 * 1024 * 1024


class S3BlobStore:
    cheap_exists = False  # a request each: the ingest does not ask per frame (put_files skips what is stored)

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 multipart_bytes: int | None = None):
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise UserError("an s3:// blob store needs boto3: pip install 'great-hmd[scale]'") from None
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise UserError(f"blob store {url!r}: expected s3://BUCKET[/PREFIX]")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.multipart_bytes = MULTIPART_BYTES if multipart_bytes is None else multipart_bytes
        self._errors = botocore.exceptions
        # request_checksum_calculation "when_required": no CRC32 of every body the store does not ask
        # for (botocore's default since 1.36 computes one per PUT, and the store checks it again). A
        # PUT's body is still signed (SHA-256 over HTTP) or carried by TLS, and every frame and index
        # is hashed and checked by the ingest. It is also what many S3-compatible stores accept.
        config = botocore.config.Config(max_pool_connections=PUT_THREADS * 2,
                                        retries={"max_attempts": 5, "mode": "standard"},
                                        request_checksum_calculation="when_required")
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                     region_name=region or os.environ.get("AWS_DEFAULT_REGION")
                                                     or "us-east-1", config=config)
        try:
            self.client.head_bucket(Bucket=bucket)
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise UserError(f"blob store {url}: {exc}") from None
            self.client.create_bucket(Bucket=bucket)
        except self._errors.BotoCoreError as exc:
            raise UserError(f"blob store {url} ({endpoint_url or 'AWS'}): {exc}") from None
        self.index: PackIndex | None = None

    def attach_index(self, index: PackIndex) -> None:
        """Pack uploads' frames from now on, locating them in ``index`` (the metadata database)."""
        self.index = index

    @property
    def packing(self) -> bool:
        """Whether uploads are stored as packs (the ingest then spools them as one file)."""
        return self.index is not None

    def _pack_key(self, pack: str) -> str:
        return f"{self.prefix}/packs/{pack}" if self.prefix else f"packs/{pack}"

    def _location(self, sha256: str) -> tuple[str, int, int] | None:
        return self.index.blob_locations([sha256]).get(sha256) if self.index is not None else None

    def _key(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self.prefix}/{sha256[:2]}/{sha256}" if self.prefix else f"{sha256[:2]}/{sha256}"

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.client.put_object(Bucket=self.bucket, Key=self._key(sha), Body=data)
        return sha

    def put_file(self, path: str | os.PathLike, sha256: str | None = None) -> str:
        sha = sha256 or sha256_file(path)
        with open(path, "rb") as fh:
            self.client.put_object(Bucket=self.bucket, Key=self._key(sha), Body=fh)
        return sha

    def put_files(self, items: list[tuple[str, os.PathLike | bytes]]) -> None:
        """Many (sha256, path or bytes) at once; returns when all are stored and locatable. With an
        index: one pack object, one request, and one transaction of locations; without: one object
        each, several requests in flight."""
        if self.index is None:
            with concurrent.futures.ThreadPoolExecutor(PUT_THREADS) as pool:
                for fut in [pool.submit(self._put_one, sha, item) for sha, item in items]:
                    fut.result()
            return
        rows, offset = [], 0
        seen = set(self.index.blob_locations([sha for sha, _ in items]))  # packed before: not again
        # an upload can be tens of MB: in memory up to PACK_IN_MEMORY, then on disk
        with tempfile.SpooledTemporaryFile(max_size=PACK_IN_MEMORY) as body:
            for sha, item in items:
                if sha in seen:
                    continue
                seen.add(sha)
                data = item if isinstance(item, bytes) else Path(item).read_bytes()
                rows.append((sha, offset, len(data)))
                body.write(data)
                offset += len(data)
            if rows:
                self._put_pack(body, offset, rows)

    def put_pack(self, path: str | os.PathLike, rows: list[tuple[str, int, int]]) -> None:
        """A file that holds blobs one after the other, stored as one pack object; ``rows``:
        (sha256, offset, length) of each blob in it. Blobs packed before keep their first location."""
        self.index.add_blob_locations(self.store_pack(path, rows))  # type: ignore[union-attr]

    def store_pack(self, path: str | os.PathLike, rows: list[tuple[str, int, int]], *, synced: bool = False,
                   sha256: str | None = None) -> list[tuple[str, str, int, int]]:
        """:meth:`put_pack` without recording the locations: they are returned, for the caller to
        record with the rows that name the blobs (one transaction). ``sha256``: the file's, where
        the caller hashed it as it wrote it (else it is read once more to hash it); ``synced``
        means nothing here (the file is a spool, the object store makes the object durable)."""
        with open(path, "rb") as fh:
            return self._store_pack(fh, os.fstat(fh.fileno()).st_size, rows, sha256)

    @staticmethod
    def pack_locations(sha256: str, rows: list[tuple[str, int, int]]) -> list[tuple[str, str, int, int]]:
        """The locations to record for a pack put by :meth:`put_pack_file` (what :meth:`store_pack` returns)."""
        return [(sha, sha256, offset, length) for sha, offset, length in rows]

    def pack_upload(self, path: str | os.PathLike,
                    submit: Callable[..., concurrent.futures.Future]) -> "PackUpload":
        """Put the pack being written to ``path`` while it is written (see :class:`PackUpload`);
        ``submit``: an executor's, which runs its requests. The ingest records
        :meth:`pack_locations` under its name once the upload is valid, or discards it."""
        return PackUpload(self, Path(path), submit)

    def put_pack_file(self, path: str | os.PathLike, name: str) -> None:
        """PUT a finished pack file as the pack object ``name``."""
        with open(path, "rb") as fh:
            self.client.put_object(Bucket=self.bucket, Key=self._pack_key(name), Body=fh,
                                   ContentLength=os.fstat(fh.fileno()).st_size)

    def discard_pack(self, name: str, shas: list[str]) -> None:
        """Delete the pack object ``name`` (holding the blobs ``shas``), put for an upload that was
        then refused, unless a recorded location names it."""
        assert self.index is not None
        if not any(loc[0] == name for loc in self.index.blob_locations(shas).values()):
            self.client.delete_object(Bucket=self.bucket, Key=self._pack_key(name))

    def _put_pack(self, body: BinaryIO, size: int, rows: list[tuple[str, int, int]]) -> None:
        self.index.add_blob_locations(self._store_pack(body, size, rows))  # type: ignore[union-attr]

    def _store_pack(self, body: BinaryIO, size: int, rows: list[tuple[str, int, int]],
                    sha256: str | None = None) -> list[tuple[str, str, int, int]]:
        assert self.index is not None
        if sha256 is None:
            body.seek(0)
            digest = hashlib.sha256()
            while block := body.read(1 << 20):
                digest.update(block)
            sha256 = digest.hexdigest()
        pack = sha256  # content-addressed, as every other object
        body.seek(0)
        self.client.put_object(Bucket=self.bucket, Key=self._pack_key(pack), Body=body, ContentLength=size)
        return self.pack_locations(pack, rows)

    def _put_one(self, sha256: str, item: os.PathLike | bytes) -> str:
        return self.put_bytes(item) if isinstance(item, bytes) else self.put_file(item, sha256)

    def exists(self, sha256: str) -> bool:
        if self._location(sha256) is not None:
            return True
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, sha256: str) -> int:
        loc = self._location(sha256)
        if loc is not None:
            return loc[2]
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"])

    def open(self, sha256: str) -> BinaryIO:
        """The whole blob in memory (frames, manifests and models are MBs at most), seekable: a
        packed blob is the byte range of its pack."""
        loc = self._location(sha256)
        try:
            if loc is not None:
                pack, offset, length = loc
                body = self.client.get_object(Bucket=self.bucket, Key=self._pack_key(pack),
                                              Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            else:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}") from None
            raise
        with body:
            return io.BytesIO(body.read())

    def read_many(self, shas: list[str]) -> dict[str, bytes]:
        """Several blobs' bytes: packed ones with one ranged GET per pack (from the first to the
        last wanted byte), the others one GET each."""
        locations = self.index.blob_locations(list(set(shas))) if self.index is not None else {}
        out = read_packed(locations, self._read_range)
        for sha in shas:
            if sha not in out:
                with self.open(sha) as fh:
                    out[sha] = fh.read()
        return out

    def _read_range(self, pack: str, start: int, end: int) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._pack_key(pack),
                                      Range=f"bytes={start}-{end - 1}")["Body"]
        with body:
            return body.read()

    def objects(self) -> list[str]:
        """Every object's key (blobs stored one object each, and packs)."""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{self.prefix}/" if self.prefix else ""):
            out += [obj["Key"] for obj in page.get("Contents", [])]
        return out

    def names(self) -> list[str]:
        """Every blob's sha256: those stored one object each, and those in packs."""
        packs = f"{self.prefix}/packs/" if self.prefix else "packs/"
        single = [key.rsplit("/", 1)[-1] for key in self.objects() if not key.startswith(packs)]
        return sorted(set(single) | (self.index.packed_blobs() if self.index is not None else set()))


class PackUpload:
    """An upload's pack, put while the ingest writes it to a spool file: once it reaches the
    store's ``multipart_bytes`` (:data:`MULTIPART_BYTES`; setting ``s3_multipart_mb``), every
    :data:`PART_BYTES` written go up as one part of a multipart upload at once (``written``), the
    rest when the pack is complete (``finish``; ``done`` is set when the object is stored); a
    smaller pack is one PUT at ``finish``. ``discard`` removes whatever was put (an upload refused,
    or a repeat). The requests run on the caller's executor; the multipart upload is completed from
    the last part's callback, so no executor thread ever waits for another."""

    def __init__(self, store: S3BlobStore, path: Path, submit: Callable[..., concurrent.futures.Future]):
        self.store, self.path, self._submit = store, path, submit
        self.name = secrets.token_hex(32)  # unique: no two uploads' packs share an object
        self.key = store._pack_key(self.name)
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._upload_id: str | None = None  # the multipart upload, once a first part is full
        self._parts: list[concurrent.futures.Future] = []
        self._etags: dict[int, str] = {}
        self._sent = 0  # bytes handed to part requests
        self._closed = False  # no part is added any more (finished or discarded)
        self._finished = False  # finish() was called: ``done`` will be settled
        self._complete = False  # the multipart upload is to be completed (once)

    @property
    def parts(self) -> int:
        """Parts started so far (0: the pack is, or will be, one PUT)."""
        return len(self._parts)

    def written(self, size: int) -> None:
        """The spool file holds ``size`` bytes (flushed): once it reaches the multipart size, start
        a part for each full one."""
        if self._upload_id is None and size < self.store.multipart_bytes:
            return
        while size - self._sent >= PART_BYTES and not self._closed:
            if self._upload_id is None:
                self._upload_id = self.store.client.create_multipart_upload(Bucket=self.store.bucket,
                                                                            Key=self.key)["UploadId"]
            self._start_part(self._sent, PART_BYTES)

    def _start_part(self, start: int, length: int) -> None:
        number = len(self._parts) + 1
        fut = self._submit(self._put_part, number, start, length)
        self._parts.append(fut)
        self._sent = start + length
        fut.add_done_callback(self._part_done)

    def _put_part(self, number: int, start: int, length: int) -> None:
        with open(self.path, "rb") as fh:
            data = os.pread(fh.fileno(), length, start)  # at most PART_BYTES in memory per request
        if len(data) != length:
            raise OSError(f"pack spool {self.path} holds {start + len(data)} bytes, not {start + length}")
        answer = self.store.client.upload_part(Bucket=self.store.bucket, Key=self.key, PartNumber=number,
                                               UploadId=self._upload_id, Body=data, ContentLength=length)
        self._etags[number] = answer["ETag"]

    def finish(self, size: int) -> concurrent.futures.Future:
        """The pack is complete at ``size`` bytes: put the rest; returns ``done``."""
        if self._upload_id is None:  # one PUT
            self._closed = self._finished = True
            self._submit(self.store.put_pack_file, self.path, self.name).add_done_callback(
                lambda f: _settle(self.done, f.exception()))
            return self.done
        if size > self._sent:
            self._start_part(self._sent, size - self._sent)
        with self._lock:
            self._closed = self._finished = self._complete = True
        self._part_done(None)  # completes now if every part is done already
        return self.done

    def _part_done(self, _fut: concurrent.futures.Future | None) -> None:
        with self._lock:
            if not self._complete or self.done.done() or not all(p.done() for p in self._parts):
                return
            errors = [p.exception() for p in self._parts if p.exception() is not None]
            if errors:
                _settle(self.done, errors[0])
                return
            self._complete = False  # once
        # every part is stored: complete the object (on the executor, off this callback's thread)
        self._submit(self._finish_parts).add_done_callback(lambda f: _settle(self.done, f.exception()))

    def _finish_parts(self) -> None:
        parts = [{"ETag": self._etags[n], "PartNumber": n} for n in range(1, len(self._parts) + 1)]
        self.store.client.complete_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self._upload_id,
                                                    MultipartUpload={"Parts": parts})

    def discard(self, shas: list[str]) -> None:
        """Once its requests are over, remove what was put of this pack (the object, unless a
        recorded location names it; an unfinished multipart upload is aborted)."""
        with self._lock:
            self._closed = True  # no part is added after this
            finishing = self._finished  # else never completed: finish() is not called after discard
        concurrent.futures.wait(self._parts)
        if finishing:
            concurrent.futures.wait([self.done])
        if self.done.done() and self.done.exception() is None:
            self.store.discard_pack(self.name, shas)
        elif self._upload_id is not None:
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self._upload_id)


def _settle(fut: concurrent.futures.Future, exc: BaseException | None) -> None:
    """Set ``fut``'s outcome unless it has one."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
