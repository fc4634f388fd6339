"""Metadata storage: devices, uploads, frames, jobs and model versions.

:class:`Storage` is the interface the service uses; :class:`SQLiteStorage` is the embedded
default (one file, WAL, one connection behind a lock: the API and the worker share a process).
A PostgreSQL implementation needs the same methods; every multi-row change is one transaction
here, so it maps onto one transaction there.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from shared.errors import UserError

SCHEMA_VERSION = 1
TERMINAL_STATES = ("accepted", "rejected", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    current_version TEXT
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices(id),
    content_sha256 TEXT NOT NULL,
    frames INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    index_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (device_id, content_sha256)
);
CREATE TABLE IF NOT EXISTS frames (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    upload_id TEXT NOT NULL REFERENCES uploads(id),
    device_id INTEGER NOT NULL,
    ord INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_by_device ON frames (device_id, row);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices(id),
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    frames_through INTEGER NOT NULL,
    frames INTEGER NOT NULL DEFAULT 0,
    max_frames INTEGER,
    base_version TEXT,
    progress TEXT NOT NULL DEFAULT '{}',
    evaluation TEXT,
    result_version TEXT,
    candidate_dir TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    device_id INTEGER,               -- NULL: the base version every device starts on
    parent_version TEXT,
    onnx_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    run_dir TEXT NOT NULL,
    job_id TEXT,
    created REAL NOT NULL
);
"""


@dataclasses.dataclass
class Device:
    id: int
    name: str
    token_sha256: str
    created: float
    current_version: str | None


@dataclasses.dataclass
class Upload:
    id: str
    device_id: int
    content_sha256: str
    frames: int
    bytes: int
    index_sha256: str
    created: float


@dataclasses.dataclass
class FrameRow:
    sha256: str
    width: int
    height: int
    meta: dict[str, Any]
    row: int | None = None


@dataclasses.dataclass
class Job:
    id: str
    device_id: int
    state: str
    trigger: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    frames_through: int
    frames: int
    max_frames: int | None
    base_version: str | None
    progress: dict[str, Any]
    evaluation: dict[str, Any] | None
    result_version: str | None
    candidate_dir: str | None
    reason: str | None


@dataclasses.dataclass
class Version:
    version: str
    device_id: int | None
    parent_version: str | None
    onnx_sha256: str
    manifest_sha256: str
    bytes: int
    run_dir: str
    job_id: str | None
    created: float


