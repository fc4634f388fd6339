"""`hmd cloud serve | worker | add-device | devices | rotate-token | import-base`: run and
administer the retraining service.

Settings come from flags, else the environment (``HMD_CLOUD_<NAME>``, e.g. HMD_CLOUD_DATA_DIR,
HMD_CLOUD_AUTO_JOB_FRAMES, HMD_CLOUD_MAX_UPLOAD_BYTES), else the defaults in cloud/settings.py.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

from shared.errors import UserError


def _data_dir(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                     help="metadata database, blobs, signing key, runs (env HMD_CLOUD_DATA_DIR)")


def _backends(sub: argparse.ArgumentParser) -> None:
    """Where metadata and blobs live (the embedded defaults are inside --data-dir)."""
    sub.add_argument("--database-url", default=None, metavar="URL",
                     help="sqlite:///PATH (default DATA/cloud.sqlite3) or postgresql://USER@HOST:PORT/DB, which "
                          "several API and worker processes share (env HMD_CLOUD_DATABASE_URL)")
    sub.add_argument("--blob-url", default=None, metavar="URL",
                     help="file://PATH (default DATA/blobs) or s3://BUCKET/PREFIX (env HMD_CLOUD_BLOB_URL)")
    sub.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                     help="an S3-compatible server for s3:// (default AWS; env HMD_CLOUD_S3_ENDPOINT_URL; "
                          "credentials: the AWS_* environment variables)")


def _training(sub: argparse.ArgumentParser) -> None:
    """How a personalisation job trains (serve runs jobs in-process; worker processes run them too)."""
    sub.add_argument("--teacher-run", type=Path, default=None, metavar="RUN_DIR",
                     help="the larger cloud teacher whose class predictions are distilled")
    sub.add_argument("--base-data", default=None, metavar="SOURCE",
                     help="base training data replayed during personalisation (default: the base run's own)")
    sub.add_argument("--base-val-data", default=None, metavar="SOURCE",
                     help="the gate's guard against forgetting (default: the base run's validation data)")
    sub.add_argument("--epochs", type=int, default=None, help="personalisation epochs (default 8)")
    sub.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap personalisation steps (quick runs)")
    sub.add_argument("--lr", type=float, default=None, help="personalisation learning rate")
    sub.add_argument("--batch-size", type=int, default=None, help="personalisation batch size")
    sub.add_argument("--frame-size", type=int, default=None,
                     help="side wearer frames are resized to for training (default: the model's input)")
    sub.add_argument("--method", default=None, help="multi-task weighting for personalisation (default great)")
    sub.add_argument("--nproc", dest="job_nproc", type=int, default=None, metavar="N",
                     help="a personalisation job trains on N CPU processes, the same weights as one up to float "
                          "rounding (the batch size a multiple of N; room jobs use one; env HMD_CLOUD_JOB_NPROC; "
                          "default 1)")
    sub.add_argument("--tolerance", type=float, default=None,
                     help="allowed relative loss on the base set (default 0.05)")
    sub.add_argument("--int8", action="store_const", const=True, default=None,
                     help="export new model versions as static INT8 (faster on the headset; default FP32)")


def _log_level(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                     help="log level (default info; -v is debug, -q is warning)")
    loud = sub.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                      help="--log-level debug")
    loud.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                      help="--log-level warning")


def _signing_key(sub: argparse.ArgumentParser) -> None:
    # issue 13 (harden): the signing key outside the data folder of the process that parses uploads
    sub.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                     help="Ed25519 key file (make one: python -m cloud.keys FILE; env HMD_CLOUD_SIGNING_KEY; "
                          "default DATA/signing.key)")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# libraries that log progress at INFO while the worker exports a model (ONNX export: onnx_ir,
# onnxscript): their lines say nothing to someone running the service, so they start at WARNING
CHATTY_LIBRARIES = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "matplotlib", "PIL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The cloud retraining service: `serve` runs it; `add-device`, `devices` and "
                          "`rotate-token` administer headsets (they work while it runs); `import-base` "
                          "registers a base model. `hmd cloud ACTION --help` for each.")
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = subs.add_parser(
        "serve", help="run the API and the job worker (one process)",
        description="Run the HTTP API (uploads, jobs, models, events) and the personalisation worker in one "
                    "process, until Ctrl+C or SIGTERM. Settings come from these flags, else HMD_CLOUD_<NAME> "
                    "environment variables (e.g. HMD_CLOUD_DATA_DIR, HMD_CLOUD_PORT), else the defaults shown. "
                    "The data folder (SQLite metadata, blobs, the Ed25519 signing key, job runs) is created on "
                    "first start; headsets are provisioned with `hmd cloud add-device`.")
    _data_dir(serve)
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--base-run", type=Path, default=None, metavar="RUN_DIR",
                       help="training run registered as the base version on first start")
    serve.add_argument("--auto-job-frames", type=int, default=None, metavar="N",
                       help="start a personalisation job once a device uploaded N new frames (0: never; default 64)")
    serve.add_argument("--max-upload-bytes", type=int, default=None, help="upload size limit (default 64 MiB)")
    serve.add_argument("--no-worker", dest="worker", action="store_const", const=False, default=None,
                       help="API only (jobs queue up for `hmd cloud worker` processes)")
    serve.add_argument("--workers", dest="api_processes", type=int, default=1, metavar="N",
                       help="N API processes on the one port (needs a postgresql:// --database-url; default 1)")
    _backends(serve)
    _training(serve)
    _log_level(serve)
    _signing_key(serve)

    worker = subs.add_parser(
        "worker", help="run personalisation jobs from the shared queue (no HTTP)",
        description="Claim queued jobs from the shared PostgreSQL queue and run them, until Ctrl+C or SIGTERM (the "
                    "job in hand goes back to the queue). Any number of workers on any machines: each holds its "
                    "job by a lease its heartbeat renews (--job-lease-s); a worker that dies loses the lease and "
                    "another re-runs the job, up to the attempt limit. Needs --database-url postgresql://..., the "
                    "blob store the API uses, and the data folder's runs/ and signing key (a shared volume).")
    _data_dir(worker)
    _backends(worker)
    worker.add_argument("--job-lease-s", type=float, default=None, metavar="S",
                        help="a job is another worker's S seconds after its worker's last heartbeat (default 30)")
    worker.add_argument("--max-job-attempts", type=int, default=None, metavar="N",
                        help="a job whose worker died N times is failed with that reason (default 3)")
    _training(worker)
    _log_level(worker)
    _signing_key(worker)

    add = subs.add_parser(
        "add-device", help="provision a device; prints its token once and the key to trust",
        description="Register a headset by name. Prints its bearer token (shown only this once: keep it; "
                    "`hmd cloud rotate-token NAME` replaces a lost one) and the service's public signing key, "
                    "which the headset trusts with --trusted-key. Creates the data folder and the signing key "
                    "if they do not exist yet.")
    add.add_argument("name", help="device name: letters, digits, '-', '_'")
    _data_dir(add)

    devices = subs.add_parser("devices", help="list the provisioned devices",
                              description="One line per device: name, when it was added, its current model "
                                          "version, its uploads and frames.")
    _data_dir(devices)

    rotate = subs.add_parser("rotate-token", help="give a device a new token; the old one stops working",
                             description="Replace a device's token (lost, or leaked): the new token is printed "
                                         "once, and the old one is rejected (HTTP 401) from now on, also by a "
                                         "service that is running. The device keeps its uploads and models.")
    rotate.add_argument("name", help="the device's name (see `hmd cloud devices`)")
    _data_dir(rotate)

    base = subs.add_parser("import-base", help="register a training run as the base version")
    base.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    base.add_argument("--version", default=None, help="version name (default base-RUNNAME-eEPOCHS)")
    base.add_argument("--staged", action="store_true",
                      help="register it without giving it to any device: `hmd cloud release VERSION --canary P%%` "
                           "rolls it out")
    _data_dir(base)
    _backends(base)

    release = subs.add_parser(
        "release", help="staged rollout of a base version: canary, promote, halt, status",
        description="Give a base version (import-base --staged) to a stable fraction of the devices (--canary 10%%), "
                    "widen it (--canary 50%%), make it every device's base (--promote) or halt it (--halt: its devices "
                    "go back to the previous base, re-signed). Headsets' health reports (POST /v1/health) halt a "
                    "canary by themselves when a threshold is crossed. Without an action: the releases and their "
                    "canaries' health.")
    release.add_argument("version", nargs="?", help="the base version (omit to list releases)")
    action = release.add_mutually_exclusive_group()
    action.add_argument("--canary", metavar="P%", help="give it to P percent of the devices")
    action.add_argument("--promote", action="store_true", help="give it to every device (the new stable base)")
    action.add_argument("--halt", action="store_true", help="stop the canary; its devices go back")
    release.add_argument("--max-error-rate", type=float, default=0.01,
                         help="halt above this many inference errors per frame (default 0.01)")
    release.add_argument("--max-rollbacks", type=int, default=0,
                         help="halt when headsets rolled the canary back more often than this (default 0)")
    release.add_argument("--min-fps-ratio", type=float, default=0.8,
                         help="halt when the canary's mean FPS falls below this fraction of the stable base's "
                              "(default 0.8; 0: never)")
    _data_dir(release)
    _backends(release)


def settings_from_args(args: argparse.Namespace):
    from cloud.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k in Settings.field_names()}
    return Settings.from_sources(flags)


def run(args: argparse.Namespace) -> int:
    return {"serve": serve, "worker": worker, "release": release, "add-device": add_device, "devices": list_devices, "rotate-token": rotate_token,
            "import-base": import_base}[args.action](args)


def configure_logging(level: str) -> None:
    """One format for the service's, uvicorn's and every library's lines (uvicorn is run without
    its own logging config, so its loggers propagate here); chatty libraries start at WARNING."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # whatever set them before: follow the root
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else happens: a port in use is one line and
    exit 2, before the data folder or a signing key is created."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, OverflowError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another `hmd cloud serve`?): "
                            f"stop that one or choose another --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


