"""The model manifest: everything a headset needs to run a model it did not train.

Written beside every exported ONNX file as ``<name>.manifest.json`` (or
``manifest.json`` in a model-store folder). Signed by the cloud (Ed25519 over
:meth:`Manifest.canonical_bytes`), verified by the device together with the
ONNX file's sha256.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.atomic import atomic_write_text
from shared.errors import UserError
from shared.hashing import sha256_file

MANIFEST_FORMAT = 1


class NoiseModel(BaseModel):
    """The input corruption used in training (the paper's CIFAR multi-task setting)."""

    salt_pepper: float = 0.04  # fraction of pixels set to 0 or 1, equal probability
    speckle: float = 0.1  # std of multiplicative gaussian noise: x + x * N(0, speckle)
    apply_at_inference: bool = False  # live frames are already real camera frames


class InputSpec(BaseModel):
    name: str = "image"
    height: int
    width: int
    channels: int = 1
    colour: Literal["gray", "rgb"] = "gray"  # gray: RGB frame -> gray with OpenCV's BT.601 weights
    scale: float = 1.0 / 255.0  # uint8 -> [0, 1]; mean/std normalisation lives inside the model
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    noise: NoiseModel = Field(default_factory=NoiseModel)


class OutputSpec(BaseModel):
    name: str  # ONNX output name
    task: Literal["class", "colour", "edges", "denoised", "depth", "normals", "keypoints"]
    shape: list[int]  # e.g. [1, 10] or [1, 3, H, W]
    kind: Literal["logits", "image", "depth", "normals", "heatmaps"]  # depth in metres, unit normals
    range: list[float] | None = None  # value range for images ([0, 1])


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: int = MANIFEST_FORMAT
    version: str
    parent_version: str | None = None
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    onnx_file: str = "model.onnx"
    precision: Literal["fp32", "int8"] = "fp32"
    sha256: str
    input: InputSpec
    outputs: list[OutputSpec]
    class_names: list[str]
    architecture: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    quantisation: dict[str, Any] | None = None
    training: dict[str, Any] = Field(default_factory=dict)  # command, config, data, method
    # the task set (models/registry.py): None = "cifar" (manifests written before there were two); the
    # headset picks its overlays by it
    task_set: str | None = None
    # set by the cloud when it signs: a number above every earlier one (a headset refuses an older
    # model than it runs) and the device the model is for (None: every device, e.g. the base)
    sequence: int | None = Field(default=None, ge=0)
    device: str | None = None
    signature: str | None = None  # base64 Ed25519 over canonical_bytes()

    # -- helpers ---------------------------------------------------------------------------
    def output(self, task: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.task == task), None)

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: the manifest without its signature, keys sorted."""
        data = self.model_dump(mode="json")
        data.pop("signature", None)
        for optional in ("sequence", "device", "task_set"):  # absent from manifests signed before they existed
            if data.get(optional) is None:
                data.pop(optional, None)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"manifest not found: {path}")
        try:
            return cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()[0:3]
            raise UserError(f"manifest {path} is not valid: {' '.join(first)}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        try:
            return cls.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            raise UserError(f"manifest is not valid: {str(exc).splitlines()[0]}") from None

    def check_file(self, onnx_path: str | os.PathLike) -> None:
        """Raise UserError unless ``onnx_path`` has the sha256 this manifest declares."""
        actual = sha256_file(onnx_path)
        if actual != self.sha256:
            raise UserError(
                f"model file {onnx_path} does not match its manifest (sha256 {actual[:12]}... != {self.sha256[:12]}...)")


def manifest_path_for(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.manifest.json`` (falls back to ``manifest.json`` in the same folder)."""
    onnx_path = Path(onnx_path)
    beside = onnx_path.with_suffix(".manifest.json")
    if beside.exists():
        return beside
    folder = onnx_path.parent / "manifest.json"
    if folder.exists():
        return folder
    return beside
