import json

import numpy as np
import onnx
import pytest
import torch

from models.export_run import export_run
from models.export import PARITY_TOLERANCE, onnx_outputs, torch_outputs
from models.train import TrainConfig, load_model, train
from shared.hashing import sha256_file
from shared.manifest import Manifest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    train(TrainConfig(method="great", data="synthetic:48", epochs=1, batch_size=8, size=32, width=4,
                      decoder_width=8, max_steps_per_epoch=2), d, log=lambda s: None, command="hmd train ...")
    return d


def test_export_fp32_matches_torch_and_has_no_gal_or_aux(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    manifest = export_run(run_dir, out)
    assert manifest.metrics["export_parity_max_abs"] <= PARITY_TOLERANCE
    assert manifest.sha256 == sha256_file(out)
    saved = Manifest.load(tmp_path / "m.manifest.json")
    assert saved == manifest and saved.input.height == 32 and saved.class_names[0] == "circle"
    assert [o.name for o in saved.outputs] == ["class_logits", "colour", "edges", "denoised"]
    assert saved.training["command"] == "hmd train ..." and saved.training["method"] == "great"
    graph = onnx.load(str(out)).graph
    names = [i.name for i in graph.initializer]
    assert not any("gamma" in n or "aux" in n or "gals" in n for n in names)
    n_onnx = sum(int(np.prod(i.dims)) for i in graph.initializer)
    model, _ = load_model(run_dir)
    # BN folding may merge parameters; nothing beyond the inference network's size is stored
    assert n_onnx <= sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    frames = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    for a, b in zip(torch_outputs(model, frames), onnx_outputs(out, frames)):
        assert np.abs(a - b).max() <= PARITY_TOLERANCE


def test_export_int8_reports_quality_change(run_dir, tmp_path):
    out = tmp_path / "q.onnx"
    manifest = export_run(run_dir, out, int8=True, frames=16)
    q = manifest.quantisation
    assert manifest.precision == "int8"
    assert set(q["quality_change"]) == {"class_error_pct", "rmse_colour", "rmse_edges", "rmse_denoised"}
    assert all(abs(v) < 0.05 for k, v in q["quality_change"].items() if k.startswith("rmse"))
    graph = onnx.load(str(out)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)


def test_a_failed_parity_check_writes_nothing(run_dir, tmp_path, monkeypatch):
    import models.export as ex
    monkeypatch.setattr(ex, "parity", lambda *a, **k: 1.0)
    with pytest.raises(RuntimeError, match="parity"):
        export_run(run_dir, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.manifest.json").exists()


def test_exporting_the_same_weights_again_reuses_the_graph_and_changed_weights_do_not(run_dir, tmp_path, monkeypatch):
    import models.export as ex

    traced = []
    real = ex._trace_export
    monkeypatch.setattr(ex, "_trace_export", lambda *a: (traced.append(a[3:]), real(*a)))
    monkeypatch.setattr(ex, "_EXPORTED", {})
    model, _ = load_model(run_dir)
    ex._onnx_export(model, tmp_path / "a.onnx", 32, 32)
    ex._onnx_export(model, tmp_path / "b.onnx", 32, 32)  # the same weights and size: no second trace
    assert len(traced) == 1 and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    wrapper = ex._wrapper(model)
    key = ex._export_key(wrapper, model, 32, 32)
    assert ex._export_key(wrapper, model, 40, 40) != key  # another size is another graph
    with torch.no_grad():
        next(model.parameters())[0].add_(1e-6)  # one weight changed a little: another graph
    assert ex._export_key(wrapper, model, 32, 32) != key and set(ex._EXPORTED) == {key}