SETTINGS_ENV = "HMD_CLOUD__SETTINGS_JSON"  # how `serve --workers N` hands its settings to each API process


def serve(args: argparse.Namespace) -> int:
    from shared.paths import resolve_model

    settings = settings_from_args(args)
    if settings.base_run is not None:  # a shipped model's name works too (`--base-run base`)
        settings.base_run = resolve_model(settings.base_run)
    if settings.teacher_run is not None:
        settings.teacher_run = resolve_model(settings.teacher_run)
    if settings.base_run is not None and not (settings.base_run / "checkpoint.pt").is_file():
        raise UserError(f"--base-run {settings.base_run}: no checkpoint.pt there (expected a `hmd train` run folder)")
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise UserError(f"--data-dir {settings.data_dir} is a file, not a folder")
    processes = args.api_processes
    if processes < 1:
        raise UserError("--workers must be >= 1")
    if processes > 1 and not settings.db_url.startswith(("postgresql://", "postgres://")):
        raise UserError("--workers N needs a database the processes share: --database-url postgresql://... "
                        "(SQLite is the one-process embedded service)")
    sock = bind_socket(settings.host, settings.port)
    configure_logging(settings.log_level)
    log = logging.getLogger("hmd.cloud")

    import uvicorn

    from cloud.app import create_app

    if processes > 1:  # uvicorn's supervisor: N processes accept on the one socket, a dead one is replaced
        import json
        import os

        from uvicorn.supervisors import Multiprocess

        os.environ[SETTINGS_ENV] = json.dumps(settings.to_json())
        config = uvicorn.Config("cloud.cli:app_from_environment", factory=True, workers=processes, log_config=None,
                                log_level=settings.log_level, timeout_graceful_shutdown=3)
        log.info("serving %s on http://%s:%d with %d API processes (Ctrl+C stops them)", settings.data_dir,
                 settings.host, settings.port, processes)
        try:
            Multiprocess(config, sockets=[sock]).run()
        finally:
            sock.close()
        return 0

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # only now: the services are open and the socket accepts connections
                log.info("serving %s on http://%s:%d (Ctrl+C stops it)", settings.data_dir, settings.host,
                         settings.port)

    config = uvicorn.Config(create_app(settings), log_config=None, log_level=settings.log_level,
                            timeout_graceful_shutdown=3)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's way of saying the application's start-up failed (logged above)
        pass
    finally:
        sock.close()
    if not server.started:
        print("hmd cloud: error: the service did not start (see the log above)", file=sys.stderr)
        return 1
    if signal.SIGINT in getattr(server, "_captured_signals", ()):
        # uvicorn re-raises a captured Ctrl+C after its graceful shutdown, which ends up as
        # KeyboardInterrupt ("interrupted", 130) unless SIGINT was ignored when this process
        # started (a parent that ignores it, e.g. a test runner's worker): say the same then
        raise KeyboardInterrupt
    return 0


