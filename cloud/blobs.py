"""Content-addressed blob storage for frames, manifests and models.

:class:`BlobStore` is the interface; :class:`LocalBlobStore` keeps ``ROOT/ab/abcdef...`` files
(the name is the sha256 of the content, so a blob is written once and never changes);
:class:`cloud.s3.S3BlobStore` implements the same five methods with object keys of the same names.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.atomic import fsync_dir
from shared.errors import UserError
from shared.hashing import sha256_file


SHA256_NAME = re.compile(r"[0-9a-f]{64}")


class BlobStore(Protocol):
    def put_bytes(self, data: bytes) -> str: ...
    def put_file(self, path: str | os.PathLike, sha256: str | None = None) -> str: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def open(self, sha256: str) -> BinaryIO: ...


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(exist_ok=True)
        self._root, self._tmp = str(self.root), str(self.tmp)
        self._dirs: set[str] = set()  # ab/ folders known to exist (never removed)
        self._temp_names = itertools.count()

    def _path(self, sha256: str) -> Path:
        return Path(self._file(sha256))

    def _file(self, sha256: str) -> str:
        """The blob's path as a string (an upload asks for hundreds: pathlib's parsing showed in profiles)."""
        if not SHA256_NAME.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self._root}/{sha256[:2]}/{sha256}"

    def _commit(self, tmp: Path, sha256: str, durable: bool = False) -> str:
        dest = self._file(sha256)
        if os.path.exists(dest):  # content-addressed: same name, same bytes
            Path(tmp).unlink(missing_ok=True)
            return sha256
        folder = dest[:-65]
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        os.replace(tmp, dest)
        if durable:  # the rename too (bulk ingest makes everything durable with one sync())
            fsync_dir(folder)
        return sha256

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self._path(sha).exists():
            return sha
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return self._commit(Path(tmp), sha, durable=True)

    # -- bulk ingest: write many blobs without one fsync each -------------------------------
    def temp_file(self) -> tuple[BinaryIO, Path]:
        """An open, empty file in the store's temporary folder (same filesystem as the blobs):
        named by process and counter (cheaper than mkstemp's random names, one per frame); a name
        taken already (another host's process on a shared folder) falls back to mkstemp."""
        name = f"{self._tmp}/{os.getpid()}-{next(self._temp_names)}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd, name = tempfile.mkstemp(dir=self.tmp)
        return os.fdopen(fd, "wb"), Path(name)

    def adopt(self, tmp: str | os.PathLike, sha256: str) -> str:
        """Move a :meth:`temp_file` whose content hashes to ``sha256`` into the store (or drop it
        if that blob exists). Not durable until :meth:`sync`."""
        return self._commit(Path(tmp), sha256)

    def sync(self) -> None:
        """Make every blob written or adopted so far durable: one ``syncfs`` of the blob
        filesystem (data and renames) instead of an fsync per blob."""
        _syncfs(self.root)

    def put_file(self, path: str | os.PathLike, sha256: str | None = None) -> str:
        """Copy a file in (the source is left alone)."""
        sha = sha256 or sha256_file(path)
        if self._path(sha).exists():
            return sha
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        os.close(fd)
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        return self._commit(Path(tmp), sha, durable=True)

    def exists(self, sha256: str) -> bool:
        return os.path.isfile(self._file(sha256))

    def size(self, sha256: str) -> int:
        return self._path(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        return open(self._path(sha256), "rb")

    # -- recovery after a crash (the embedded store has one writing process) ------------------
    def remove_temporary(self) -> int:
        """Delete what a killed process left in the temporary folder; returns how many files."""
        n = 0
        for path in self.tmp.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                n += 1
        return n

    def names(self) -> list[str]:
        """Every blob's sha256."""
        return [p.name for d in self.root.iterdir() if len(d.name) == 2 and d.is_dir() for p in d.iterdir()]

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete blobs no database row names (a crash between renaming an upload's frames into
        the store and committing it leaves such blobs); returns how many."""
        n = 0
        for name in self.names():
            if name not in referenced:
                self._path(name).unlink(missing_ok=True)
                n += 1
        return n


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fn = getattr(_LIBC, "syncfs", None) if _LIBC is not None else None
        if fn is None:
            os.sync()
        elif fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None
