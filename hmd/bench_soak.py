"""`hmd bench soak`: simulated headsets journal and upload against a real `hmd cloud serve`
process that is SIGKILLed and restarted mid-upload, runs out of (quota) space, has its
connections cut, gets large uploads at once, and is sent every class of bad input; prints one
JSON report.

    hmd bench soak                                  # 50 headsets, 3 kills, ~3 minutes of journaling
    hmd bench soak --headsets 3 --kills 1 --seconds 12   # about what the test runs

The headsets talk to the server through :class:`hmd.soak_proxy.FlakyProxy`, which cuts part of
their connections at a random point (mid-request or mid-response). The "disk full" phase runs the
first server with a per-device quota too small for the headsets' frames: they get 507 and keep
their batches. The memory phase sends several large uploads at once from other devices (big EXIF
frames, the costliest decode, and an 8 MB index of metadata).

Report: uploads attempted and acknowledged, connections cut, frames journaled vs stored (each
frame looked up by content: stored, still held by its headset when the drain time ran out, or
lost: target 0; see :func:`_frame_accounting`), orphan files after a
restart (temporary or spooled files, blobs no row names: target 0), the server's peak resident
memory (VmHWM, per server process) against the stated bound (``cloud.ingest.memory_bound`` plus
the server's memory at start: ``peak_rss_over_bound`` must stay below 1), jobs lost (not
finished, or accepted without their version: target 0), jobs whose runner completed twice
(target 0), and each bad-input class with the status it got.
"""
from __future__ import annotations

import argparse
import contextlib
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
import threading
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


COMPLETIONS = "soak-completions.log"  # in the data dir: one line per run of the runner that completed