def app_from_environment():
    """The app of one of `serve --workers N`'s processes (uvicorn's factory): the settings the
    parent resolved, from its environment."""
    import json
    import os

    from cloud.app import create_app
    from cloud.settings import Settings

    settings = Settings.from_json(json.loads(os.environ[SETTINGS_ENV]))
    configure_logging(settings.log_level)
    return create_app(settings)


def worker(args: argparse.Namespace) -> int:
    """Jobs from the shared queue until SIGTERM/SIGINT; the job in hand goes back to the queue."""
    import signal
    import threading

    from cloud.services import Services, is_shared
    from shared.paths import resolve_model

    settings = settings_from_args(args)
    settings.worker = True
    if settings.teacher_run is not None:
        settings.teacher_run = resolve_model(settings.teacher_run)
    if not settings.db_url.startswith(("postgresql://", "postgres://")):
        raise UserError("hmd cloud worker needs the shared queue: --database-url postgresql://... (the embedded "
                        "SQLite service runs its jobs inside `hmd cloud serve`)")
    configure_logging(settings.log_level)
    log = logging.getLogger("hmd.cloud")
    services = Services.open(settings)
    assert is_shared(services.storage)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    services.start(api=False)
    log.info("worker %s: taking jobs from %s (lease %.0f s)", services.queue.owner, services.storage.where,
             settings.job_lease_s)
    try:
        while not stop.wait(1.0):
            if services.worker is not None and not services.worker.alive:
                raise UserError("the job worker thread stopped")
    finally:
        services.stop()
    log.info("worker stopped (%d jobs completed)", services.worker.completed if services.worker else 0)
    return 0


