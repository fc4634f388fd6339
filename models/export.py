"""ONNX export with a parity check, the manifest, and static INT8 (QDQ) quantisation.

The exported graph is the inference network only: no gradient-alignment layers,
no auxiliary classifier (they live in the training method, not in the model).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shared.errors import UserError
from shared.hashing import sha256_file
from shared.manifest import InputSpec, Manifest, NoiseModel, OutputSpec

from models.network import MultiTaskNet, OnnxWrapper
from models.room_network import RoomNet, RoomOnnxWrapper

PARITY_TOLERANCE = 1e-4
OUTPUT_TASKS = ("class", "colour", "edges", "denoised")


def _is_room(net: torch.nn.Module) -> bool:
    """A room network, plain or in a multi-task architecture (MTAN, ASTMT: ``base`` is the plain one)."""
    return isinstance(getattr(net, "base", net), RoomNet)


def _wrapper(net: MultiTaskNet | RoomNet) -> OnnxWrapper | RoomOnnxWrapper:
    return RoomOnnxWrapper(net) if _is_room(net) else OnnxWrapper(net)


# The last few graphs this process exported, by what determines them (the wrapper's class, the
# architecture, every parameter and buffer, the input size): exporting the same weights again (the
# FP32 and the INT8 export of one run) reuses the graph instead of tracing it again (~10 s each).
_EXPORTED: dict[str, bytes] = {}
_EXPORTED_KEEP = 2


def _export_key(wrapper: torch.nn.Module, net: MultiTaskNet | RoomNet, height: int, width: int) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([type(wrapper).__qualname__, type(net).__qualname__, net.cfg.to_dict(),
                                   height, width], sort_keys=True, default=str).encode())
    for name, t in net.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _onnx_export(net: MultiTaskNet, path: Path, height: int, width: int) -> None:
    wrapper = _wrapper(net).eval()
    key = _export_key(wrapper, net, height, width)
    if key in _EXPORTED:
        Path(path).write_bytes(_EXPORTED[key])
        return
    _trace_export(wrapper, net, path, height, width)
    _EXPORTED[key] = Path(path).read_bytes()
    while len(_EXPORTED) > _EXPORTED_KEEP:
        _EXPORTED.pop(next(iter(_EXPORTED)))


def _trace_export(wrapper: torch.nn.Module, net: MultiTaskNet | RoomNet, path: Path, height: int, width: int) -> None:
    example = torch.rand(1, net.cfg.in_channels, height, width)
    # the dynamo exporter prints progress lines; keep them out of our output unless it fails
    buf = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(path), input_names=["image"],
                              output_names=list(wrapper.OUTPUT_NAMES), dynamo=True, external_data=False)
    except Exception:
        print(buf.getvalue())
        raise


def onnx_outputs(path: str | os.PathLike, frames: np.ndarray) -> list[np.ndarray]:
    """Run an ONNX model on N x 1 x H x W frames one by one; returns the stacked outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs: list[list[np.ndarray]] = [[] for _ in sess.get_outputs()]
    for frame in frames:
        for i, o in enumerate(sess.run(None, {"image": frame[None].astype(np.float32)})):
            outs[i].append(o)
    return [np.concatenate(o, 0) for o in outs]


def torch_outputs(net: MultiTaskNet, frames: np.ndarray) -> list[np.ndarray]:
    net.eval()
    with torch.no_grad():
        out = _wrapper(net)(torch.from_numpy(frames.astype(np.float32)))
    return [o.numpy() for o in out]


def parity(net: MultiTaskNet, onnx_path: Path, frames: np.ndarray) -> float:
    """Max abs difference between the torch forward and the ONNX model over all outputs."""
    ref = torch_outputs(net, frames)
    got = onnx_outputs(onnx_path, frames)
    return float(max(np.abs(a - b).max() for a, b in zip(ref, got)))


