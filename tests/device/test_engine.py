import json

import cv2
import numpy as np
import onnx
import pytest

from device.engine import ModelRejected, load_model, probe_frame
from shared.hashing import generate_keypair, sha256_file
from shared.manifest import Manifest
from tests.device.conftest import make_toy_model


def test_preprocessing_is_exactly_what_the_manifest_says(toy):
    engine = load_model(toy("a", size=32))
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    x = engine.preprocess(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # BT.601
    expected = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    assert x.shape == (1, 1, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], expected, atol=1e-6)
    assert engine.manifest.input.noise.apply_at_inference is False  # no noise on live frames


def test_toy_model_outputs_come_through_unchanged(toy):
    engine = load_model(toy("a", size=32))
    pred = engine.predict(np.full((48, 64, 3), 64, np.uint8))
    assert pred.class_name == "ring" and pred.version == "a"  # logits = mean * [0..5]
    np.testing.assert_allclose(pred.colour[5, 5], [64 / 255, 1 - 64 / 255, 0.5], atol=1e-6)
    assert pred.colour.shape == (32, 32, 3) and pred.edges.shape == (32, 32)
    np.testing.assert_allclose(pred.denoised, 1 - 64 / 255, atol=1e-6)


def test_noise_is_applied_only_when_the_manifest_asks(toy):
    folder = toy("noisy")
    m = Manifest.load(folder / "manifest.json")
    m.input.noise.apply_at_inference = True
    m.save(folder / "manifest.json")
    x = load_model(folder).preprocess(np.full((32, 32, 3), 128, np.uint8))
    assert x.std() > 0.01 and ((x == 0) | (x == 1)).any()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_real_exported_models_load_and_give_finite_outputs(real_models, precision):
    engine = load_model(real_models[precision])
    assert engine.manifest.precision == precision and engine.input_hw == (64, 64)
    pred = engine.predict(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    assert pred.colour.shape == (64, 64, 3) and np.isfinite(pred.colour).all()
    assert 0 <= pred.edges.min() and pred.edges.max() <= 1
    assert 0 < pred.confidence <= 1 and pred.class_name in engine.manifest.class_names


def test_optimised_graph_cache_is_written_once_and_reused(toy, tmp_path):
    folder = toy("cached")
    first = load_model(folder, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".*"))
    mtime = cached[0].stat().st_mtime_ns
    second = load_model(folder, cache_dir=tmp_path / "cache")
    assert cached[0].stat().st_mtime_ns == mtime
    frame = np.full((32, 32, 3), 99, np.uint8)
    np.testing.assert_allclose(first.predict(frame).colour, second.predict(frame).colour)


def test_a_model_whose_bytes_do_not_match_the_manifest_is_rejected(toy):
    folder = toy("tampered")
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelRejected, match="does not match its manifest"):
        load_model(folder)


def test_missing_files_are_rejected(toy, tmp_path):
    with pytest.raises(ModelRejected, match="not found"):
        load_model(tmp_path / "nothing.onnx")
    folder = toy("nomanifest")
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelRejected, match="no manifest"):
        load_model(folder / "model.onnx")


def test_a_corrupt_onnx_file_is_rejected_in_one_line(toy):
    folder = toy("corrupt")
    (folder / "model.onnx").write_bytes(b"garbage" * 50)
    m = Manifest.load(folder / "manifest.json")
    m.sha256 = sha256_file(folder / "model.onnx")
    m.save(folder / "manifest.json")
    with pytest.raises(ModelRejected, match="could not be loaded by ONNX Runtime") as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_declared_outputs_and_inputs_must_match_the_graph(toy):
    folder = toy("renamed")
    m = Manifest.load(folder / "manifest.json")
    m.outputs[2].name = "edge_map"
    m.save(folder / "manifest.json")
    with pytest.raises(ModelRejected, match="'edge_map' declared in the manifest is not in the graph"):
        load_model(folder)
    folder = toy("resized")
    m = Manifest.load(folder / "manifest.json")
    m.input.height = 64
    m.save(folder / "manifest.json")
    with pytest.raises(ModelRejected, match="input is image"):
        load_model(folder)


def test_a_model_that_is_nan_on_the_probe_frame_is_rejected(toy):
    with pytest.raises(ModelRejected, match="not finite"):
        load_model(toy("nan", nan=True))
    assert np.isfinite(probe_frame(8, 8)).all()


def test_signatures_are_required_and_checked_with_a_trusted_key(toy):
    priv, pub = generate_keypair()
    signed = toy("signed", private_key=priv)
    assert load_model(signed, public_key=pub).version == "signed"
    with pytest.raises(ModelRejected, match="not signed"):
        load_model(toy("unsigned"), public_key=pub)
    other_priv, _ = generate_keypair()
    with pytest.raises(ModelRejected, match="signature does not verify"):
        load_model(toy("forged", private_key=other_priv), public_key=pub)
    # a signed manifest edited afterwards (the class names, say) no longer verifies
    data = json.loads((signed / "manifest.json").read_text())
    data["class_names"][0] = "dog"
    (signed / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelRejected, match="signature does not verify"):
        load_model(signed, public_key=pub)


def test_file_layout_with_manifest_beside_the_onnx(tmp_path):
    path = make_toy_model(tmp_path / "m", "beside", layout="file")
    assert path.name == "m.onnx" and (tmp_path / "m.manifest.json").is_file()
    assert load_model(path).version == "beside"
    assert onnx.load(str(path)).graph.input[0].name == "image"