def add_device(args: argparse.Namespace) -> int:
    from cloud.keys import DEVICE_NAME, SigningKey, new_token, token_sha256
    from cloud.backends import open_storage

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


def _open_existing_storage(settings):
    """The metadata database of an existing data folder (listing or rotating never creates one)."""
    from cloud.backends import open_storage

    if settings.database_url is None and not (settings.data_dir / "cloud.sqlite3").is_file():
        raise UserError(f"no cloud data in {settings.data_dir} (`hmd cloud add-device` or `serve` creates it)")
    return open_storage(settings.db_url)


def list_devices(args: argparse.Namespace) -> int:
    storage = _open_existing_storage(settings_from_args(args))
    try:
        rows = [(d.name, datetime.datetime.fromtimestamp(d.created).strftime("%Y-%m-%d %H:%M"),
                 d.current_version or "(base)", str(storage.upload_count(d.id)), str(storage.frame_count(d.id)))
                for d in storage.devices()]
    finally:
        storage.close()
    if not rows:
        print("no devices (add one with `hmd cloud add-device NAME`)", file=sys.stderr)
        return 0
    rows.insert(0, ("NAME", "ADDED", "CURRENT VERSION", "UPLOADS", "FRAMES"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def rotate_token(args: argparse.Namespace) -> int:
    from cloud.keys import new_token, token_sha256

    storage = _open_existing_storage(settings_from_args(args))
    try:
        token = new_token(args.name)
        if not storage.set_device_token(args.name, token_sha256(token)):
            raise UserError(f"no device named {args.name!r} (see `hmd cloud devices`)")
    finally:
        storage.close()
    print(f"device: {args.name}")
    print(f"token: {token}")
    print("(the token is shown only this once; the old one is rejected from now on)", file=sys.stderr)
    return 0


def import_base(args: argparse.Namespace) -> int:
    from cloud import rollout
    from cloud.services import Services

    settings = settings_from_args(args)
    settings.worker = False
    services = Services.open(settings)
    try:
        if args.staged:
            rollout.begin_staging(services.storage)
        v = services.registry.import_base(args.run_dir, version=args.version)
    finally:
        services.storage.close()
    print(f"base version {v.version} (sha256 {v.onnx_sha256[:12]}..., {v.bytes} bytes)"
          + (": staged, `hmd cloud release` rolls it out" if args.staged else ""))
    return 0


def release(args: argparse.Namespace) -> int:
    from cloud import rollout
    from cloud.services import Services

    settings = settings_from_args(args)
    settings.worker = False
    services = Services.open(settings)
    storage = services.storage
    try:
        if args.version is None:
            if args.canary or args.promote or args.halt:
                raise UserError("name the base version to release")
            for r in storage.releases():
                health = storage.health_summary([r.version])
                print(f"{r.version}  {r.state}  {r.percent:g}%  previous={r.previous or '-'}  "
                      f"reports={health['reports']} frames={health['frames']} errors={health['errors']} "
                      f"rollbacks={health['rollbacks']} fps={health['fps']:.1f}"
                      + (f"  reason: {r.reason}" if r.reason and r.state != "promoted" else ""))
            return 0
        if args.canary:
            r = rollout.stage(storage, args.version, rollout.parse_percent(args.canary),
                              max_error_rate=args.max_error_rate, max_rollbacks=args.max_rollbacks,
                              min_fps_ratio=args.min_fps_ratio)
        elif args.promote:
            r = rollout.promote(storage, args.version)
        elif args.halt:
            halted = rollout.halt(storage, services.registry, args.version, "halted by hand")
            if halted is None:
                raise UserError(f"{args.version} is not a canary release")
            r = halted
        else:
            r = storage.release(args.version)
            if r is None:
                raise UserError(f"no release of {args.version}")
        told = rollout.notify_devices(storage, services.broker.publish, r)
    finally:
        storage.close()
    print(f"{r.version}: {r.state} at {r.percent:g}% of the devices"
          + (f" (back on {r.rollback_version}: {r.reason})" if r.state == "halted" else "")
          + (f"; {told} device(s) told" if told else ""))
    return 0