def resign_job(ctx: JobContext) -> JobOutcome:
    """A fast job runner (no training) for the soak; it notes each completed run, so that a job
    whose result was committed and which then ran again would show up as completed twice."""
    time.sleep(0.5)  # long enough to be interrupted by a kill now and then
    version = resigned_version(ctx)
    with open(ctx.settings.data_dir / COMPLETIONS, "a") as fh:
        fh.write(f"{ctx.job.id} {ctx.job.attempts}\n")
    return JobOutcome(True, "soak: re-signed", {}, version, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headsets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=150.0, help="journaling time (the drain comes after)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL + restart the server this many times")
    parser.add_argument("--fps", type=float, default=4.0, help="frames journaled per headset per second")
    parser.add_argument("--quota-bytes", type=int, default=60_000, help="per-device quota of the first server")
    parser.add_argument("--cut-fraction", type=float, default=0.5,
                        help="fraction of the headsets' connections the proxy cuts part-way")
    parser.add_argument("--cut-within-kib", type=int, default=1024,
                        help="a cut connection is cut within its first this many KiB of requests (or 1/64 of it "
                             "of responses)")
    parser.add_argument("--drain-seconds", type=float, default=600.0,
                        help="after the journaling, how long the headsets may take to upload what they hold")
    parser.add_argument("--memory-uploads", type=int, default=6,
                        help="concurrent large uploads (other devices) sent in the memory phase")
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
        self.peak_rss_mb: list[float] = []  # VmHWM of each server process, when it ended
        self.start_rss_mb: list[float] = []  # VmRSS of each once it answered /healthz (nothing uploaded)

    def start(self, quota: int) -> None:
        env = dict(os.environ, HMD_CLOUD_RUNNER="hmd.bench_soak:resign_job", HMD_CLOUD_MAX_DEVICE_BYTES=str(quota),
                   HMD_CLOUD_AUTO_JOB_FRAMES="40", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "hmd", "cloud", "serve", "--data-dir", str(self.data),
                                      "--port", str(self.port), "--base-run", self.base_run, "--log-level", "warning"],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 1800  # generous: on a loaded machine (2 cores shared) a start takes minutes
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    self.start_rss_mb.append(round(self._status_mb("VmRSS"), 1))
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError("the server did not start")

    def ensure_stopped(self) -> None:
        """Kill the server if it still runs (the bench failed part-way)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _status_mb(self, field: str) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return 0.0

    def _hwm(self) -> float:
        return self._status_mb("VmHWM")

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
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("frames/0.jpg")
        info.size, info.pax_headers = len(jpg), {"comment": "x" * 60_000_000}
        t.addfile(info, io.BytesIO(jpg))
    classes["60 MB PAX header (read whole by tarfile)"] = buf.getvalue()
    out = {}
    with httpx.Client(timeout=600) as c:  # a loaded machine parses 60 MB slowly
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


def _with_exif(jpg: bytes, tag: bytes) -> bytes:
    """``jpg`` with an (empty) EXIF segment carrying ``tag``: the server then gives it OpenCV's
    full decode, its costliest path; the tag makes each copy a distinct blob."""
    payload = b"Exif\0\0II*\0\x08\0\0\0\0\0\0\0\0\0" + tag
    return jpg[:2] + b"\xff\xe1" + (2 + len(payload)).to_bytes(2, "big") + payload + jpg[2:]


def _memory_phase(url: str, tokens: list[str], frames_per_upload: int = 6) -> dict[str, object]:
    """Large uploads sent at once by other devices while the headsets go on: each of several
    2560x1440 EXIF frames of noise (~2.5 MB, the full decode path), plus one index of 8 MB of
    frame metadata (parsed whole before it is refused). What each answered."""
    rng = np.random.default_rng(1)
    frames = [cv2.imencode(".jpg", rng.integers(0, 255, (1440, 2560, 3), np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes() for _ in range(frames_per_upload)]
    bodies = []
    for d, _ in enumerate(tokens[:-1]):
        members = {f"frames/{i}.jpg": _with_exif(f, f"dev{d}".encode()) for i, f in enumerate(frames)}
        index = {"format": 1, "frames": [{"file": n, "sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                                         for n, b in members.items()]}
        bodies.append(tar_members([("index.json", json.dumps(index).encode()), *members.items()]))
    meta = {"note": "x" * 3900}
    index = {"format": 1, "frames": [{"file": f"frames/{i}.jpg", "sha256": "0" * 64, "bytes": 1, **meta}
                                     for i in range(2000)]}
    bodies.append(tar_members([("index.json", json.dumps(index).encode())]))
    statuses: list[object] = [None] * len(bodies)

    def send(i: int) -> None:
        for _ in range(5):  # 503: every parser was busy for 30 s; retried, as a headset does
            try:
                statuses[i] = httpx.post(f"{url}/v1/uploads", content=bodies[i], timeout=600,
                                         headers={"Authorization": f"Bearer {tokens[i]}",
                                                  "Content-Type": "application/x-tar"}).status_code
            except httpx.HTTPError as exc:
                statuses[i] = f"connection failed ({type(exc).__name__})"
            if statuses[i] != 503:
                return

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"uploads": len(bodies), "bytes_sent": sum(len(b) for b in bodies),
            "large_frame_uploads": statuses[:-1], "8 MB index of metadata": statuses[-1]}


def _frame_accounting(db: Path, headsets: list[Headset], device_ids: list[int]) -> dict[str, int]:
    """Every journaled frame, looked up by its content in the server's table of that device:
    stored; or still held by its headset (not uploaded when the drain time ran out: kept, to be
    uploaded later); or lost (the headset marked it uploaded, the server has no row for it).
    Frames are distinct (see :meth:`Headset.journal_frame`), so distinct rows count frames; a frame
    can have two rows: an upload whose answer was cut is retried as a *larger* batch (the journal
    grew meanwhile), a new upload to the server, which then stores its first frames again."""
    import sqlite3

    out = {"frames_stored": 0, "frames_still_in_journals": 0, "frames_stored_not_yet_acknowledged": 0,
           "frames_lost": 0}
    with contextlib.closing(sqlite3.connect(db)) as con:
        for h, device_id in zip(headsets, device_ids):
            stored = {r[0] for r in con.execute("SELECT sha256 FROM frames WHERE device_id=?", (device_id,))}
            out["frames_stored"] += len(stored)
            through = h.journal.uploaded_through()
            for entry in h.journal.entries():
                sha = hashlib.sha256((h.journal.root / entry["file"]).read_bytes()).hexdigest()
                if entry["seq"] > through:
                    key = "frames_stored_not_yet_acknowledged" if sha in stored else "frames_still_in_journals"
                    out[key] += 1
                elif sha not in stored:
                    out["frames_lost"] += 1
    return out


def run(args: argparse.Namespace) -> int:
    servers: list[Server] = []
    try:
        return _soak(args, servers)
    finally:
        for server in servers:
            server.ensure_stopped()


def _soak(args: argparse.Namespace, servers: list[Server]) -> int:
    from cloud.ingest import memory_bound
    from cloud.keys import new_token, token_sha256
    from cloud.services import Services
    from cloud.settings import Settings
    from cloud.storage import SQLiteStorage
    from hmd.soak_proxy import FlakyProxy
    from shared.hashing import read_key

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hmd-soak-"))
    data = work / "data"
    server = Server(data, _free_port(), args.base_run)
    servers.append(server)
    server.start(args.quota_bytes)  # registers the base version; the quota fills quickly ("disk full")
    proxy = FlakyProxy(server.port, cut_fraction=args.cut_fraction,
                       upstream_cut_bytes=args.cut_within_kib * 1024).start()
    storage = SQLiteStorage(data / "cloud.sqlite3")
    tokens, device_ids, memory_tokens = {}, [], []
    for i in range(args.headsets):
        token = new_token(f"soak{i}")
        device_ids.append(storage.add_device(f"soak{i}", token_sha256(token)).id)
        tokens[f"soak{i}"] = token
    for i in range(args.memory_uploads + 1 if args.memory_uploads else 0):
        token = new_token(f"memory{i}")
        storage.add_device(f"memory{i}", token_sha256(token))
        memory_tokens.append(token)
    storage.close()
    key = read_key(data / "signing.pub")
    headsets = [Headset(name, token, work / "journals", proxy.url, key, i) for i, (name, token) in
                enumerate(tokens.items())]
    for h in headsets:
        h.sync.start()
    t0 = time.time()
    kill_at = [t0 + args.seconds * (k + 1) / (args.kills + 1) for k in range(args.kills)]
    quota_phase_end = t0 + args.seconds / (2 * (args.kills + 1))
    memory_at = t0 + args.seconds * 0.75 if memory_tokens else 0
    quota_507 = 0
    memory: dict[str, object] = {}
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
        if memory_at and time.time() > memory_at:  # the journaling pauses while it runs; uploads go on
            memory = _memory_phase(server.url, memory_tokens)
            memory_at = 0
        time.sleep(period)
    bad = _bad_inputs(server.url, tokens["soak0"])
    journaled = 0
    for h in headsets:
        h.journal.close()
        journaled += h.journal.written
    deadline = time.time() + args.drain_seconds
    while time.time() < deadline and any(h.journal.pending_batches(max_batches=1) for h in headsets):
        time.sleep(0.5)
    for h in headsets:
        h.sync.stop()
    proxy.stop()
    server.kill()  # a last kill, then count what a restart leaves
    services = Services.open(Settings(data_dir=data, worker=False))
    try:
        orphans_before = {"temporary": sum(1 for p in (data / "blobs" / ".tmp").iterdir()),
                          "unreferenced_blobs": len(set(services.blobs.names()) - services.storage.referenced_blobs())}
        services.recover_files()
        orphans_after = sum(1 for p in (data / "blobs" / ".tmp").iterdir()) + \
            len(set(services.blobs.names()) - services.storage.referenced_blobs()) + \
            sum(1 for _ in (data / "spool").glob("*"))
        rows = sum(services.storage.frame_count(d) for d in device_ids)
        frames = _frame_accounting(data / "cloud.sqlite3", headsets, device_ids)
    finally:
        services.storage.close()
    server.start(0)  # jobs left running by the last kill re-run; wait for the queue to drain
    time.sleep(3)
    storage = SQLiteStorage(data / "cloud.sqlite3")
    deadline = time.time() + 60
    while time.time() < deadline and any(j.state in ("queued", "running") for j in storage.jobs()):
        time.sleep(0.5)
    jobs = storage.jobs()
    versions_by_job = {j.id: storage.version(j.result_version) for j in jobs if j.result_version}
    storage.close()
    server.stop()
    completions: dict[str, int] = {}
    log_path = data / COMPLETIONS
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        completions[line.split()[0]] = completions.get(line.split()[0], 0) + 1
    # the bound holds the server's resident memory at start (code, model, database) plus what the
    # ingest can hold: its uploads being parsed, decode workers, and every open connection's buffer
    connections = 2 * args.headsets + len(memory_tokens) + 2
    bound = memory_bound(Settings.max_frame_bytes, Settings.max_frame_pixels, connections)
    bound_mb = [start + bound["total"] / 2 ** 20 for start in server.start_rss_mb]  # per server process
    ratios = [peak / b for peak, b in zip(server.peak_rss_mb, bound_mb)]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    report = {
        "headsets": args.headsets, "seconds": args.seconds, "kills": args.kills,
        "uploads_attempted": sum(h.sync.stats.uploaded_batches + h.sync.stats.upload_failures +
                                 h.sync.stats.refused_batches for h in headsets),
        "uploads_acknowledged": sum(h.sync.stats.uploaded_batches for h in headsets),
        "upload_failures_retried": sum(h.sync.stats.upload_failures for h in headsets),
        "quota_phase_failures": quota_507,
        "refused_batches": sum(h.sync.stats.refused_batches for h in headsets),
        "connections_cut": proxy.stats.as_dict(),
        "frames_journaled": journaled, **frames, "frames_stored_twice": rows - frames["frames_stored"],
        "orphans_left_by_the_kill": orphans_before, "orphan_files_after_restart": orphans_after,
        "server_peak_rss_mb": max(server.peak_rss_mb),
        "server_start_rss_mb_per_run": server.start_rss_mb, "server_peak_rss_mb_per_run": server.peak_rss_mb,
        "memory_bound_terms_mb": {k: round(v / 2 ** 20, 1) for k, v in bound.items()},
        "peak_rss_over_bound": round(ratios[worst], 3),  # the worst server run: peak / (its start + bound)
        "peak_rss_over_bound_per_run": [round(r, 3) for r in ratios],
        "memory_phase": memory,
        "jobs": len(jobs), "jobs_accepted": sum(j.state == "accepted" for j in jobs),
        "jobs_lost": sum(j.state not in ("accepted", "rejected", "failed") for j in jobs) +
        sum(v is None for v in versions_by_job.values()),
        "jobs_completed_twice": sum(n > 1 for n in completions.values()),
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
