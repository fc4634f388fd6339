"""The INT8 graph rewrite (space-to-depth decoder stages) is exact and what export_onnx applies."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from models.export import _onnx_export, export_onnx, onnx_outputs
from models.int8_graph import float_nodes, s2d_weights, space_to_depth_rewrite, subpixel_weights
from models.network import MultiTaskNet, NetConfig


def depth_to_space(x: np.ndarray) -> np.ndarray:
    """ONNX DepthToSpace(2, DCR) of N x 4C x H x W."""
    n, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(n, 2, 2, c, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * h, 2 * w)


def space_to_depth(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def conv(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=pad).numpy()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_weight_transforms_are_exact(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((1, 3, 6, 10)).astype(np.float32)
    w = rng.standard_normal((5, 3, k, k)).astype(np.float32)
    up = np.repeat(np.repeat(x, 2, 2), 2, 3)
    wp, r = subpixel_weights(w)
    np.testing.assert_allclose(depth_to_space(conv(x, wp, r)), conv(up, w, k // 2), atol=1e-4)
    ws, r = s2d_weights(w)
    np.testing.assert_allclose(depth_to_space(conv(space_to_depth(up), ws, r)), conv(up, w, k // 2), atol=1e-4)


def _trained_like(cfg: NetConfig) -> MultiTaskNet:
    """Random BN statistics and affine parameters, so that folded convs have biases."""
    torch.manual_seed(0)
    net = MultiTaskNet(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("cfg", [NetConfig(), NetConfig(width=4, decoder_width=8), NetConfig(activation="leaky")],
                         ids=["default", "all-8-channel-decoder", "leaky"])
def test_rewrite_matches_the_fp32_graph(cfg, tmp_path):
    net = _trained_like(cfg)
    path = tmp_path / "fp32.onnx"
    _onnx_export(net, path, 32, 32)
    model, n = space_to_depth_rewrite(onnx.load(str(path)))
    assert n > 0
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("DepthToSpace") >= 3  # at least the three dense outputs
    out = tmp_path / "s2d.onnx"
    onnx.save(model, str(out))
    frames = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    for a, b in zip(onnx_outputs(path, frames), onnx_outputs(out, frames)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    excluded = set(float_nodes(model))
    by_name = {node.name: node for node in model.graph.node}
    assert sum(by_name[x].op_type == "Sigmoid" for x in excluded) == 3
    assert sum(by_name[x].op_type == "DepthToSpace" for x in excluded) == 3


def test_nothing_to_rewrite_leaves_the_model_alone(tmp_path):
    net = _trained_like(NetConfig(decoder_width=64))  # decoder stages of 64/32/16 channels: not worth s2d
    path = tmp_path / "fp32.onnx"
    _onnx_export(net, path, 32, 32)
    model, n = space_to_depth_rewrite(onnx.load(str(path)))
    assert n == 0 and [x.op_type for x in model.graph.node] == [x.op_type for x in onnx.load(str(path)).graph.node]


def test_int8_export_uses_the_rewrite_and_reports_it(tmp_path):
    net = _trained_like(NetConfig())
    frames = np.random.default_rng(1).random((8, 1, 32, 32), dtype=np.float32)
    m = export_onnx(net, tmp_path / "q.onnx", height=32, width=32, class_names=[str(i) for i in range(6)],
                    version="t", parity_frames=frames[:4], calib_frames=frames, int8=True)
    q = m.quantisation
    assert "space-to-depth" in q["method"] and q["graph"]["space_to_depth_convs"] == 12
    assert q["graph"]["space_to_depth_max_abs_diff"] < 1e-4
    assert q["class_agreement_pct"] >= 75 and max(q["rmse_vs_fp32"].values()) < 0.02
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert sum(n.op_type == "Resize" for n in graph.node) == 4  # of 7: the full-resolution ones are gone
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20
