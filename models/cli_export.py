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
        print(f"int8 quality change per task: {manifest.quantisation.get('quality_change')}")
    return 0