def _output_specs(net: MultiTaskNet, height: int, width: int) -> list[OutputSpec]:
    if _is_room(net):  # outputs at a quarter of the input size
        ho, wo = height // 4, width // 4
        return [OutputSpec(name="depth", task="depth", shape=[1, 1, ho, wo], kind="depth"),
                OutputSpec(name="normals", task="normals", shape=[1, 3, ho, wo], kind="normals", range=[-1.0, 1.0]),
                OutputSpec(name="keypoints", task="keypoints", shape=[1, net.cfg.num_keypoints, ho, wo],
                           kind="heatmaps", range=[0.0, 1.0])]
    k = net.cfg.num_classes
    return [
        OutputSpec(name="class_logits", task="class", shape=[1, k], kind="logits"),
        OutputSpec(name="colour", task="colour", shape=[1, 3, height, width], kind="image", range=[0.0, 1.0]),
        OutputSpec(name="edges", task="edges", shape=[1, 1, height, width], kind="image", range=[0.0, 1.0]),
        OutputSpec(name="denoised", task="denoised", shape=[1, 1, height, width], kind="image", range=[0.0, 1.0]),
    ]


def _task_quality(outs: list[np.ndarray], targets: dict[str, np.ndarray] | None) -> dict[str, float]:
    """Table-4 style metrics of stacked ONNX outputs against targets (when given)."""
    if targets is None:
        return {}
    if "depth" in targets:
        from models.room_tasks import output_quality

        return output_quality(outs, targets)
    logits, colour, edges, denoised = outs
    res: dict[str, float] = {}
    labels = targets.get("label")
    if labels is not None and (labels >= 0).any():
        m = labels >= 0
        res["class_error_pct"] = float(100.0 * (logits[m].argmax(1) != labels[m]).mean())
    res["rmse_colour"] = float(np.sqrt(((colour - targets["colour"]) ** 2).mean()))
    res["rmse_edges"] = float(np.sqrt(((edges - targets["edges"]) ** 2).mean()))
    res["rmse_denoised"] = float(np.sqrt(((denoised - targets["denoised"]) ** 2).mean()))
    return res


class _CalibrationReader:
    def __init__(self, frames: np.ndarray):
        self._it = iter([{"image": f[None].astype(np.float32)} for f in frames])

    def get_next(self):
        return next(self._it, None)


def int8_method(space_to_depth: bool) -> str:
    """The manifest's quantisation method string."""
    layout = ("decoder stages of <= 8 channels in space-to-depth form (nearest x2 upsample + conv "
              "as one sub-pixel conv, also through a concat with the input image); " if space_to_depth else "")
    return ("onnxruntime static QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax; " + layout
            + "input normalisation, stem conv and each output's path from its last conv kept FP32")


