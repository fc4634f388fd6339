"""Service settings: defaults < environment (``HMD_CLOUD_*``) < command-line flags.

The storage and blob back-ends are named by URL: the embedded ``sqlite:///PATH`` and
``file://PATH`` by default, or PostgreSQL (``postgresql://``) and an S3-compatible store
(``s3://BUCKET/PREFIX`` with ``s3_endpoint_url``) for several API and worker processes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from shared.errors import UserError

ENV_PREFIX = "HMD_CLOUD_"


@dataclasses.dataclass
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None  # default sqlite:///DATA/cloud.sqlite3
    blob_url: str | None = None  # default file://DATA/blobs
    s3_endpoint_url: str | None = None  # an S3-compatible server for s3:// blob URLs (default: AWS)
    s3_multipart_mb: int = 64  # an upload's pack that reaches this many MiB goes up in 8 MiB parts while
    # it arrives (0: from its first part); a smaller one in one PUT when complete (README "Running at scale")
    early_transaction: bool = True  # PostgreSQL: an upload's transaction opens when its index arrives
    job_lease_s: float = 30.0  # a worker holds a job this long past its last heartbeat (shared queue)
    queue_url: str = "db:"  # jobs are rows of the metadata database
    max_upload_bytes: int = 64 * 1024 * 1024
    max_frame_bytes: int = 4 * 1024 * 1024
    max_frames_per_upload: int = 4096
    max_frame_pixels: int = 3840 * 2160  # frames are rejected from their header above this (decoded-size limit)
    max_frame_meta_bytes: int = 4096  # JSON bytes of one frame's metadata in an upload index
    max_uploads_in_flight: int = 4  # per device; more concurrent uploads answer 429
    max_device_bytes: int = 4 * 1024 ** 3  # stored upload bytes per device (0: no quota); over it: 507
    max_streams_per_device: int = 4  # open /v1/events streams per device; more answer 429
    max_job_attempts: int = 3  # a job interrupted this many times (e.g. it kills the process) is failed
    signing_key: Path | None = None  # the Ed25519 private key file (default DATA/signing.key)
    auto_job_frames: int = 64  # a job starts once a device uploaded this many new frames (0: never)
    job_max_frames: int = 512  # the most recent wearer frames a job trains on
    frame_size: int | None = None  # frames are resized to this side for training (default: the model's)
    base_run: Path | None = None  # registered as the base version on first start
    base_data: str | None = None  # the base training data replayed by personalisation (None: the base
    # run's recorded training data)
    base_val_data: str | None = None  # the gate's base set (None: the base run's recorded validation data)
    teacher_run: Path | None = None
    method: str = "great"
    epochs: int = 8  # 200 steps on 512 frames: what real footage needs (README "Real footage")
    max_steps_per_epoch: int | None = None
    lr: float | None = None  # personalisation learning rate (None: models.personalise's default)
    batch_size: int | None = None  # personalisation batch size (None: its default)
    holdout_fraction: float = 0.2
    tolerance: float = 0.05  # relative loss allowed on the base set (see models/personalise.py)
    int8: bool = False  # export versions as static INT8 (1.6x faster on the headset's CPU; see README)
    seed: int = 0
    job_nproc: int = 1  # processes a personalisation job trains on (models/distributed.py; room jobs: 1)
    worker: bool = True  # run the job worker in this process
    runner: str = "cloud.personalisation:personalise_job"  # MODULE:FUNCTION that runs one job
    sse_keepalive_s: float = 15.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.base_run = Path(self.base_run) if self.base_run else None
        self.teacher_run = Path(self.teacher_run) if self.teacher_run else None
        self.signing_key = Path(self.signing_key) if self.signing_key else None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cloud.sqlite3'}"

    @property
    def blobs_url(self) -> str:
        return self.blob_url or f"file://{self.data_dir / 'blobs'}"

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON (paths as strings); :meth:`from_json` reverses it."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "Settings":
        s = cls(**{k: v for k, v in values.items() if k in cls.field_names()})
        s.validate()
        return s

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> "Settings":
        """Build from the environment and flags (flags win; a flag left at None means 'not given')."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name in types:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _coerce(name, str(types[name]), raw)
        for name, value in (flags or {}).items():
            if name in types and value is not None:
                values[name] = value
        if "data_dir" not in values:
            raise UserError(f"no data dir: give --data-dir DIR or set {ENV_PREFIX}DATA_DIR")
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        if self.max_upload_bytes < 1024:
            raise UserError("max_upload_bytes must be at least 1024")
        if self.auto_job_frames < 0:
            raise UserError("auto_job_frames must be >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UserError("holdout_fraction must be between 0 and 1")
        if self.epochs < 1:
            raise UserError("epochs must be >= 1")
        if self.job_nproc < 1:
            raise UserError("job_nproc must be >= 1")
        if self.job_lease_s <= 0:
            raise UserError("job_lease_s must be > 0")
        for name in ("max_frame_pixels", "max_frame_meta_bytes", "max_uploads_in_flight", "max_streams_per_device",
                     "max_job_attempts"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        if self.s3_multipart_mb < 0:
            raise UserError("s3_multipart_mb must be >= 0")
        if self.max_device_bytes < 0:
            raise UserError("max_device_bytes must be >= 0 (0: no quota)")


def _coerce(name: str, typ: str, raw: str) -> Any:
    try:
        if "bool" in typ:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in typ and "float" not in typ:
            return int(raw)
        if "float" in typ:
            return float(raw)
    except ValueError:
        raise UserError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {typ}") from None
    return raw
