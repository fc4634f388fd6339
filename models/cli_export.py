"""`hmd export DIR --out FILE.onnx [--int8]`: ONNX + manifest from a training run."""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import UserError

from models.cli_common import parse_size_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="a run folder written by `hmd train`")
    parser.add_argument("--out", required=True, metavar="FILE.onnx")
    parser.add_argument("--int8", action="store_true", help="static INT8 (QDQ) calibrated on training frames")
    parser.add_argument("--size", type=parse_size_arg, default=None, metavar="N|WxH",
                        help="input size of the exported model: N (square) or WIDTHxHEIGHT, a room model's e.g. "
                        "128x96 for a 4:3 camera (fully convolutional; default: the training size)")
    parser.add_argument("--version", default=None, help="model version (default: RUNNAME-eEPOCH[-int8])")
    parser.add_argument("--frames", type=int, default=64, help="frames for the parity check and calibration")


def run(args: argparse.Namespace) -> int:
    from models.export_run import export_run

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: expected a .onnx file name")
    manifest = export_run(args.run_dir, out, int8=args.int8, size=args.size, version=args.version,
                          frames=args.frames)
    print(f"wrote {out} and {out.with_suffix('.manifest.json')} (version {manifest.version}, "
          f"{manifest.precision}, parity max abs diff {manifest.metrics['export_parity_max_abs']:.2e})")
    if manifest.quantisation:
        print(int8_quality_line(manifest.quantisation))
    return 0


_QUALITY_NAMES = {"class_error_pct": ("class error", "%", 2), "rmse_colour": ("colour RMSE", "", 4),
                  "rmse_edges": ("edges RMSE", "", 4), "rmse_denoised": ("denoised RMSE", "", 4)}


def int8_quality_line(quant: dict) -> str:
    """The INT8 model against the FP32 one, as a reader wants it: each task's held-out metric
    FP32 -> INT8 (change), or, without held-out targets, agreement with the FP32 outputs."""
    fp32, int8 = quant.get("fp32_quality") or {}, quant.get("int8_quality") or {}
    parts = []
    for key, (name, unit, digits) in _QUALITY_NAMES.items():
        if key in fp32 and key in int8:
            a, b = fp32[key], int8[key]
            change = round(b - a, digits) + 0.0  # -6.4e-07 is "+0.0000", not "-0.0000"
            parts.append(f"{name} {a:.{digits}f}{unit} -> {b:.{digits}f}{unit} ({change:+.{digits}f})")
    if not parts:
        parts = [f"{task} RMSE vs FP32 {v:.4f}" for task, v in (quant.get("rmse_vs_fp32") or {}).items()]
    agreement = quant.get("class_agreement_pct")
    if agreement is not None:
        parts.append(f"class agreement with FP32 {agreement:.1f}%")
    return "INT8 vs FP32: " + ", ".join(parts)
