"""The model registry: per version, its training run folder (to train further from), the ONNX
file and the signed manifest (both content-addressed blobs), and its lineage (parent version).

``DATA/runs/<version>/`` holds the run folder; a version becomes visible only when its row is
committed, so a crash mid-export leaves at most an unreferenced folder that the re-run replaces.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from cloud.blobs import BlobStore
from cloud.keys import SigningKey
from cloud.storage import Storage, Version
from shared.atomic import atomic_write_bytes
from shared.errors import UserError
from shared.manifest import Manifest
from shared.wire import ModelInfo

RUN_FILES = ("checkpoint.pt", "metrics.json")


class ModelRegistry:
    def __init__(self, data_dir: str | os.PathLike, storage: Storage, blobs: BlobStore, key: SigningKey,
                 int8: bool = False):
        """``int8``: every version built from now on is exported as static INT8 (calibrated on the
        run's own training frames; the manifest records the quality change against FP32)."""
        self.runs_dir = Path(data_dir) / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.storage, self.blobs, self.key = storage, blobs, key
        self.int8 = int8

    def run_dir(self, version: Version) -> Path:
        return Path(version.run_dir)

    def manifest(self, version: Version) -> Manifest:
        with self.blobs.open(version.manifest_sha256) as fh:
            return Manifest.from_bytes(fh.read())

    def write_model_folder(self, version: Version, dest: str | os.PathLike) -> Path:
        """``dest/model.onnx`` + ``dest/manifest.json`` (signed) of a version; unchanged if already there."""
        dest = Path(dest)
        manifest = dest / "manifest.json"
        if manifest.is_file() and Manifest.load(manifest).sha256 == version.onnx_sha256:
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        for name, sha in (("model.onnx", version.onnx_sha256), ("manifest.json", version.manifest_sha256)):
            with self.blobs.open(sha) as fh:
                atomic_write_bytes(dest / name, fh.read())
        return dest

    def sign(self, manifest: Manifest, device_id: int | None) -> Manifest:
        """Sign with the next sequence number and the device it is for (None: every device)."""
        device = self.storage.device(device_id) if device_id is not None else None
        return self.key.sign_manifest(manifest, sequence=self.storage.next_manifest_sequence(),
                                      device=device.name if device else None)

    def build_version(self, run_dir: str | os.PathLike, version: str, *, parent: str | None,
                      device_id: int | None, job_id: str | None = None,
                      extra_training: dict | None = None) -> Version:
        """Copy ``run_dir`` into the registry, export it to ONNX, sign the manifest, store both as
        blobs; returns the :class:`Version` row (not committed: the caller commits it)."""
        from models.export_run import export_run  # torch: only the worker and import-base need it

        run_dir = Path(run_dir)
        if not (run_dir / "checkpoint.pt").is_file():
            raise UserError(f"{run_dir} is not a training run folder (no checkpoint.pt)")
        dest = self.runs_dir / version
        tmp = Path(tempfile.mkdtemp(dir=self.runs_dir, prefix=f".{version}."))
        try:
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, tmp / name)
            export_dir = tmp / "export"
            manifest = export_run(tmp, export_dir / "model.onnx", version=version, parent_version=parent,
                                  manifest_path=export_dir / "manifest.json", extra_training=extra_training,
                                  int8=self.int8)
            signed = self.sign(manifest, device_id)
            onnx_sha = self.blobs.put_file(export_dir / "model.onnx", manifest.sha256)
            manifest_sha = self.blobs.put_bytes(signed.to_json().encode("utf-8"))
            size = self.blobs.size(onnx_sha)
            shutil.rmtree(export_dir)
            if dest.exists():  # an interrupted earlier attempt of the same job
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Version(version=version, device_id=device_id, parent_version=parent, onnx_sha256=onnx_sha,
                       manifest_sha256=manifest_sha, bytes=size, run_dir=str(dest), job_id=job_id,
                       created=time.time())

    def import_base(self, run_dir: str | os.PathLike, version: str | None = None) -> Version:
        """Register a training run as the base version every device starts on."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"base run {run_dir} is not a folder")
        if version is None:
            try:
                epochs = json.loads((run_dir / "metrics.json").read_text()).get("epochs", 0)
            except (OSError, ValueError):
                epochs = 0
            version = re.sub(r"[^A-Za-z0-9._-]", "_", f"base-{run_dir.resolve().name}-e{epochs}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", version):
            raise UserError(f"version {version!r}: use letters, digits, '.', '_' and '-'")
        if self.storage.version(version) is not None:
            raise UserError(f"model version {version} exists already")
        v = self.build_version(run_dir, version, parent=None, device_id=None,
                               extra_training={"role": "base", "imported_from": str(run_dir.resolve())})
        self.storage.add_version(v)
        return v


def model_info(v: Version) -> ModelInfo:
    return ModelInfo(version=v.version, parent_version=v.parent_version, sha256=v.onnx_sha256, bytes=v.bytes,
                     created=v.created, manifest_url=f"/v1/models/{v.version}/manifest",
                     model_url=f"/v1/models/{v.version}/model.onnx")
