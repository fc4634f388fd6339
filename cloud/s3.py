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
reading a frame back is a ``Range`` GET of its bytes. The ingest PUTs an upload's pack
(:meth:`S3BlobStore.put_pack_file`) as soon as its last frame is written, while the decode checks
finish, and deletes the object if the upload is then refused (:meth:`S3BlobStore.discard_pack`).
Blobs stored one object each (manifests, models, and frames stored before packing) are read as
before: a blob with no pack location is looked up under its own key.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from cloud.blobs import PackIndex, read_packed
from shared.errors import UserError
from shared.hashing import sha256_file

PUT_THREADS = 8  # one request per object: several in flight hide the round trips
PACK_IN_MEMORY = 8 * 1024 * 1024  # a larger pack is put from a temporary file


class S3BlobStore:
    cheap_exists = False  # a request each: the ingest does not ask per frame (put_files skips what is stored)

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None):
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
        self._errors = botocore.exceptions
        config = botocore.config.Config(max_pool_connections=PUT_THREADS * 2, retries={"max_attempts": 5,
                                                                                       "mode": "standard"})
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

    def put_pack_file(self, path: str | os.PathLike, sha256: str) -> None:
        """PUT a finished pack file as the object named by its bytes' ``sha256``. The ingest starts
        this as soon as an upload's pack is written, while its last frames are still being
        decoded, then records :meth:`pack_locations` once the upload is valid, or
        :meth:`discard_pack` s it."""
        with open(path, "rb") as fh:
            self.client.put_object(Bucket=self.bucket, Key=self._pack_key(sha256), Body=fh,
                                   ContentLength=os.fstat(fh.fileno()).st_size)

    def discard_pack(self, sha256: str, shas: list[str]) -> None:
        """Delete the pack object ``sha256`` (holding the blobs ``shas``), put for an upload that was
        then refused, unless a recorded location names it (the same bytes committed by another)."""
        assert self.index is not None
        if not any(loc[0] == sha256 for loc in self.index.blob_locations(shas).values()):
            self.client.delete_object(Bucket=self.bucket, Key=self._pack_key(sha256))

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