def quantise_int8(fp32_path: Path, out_path: Path, calib_frames: np.ndarray) -> dict[str, Any]:
    """Static QDQ INT8 (per-channel weights, uint8 activations) calibrated on ``calib_frames``.

    The graph is first rewritten for ONNX Runtime's INT8 kernels (models.int8_graph: the
    small-channel full-resolution decoder stages in space-to-depth form, which INT8 runs 2.5x
    faster than FP32 runs the original; as quantised directly, INT8 was slower than FP32 there).
    The rewrite is checked against the FP32 graph on ``calib_frames``; should it ever disagree,
    the plain graph is quantised instead. Returns what was done, for the manifest.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from models.int8_graph import float_nodes, space_to_depth_rewrite

    with tempfile.TemporaryDirectory() as tmp:
        src = fp32_path
        model, rewritten = space_to_depth_rewrite(onnx.load(str(fp32_path)))
        layout_diff = None
        if rewritten:
            s2d = Path(tmp) / "s2d.onnx"
            onnx.save(model, str(s2d))
            check = calib_frames[:4]
            try:
                layout_diff = float(max(np.abs(a - b).max() for a, b in zip(onnx_outputs(fp32_path, check),
                                                                               onnx_outputs(s2d, check))))
            except Exception:  # noqa: BLE001 - onnxruntime's own types; a rewrite bug must not fail the export
                layout_diff = None
            if layout_diff is not None and np.isfinite(layout_diff) and layout_diff <= PARITY_TOLERANCE:
                src = s2d
            else:
                rewritten, layout_diff = 0, None
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        excluded = float_nodes(onnx.load(str(pre)))
        quantize_static(str(pre), str(out_path), _CalibrationReader(calib_frames),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    return {"space_to_depth_convs": rewritten, "space_to_depth_max_abs_diff": layout_diff,
            "fp32_nodes": len(excluded)}


def export_onnx(net: MultiTaskNet, out_path: str | os.PathLike, *, height: int, width: int,
                class_names: Sequence[str], version: str, parity_frames: np.ndarray,
                parent_version: str | None = None, metrics: dict[str, Any] | None = None,
                training: dict[str, Any] | None = None, noise: NoiseModel | None = None,
                int8: bool = False, calib_frames: np.ndarray | None = None,
                eval_targets: dict[str, np.ndarray] | None = None,
                manifest_path: str | os.PathLike | None = None) -> Manifest:
    """Export ``net`` to ``out_path`` (+ ``<stem>.manifest.json``) and return the manifest.

    ``parity_frames`` (N x 1 x H x W in [0, 1], real inputs) check the FP32 graph against the
    torch forward; above :data:`PARITY_TOLERANCE` the export fails and nothing is written.
    With ``int8`` the written model is the quantised one; the manifest reports its quality
    change per task against the FP32 model (and against ``eval_targets`` when given).
    """
    out_path = Path(out_path)
    if height % 8 or width % 8:
        raise UserError(f"input size {height}x{width}: both sides must divide by 8")
    room = _is_room(net)
    if len(class_names) != net.cfg.num_classes:
        raise UserError(f"{len(class_names)} class names for a {net.cfg.num_classes}-class model")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _onnx_export(net, fp32, height, width)
        diff = parity(net, fp32, parity_frames)
        if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export parity check failed: max |torch - onnx| = {diff:.3g} "
                               f"> {PARITY_TOLERANCE:g}; nothing was written")
        quant: dict[str, Any] | None = None
        final = fp32
        if int8:
            if calib_frames is None:
                calib_frames = parity_frames
            q = Path(tmp) / "int8.onnx"
            layout = quantise_int8(fp32, q, calib_frames)
            ref = onnx_outputs(fp32, parity_frames)
            got = onnx_outputs(q, parity_frames)
            quant = {
                "method": int8_method(bool(layout["space_to_depth_convs"])),
                "calibration_frames": int(len(calib_frames)),
                "graph": layout,
            }
            if room:
                quant["rmse_vs_fp32"] = {t: float(np.sqrt(((a - b) ** 2).mean()))
                                         for t, a, b in zip(RoomOnnxWrapper.OUTPUT_NAMES, ref, got)}
            else:
                quant["class_agreement_pct"] = float(100.0 * (ref[0].argmax(1) == got[0].argmax(1)).mean())
                quant["rmse_vs_fp32"] = {t: float(np.sqrt(((a - b) ** 2).mean()))
                                         for t, a, b in zip(OUTPUT_TASKS[1:], ref[1:], got[1:])}
            if eval_targets is not None:
                quant["fp32_quality"] = _task_quality(onnx_outputs(fp32, eval_targets["input"]), eval_targets)
                quant["int8_quality"] = _task_quality(onnx_outputs(q, eval_targets["input"]), eval_targets)
                quant["quality_change"] = {k: quant["int8_quality"][k] - quant["fp32_quality"][k]
                                           for k in quant["int8_quality"]}
            final = q
        manifest = Manifest(
            version=version,
            parent_version=parent_version,
            onnx_file=out_path.name,
            precision="int8" if int8 else "fp32",
            sha256=sha256_file(final),
            input=InputSpec(height=height, width=width, channels=net.cfg.in_channels,
                            colour="rgb" if net.cfg.in_channels == 3 else "gray",
                            noise=noise or (NoiseModel(salt_pepper=0.0, speckle=0.0) if room else NoiseModel())),
            outputs=_output_specs(net, height, width),
            class_names=list(class_names),
            architecture=net.cfg.to_dict(),
            metrics=dict(metrics or {}, export_parity_max_abs=diff),
            quantisation=quant,
            training=dict(training or {}),
            task_set="room" if room else None,
        )
        os.replace(final, out_path)  # same filesystem: atomic
    manifest.save(Path(manifest_path) if manifest_path else out_path.with_suffix(".manifest.json"))
    return manifest
