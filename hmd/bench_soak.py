"""`hmd bench soak`: simulated headsets journal and upload against a real `hmd cloud serve`
process that is SIGKILLed and restarted mid-upload, runs out of (quota) space, and is sent every
class of bad input; prints one JSON report.

    hmd bench soak                                  # 50 headsets, 3 kills, ~3 minutes
    hmd bench soak --headsets 3 --kills 1 --seconds 20 --out soak.json   # what the test runs

Report: uploads attempted and acknowledged, frames journaled vs stored (lost = journaled - stored
once the headsets drained their journals: target 0), orphan files after a restart (temporary or
spooled files, blobs no row names: target 0), the server's peak resident memory (VmHWM, per
server process), jobs lost (not finished, not queued or running: target 0), and each bad-input
class with the status it got. The "disk full" phase runs the first server with a per-device
quota too small for the headsets' frames: they get 507 and keep their batches.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

from cloud.storage import Version
from cloud.worker import JobContext, JobOutcome
from shared.wire import tar_members

ROOT = Path(__file__).resolve().parent.parent


def resigned_version(ctx: JobContext) -> Version:
    """The device's current model re-signed under a new name: a new version without training."""
    job = ctx.job
    base = ctx.storage.current_version(job.device_id)
    device = ctx.storage.device(job.device_id)
    name = f"{device.name}-{job.id}"
    manifest = ctx.registry.manifest(base).model_copy(update={"version": name, "parent_version": base.version})
    signed = ctx.registry.sign(manifest, job.device_id)
    manifest_sha = ctx.blobs.put_bytes(signed.to_json().encode())
    ctx.storage.update_job(job.id, base_version=base.version)
    return Version(name, job.device_id, base.version, base.onnx_sha256, manifest_sha, base.bytes, base.run_dir,
                   job.id, time.time())


