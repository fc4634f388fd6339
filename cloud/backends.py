"""The storage back-ends by URL: ``open_storage`` (metadata) and ``open_blob_store`` (blobs).

The embedded ones (``sqlite:///PATH``, ``file://PATH``) by default; PostgreSQL and an
S3-compatible store for several processes, imported only when their URL is used.
"""
from __future__ import annotations

from cloud.blobs import BlobStore, LocalBlobStore
from cloud.storage import SQLiteStorage, Storage
from shared.errors import UserError


def open_storage(url: str) -> Storage:
    """``sqlite:///PATH`` (the embedded default) or ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB``."""
    if url.startswith("sqlite:///"):
        return SQLiteStorage(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        from cloud.postgres import PostgresStorage

        return PostgresStorage(url)
    raise UserError(f"database {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def open_blob_store(url: str, s3_endpoint_url: str | None = None, s3_multipart_mb: int | None = None) -> BlobStore:
    """``file://PATH`` (the embedded default) or ``s3://BUCKET[/PREFIX]`` (at ``s3_endpoint_url``,
    else AWS; packs from ``s3_multipart_mb`` MiB put in parts)."""
    if url.startswith("file://"):
        return LocalBlobStore(url[len("file://"):])
    if url.startswith("s3://"):
        from cloud.s3 import S3BlobStore

        return S3BlobStore(url, endpoint_url=s3_endpoint_url,
                           multipart_bytes=None if s3_multipart_mb is None else s3_multipart_mb * 1024 * 1024)
    raise UserError(f"blob store {url!r}: use file://PATH or s3://BUCKET[/PREFIX]")
