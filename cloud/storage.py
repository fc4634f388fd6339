"""Metadata storage: devices, uploads, frames, jobs and model versions.

:class:`Storage` is the interface the service uses. :class:`SQLStorage` holds every query once,
in the SQL both databases speak; :class:`SQLiteStorage` is the embedded default (one file, WAL,
one connection behind a lock: the API and the worker share a process) and
:class:`cloud.postgres.PostgresStorage` the shared one (``postgresql://`` URLs: several API and
worker processes on any machines). They differ only in plumbing (connections, placeholders) and
in the row locks PostgreSQL needs where SQLite's one writer serialises by itself
(``FOR_UPDATE``, ``SKIP_LOCKED``). The schema is a list of numbered :data:`MIGRATIONS`, applied
in order on open and recorded in ``meta.schema``, the same on both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from shared.errors import UserError

TERMINAL_STATES = ("accepted", "rejected", "failed")

# Numbered schema changes, applied in order and recorded in meta.schema. {pk}: an auto-numbered
# integer key; {real}: a 64-bit float (PostgreSQL's REAL is 32 bits: timestamps need DOUBLE).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, ["""CREATE TABLE IF NOT EXISTS devices (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL,
    created {real} NOT NULL,
    current_version TEXT
)""", """CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices(id),
    content_sha256 TEXT NOT NULL,
    frames INTEGER NOT NULL,
    bytes BIGINT NOT NULL,
    index_sha256 TEXT NOT NULL,
    created {real} NOT NULL,
    UNIQUE (device_id, content_sha256)
)""", """CREATE TABLE IF NOT EXISTS frames (
    row {pk},
    upload_id TEXT NOT NULL REFERENCES uploads(id),
    device_id INTEGER NOT NULL,
    ord INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    meta TEXT NOT NULL
)""", "CREATE INDEX IF NOT EXISTS frames_by_device ON frames (device_id, row)",
        """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices(id),
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created {real} NOT NULL,
    started {real},
    finished {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    frames_through BIGINT NOT NULL,
    frames INTEGER NOT NULL DEFAULT 0,
    max_frames INTEGER,
    base_version TEXT,
    progress TEXT NOT NULL DEFAULT '{{}}',
    evaluation TEXT,
    result_version TEXT,
    candidate_dir TEXT,
    reason TEXT
)""", "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created)",
        """CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    device_id INTEGER,
    parent_version TEXT,
    onnx_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    run_dir TEXT NOT NULL,
    job_id TEXT,
    created {real} NOT NULL
)"""]),  # versions.device_id NULL: the base version every device starts on
    # 2: job leases, so that worker processes on other machines can hold a job and lose it by dying
    (2, ["ALTER TABLE jobs ADD COLUMN lease_owner TEXT", "ALTER TABLE jobs ADD COLUMN lease_expires {real}"]),
    # 3: staged rollout of base versions (cloud/rollout.py) and the headsets' health reports
    (3, ["""CREATE TABLE IF NOT EXISTS releases (
    version TEXT PRIMARY KEY REFERENCES versions(version),
    previous TEXT,
    percent {real} NOT NULL,
    state TEXT NOT NULL,
    created {real} NOT NULL,
    updated {real} NOT NULL,
    reason TEXT,
    max_error_rate {real} NOT NULL,
    max_rollbacks INTEGER NOT NULL,
    min_fps_ratio {real} NOT NULL,
    rollback_version TEXT
)""", """CREATE TABLE IF NOT EXISTS health (
    id {pk},
    device_id INTEGER NOT NULL REFERENCES devices(id),
    version TEXT NOT NULL,
    created {real} NOT NULL,
    frames INTEGER NOT NULL,
    fps {real} NOT NULL,
    latency_ms {real} NOT NULL,
    rollbacks INTEGER NOT NULL,
    errors INTEGER NOT NULL
)""", "CREATE INDEX IF NOT EXISTS health_by_version ON health (version)"]),
    # v4: a frame the device already stored (same bytes) is not stored again, e.g. when the answer to
    # an upload was lost and the headset resends those frames inside a larger batch
    (4, ["CREATE INDEX IF NOT EXISTS frames_by_device_sha ON frames (device_id, sha256)"]),
    # v5: an object store keeps an upload's frames in one object (a pack); a blob stored that way is
    # read back as the byte range [pack_offset, pack_offset + pack_length) of object ``pack``
    (5, ["""CREATE TABLE IF NOT EXISTS blob_packs (
    sha256 TEXT PRIMARY KEY,
    pack TEXT NOT NULL,
    pack_offset BIGINT NOT NULL,
    pack_length BIGINT NOT NULL
)"""]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
    meta_json: str | None = None  # ``meta`` encoded, when the ingest has it already (one encoding per frame)


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
    lease_owner: str | None = None  # the worker holding a running job (shared queue)
    lease_expires: float | None = None  # ... until then, unless its heartbeat extends it


@dataclasses.dataclass
class Release:
    """A staged rollout of a base version: ``percent`` of the devices (a stable hash of the device
    name picks them) get ``version`` instead of ``previous`` while ``state`` is ``canary``;
    ``promoted``: every device; ``halted``: the canary devices are back on ``previous``, re-signed
    as ``rollback_version`` (a newer signed sequence, so headsets accept the step back)."""
    version: str
    previous: str | None
    percent: float
    state: str  # canary | promoted | halting | halted
    created: float
    updated: float
    reason: str | None
    max_error_rate: float
    max_rollbacks: int
    min_fps_ratio: float
    rollback_version: str | None = None


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
                      frames: list[FrameRow], locations: list[tuple[str, str, int, int]] = ...) -> tuple[Upload, bool]: ...
    def upload_count(self, device_id: int | None = None) -> int: ...
    def device_bytes(self, device_id: int) -> int: ...
    def frame_count(self, device_id: int | None = None) -> int: ...
    def frames_for_job(self, device_id: int, through_row: int, limit: int) -> list[FrameRow]: ...
    def create_job_if_due(self, device_id: int, min_new_frames: int, trigger: str,
                          max_frames: int | None = None) -> Job | None: ...
    def job(self, job_id: str, device_id: int | None = None) -> Job | None: ...
    def jobs(self, device_id: int | None = None, state: str | None = None) -> list[Job]: ...
    def claim_next_job(self, owner: str | None = None, lease_s: float | None = None) -> Job | None: ...
    def requeue_interrupted(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]: ...
    def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]: ...
    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def finish_job(self, job_id: str, state: str, *, version: Version | None = None, owner: str | None = None,
                   **fields: Any) -> None: ...
    def add_version(self, version: Version) -> None: ...
    def version(self, name: str) -> Version | None: ...
    def base_version(self) -> Version | None: ...
    def device_base(self, device: Device) -> Version | None: ...
    def current_version(self, device_id: int) -> Version | None: ...
    def add_release(self, release: Release) -> None: ...
    def releases(self) -> list[Release]: ...
    def release(self, version: str) -> Release | None: ...
    def update_release(self, version: str, *, only_if_state: str | None = None, **fields: Any) -> bool: ...
    def add_health(self, device_id: int, version: str, frames: int, fps: float, latency_ms: float,
                   rollbacks: int, errors: int) -> None: ...
    def health_summary(self, versions: list[str]) -> dict[str, float]: ...
    def next_manifest_sequence(self) -> int: ...
    def referenced_blobs(self) -> set[str]: ...
    def add_blob_locations(self, rows: list[tuple[str, str, int, int]]) -> None: ...
    def blob_locations(self, shas: list[str]) -> dict[str, tuple[str, int, int]]: ...
    def packed_blobs(self) -> set[str]: ...
    def pack_contents(self) -> dict[str, list[str]]: ...
    def remove_packs(self, packs: list[str]) -> None: ...
    def close(self) -> None: ...


_FRAME_COLUMNS = ("upload_id", "device_id", "ord", "sha256", "width", "height", "meta")
_LOCATION_COLUMNS = ("sha256", "pack", "pack_offset", "pack_length")


def in_canary(release: Release, device_name: str) -> bool:
    """Whether a device is in a release's canary: a stable hash of (release, device name) below
    its percentage, so widening a canary keeps the devices already in."""
    h = int.from_bytes(hashlib.sha256(f"{release.version}\0{device_name}".encode()).digest()[:8], "big")
    return h / 2 ** 64 * 100.0 < release.percent


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class SQLStorage:
    """Every query of :class:`Storage` once, in SQL that SQLite and PostgreSQL both accept
    (``?`` placeholders; a subclass translates). Subclasses give ``_tx`` (a transaction yielding a
    connection-like object with ``execute``/``executemany``), ``_query`` and ``close``."""

    # SQLite's BEGIN IMMEDIATE makes every writing transaction exclusive, so it needs no row locks
    FOR_UPDATE = ""
    SKIP_LOCKED = ""
    PK = "INTEGER PRIMARY KEY AUTOINCREMENT"
    REAL = "REAL"
    IntegrityError: type[Exception] = sqlite3.IntegrityError
    where = "the database"

    def _tx(self) -> Any:
        raise NotImplementedError

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _lock_schema(self, db: Any) -> None:
        """Serialise migrations of processes starting at once (SQLite: BEGIN IMMEDIATE does)."""

    def _migrate(self) -> None:
        """Apply the :data:`MIGRATIONS` this database has not had yet, in one transaction."""
        with self._tx() as db:
            self._lock_schema(db)
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            current = int(row["value"]) if row else 0
            if current > SCHEMA_VERSION:
                raise UserError(f"{self.where}: database schema {current} is newer than this program's "
                                f"{SCHEMA_VERSION} (upgrade great-hmd)")
            for number, statements in MIGRATIONS:
                if number > current:
                    for sql in statements:
                        db.execute(sql.format(pk=self.PK, real=self.REAL))
            db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        return int(self._query("SELECT value FROM meta WHERE key='schema'")[0]["value"])

    # -- devices -----------------------------------------------------------------------------
    def add_device(self, name: str, token_sha256: str) -> Device:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO devices (name, token_sha256, created) VALUES (?, ?, ?)",
                           (name, token_sha256, time.time()))
        except self.IntegrityError:
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
                      frames: list[FrameRow], locations: list[tuple[str, str, int, int]] = ()) -> tuple[Upload, bool]:
        """Insert the upload and all its frames in one transaction; (upload, created). ``locations``:
        where a packing blob store put the upload's blobs (:meth:`add_blob_locations`' rows), recorded
        in the same transaction."""
        try:
            return self._commit_upload(device_id, content_sha256, index_sha256, size, frames, locations)
        except self.IntegrityError:  # another process committed the same upload meanwhile
            existing = self.find_upload(device_id, content_sha256)
            if existing is None:
                raise
            return existing, False

    def _commit_upload(self, device_id: int, content_sha256: str, index_sha256: str, size: int,
                       frames: list[FrameRow], locations: list[tuple[str, str, int, int]]) -> tuple[Upload, bool]:
        with self._tx() as db:
            up, created = self._insert_upload(db, device_id, content_sha256, index_sha256, size, frames)
            if created:
                self._insert_locations(db, locations)
        return up, created

    def _insert_upload(self, db: Any, device_id: int, content_sha256: str, index_sha256: str, size: int,
                       frames: list[FrameRow]) -> tuple[Upload, bool]:
        """In the transaction ``db``: the upload's row and its frames' rows; (upload, created), or
        the upload stored already and False."""
        row = db.execute("SELECT * FROM uploads WHERE device_id=? AND content_sha256=?",
                         (device_id, content_sha256)).fetchone()
        if row is not None:  # a concurrent retry won the race: same answer as a repeat
            return Upload(**dict(row)), False
        up = Upload(new_id("u"), device_id, content_sha256, len(frames), size, index_sha256, time.time())
        db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(up))
        # frames this device already stored (a resent batch that overlaps an earlier one) are not
        # stored twice; the upload still answers for all of them
        have = self._stored_frames(db, device_id, sorted({f.sha256 for f in frames}))
        new, seen = [], set(have)
        for i, f in enumerate(frames):
            if f.sha256 not in seen:
                seen.add(f.sha256)
                new.append((up.id, device_id, i, f.sha256, f.width, f.height, f.meta_json or json.dumps(f.meta)))
        self._insert_many(db, "frames", _FRAME_COLUMNS, new)
        return up, True

    def _insert_locations(self, db: Any, locations: list[tuple[str, str, int, int]] | tuple) -> None:
        """In the transaction ``db``: where a packing store put blobs; a blob located already keeps
        its first location."""
        self._insert_many(db, "blob_packs", _LOCATION_COLUMNS, list(locations), keep_existing="sha256")

    def _stored_frames(self, db: Any, device_id: int, shas: list[str]) -> set[str]:
        """Which of ``shas`` the device has stored (IN lists of 500; PostgreSQL overrides this with
        one array parameter, a query its driver can prepare once)."""
        have: set[str] = set()
        for i in range(0, len(shas), 500):
            part = shas[i:i + 500]
            have.update(r[0] for r in db.execute(
                f"SELECT sha256 FROM frames WHERE device_id=? AND sha256 IN ({','.join('?' * len(part))})",
                (device_id, *part)).fetchall())
        return have

    def _insert_many(self, db: Any, table: str, columns: tuple[str, ...], rows: list[tuple],
                     keep_existing: str | None = None) -> None:
        """``rows`` into ``table`` in the transaction ``db``; with ``keep_existing`` (a unique
        column), a row whose key is there already is left out. SQLite runs executemany's loop in C;
        PostgreSQL overrides this with COPY (cloud/postgres.py)."""
        if rows:
            conflict = f" ON CONFLICT ({keep_existing}) DO NOTHING" if keep_existing else ""
            db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))}){conflict}",
                           rows)

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
    def _job(row: Any) -> Job:
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
            db.execute("SELECT id FROM devices WHERE id=?" + self.FOR_UPDATE, (device_id,))  # one at a time per device
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

    def claim_next_job(self, owner: str | None = None, lease_s: float | None = None) -> Job | None:
        """Atomically move the oldest queued job to running (attempts + 1) and return it. With
        ``owner`` and ``lease_s`` the job is leased: it is the owner's until ``lease_expires``,
        which the owner's heartbeat (:meth:`renew_lease`) keeps moving; a worker that dies stops
        renewing and :meth:`requeue_expired` gives the job to another. On PostgreSQL the row is
        locked with SKIP LOCKED, so workers claiming at once take different jobs without waiting."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY created LIMIT 1"
                             + self.FOR_UPDATE + self.SKIP_LOCKED).fetchone()
            if row is None:
                return None
            expires = now + lease_s if lease_s is not None else None
            db.execute("UPDATE jobs SET state='running', started=?, attempts=attempts+1, lease_owner=?, "
                       "lease_expires=? WHERE id=?", (now, owner, expires, row["id"]))
            return self._job(db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone())

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """The heartbeat: extend the owner's lease; False when the job is no longer the owner's
        (its lease expired and another worker took it, or it finished), so the owner stops."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET lease_expires=? WHERE id=? AND state='running' AND lease_owner=?",
                              (time.time() + lease_s, job_id, owner)).rowcount == 1

    def release_job(self, job_id: str, owner: str, note: str) -> bool:
        """A worker stopping (SIGTERM) hands its job back to the queue, if the job is still its."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state='queued', lease_owner=NULL, lease_expires=NULL, progress=? "
                              "WHERE id=? AND state='running' AND lease_owner=?",
                              (json.dumps({"stage": "queued", "note": note}), job_id, owner)).rowcount == 1

    def requeue_interrupted(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """Jobs left running by a process that died go back to the queue (they re-run from the
        start), unless they have been tried ``max_attempts`` times already: those are failed, so a
        job that kills its process is not re-run forever. Returns (requeued ids, failed ids).
        Every running job counts: for the embedded service, whose one process runs all jobs."""
        return self._requeue("state='running'", (), max_attempts, "interrupted by a restart; re-running",
                             "the process died while running it")

    def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[str], list[str]]:
        """The shared queue's recovery: running jobs whose lease expired (the worker holding it
        died or lost the database) are queued again or, tried ``max_attempts`` times, failed."""
        return self._requeue("state='running' AND lease_expires < ?", (time.time(),), max_attempts,
                             "its worker stopped renewing the lease; re-running",
                             "its worker died (lease expired) each time")

    def _requeue(self, where: str, args: tuple, max_attempts: int | None, note: str,
                 cause: str) -> tuple[list[str], list[str]]:
        with self._tx() as db:
            rows = db.execute(f"SELECT id, attempts FROM jobs WHERE {where}" + self.FOR_UPDATE + self.SKIP_LOCKED,
                              args).fetchall()
            failed = [r["id"] for r in rows if max_attempts is not None and r["attempts"] >= max_attempts]
            requeued = [r["id"] for r in rows if r["id"] not in failed]
            for job_id in failed:
                db.execute("UPDATE jobs SET state='failed', finished=?, reason=?, progress=?, lease_owner=NULL "
                           "WHERE id=?", (time.time(), f"interrupted {max_attempts} times ({cause})",
                                          json.dumps({"stage": "failed", "note": "attempt limit reached"}), job_id))
            for job_id in requeued:
                db.execute("UPDATE jobs SET state='queued', progress=?, lease_owner=NULL, lease_expires=NULL "
                           "WHERE id=?", (json.dumps({"stage": "queued", "note": note}), job_id))
        return requeued, failed

    _JOB_FIELDS = {"progress", "evaluation", "base_version", "reason", "candidate_dir", "result_version", "state",
                   "finished", "frames", "lease_owner", "lease_expires"}

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update_job(None, job_id, fields)

    def _update_job(self, db: Any, job_id: str, fields: dict[str, Any]) -> None:
        """``db``: inside that transaction; None: in one of its own."""
        bad = set(fields) - self._JOB_FIELDS
        if bad:
            raise ValueError(f"unknown job fields {bad}")
        sets, args = [], []
        for k, v in fields.items():
            sets.append(f"{k}=?")
            args.append(json.dumps(v) if k in ("progress", "evaluation") and v is not None else v)
        if not sets:
            return
        if db is None:
            with self._tx() as tx:
                tx.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))
        else:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))

    def finish_job(self, job_id: str, state: str, *, version: Version | None = None, owner: str | None = None,
                   **fields: Any) -> None:
        """Record a job's outcome; with ``version``, register it and make it the device's current
        one in the same transaction (so a crash never leaves a finished job without its version,
        nor a version whose job runs again). With ``owner``, only while that worker still holds the
        job's lease: a worker whose lease expired (and the job went to another) cannot finish it,
        so no job completes twice."""
        if state not in TERMINAL_STATES:
            raise ValueError(state)
        with self._tx() as db:
            row = db.execute("SELECT state, lease_owner FROM jobs WHERE id=?" + self.FOR_UPDATE, (job_id,)).fetchone()
            if row is None or row["state"] in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} is not running (state {row and row['state']})")
            if owner is not None and (row["state"] != "running" or row["lease_owner"] != owner):
                raise RuntimeError(f"job {job_id} is no longer {owner}'s (its lease expired; state {row['state']}, "
                                   f"held by {row['lease_owner']})")
            if version is not None:
                db.execute("DELETE FROM versions WHERE version=?", (version.version,))
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(version))
                db.execute("UPDATE devices SET current_version=? WHERE id=?", (version.version, version.device_id))
                fields["result_version"] = version.version
            self._update_job(db, job_id, dict(fields, state=state, finished=time.time(), lease_owner=None))

    # -- versions ----------------------------------------------------------------------------
    def add_version(self, version: Version) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(version))
        except self.IntegrityError:
            raise UserError(f"model version {version.version} exists already") from None

    def version(self, name: str) -> Version | None:
        rows = self._query("SELECT * FROM versions WHERE version=?", (name,))
        return Version(**dict(rows[0])) if rows else None

    def base_version(self) -> Version | None:
        """The stable base every device starts on: the newest base version; once releases are
        staged (``hmd cloud release``), the last promoted one (before any: the base that was
        stable when the first was staged)."""
        releases = self.releases()
        if releases:
            promoted = [r.version for r in releases if r.state == "promoted"]
            v = self.version(promoted[-1] if promoted else releases[0].previous or "")
            if v is not None:
                return v
        rows = self._query("SELECT * FROM versions WHERE device_id IS NULL ORDER BY created DESC LIMIT 1")
        return Version(**dict(rows[0])) if rows else None

    def device_base(self, device: Device) -> Version | None:
        """The base this device runs: the canary's when the newest release is a canary that
        includes it, the re-signed previous base when that canary was halted, else the stable one."""
        releases = self.releases()
        if releases and releases[-1].state in ("canary", "halted") and in_canary(releases[-1], device.name):
            name = releases[-1].version if releases[-1].state == "canary" else releases[-1].rollback_version
            v = self.version(name) if name else None
            if v is not None:
                return v
        return self.base_version()

    def root_base(self, v: Version) -> Version:
        """The base version a personalised version was trained from (itself for a base)."""
        for _ in range(64):  # lineage is short; never loop on a corrupt cycle
            if v.device_id is None or not v.parent_version:
                return v
            parent = self.version(v.parent_version)
            if parent is None:
                return v
            v = parent
        return v

    def current_version(self, device_id: int) -> Version | None:
        """The device's personalised version, else its base. With staged releases, a personalised
        version counts only while it was trained from the base the device is on now (a canary
        device gets the new base, and is personalised on top of it by its next job)."""
        dev = self.device(device_id)
        if dev is None:
            return self.base_version()
        staged = bool(self.releases())
        base = self.device_base(dev) if staged else self.base_version()
        if dev.current_version:
            v = self.version(dev.current_version)
            if v is not None and (not staged or base is None or self.root_base(v).onnx_sha256 == base.onnx_sha256):
                return v
        return base

    # -- staged rollout (cloud/rollout.py) ------------------------------------------------------
    def add_release(self, release: Release) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM releases WHERE version=?", (release.version,))
            db.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(release))

    def releases(self) -> list[Release]:
        return [Release(**dict(r)) for r in self._query("SELECT * FROM releases ORDER BY created")]

    def release(self, version: str) -> Release | None:
        rows = self._query("SELECT * FROM releases WHERE version=?", (version,))
        return Release(**dict(rows[0])) if rows else None

    def update_release(self, version: str, *, only_if_state: str | None = None, **fields: Any) -> bool:
        """Change a release (``only_if_state``: only from that state: one process wins a halt)."""
        sets = ", ".join(f"{k}=?" for k in fields) + ", updated=?"
        sql, args = f"UPDATE releases SET {sets} WHERE version=?", [*fields.values(), time.time(), version]
        if only_if_state is not None:
            sql, args = sql + " AND state=?", args + [only_if_state]
        with self._tx() as db:
            return db.execute(sql, tuple(args)).rowcount == 1

    def add_health(self, device_id: int, version: str, frames: int, fps: float, latency_ms: float, rollbacks: int,
                   errors: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO health (device_id, version, created, frames, fps, latency_ms, rollbacks, errors) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (device_id, version, time.time(), frames, fps, latency_ms, rollbacks, errors))

    def health_summary(self, versions: list[str]) -> dict[str, float]:
        """Totals of the health reports of devices running any of ``versions``."""
        if not versions:
            return {"reports": 0, "devices": 0, "frames": 0, "errors": 0, "rollbacks": 0, "fps": 0.0,
                    "latency_ms": 0.0}
        marks = ",".join("?" * len(versions))
        r = self._query(f"SELECT COUNT(*), COUNT(DISTINCT device_id), COALESCE(SUM(frames), 0), "
                        f"COALESCE(SUM(errors), 0), COALESCE(SUM(rollbacks), 0), COALESCE(AVG(fps), 0), "
                        f"COALESCE(AVG(latency_ms), 0) FROM health WHERE version IN ({marks})", tuple(versions))[0]
        return {"reports": int(r[0]), "devices": int(r[1]), "frames": int(r[2]), "errors": int(r[3]),
                "rollbacks": int(r[4]), "fps": float(r[5]), "latency_ms": float(r[6])}

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
        with self._tx() as db:  # one statement: concurrent callers never get the same number
            row = db.execute("INSERT INTO meta (key, value) VALUES ('manifest_sequence', '1') ON CONFLICT (key) "
                             "DO UPDATE SET value=CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT) RETURNING value").fetchone()
        return int(row["value"])

    def referenced_blobs(self) -> set[str]:
        """Every blob a row names: frames, upload indexes, model files and manifests."""
        rows = self._query("SELECT sha256 FROM frames UNION SELECT index_sha256 FROM uploads "
                           "UNION SELECT onnx_sha256 FROM versions UNION SELECT manifest_sha256 FROM versions")
        return {r[0] for r in rows}

    # -- packed blobs (cloud/s3.py): where in which pack object a blob's bytes are ----------------
    def add_blob_locations(self, rows: list[tuple[str, str, int, int]]) -> None:
        """(sha256, pack, offset, length) rows; a blob located already keeps its first location."""
        if rows:
            with self._tx() as db:
                self._insert_many(db, "blob_packs", _LOCATION_COLUMNS, rows, keep_existing="sha256")

    def blob_locations(self, shas: list[str]) -> dict[str, tuple[str, int, int]]:
        out: dict[str, tuple[str, int, int]] = {}
        for i in range(0, len(shas), 500):
            part = shas[i:i + 500]
            for r in self._query(f"SELECT sha256, pack, pack_offset, pack_length FROM blob_packs WHERE sha256 IN "
                                 f"({','.join('?' * len(part))})", tuple(part)):
                out[r[0]] = (r[1], int(r[2]), int(r[3]))
        return out

    def packed_blobs(self) -> set[str]:
        return {r[0] for r in self._query("SELECT sha256 FROM blob_packs")}

    def pack_contents(self) -> dict[str, list[str]]:
        """Every pack and the blobs located in it."""
        out: dict[str, list[str]] = {}
        for r in self._query("SELECT pack, sha256 FROM blob_packs"):
            out.setdefault(r[0], []).append(r[1])
        return out

    def remove_packs(self, packs: list[str]) -> None:
        """Forget where these packs' blobs are (their files are being deleted)."""
        with self._tx() as db:
            db.executemany("DELETE FROM blob_packs WHERE pack=?", [(p,) for p in packs])


class SQLiteStorage(SQLStorage):
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
        self.where = str(self.path)
        self._migrate()

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