def resign_job(ctx: JobContext) -> JobOutcome:
    """A fast job runner (no training) for the soak."""
    time.sleep(0.5)  # long enough to be interrupted by a kill now and then
    return JobOutcome(True, "soak: re-signed", {}, resigned_version(ctx), None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headsets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=150.0, help="journaling time (the drain comes after)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL + restart the server this many times")
    parser.add_argument("--fps", type=float, default=4.0, help="frames journaled per headset per second")
    parser.add_argument("--quota-bytes", type=int, default=60_000, help="per-device quota of the first server")
    parser.add_argument("--base-run", default=str(ROOT / "hmd" / "assets" / "base-studio"))
    parser.add_argument("--work", default=None, help="folder for the data dir and journals (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data: Path, port: int, base_run: str):
        self.data, self.port, self.base_run = data, port, base_run
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.peak_rss_mb: list[float] = []

    def start(self, quota: int) -> None:
        env = dict(os.environ, HMD_CLOUD_RUNNER="hmd.bench_soak:resign_job", HMD_CLOUD_MAX_DEVICE_BYTES=str(quota),
                   HMD_CLOUD_AUTO_JOB_FRAMES="40", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "hmd", "cloud", "serve", "--data-dir", str(self.data),
                                      "--port", str(self.port), "--base-run", self.base_run, "--log-level", "warning"],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def _hwm(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return 0.0

    def kill(self) -> None:
        self.peak_rss_mb.append(round(self._hwm(), 1))
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.peak_rss_mb.append(round(self._hwm(), 1))
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Headset:
    """A journal fed with distinct frames and a sync client uploading it."""

    def __init__(self, name: str, token: str, root: Path, url: str, key: bytes, seed: int):
        from device.journal import Journal
        from device.sync import SyncClient

        self.name = name
        self.journal = Journal(root / name, max_bytes=1 << 30).start()
        self.sync = SyncClient(url, token, trust_key=key, download_dir=root / f"{name}-dl", journal=self.journal,
                               batch_frames=16, upload_interval=0.3, backoff_initial=0.2, backoff_max=2.0,
                               timeout=10, log=lambda m: None)
        rng = np.random.default_rng(seed)
        self.base = rng.integers(0, 255, (48, 64, 3), np.uint8)
        self.n = 0

    def journal_frame(self) -> None:
        img = self.base.copy()
        # every frame distinct *after* JPEG compression: the frame number's 16 bits as black or white
        # 8x8 blocks (a few changed pixel values can quantise to the same JPEG bytes, which the cloud
        # then rightly stores once, and the soak would count the duplicates as lost)
        for bit in range(16):
            r, c = divmod(bit, 8)
            img[8 * r:8 * r + 8, 8 * c:8 * c + 8] = 255 if (self.n >> bit) & 1 else 0
        self.n += 1
        while not self.journal.submit(img, {"frame_index": self.n}):
            time.sleep(0.01)


def _bad_inputs(url: str, token: str) -> dict[str, int]:
    """Every bad-input class of issue 13, sent once; the status each got."""
    auth = {"Authorization": f"Bearer {token}"}

    def upload(frames: dict[str, bytes], **meta) -> bytes:
        index = {"format": 1, "frames": [{"file": n, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d), **meta}
                                         for n, d in frames.items()]}
        return tar_members([("index.json", json.dumps(index).encode()), *frames.items()])

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    prog = bytearray(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
    sof = prog.index(b"\xff\xc2")
    prog[sof + 5:sof + 9] = (16000).to_bytes(2, "big") * 2
    png = bytearray(cv2.imencode(".png", img)[1].tobytes())
    png[16:24] = (12000).to_bytes(4, "big") * 2
    scan = jpg.index(b"\xff\xda")
    classes = {
        "not a tar": b"plain text" * 100,
        "path traversal": tar_members([("../x.jpg", jpg)]),
        "symlink": b"",
        "image bomb (16000x16000 progressive JPEG)": upload({"frames/0.jpg": bytes(prog)}),
        "PNG under a .jpg name": upload({"frames/0.jpg": bytes(png)}),
        "JPEG cut in half + end marker": upload({"frames/0.jpg": jpg[: (scan + len(jpg)) // 2] + b"\xff\xd9"}),
        "7 MB of frame metadata": upload({"frames/0.jpg": jpg}, note="x" * 7_000_000),
        "too large": b"\0" * (65 * 1024 * 1024),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("frames/0.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    classes["symlink"] = buf.getvalue()
    out = {}
    with httpx.Client(timeout=60) as c:
        for name, body in classes.items():
            try:
                out[name] = c.post(f"{url}/v1/uploads", content=body,
                                   headers={**auth, "Content-Type": "application/x-tar"}).status_code
            except httpx.HTTPError as exc:  # the server may close early on a too-large body
                out[name] = f"connection closed ({type(exc).__name__})"
        out["Range with 5000 digits"] = c.get(f"{url}/v1/models/nope/model.onnx",
                                             headers={**auth, "Range": "bytes=" + "9" * 5000 + "-"}).status_code
        base = c.get(f"{url}/v1/models/current", headers=auth).json()["model_url"]
        out["Range with 5000 digits (a real model)"] = c.get(
            f"{url}{base}", headers={**auth, "Range": "bytes=" + "9" * 5000 + "-"}).status_code
        out["wrong token"] = c.get(f"{url}/v1/models/current", headers={"Authorization": "Bearer x.y"}).status_code
    return out


def run(args: argparse.Namespace) -> int:
    from cloud.keys import new_token, token_sha256
    from cloud.services import Services
    from cloud.settings import Settings
    from cloud.storage import SQLiteStorage
    from shared.hashing import read_key

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hmd-soak-"))
    data = work / "data"
    server = Server(data, _free_port(), args.base_run)
    server.start(args.quota_bytes)  # registers the base version; the quota fills quickly ("disk full")
    storage = SQLiteStorage(data / "cloud.sqlite3")
    tokens = {}
    for i in range(args.headsets):
        token = new_token(f"soak{i}")
        storage.add_device(f"soak{i}", token_sha256(token))
        tokens[f"soak{i}"] = token
    storage.close()
    key = read_key(data / "signing.pub")
    headsets = [Headset(name, token, work / "journals", server.url, key, i) for i, (name, token) in
                enumerate(tokens.items())]
    for h in headsets:
        h.sync.start()
    t0 = time.time()
    kill_at = [t0 + args.seconds * (k + 1) / (args.kills + 1) for k in range(args.kills)]
    quota_phase_end = t0 + args.seconds / (2 * (args.kills + 1))
    quota_507 = 0
    period = 1.0 / args.fps
    while time.time() - t0 < args.seconds:
        for h in headsets:
            h.journal_frame()
        if quota_phase_end and time.time() > quota_phase_end:  # the disk is "freed": restart with room
            quota_507 = sum(h.sync.stats.upload_failures for h in headsets)
            server.kill()
            server.start(0)
            quota_phase_end = 0
        if kill_at and time.time() > kill_at[0]:
            kill_at.pop(0)
            server.kill()  # mid-upload: the headsets upload continuously
            server.start(0)
        time.sleep(period)
    bad = _bad_inputs(server.url, tokens["soak0"])
    journaled = 0
    for h in headsets:
        h.journal.close()
        journaled += h.journal.written
    deadline = time.time() + 120 + args.headsets
    while time.time() < deadline and any(h.journal.pending_batches(max_batches=1) for h in headsets):
        time.sleep(0.5)
    for h in headsets:
        h.sync.stop()
    server.kill()  # a last kill, then count what a restart leaves
    services = Services.open(Settings(data_dir=data, worker=False))
    try:
        orphans_before = {"temporary": sum(1 for p in (data / "blobs" / ".tmp").iterdir()),
                          "unreferenced_blobs": len(set(services.blobs.names()) - services.storage.referenced_blobs())}
        services.recover_files()
        orphans_after = sum(1 for p in (data / "blobs" / ".tmp").iterdir()) + \
            len(set(services.blobs.names()) - services.storage.referenced_blobs()) + \
            sum(1 for _ in (data / "spool").glob("*"))
        stored = services.storage.frame_count()
        jobs = services.storage.jobs()
    finally:
        services.storage.close()
    server.start(0)  # jobs left running by the last kill re-run; wait for the queue to drain
    time.sleep(3)
    storage = SQLiteStorage(data / "cloud.sqlite3")
    deadline = time.time() + 60
    while time.time() < deadline and any(j.state in ("queued", "running") for j in storage.jobs()):
        time.sleep(0.5)
    jobs = storage.jobs()
    storage.close()
    server.stop()
    report = {
        "headsets": args.headsets, "seconds": args.seconds, "kills": args.kills,
        "uploads_attempted": sum(h.sync.stats.uploaded_batches + h.sync.stats.upload_failures +
                                 h.sync.stats.refused_batches for h in headsets),
        "uploads_acknowledged": sum(h.sync.stats.uploaded_batches for h in headsets),
        "upload_failures_retried": sum(h.sync.stats.upload_failures for h in headsets),
        "quota_phase_failures": quota_507,
        "refused_batches": sum(h.sync.stats.refused_batches for h in headsets),
        "frames_journaled": journaled, "frames_stored": stored, "frames_lost": journaled - stored,
        "orphans_left_by_the_kill": orphans_before, "orphan_files_after_restart": orphans_after,
        "server_peak_rss_mb": max(server.peak_rss_mb), "server_peak_rss_mb_per_run": server.peak_rss_mb,
        "jobs": len(jobs), "jobs_accepted": sum(j.state == "accepted" for j in jobs),
        "jobs_lost": sum(j.state not in ("accepted", "rejected", "failed") for j in jobs),
        "jobs_max_attempts": max((j.attempts for j in jobs), default=0),
        "bad_inputs": bad,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0
