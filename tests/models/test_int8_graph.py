"""The INT8 graph rewrite (space-to-depth decoder stages) is exact and what export_onnx applies."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from models.export import _onnx_export, export_onnx, onnx_outputs, quantise_int8
from models.int8_graph import (concat_weights, float_nodes, s2d_weights, space_to_depth_rewrite,
                               subpixel_weights)
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


@pytest.mark.parametrize("k", [1, 3])
def test_concat_split_is_exact(k):
    """conv(concat([up(h), x]), w) == DepthToSpace(conv(concat([h, SpaceToDepth(x)]), W))."""
    rng = np.random.default_rng(k)
    h = rng.standard_normal((1, 3, 5, 7)).astype(np.float32)
    x = rng.standard_normal((1, 2, 10, 14)).astype(np.float32)
    w = rng.standard_normal((4, 5, k, k)).astype(np.float32)
    ref = conv(np.concatenate([np.repeat(np.repeat(h, 2, 2), 2, 3), x], 1), w, k // 2)
    wc, r = concat_weights(w, [(3, True), (2, False)])
    assert wc.shape == (16, 3 + 4 * 2, 2 * r + 1, 2 * r + 1)
    np.testing.assert_allclose(depth_to_space(conv(np.concatenate([h, space_to_depth(x)], 1), wc, r)), ref, atol=1e-4)
    with pytest.raises(ValueError):
        concat_weights(w, [(3, True), (1, False)])


def test_camera_decoder_is_rewritten_exactly_and_quantised_with_fp32_outputs(tiny_camera_model, tmp_path):
    """The camera decoder (width 4, 48x64: every decoder stage has 8 channels): each stage's
    conv(concat([up(h), image])) and everything after it runs in s2d form, the FP32 graph is
    unchanged to float rounding, and the INT8 model keeps each output's path in FP32."""
    fp32 = onnx.load(str(tiny_camera_model))
    model, n = space_to_depth_rewrite(fp32)
    convs = [x for x in fp32.graph.node if x.op_type == "Conv" and "heads" in x.input[1]]
    assert n == len(convs) == 30  # 3 decoders x (3 stages x 3 convs + the output conv)
    onnx.checker.check_model(model)
    ops = [x.op_type for x in model.graph.node]
    assert "Resize" not in ops and ops.count("SpaceToDepth") == 3  # the input at 1/4, 1/2 and full size
    s2d = tmp_path / "s2d.onnx"
    onnx.save(model, str(s2d))
    frames = np.random.default_rng(0).random((8, 1, 48, 64), dtype=np.float32)
    for a, b in zip(onnx_outputs(tiny_camera_model, frames[:3]), onnx_outputs(s2d, frames[:3])):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    by_name = {x.name: x for x in model.graph.node}
    kept = [by_name[x].op_type for x in float_nodes(model)]
    # stem conv + 3 output convs; the residual Add of the input gray and its Expand on colour and denoised
    assert kept.count("Conv") == 4 and kept.count("Clip") == 3 and kept.count("DepthToSpace") == 3
    assert kept.count("Add") == 2 and kept.count("Expand") == 2
    q = tmp_path / "q.onnx"
    info = quantise_int8(tiny_camera_model, q, frames)
    assert info["space_to_depth_convs"] == 30 and info["space_to_depth_max_abs_diff"] < 1e-4
    qg = onnx.load(str(q)).graph
    producer = {o: x for x in qg.node for o in x.output}
    for out in qg.output[1:]:  # each dense output: Clip of FP32 values, not of a dequantised tensor
        clip = producer[out.name]
        assert clip.op_type == "Clip" and producer[clip.input[0]].op_type in ("Add", "DepthToSpace")
    assert sum(x.op_type == "QuantizeLinear" for x in qg.node) > 20
    for a, b in zip(onnx_outputs(tiny_camera_model, frames[:4])[1:], onnx_outputs(q, frames[:4])[1:]):
        assert np.sqrt(((a - b) ** 2).mean()) < 0.02


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