class Storage(Protocol):
    def add_device(self, name: str, token_sha256: str) -> Device: ...
    def device(self, device_id: int) -> Device | None: ...
    def device_by_name(self, name: str) -> Device | None: ...
    def find_upload(self, device_id: int, content_sha256: str) -> Upload | None: ...
    def upload(self, device_id: int, upload_id: str) -> Upload | None: ...
    def commit_upload(self, device_id: int, content_sha256: str, index_sha256: str, size: int,
                      frames: list[FrameRow]) -> tuple[Upload, bool]: ...
    def upload_count(self, device_id: int | None = None) -> int: ...
    def device_bytes(self, device_id: int) -> int: ...
    def device_bytes(self, device_id: int) -> int:
        """Upload bytes stored for a device (its quota counts these)."""
        return int(self._query("SELECT COALESCE(SUM(bytes), 0) FROM uploads WHERE device_id=?", (device_id,))[0][0])

    def frame_count(self, device_id: int | None = None) -> int: ...
    def frames_for_job(self, device_id: int, through_row: int, limit: int) -> list[FrameRow]: ...
    def create_job_if_due(self, device_id: int, min_new_frames: int, trigger: str,
                          max_frames: int | None = None) -> Job | None: ...
    def job(self, job_id: str, device_id: int | None = None) -> Job | None: ...
    def jobs(self, device_id: int | None = None, state: str | None = None) -> list[Job]: ...
    def claim_next_job(self) -> Job | None: ...
    def requeue_interrupted(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def finish_job(self, job_id: str, state: str, *, version: Version | None = None, **fields: Any) -> None: ...
    def add_version(self, version: Version) -> None: ...
    def version(self, name: str) -> Version | None: ...
    def base_version(self) -> Version | None: ...
    def current_version(self, device_id: int) -> Version | None: ...
    def next_manifest_sequence(self) -> int: ...
    def referenced_blobs(self) -> set[str]: ...
    def close(self) -> None: ...


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class SQLiteStorage:
    """The embedded :class:`Storage`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed upload or job survives a power cut
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise UserError(f"{self.path}: database schema {row['value']} is not {SCHEMA_VERSION}")

    # -- plumbing ----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, outer: "SQLiteStorage"):
            self.outer = outer

        def __enter__(self) -> sqlite3.Connection:
            self.outer._lock.acquire()
            self.outer._db.execute("BEGIN IMMEDIATE")
            return self.outer._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.outer._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.outer._lock.release()

    def _tx(self) -> "SQLiteStorage._Tx":
        return SQLiteStorage._Tx(self)

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- devices -----------------------------------------------------------------------------
    def add_device(self, name: str, token_sha256: str) -> Device:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO devices (name, token_sha256, created) VALUES (?, ?, ?)",
                           (name, token_sha256, time.time()))
        except sqlite3.IntegrityError:
            raise UserError(f"a device named {name!r} exists already") from None
        return self.device_by_name(name)  # type: ignore[return-value]

    def device(self, device_id: int) -> Device | None:
        rows = self._query("SELECT * FROM devices WHERE id=?", (device_id,))
        return Device(**dict(rows[0])) if rows else None

    def device_by_name(self, name: str) -> Device | None:
        rows = self._query("SELECT * FROM devices WHERE name=?", (name,))
        return Device(**dict(rows[0])) if rows else None

    # -- uploads -----------------------------------------------------------------------------
    def find_upload(self, device_id: int, content_sha256: str) -> Upload | None:
        rows = self._query("SELECT * FROM uploads WHERE device_id=? AND content_sha256=?", (device_id, content_sha256))
        return Upload(**dict(rows[0])) if rows else None

    def upload(self, device_id: int, upload_id: str) -> Upload | None:
        rows = self._query("SELECT * FROM uploads WHERE device_id=? AND id=?", (device_id, upload_id))
        return Upload(**dict(rows[0])) if rows else None

    def commit_upload(self, device_id: int, content_sha256: str, index_sha256: str, size: int,
                      frames: list[FrameRow]) -> tuple[Upload, bool]:
        """Insert the upload and all its frames in one transaction; (upload, created)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM uploads WHERE device_id=? AND content_sha256=?",
                             (device_id, content_sha256)).fetchone()
            if row is not None:  # a concurrent retry won the race: same answer as a repeat
                return Upload(**dict(row)), False
            up = Upload(new_id("u"), device_id, content_sha256, len(frames), size, index_sha256, time.time())
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(up))
            db.executemany(
                "INSERT INTO frames (upload_id, device_id, ord, sha256, width, height, meta) VALUES (?,?,?,?,?,?,?)",
                [(up.id, device_id, i, f.sha256, f.width, f.height, json.dumps(f.meta)) for i, f in enumerate(frames)])
        return up, True

    def upload_count(self, device_id: int | None = None) -> int:
        if device_id is None:
            return int(self._query("SELECT COUNT(*) FROM uploads")[0][0])
        return int(self._query("SELECT COUNT(*) FROM uploads WHERE device_id=?", (device_id,))[0][0])

    def device_bytes(self, device_id: int) -> int:
        """Upload bytes stored for a device (its quota counts these)."""
        return int(self._query("SELECT COALESCE(SUM(bytes), 0) FROM uploads WHERE device_id=?", (device_id,))[0][0])

    def frame_count(self, device_id: int | None = None) -> int:
        if device_id is None:
            return int(self._query("SELECT COUNT(*) FROM frames")[0][0])
        return int(self._query("SELECT COUNT(*) FROM frames WHERE device_id=?", (device_id,))[0][0])

    def frames_for_job(self, device_id: int, through_row: int, limit: int) -> list[FrameRow]:
        """The device's most recent ``limit`` frames up to ``through_row``, oldest first."""
        rows = self._query("SELECT * FROM frames WHERE device_id=? AND row<=? ORDER BY row DESC LIMIT ?",
                           (device_id, through_row, limit))
        return [FrameRow(r["sha256"], r["width"], r["height"], json.loads(r["meta"]), r["row"]) for r in reversed(rows)]

    # -- jobs --------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        d = dict(row)
        d["progress"] = json.loads(d["progress"] or "{}")
        d["evaluation"] = json.loads(d["evaluation"]) if d["evaluation"] else None
        return Job(**d)

    def create_job_if_due(self, device_id: int, min_new_frames: int, trigger: str,
                          max_frames: int | None = None) -> Job | None:
        """Queue a job for the device when it has >= ``min_new_frames`` frames newer than its last
        job's (0: any frames at all) and no job waiting or running (one transaction: two uploads
        never start two jobs)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE device_id=? AND state IN ('queued','running')",
                          (device_id,)).fetchone():
                return None
            last = db.execute("SELECT MAX(frames_through) FROM jobs WHERE device_id=?", (device_id,)).fetchone()[0]
            last = -1 if last is None else int(last)
            if min_new_frames <= 0:  # asked for explicitly: train on what there is
                last = -1
            new, through = db.execute("SELECT COUNT(*), MAX(row) FROM frames WHERE device_id=? AND row>?",
                                      (device_id, last)).fetchone()
            if new < max(1, min_new_frames):
                return None
            total = db.execute("SELECT COUNT(*) FROM frames WHERE device_id=? AND row<=?",
                               (device_id, through)).fetchone()[0]
            job_id = new_id("j")
            db.execute("INSERT INTO jobs (id, device_id, state, trigger, created, frames_through, frames, max_frames) "
                       "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                       (job_id, device_id, trigger, time.time(), through, total, max_frames))
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def job(self, job_id: str, device_id: int | None = None) -> Job | None:
        if device_id is None:
            rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        else:
            rows = self._query("SELECT * FROM jobs WHERE id=? AND device_id=?", (job_id, device_id))
        return self._job(rows[0]) if rows else None

    def jobs(self, device_id: int | None = None, state: str | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if device_id is not None:
            sql, args = sql + " AND device_id=?", args + [device_id]
        if state is not None:
            sql, args = sql + " AND state=?", args + [state]
        return [self._job(r) for r in self._query(sql + " ORDER BY created", tuple(args))]

    def claim_next_job(self) -> Job | None:
        """Atomically move the oldest queued job to running (attempts + 1) and return it."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', started=?, attempts=attempts+1 WHERE id=?",
                       (time.time(), row["id"]))
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone())

    def requeue_interrupted(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """Jobs left running by a process that died go back to the queue (they re-run from the
        start), unless they have been tried ``max_attempts`` times already: those are failed, so a
        job that kills its process is not re-run forever. Returns (requeued ids, failed ids)."""
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state='running'").fetchall()
            failed = [r["id"] for r in rows if max_attempts is not None and r["attempts"] >= max_attempts]
            requeued = [r["id"] for r in rows if r["id"] not in failed]
            for job_id in failed:
                db.execute("UPDATE jobs SET state='failed', finished=?, reason=?, progress=? WHERE id=?",
                           (time.time(), f"interrupted {max_attempts} times (the process died while running it)",
                            json.dumps({"stage": "failed", "note": "attempt limit reached"}), job_id))
            for job_id in requeued:
                db.execute("UPDATE jobs SET state='queued', progress=? WHERE id=?",
                           (json.dumps({"stage": "queued", "note": "interrupted by a restart; re-running"}), job_id))
        return requeued, failed

    _JOB_FIELDS = {"progress", "evaluation", "base_version", "reason", "candidate_dir", "result_version", "state",
                   "finished", "frames"}

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update_job(self._db, job_id, fields, lock=True)

    def _update_job(self, db: sqlite3.Connection, job_id: str, fields: dict[str, Any], lock: bool = False) -> None:
        bad = set(fields) - self._JOB_FIELDS
        if bad:
            raise ValueError(f"unknown job fields {bad}")
        sets, args = [], []
        for k, v in fields.items():
            sets.append(f"{k}=?")
            args.append(json.dumps(v) if k in ("progress", "evaluation") and v is not None else v)
        if not sets:
            return
        if lock:
            with self._tx() as tx:
                tx.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))
        else:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))

    def finish_job(self, job_id: str, state: str, *, version: Version | None = None, **fields: Any) -> None:
        """Record a job's outcome; with ``version``, register it and make it the device's current
        one in the same transaction (so a crash never leaves a finished job without its version,
        nor a version whose job runs again)."""
        if state not in TERMINAL_STATES:
            raise ValueError(state)
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} is not running (state {row and row['state']})")
            if version is not None:
                db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           dataclasses.astuple(version))
                db.execute("UPDATE devices SET current_version=? WHERE id=?", (version.version, version.device_id))
                fields["result_version"] = version.version
            self._update_job(db, job_id, dict(fields, state=state, finished=time.time()))

    # -- versions ----------------------------------------------------------------------------
    def add_version(self, version: Version) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(version))
        except sqlite3.IntegrityError:
            raise UserError(f"model version {version.version} exists already") from None

    def version(self, name: str) -> Version | None:
        rows = self._query("SELECT * FROM versions WHERE version=?", (name,))
        return Version(**dict(rows[0])) if rows else None

    def base_version(self) -> Version | None:
        rows = self._query("SELECT * FROM versions WHERE device_id IS NULL ORDER BY created DESC LIMIT 1")
        return Version(**dict(rows[0])) if rows else None

    def current_version(self, device_id: int) -> Version | None:
        dev = self.device(device_id)
        if dev is not None and dev.current_version:
            v = self.version(dev.current_version)
            if v is not None:
                return v
        return self.base_version()

    # -- administration (`hmd cloud devices`, `hmd cloud rotate-token`) -------------------------
    def devices(self) -> list[Device]:
        return [Device(**dict(r)) for r in self._query("SELECT * FROM devices ORDER BY name")]

    def set_device_token(self, name: str, token_sha256: str) -> bool:
        """Replace a device's token hash (the old token stops working); False if there is no such device."""
        with self._tx() as db:
            return db.execute("UPDATE devices SET token_sha256=? WHERE name=?", (token_sha256, name)).rowcount == 1


    def next_manifest_sequence(self) -> int:
        """A number larger than every one handed out before (signed into each manifest, so a
        headset can refuse an older model than the one it runs)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='manifest_sequence'").fetchone()
            seq = (int(row["value"]) if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO meta VALUES ('manifest_sequence', ?)", (str(seq),))
        return seq

    def referenced_blobs(self) -> set[str]:
        """Every blob a row names: frames, upload indexes, model files and manifests."""
        rows = self._query("SELECT sha256 FROM frames UNION SELECT index_sha256 FROM uploads "
                           "UNION SELECT onnx_sha256 FROM versions UNION SELECT manifest_sha256 FROM versions")
        return {r[0] for r in rows}


def open_storage(url: str) -> Storage:
    if url.startswith("sqlite:///"):
        return SQLiteStorage(url[len("sqlite:///"):])
    raise UserError(f"database {url!r}: only sqlite:///PATH is built in (PostgreSQL plugs in behind cloud.storage.Storage)")

