"""`hmd cloud serve | add-device | import-base`: run and administer the retraining service.

Settings come from flags, else the environment (``HMD_CLOUD_<NAME>``, e.g. HMD_CLOUD_DATA_DIR,
HMD_CLOUD_AUTO_JOB_FRAMES, HMD_CLOUD_MAX_UPLOAD_BYTES), else the defaults in cloud/settings.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import UserError


def _data_dir(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                     help="metadata database, blobs, signing key, runs (env HMD_CLOUD_DATA_DIR)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = subs.add_parser("serve", help="run the API and the job worker (one process)")
    _data_dir(serve)
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--base-run", type=Path, default=None, metavar="RUN_DIR",
                       help="training run registered as the base version on first start")
    serve.add_argument("--teacher-run", type=Path, default=None, metavar="RUN_DIR",
                       help="the larger cloud teacher whose class predictions are distilled")
    serve.add_argument("--base-data", default=None, metavar="SOURCE",
                       help="base training data replayed during personalisation (default synthetic)")
    serve.add_argument("--auto-job-frames", type=int, default=None, metavar="N",
                       help="start a personalisation job once a device uploaded N new frames (0: never; default 64)")
    serve.add_argument("--max-upload-bytes", type=int, default=None, help="upload size limit (default 64 MiB)")
    serve.add_argument("--epochs", type=int, default=None, help="personalisation epochs (default 3)")
    serve.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap personalisation steps (quick runs)")
    serve.add_argument("--lr", type=float, default=None, help="personalisation learning rate")
    serve.add_argument("--batch-size", type=int, default=None, help="personalisation batch size")
    serve.add_argument("--frame-size", type=int, default=None,
                       help="side wearer frames are resized to for training (default: the model's input)")
    serve.add_argument("--method", default=None, help="multi-task weighting for personalisation (default great)")
    serve.add_argument("--tolerance", type=float, default=None, help="allowed relative loss on the base set (default 0.05)")
    serve.add_argument("--int8", action="store_const", const=True, default=None,
                       help="export new model versions as static INT8 (faster on the headset; default FP32)")
    serve.add_argument("--no-worker", dest="worker", action="store_const", const=False, default=None,
                       help="API only (jobs queue up for a worker process)")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    # issue 13 (harden): the signing key outside the data folder of the process that parses uploads
    serve.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                       help="Ed25519 key file (make one: python -m cloud.keys FILE; env HMD_CLOUD_SIGNING_KEY; "
                            "default DATA/signing.key)")

    add = subs.add_parser("add-device", help="provision a device; prints its token once and the key to trust")
    add.add_argument("name", help="device name: letters, digits, '-', '_'")
    _data_dir(add)

    base = subs.add_parser("import-base", help="register a training run as the base version")
    base.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    base.add_argument("--version", default=None, help="version name (default base-RUNNAME-eEPOCHS)")
    _data_dir(base)


def settings_from_args(args: argparse.Namespace):
    from cloud.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k in Settings.field_names()}
    return Settings.from_sources(flags)


def run(args: argparse.Namespace) -> int:
    return {"serve": serve, "add-device": add_device, "import-base": import_base}[args.action](args)


def serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from cloud.app import create_app

    settings = settings_from_args(args)
    if settings.base_run is not None and not (settings.base_run / "checkpoint.pt").is_file():
        raise UserError(f"--base-run {settings.base_run}: no checkpoint.pt there (expected a `hmd train` run folder)")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"hmd cloud: serving {settings.data_dir} on http://{settings.host}:{settings.port}", file=sys.stderr,
          flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=3)
    return 0


def add_device(args: argparse.Namespace) -> int:
    from cloud.keys import DEVICE_NAME, SigningKey, new_token, token_sha256
    from cloud.storage import open_storage

    settings = settings_from_args(args)
    if not DEVICE_NAME.match(args.name):
        raise UserError(f"device name {args.name!r}: use 1-63 letters, digits, '-' or '_' (starting alphanumeric)")
    key = SigningKey(settings.data_dir, settings.signing_key)  # issue 13 (harden): --signing-key / env
    storage = open_storage(settings.db_url)
    try:
        token = new_token(args.name)
        storage.add_device(args.name, token_sha256(token))
    finally:
        storage.close()
    print(f"device: {args.name}")
    print(f"token: {token}")
    print(f"trust-key: {key.public_b64}")
    print(f"(the token is shown only this once; the public key is also in {key.public_path})", file=sys.stderr)
    return 0


def import_base(args: argparse.Namespace) -> int:
    from cloud.services import Services

    settings = settings_from_args(args)
    settings.worker = False
    services = Services.open(settings)
    try:
        v = services.registry.import_base(args.run_dir, version=args.version)
    finally:
        services.storage.close()
    print(f"base version {v.version} (sha256 {v.onnx_sha256[:12]}..., {v.bytes} bytes)")
    return 0
