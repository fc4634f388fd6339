"""Models for the device tests: tiny hand-built ONNX graphs (exact, instant) and, once per
session, a real exported MultiTaskNet at 64x64 in FP32 and INT8."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shared.hashing import sha256_file, sign
from shared.manifest import InputSpec, Manifest, OutputSpec

ROOT = Path(__file__).resolve().parents[2]
CLASS_NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]


def make_toy_model(dest: Path, version: str, *, size: int = 32, blue: float = 0.5, nan: bool = False,
                   nan_above: float | None = None, private_key: bytes | None = None,
                   layout: str = "folder") -> Path:
    """A graph whose outputs are known exactly, for an input gray image x (1x1xHxW):

    class_logits = mean(x) * [0, 1, 2, 3, 4, 5]  (so a bright frame says class 5, "ring")
    colour = [x, 1 - x, blue]   edges = x   denoised = 1 - x
    ``nan``: colour is NaN everywhere; ``nan_above``: logits are NaN when mean(x) > nan_above.
    ``layout``: "folder" -> dest/model.onnx + dest/manifest.json; "file" -> dest.onnx + dest.manifest.json.
    Returns the folder or the .onnx path.
    """
    k, h, w = len(CLASS_NAMES), size, size
    f = TensorProto.FLOAT
    inits = [helper.make_tensor("class_w", f, [1, k], list(range(k))),
             helper.make_tensor("one", f, [], [1.0]), helper.make_tensor("zero", f, [], [0.0]),
             helper.make_tensor("blue", f, [], [blue]), helper.make_tensor("nanc", f, [], [float("nan")])]
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["mean"]),
             helper.make_node("MatMul", ["mean", "class_w"], ["logits0"] if nan_above is not None else ["class_logits"]),
             helper.make_node("Sub", ["one", "image"], ["inv"]),
             helper.make_node("Mul", ["image", "zero"], ["zeros"]),
             helper.make_node("Add", ["zeros", "blue"], ["bluemap"]),
             helper.make_node("Concat", ["image", "inv", "bluemap"], ["colour0" if nan else "colour"], axis=1),
             helper.make_node("Identity", ["image"], ["edges"]),
             helper.make_node("Identity", ["inv"], ["denoised"])]
    if nan:
        nodes.append(helper.make_node("Mul", ["colour0", "nanc"], ["colour"]))
    if nan_above is not None:
        inits.append(helper.make_tensor("limit", f, [], [nan_above]))
        nodes += [helper.make_node("Sub", ["limit", "mean"], ["room"]),
                  helper.make_node("Sqrt", ["room"], ["root"]),  # NaN when mean > limit
                  helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
                  helper.make_node("Add", ["logits0", "nan_or_zero"], ["class_logits"])]
    outputs = [helper.make_tensor_value_info("class_logits", f, [1, k]),
               helper.make_tensor_value_info("colour", f, [1, 3, h, w]),
               helper.make_tensor_value_info("edges", f, [1, 1, h, w]),
               helper.make_tensor_value_info("denoised", f, [1, 1, h, w])]
    graph = helper.make_graph(nodes, f"toy_{version}", [helper.make_tensor_value_info("image", f, [1, 1, h, w])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if layout == "folder":
        dest.mkdir(parents=True, exist_ok=True)
        onnx_path, manifest_path = dest / "model.onnx", dest / "manifest.json"
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        onnx_path, manifest_path = dest.with_suffix(".onnx"), dest.with_suffix(".manifest.json")
    onnx.save(model, str(onnx_path))
    manifest = Manifest(version=version, onnx_file=onnx_path.name, sha256=sha256_file(onnx_path),
                        input=InputSpec(height=h, width=w),
                        outputs=[OutputSpec(name="class_logits", task="class", shape=[1, k], kind="logits"),
                                 OutputSpec(name="colour", task="colour", shape=[1, 3, h, w], kind="image", range=[0, 1]),
                                 OutputSpec(name="edges", task="edges", shape=[1, 1, h, w], kind="image", range=[0, 1]),
                                 OutputSpec(name="denoised", task="denoised", shape=[1, 1, h, w], kind="image",
                                            range=[0, 1])],
                        class_names=CLASS_NAMES)
    if private_key is not None:
        manifest.signature = sign(private_key, manifest.canonical_bytes())
    manifest.save(manifest_path)
    return dest if layout == "folder" else onnx_path


@pytest.fixture
def toy(tmp_path):
    """toy(name, **kw) -> a toy model folder under tmp_path."""
    return lambda name, **kw: make_toy_model(tmp_path / "models" / name, name, **kw)


def gray_frames(values, size=(48, 64)) -> list[np.ndarray]:
    """Uniform RGB uint8 frames, one per gray value."""
    return [np.full((*size, 3), v, np.uint8) for v in values]


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """A real MultiTaskNet exported at 64x64 (FP32 and INT8), made once per session in a
    subprocess (the test process itself stays free of torch, like the device)."""
    out = tmp_path_factory.mktemp("real_models")
    code = (
        "import sys, numpy as np, torch\n"
        "from models.network import MultiTaskNet, NetConfig\n"
        "from models.export import export_onnx\n"
        "torch.manual_seed(0)\n"
        "net = MultiTaskNet(NetConfig(num_classes=6))\n"
        "frames = np.random.default_rng(0).random((4, 1, 64, 64), dtype=np.float32)\n"
        f"names = {CLASS_NAMES!r}\n"
        "out = sys.argv[1]\n"
        "export_onnx(net, out + '/fp32.onnx', height=64, width=64, class_names=names, version='real-fp32', parity_frames=frames)\n"
        "export_onnx(net, out + '/int8.onnx', height=64, width=64, class_names=names, version='real-int8', parity_frames=frames, int8=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"fp32": out / "fp32.onnx", "int8": out / "int8.onnx"}
