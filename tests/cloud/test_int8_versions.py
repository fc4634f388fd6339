"""`hmd cloud serve --int8`: versions are exported as static INT8, signed, and the headset loads them."""
from __future__ import annotations

import numpy as np

from cloud.services import Services
from cloud.settings import Settings
from shared.manifest import Manifest
from tests.cloud.conftest import public_key


def test_int8_setting_builds_signed_int8_versions_the_headset_loads(data_dir, base_run, tmp_path):
    from device.engine import load_model

    settings = Settings.from_sources({"data_dir": data_dir, "worker": False}, env={"HMD_CLOUD_INT8": "true"})
    assert settings.int8 is True
    services = Services.open(settings)
    try:
        v = services.registry.build_version(base_run, "base-v1-int8", parent="base-v1", device_id=None)
        services.storage.add_version(v)
        folder = services.registry.write_model_folder(v, tmp_path / "int8")
    finally:
        services.storage.close()
    m = Manifest.load(folder / "manifest.json")
    assert m.precision == "int8" and m.parent_version == "base-v1"
    assert set(m.quantisation["quality_change"]) >= {"rmse_colour", "rmse_edges", "rmse_denoised"}
    engine = load_model(folder / "model.onnx", public_key=public_key(data_dir))
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # a camera frame, any size
    pred = engine.predict(frame)
    assert pred.version == "base-v1-int8" and np.isfinite(pred.colour).all() and 0.0 <= pred.confidence <= 1.0


def test_versions_are_fp32_by_default(data_dir):
    from cloud.storage import SQLiteStorage

    storage = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        base = storage.version("base-v1")
    finally:
        storage.close()
    services = Services.open(Settings(data_dir=data_dir, worker=False))
    try:
        assert services.registry.int8 is False
        assert services.registry.manifest(base).precision == "fp32"
    finally:
        services.storage.close()
