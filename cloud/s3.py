"""An S3-compatible :class:`cloud.blobs.BlobStore` (``s3://BUCKET[/PREFIX]`` URLs).

Objects are named as the folder store names files, ``PREFIX/ab/abcdef...`` (the sha256 of the
content), so a blob is written once and never changes and writing it again is harmless. The
endpoint (``HMD_CLOUD_S3_ENDPOINT_URL``, e.g. an S3-compatible server on your own machines) and
credentials (the AWS SDK's usual environment variables or files) come from the environment.
boto3 is imported only when an ``s3://`` URL is opened (the ``scale`` extra).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
from typing import BinaryIO

from shared.errors import UserError
from shared.hashing import sha256_file

PUT_THREADS = 8  # one request per object: several in flight hide the round trips


class S3BlobStore:
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

    def put_files(self, items: list[tuple[str, os.PathLike]]) -> None:
        """Many (sha256, path) at once, several requests in flight; returns when all are stored."""
        with concurrent.futures.ThreadPoolExecutor(PUT_THREADS) as pool:
            for fut in [pool.submit(self.put_file, path, sha) for sha, path in items]:
                fut.result()

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, sha256: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"])

    def open(self, sha256: str) -> BinaryIO:
        """The whole object in memory (frames, manifests and models are MBs at most), seekable."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}") from None
            raise
        with body:
            return io.BytesIO(body.read())

    def names(self) -> list[str]:
        """Every blob's sha256."""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{self.prefix}/" if self.prefix else ""):
            out += [obj["Key"].rsplit("/", 1)[-1] for obj in page.get("Contents", [])]
        return out
