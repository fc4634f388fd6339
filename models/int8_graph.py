"""Graph rewrites that make the static INT8 model fast on ONNX Runtime's CPU kernels.

Measured (``hmd bench device`` model, 128x128, 2 shared cores, ORT 1.31, onnxruntime profiler):
the FP32 graph spends half its time in the three decoders' full-resolution stages, 8-channel
3x3 convs at 128x128. INT8 is no help there: an 8-output-channel QLinearConv misses MLAS's
VNNI "symmetric conv" kernel (it wants >= 16 output channels) and falls back to im2col + a
16-wide QGEMM, 0.7 ms against FP32's 0.5 ms; and ``Resize`` on uint8 NHWC tensors (what the
NHWC transformer makes of the quantised graph) is about 4x slower per element than the FP32
NCHWc ``Upsample``. Quantising everything was ~10 % slower than FP32; leaving those stages
in FP32 only ~5-15 % faster.

So, for the INT8 model only, those stages are rewritten into an exactly equivalent form that
INT8 runs well: in space-to-depth (s2d) form a C-channel H x W map is a 4C-channel H/2 x W/2
map (``DepthToSpace(2, DCR)`` undoes it), so

* nearest x2 ``Resize`` followed by a KxK conv becomes one conv on the low-resolution input
  with 4x the output channels (the sub-pixel conv; the Resize disappears);
* a KxK stride-1 conv on a map in s2d form becomes a conv with 4x the input and output
  channels on the half-size map (8 -> 32 channels: the VNNI kernel's shape);
* elementwise ops (Relu, Sigmoid, Add, ...) act on the s2d form unchanged;
* one ``DepthToSpace`` restores full resolution where a tensor leaves the region (outputs).

A 3x3 conv in s2d form does 4x the multiply-adds (the zero taps), but at INT8 VNNI rates it
is still 2.5x faster than the FP32 conv it replaces. Only regions whose convs have at most
:data:`S2D_MAX_CHANNELS` channels are rewritten; elsewhere the 4x work is not paid back.
The rewritten FP32 graph matches the original to float rounding (checked at export).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

S2D_MAX_CHANNELS = 8
_ELEMENTWISE = ("Relu", "LeakyRelu", "Sigmoid", "Add", "Mul", "Sub")


def subpixel_weights(w: np.ndarray) -> tuple[np.ndarray, int]:
    """Nearest x2 upsampling then ``conv(w)`` (stride 1, padding k//2) == ``conv(W)`` on the
    low-resolution map then ``DepthToSpace(2, DCR)``. Returns W (4*O x C x K x K) and its padding.

    Output pixel (2i+a, 2j+b) reads upsampled rows 2i+a+dy, i.e. low-res rows i + (a+dy)//2.
    """
    o, c, k, _ = w.shape
    p = k // 2
    r = (p + 1) // 2
    out = np.zeros((4 * o, c, 2 * r + 1, 2 * r + 1), np.float32)
    for a in range(2):
        for b in range(2):
            block = out[(2 * a + b) * o:(2 * a + b + 1) * o]
            for dy in range(-p, p + 1):
                for dx in range(-p, p + 1):
                    block[:, :, (a + dy) // 2 + r, (b + dx) // 2 + r] += w[:, :, dy + p, dx + p]
    return out, r


def s2d_weights(w: np.ndarray) -> tuple[np.ndarray, int]:
    """``conv(w)`` (stride 1, padding k//2) on a full-resolution map == ``conv(W)`` on its
    ``SpaceToDepth(2, DCR)`` form. Returns W (4*O x 4*C x K x K) and its padding.

    Output phase (a, b) at block (i, j) reads input phase (a2, b2) of block (i+u, j+v) through
    tap dy = 2u + a2 - a, dx = 2v + b2 - b when that tap exists.
    """
    o, c, k, _ = w.shape
    p = k // 2
    r = (p + 1) // 2
    out = np.zeros((4 * o, 4 * c, 2 * r + 1, 2 * r + 1), np.float32)
    for a in range(2):
        for b in range(2):
            for a2 in range(2):
                for b2 in range(2):
                    for u in range(-r, r + 1):
                        for v in range(-r, r + 1):
                            dy, dx = 2 * u + a2 - a, 2 * v + b2 - b
                            if -p <= dy <= p and -p <= dx <= p:
                                out[(2 * a + b) * o:(2 * a + b + 1) * o, (2 * a2 + b2) * c:(2 * a2 + b2 + 1) * c,
                                    u + r, v + r] = w[:, :, dy + p, dx + p]
    return out, r


def concat_weights(w: np.ndarray, parts: Sequence[tuple[int, bool]]) -> tuple[np.ndarray, int]:
    """``conv(w)`` on the channel concat of parts (channels, upsampled): nearest-x2-upsampled maps
    and full-resolution maps == ``conv(W)`` on the half-resolution concat of the upsampled parts'
    inputs and the full-resolution parts' ``SpaceToDepth(2)``, then ``DepthToSpace(2, DCR)``: W is
    each part's input-channel slice of w as its sub-pixel or s2d weight, side by side (the sum of
    the parts' convs is one conv over their concat). Returns W and its padding."""
    if sum(c for c, _ in parts) != w.shape[1]:
        raise ValueError(f"parts of {[c for c, _ in parts]} channels for a weight of {w.shape[1]} inputs")
    pieces, start, r = [], 0, 0
    for c, up in parts:
        piece, r = (subpixel_weights if up else s2d_weights)(w[:, start:start + c])
        pieces.append(piece)
        start += c
    return np.concatenate(pieces, axis=1), r


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Channel count (dim 1) of every tensor whose shape ONNX shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - onnx raises its own types; unknown shapes just mean no match
        inferred = model
    g = inferred.graph
    out: dict[str, int] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            out[v.name] = dims[1].dim_value
    for i in g.initializer:
        if len(i.dims) == 4:
            out[i.name] = i.dims[1]
    return out


def space_to_depth_rewrite(model: onnx.ModelProto, max_channels: int = S2D_MAX_CHANNELS) -> tuple[onnx.ModelProto, int]:
    """Rewrite nearest-x2-Resize + conv and the small-channel full-resolution region after it into
    space-to-depth form (see the module docstring). Returns a new model and the number of convs
    rewritten (0: nothing matched, the model is returned unchanged).

    The Resize may also reach its convs through a channel ``Concat`` with full-resolution tensors
    (the camera decoder's ``conv(concat([up(h), x]))``). Split along its input channels, such a conv
    is ``subpixel_conv(h) + s2d_conv(SpaceToDepth(x))``, both on the half-resolution grid with the
    same kernel size, so it is emitted as one conv on ``Concat([h, SpaceToDepth(x)])`` whose weight
    is the two parts' weights side by side (one bias)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}

    def weight(n: onnx.NodeProto) -> np.ndarray | None:
        """The weight of a plain conv (odd square kernel, stride 1, 'same' padding, no groups or
        dilation, float32 initializer weight and bias), else None."""
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in init:
            return None
        if len(n.input) > 2 and n.input[2] and n.input[2] not in init:
            return None
        w, a = init[n.input[1]], _attrs(n)
        if w.dtype != np.float32 or w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            return None
        p = w.shape[2] // 2
        if (a.get("group", 1) != 1 or list(a.get("strides", [1, 1])) != [1, 1]
                or list(a.get("dilations", [1, 1])) != [1, 1] or _text(a.get("auto_pad", "NOTSET")) != "NOTSET"
                or list(a.get("pads", [0, 0, 0, 0])) != [p] * 4):
            return None
        return w

    def bias(n: onnx.NodeProto) -> np.ndarray | None:
        return init[n.input[2]] if len(n.input) > 2 and n.input[2] else None

    def small_conv(c: onnx.NodeProto, t: str) -> bool:
        """``c`` is a plain conv on ``t`` with at most ``max_channels`` outputs."""
        return c.input[0] == t and (w := weight(c)) is not None and w.shape[0] <= max_channels

    def small_convs(t: str) -> bool:
        """Every consumer of ``t`` is a small plain conv on it."""
        cons = consumers.get(t, [])
        return bool(cons) and t not in graph_outputs and all(small_conv(c, t) for c in cons)

    def x2(t: str) -> str | None:
        """The low-resolution input of ``t`` when ``t`` is a nearest x2 upsample, else None."""
        n = producer.get(t)
        if n is None or n.op_type != "Resize" or len(n.input) < 3 or n.input[2] not in init:
            return None
        a = _attrs(n)
        scales = init[n.input[2]]
        if (_text(a.get("mode", "nearest")) != "nearest" or scales.shape != (4,) or list(scales) != [1, 1, 2, 2]
                or (len(n.input) > 3 and n.input[3])):
            return None
        # for an exact x2 these modes all pick source pixel floor(out / 2)
        if _text(a.get("coordinate_transformation_mode", "half_pixel")) not in ("asymmetric", "half_pixel",
                                                                              "pytorch_half_pixel"):
            return None
        if _text(a.get("nearest_mode", "round_prefer_floor")) not in ("floor", "round_prefer_floor"):
            return None
        return n.input[0]

    channels: dict[str, int] | None = None

    def split_concat(n: onnx.NodeProto) -> list[tuple[str, int, bool]] | None:
        """A channel Concat of at least one x2 upsample and full-resolution maps of at most
        ``max_channels`` channels, read only by small plain convs: its parts as (tensor, channels,
        upsampled), else None."""
        nonlocal channels
        a = _attrs(n)
        if n.op_type != "Concat" or a.get("axis") not in (1, -3) or not any(x2(t) for t in n.input):
            return None
        if not small_convs(n.output[0]):
            return None
        if channels is None:
            channels = _channels(model)
        parts = [(t, channels.get(t), x2(t) is not None) for t in n.input]
        if any(c is None or (not up and c > max_channels) for _, c, up in parts):
            return None
        total = sum(c for _, c, _ in parts)
        if any(weight(c).shape[1] != total for c in consumers[n.output[0]]):
            return None
        return parts

    concats = {n.output[0]: parts for n in g.node if (parts := split_concat(n)) is not None}
    ups = {n.output[0]: n for n in g.node if x2(n.output[0]) is not None and n.output[0] not in graph_outputs
           and consumers.get(n.output[0])
           and all(c.output[0] in concats or small_conv(c, n.output[0]) for c in consumers[n.output[0]])}
    if not ups and not concats:
        return model, 0
    nodes: list[onnx.NodeProto] = []
    new_init: list[onnx.TensorProto] = []
    s2d: dict[str, str] = {}  # full-resolution tensor -> its s2d form
    low: dict[str, str] = {}  # rewritten Concat's output -> the half-resolution Concat of its parts
    made: dict[str, str] = {}  # full-resolution tensor outside the region -> its SpaceToDepth
    restored: set[str] = set()
    count = [0, 0]  # unique-name counter, convs rewritten

    def fresh(base: str) -> str:
        count[0] += 1
        return f"{base}_s2d{count[0]}"

    def constant(arr: np.ndarray, base: str) -> str:
        name = fresh(base)
        new_init.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def emit_conv(n: onnx.NodeProto, x: str, w: np.ndarray, r: int) -> None:
        b = bias(n)
        ins = [x, constant(w, n.input[1])] + ([constant(np.tile(b, 4), n.input[2])] if b is not None else [])
        out = fresh(n.output[0])
        nodes.append(helper.make_node("Conv", ins, [out], name=fresh(n.name or "conv"), kernel_shape=[2 * r + 1] * 2,
                                      pads=[r] * 4, strides=[1, 1], dilations=[1, 1], group=1))
        s2d[n.output[0]] = out
        count[1] += 1

    def restore(t: str) -> None:
        if t in s2d and t not in restored:
            nodes.append(helper.make_node("DepthToSpace", [s2d[t]], [t], name=fresh("depth_to_space"),
                                          blocksize=2, mode="DCR"))
            restored.add(t)

    def to_s2d(t: str) -> str:
        """The s2d form of ``t``: the region's own, else one SpaceToDepth (shared by all users)."""
        if t in s2d:
            return s2d[t]
        if t not in made:
            made[t] = fresh(t)
            nodes.append(helper.make_node("SpaceToDepth", [t], [made[t]], name=fresh("space_to_depth"), blocksize=2))
        return made[t]

    for n in g.node:
        if n.op_type == "Resize" and n.output[0] in ups:
            continue  # every consumer becomes a sub-pixel conv
        if n.op_type == "Concat" and n.output[0] in concats:
            ins = []
            for t, _, up in concats[n.output[0]]:
                if up:
                    restore(x2(t))  # the Resize input may itself be in s2d form
                    ins.append(x2(t))
                else:
                    ins.append(to_s2d(t))
            low[n.output[0]] = fresh(n.output[0])
            nodes.append(helper.make_node("Concat", ins, [low[n.output[0]]], name=fresh(n.name or "concat"), axis=1))
            continue
        if n.op_type == "Conv" and n.input[0] in low:
            emit_conv(n, low[n.input[0]], *concat_weights(weight(n), [(c, up) for _, c, up in concats[n.input[0]]]))
            continue
        if n.op_type == "Conv" and n.input[0] in ups:
            x = x2(n.input[0])
            restore(x)  # the Resize input may itself be in s2d form
            emit_conv(n, x, *subpixel_weights(weight(n)))
            continue
        inputs = [t for t in n.input if t]
        if inputs and any(t in s2d for t in inputs):
            if n.op_type in _ELEMENTWISE and all(t in s2d for t in inputs):
                out = fresh(n.output[0])
                nodes.append(helper.make_node(n.op_type, [s2d[t] for t in inputs], [out], name=fresh(n.name or "op"),
                                              **_attrs(n)))
                s2d[n.output[0]] = out
                continue
            w = weight(n)
            if w is not None and n.input[0] in s2d and max(w.shape[:2]) <= max_channels:
                emit_conv(n, s2d[n.input[0]], *s2d_weights(w))
                continue
        for t in inputs:
            restore(t)
        nodes.append(n)
    for t in graph_outputs:
        restore(t)
    used = {t for n in nodes for t in n.input}
    kept = [i for i in list(g.initializer) + new_init if i.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]  # shapes changed; quant_pre_process infers them again
    return model, count[1]


_OUTPUT_PATH = ("Sigmoid", "Clip", "Add", "Sub", "Mul", "DepthToSpace", "Expand", "Slice")


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes the INT8 model keeps in FP32 (``nodes_to_exclude``), each slower or lossier in INT8:
    the input normalisation and the stem conv (1 input channel: 0.16 ms INT8 against 0.03 ms FP32,
    and it would quantise the raw pixels), and each dense head's output path: from every graph
    output back to its last conv, that conv included (the paper decoder's conv, sigmoid and
    DepthToSpace; the camera decoder's linear 1x1 conv, DepthToSpace, the residual Add of the
    input gray, its Expand/Slice, and the Clip), so the outputs stay full-precision."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    init = {i.name: i for i in g.initializer}
    names: list[str] = []
    pre = {i.name for i in g.input}
    for n in g.node:  # elementwise input normalisation before the first conv
        if n.op_type in ("Sub", "Div", "Mul", "Add") and any(t in pre for t in n.input):
            names.append(n.name)
            pre.update(n.output)
        elif n.op_type == "Conv" and n.input[1] in init and init[n.input[1]].dims[1] == 1:
            names.append(n.name)
    todo = [o.name for o in g.output]
    while todo:  # each output's path back to its last conv
        n = producer.get(todo.pop())
        if n is None or n.name in names or n.op_type not in _OUTPUT_PATH + ("Conv",):
            continue
        names.append(n.name)
        if n.op_type != "Conv":
            todo.extend(t for t in n.input if t and t not in init)
    return names
