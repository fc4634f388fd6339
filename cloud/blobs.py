"""Content-addressed blob storage for frames, manifests and models.

:class:`BlobStore` is the interface; :class:`LocalBlobStore` keeps ``ROOT/ab/abcdef...`` files
(the name is the sha256 of the content, so a blob is written once and never changes);
:class:`cloud.s3.S3BlobStore` implements the same five methods with object keys of the same names.

Both stores pack an upload's frames once a :class:`PackIndex` (the metadata database) is
attached, as the service does: the frames and the upload's index go one after the other into one
pack, ``ROOT/packs/NAME`` here, made durable first; each blob's (pack, offset, length) is then
recorded in table ``blob_packs`` in the transaction that commits the upload naming them. One
file created, written and fsynced per upload instead of one per frame: on this machine's disk,
creating 720 small files and syncing the filesystem cost 8x the frames' decode check. Blobs stored one file each
(manifests, models, and frames stored before packing) read as before.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from shared.atomic import fsync_dir
from shared.errors import UserError
from shared.hashing import sha256_file


SHA256_NAME = re.compile(r"[0-9a-f]{64}")
SPAN_WASTE = 4  # read_many reads a pack's span at once unless it is 4x the bytes wanted


class PackIndex(Protocol):
    """Where packed blobs are (:class:`cloud.storage.Storage` implements it)."""

    def add_blob_locations(self, rows: list[tuple[str, str, int, int]]) -> None: ...
    def blob_locations(self, shas: list[str]) -> dict[str, tuple[str, int, int]]: ...
    def packed_blobs(self) -> set[str]: ...
    def pack_contents(self) -> dict[str, list[str]]: ...
    def remove_packs(self, packs: list[str]) -> None: ...


def pack_name(rows: list[tuple[str, int, int]]) -> str:
    """A pack's name from what it holds, (sha256, offset, length) of every blob: the same bytes get
    the same name, without reading the pack again to hash it."""
    return hashlib.sha256("".join(f"{sha} {off} {n}\n" for sha, off, n in rows).encode()).hexdigest()


def read_packed(locations: dict[str, tuple[str, int, int]],
                read_range: Callable[[str, int, int], bytes]) -> dict[str, bytes]:
    """Packed blobs' bytes, ``read_range(pack, start, end)`` called once per pack over the span of
    the blobs wanted from it, or once per blob when they lie far apart (a span 4x their bytes)."""
    by_pack: dict[str, list[tuple[str, int, int]]] = {}
    for sha, (pack, offset, length) in locations.items():
        by_pack.setdefault(pack, []).append((sha, offset, length))
    out: dict[str, bytes] = {}
    for pack, parts in by_pack.items():
        start, end = min(p[1] for p in parts), max(p[1] + p[2] for p in parts)
        groups = ([(start, end, parts)] if end - start <= SPAN_WASTE * sum(p[2] for p in parts)
                  else [(offset, offset + length, [p]) for p in parts for _, offset, length in [p]])
        for lo, hi, members in groups:
            data = read_range(pack, lo, hi)
            if len(data) != hi - lo:
                raise OSError(f"pack {pack} is truncated: {len(data)} of bytes {lo}-{hi}")
            for sha, offset, length in members:
                out[sha] = data[offset - lo: offset - lo + length]
    return out


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
        self.packs = self.root / "packs"
        self.index: PackIndex | None = None

    def attach_index(self, index: PackIndex) -> None:
        """Pack uploads' frames from now on, locating them in ``index`` (the metadata database)."""
        self.packs.mkdir(exist_ok=True)
        self.index = index

    @property
    def packing(self) -> bool:
        """Whether uploads are stored as packs (the ingest then spools them as one file)."""
        return self.index is not None

    def _location(self, sha256: str) -> tuple[str, int, int] | None:
        return self.index.blob_locations([sha256]).get(sha256) if self.index is not None else None

    def _read_range(self, pack: str, start: int, end: int) -> bytes:
        if not SHA256_NAME.fullmatch(pack):
            raise ValueError(f"not a pack name: {pack!r}")
        with open(self.packs / pack, "rb") as fh:
            return os.pread(fh.fileno(), end - start, start)

    def store_pack(self, path: str | os.PathLike, rows: list[tuple[str, int, int]], *, synced: bool = False,
                   sha256: str | None = None) -> list[tuple[str, str, int, int]]:
        """Adopt ``path``, a :meth:`temp_file` holding blobs one after the other (``rows``: their
        (sha256, offset, length)), as one durable pack; returns the locations to record
        (:meth:`PackIndex.add_blob_locations` rows), which the caller records with the rows that
        name the blobs. Blobs stored before keep their place; a pack that adds nothing is dropped.
        The file is moved, not copied; ``synced``: the caller fsynced it after its last write
        (the rename is made durable here either way). ``sha256`` is not needed here (the name
        comes from ``rows``); the object store uses it."""
        assert self.index is not None, "attach_index first"
        located = self.index.blob_locations([sha for sha, _, _ in rows])
        new = [r for r in rows if r[0] not in located]  # one stored as a file too reads from the file
        if not new:
            Path(path).unlink(missing_ok=True)
            return []
        name = pack_name(rows)
        if not synced:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(path, self.packs / name)  # the same name is the same bytes
        fsync_dir(self.packs)
        return [(sha, name, offset, length) for sha, offset, length in new]

    def put_pack(self, path: str | os.PathLike, rows: list[tuple[str, int, int]]) -> None:
        """:meth:`store_pack`, its locations recorded at once."""
        self.index.add_blob_locations(self.store_pack(path, rows))  # type: ignore[union-attr]

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
        return os.path.isfile(self._file(sha256)) or self._location(sha256) is not None

    def size(self, sha256: str) -> int:
        try:
            return os.stat(self._file(sha256)).st_size
        except FileNotFoundError:
            loc = self._location(sha256)
            if loc is None:
                raise
            return loc[2]

    def open(self, sha256: str) -> BinaryIO:
        """The blob's file, or a packed blob's bytes (frames and indexes: KBs to MBs) in memory."""
        try:
            return open(self._file(sha256), "rb")
        except FileNotFoundError:
            loc = self._location(sha256)
            if loc is None:
                raise FileNotFoundError(f"no blob {sha256} in {self.root}") from None
            return io.BytesIO(read_packed({sha256: loc}, self._read_range)[sha256])

    def read_many(self, shas: list[str]) -> dict[str, bytes]:
        """Several blobs' bytes: packed ones with one read per pack, the others a file each."""
        locations = self.index.blob_locations(list(set(shas))) if self.index is not None else {}
        packed = {sha: loc for sha, loc in locations.items() if not os.path.isfile(self._file(sha))}
        out = read_packed(packed, self._read_range)
        for sha in shas:
            if sha not in out:
                with self.open(sha) as fh:
                    out[sha] = fh.read()
        return out

    # -- recovery after a crash (the embedded store has one writing process) ------------------
    def remove_temporary(self) -> int:
        """Delete what a killed process left in the temporary folder; returns how many files."""
        n = 0
        for path in self.tmp.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                n += 1
        return n

    def _single_names(self) -> list[str]:
        return [p.name for d in self.root.iterdir() if len(d.name) == 2 and d.is_dir() for p in d.iterdir()]

    def names(self) -> list[str]:
        """Every blob's sha256: those stored one file each, and those in packs."""
        packed = self.index.packed_blobs() if self.index is not None else set()
        return sorted(set(self._single_names()) | packed)

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete blobs no database row names (a crash between storing an upload's frames and
        committing it leaves such blobs), and packs none of whose blobs is named (with their
        locations); returns how many blobs. Only while nothing else writes (startup)."""
        n = 0
        for name in self._single_names():
            if name not in referenced:
                self._path(name).unlink(missing_ok=True)
                n += 1
        if self.index is not None and self.packs.is_dir():  # without the index, packs are not judged
            contents = self.index.pack_contents()
            dead = [pack for pack, shas in contents.items() if not any(sha in referenced for sha in shas)]
            if dead:
                self.index.remove_packs(dead)
            n += sum(len(contents[pack]) for pack in dead)
            for path in self.packs.iterdir():  # dead ones, and any that a crash left unlocated
                if path.name not in contents or path.name in dead:
                    path.unlink(missing_ok=True)
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
