"""`hmd bench cloud`: the service measured over real HTTP on 127.0.0.1, JSON on stdout.

* ``upload/copy throughput``: one large upload of camera-like frames (what a headset sends: 240x320
  views of a synthetic world from ``device.capture.SyntheticSource``, JPEG-encoded as the journal
  does) through ``POST /v1/uploads`` against a plain copy of the same archive bytes, file to file,
  into the same data dir, fsync'd (the service makes every stored frame durable before it commits:
  one sync of the blob filesystem); ratio = copy time / upload time, each repeat measured side by
  side with new content, median of ``--repeats``, after one upload that is not measured (a
  running service is measured, not its first request: ``first_upload_s``). The same with noise JPEGs (nothing compresses,
  the costliest frames to decode per frame) is reported as a secondary, worst-case figure.
* ``ceiling_decode_only/copy``: the same copy time over the time of the service's per-frame
  decode check alone (:func:`cloud.ingest.check_frame`, in this process, one core, nothing
  else): the highest upload/copy ratio any service that decodes every frame could reach here.
* the service's memory (RSS of the server process, sampled every 5 ms) before and during that upload.
* ``--devices`` simulated devices uploading ``--batches`` batches each at once, retrying like the
  sync client; ``lost_uploads`` = uploads acknowledged or attempted but not stored.
* the time from the last acknowledged upload of a headset's journal to the new model serving on
  that headset, split by stage, with a real (tiny) personalisation job.

Everything runs in a temporary folder: a tiny base run is trained, the server is `hmd cloud serve`
in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upload-mb", type=float, default=48.0, help="size of the large upload (48 MB)")
    parser.add_argument("--repeats", type=int, default=3, help="median of N side-by-side upload/copy rounds")
    parser.add_argument("--devices", type=int, default=20, help="simulated devices uploading at once")
    parser.add_argument("--batches", type=int, default=5, help="batches per simulated device")
    parser.add_argument("--frames-per-batch", type=int, default=16)
    parser.add_argument("--journal-frames", type=int, default=40, help="frames the latency headset uploads")
    parser.add_argument("--skip-latency", action="store_true", help="no training (the slow part)")
    parser.add_argument("--keep", metavar="DIR", default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--no-scale", dest="scale", action="store_false",
                        help="skip the PostgreSQL + S3 measurements (issue 15; skipped anyway when they cannot run)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int, tree: bool = False) -> float:
    """CPU seconds (user + system) a process has used; ``tree``: with its children's, alive ones
    (PostgreSQL's backends are children of its postmaster)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            total += sum(_cpu_s(int(c), tree=True) for c in children)
    return total


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Server:
    def __init__(self, data_dir: Path, *flags: str, env: dict | None = None):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "hmd", "cloud", "serve", "--data-dir", str(data_dir),
                                      "--port", str(self.port), "--log-level", "warning", *flags], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})})
        deadline = time.time() + 600  # a loaded machine: several processes import torch/fastapi at once
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _add_device(data_dir: Path, name: str) -> str:
    from cloud.keys import new_token, token_sha256
    from cloud.storage import SQLiteStorage

    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        token = new_token(name)
        s.add_device(name, token_sha256(token))
    finally:
        s.close()
    return token


def _noise_frames(total_bytes: int, seed: int = 0) -> list[tuple[dict, bytes]]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    frames, size, i = [], 0, 0
    while size < total_bytes:
        img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        data = jpg.tobytes()
        frames.append(({"seq": i, "width": 640, "height": 480}, data))
        size += len(data)
        i += 1
    return frames


def _camera_frames(total_bytes: int, seed: int = 0) -> list[tuple[dict, bytes]]:
    """Headset-like frames: a pan over a synthetic world at 240x320, JPEG as the journal encodes them."""
    import inspect

    import cv2

    from device.capture import SyntheticSource
    from device.journal import Journal

    quality = inspect.signature(Journal).parameters["jpeg_quality"].default  # the journal's encoder setting
    src = SyntheticSource("forest", size=(240, 320), seed=seed)
    frames, size, i = [], 0, 0
    while size < total_bytes:
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(src.read(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        data = jpg.tobytes()
        frames.append(({"seq": i, "width": 320, "height": 240}, data))
        size += len(data)
        i += 1
    return frames


def _scene_frames(n: int, start: int, size: int = 64) -> list[tuple[dict, bytes]]:
    import cv2

    from shared.worlds import render_scene

    out = []
    for i in range(start, start + n):
        rgb, _ = render_scene("forest", 5, i, size)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        out.append(({"seq": i, "width": size, "height": size}, jpg.tobytes()))
    return out


def bench_upload(url: str, token: str, pid: int, data_dir: Path, upload_mb: float, repeats: int,
                 kind: str = "camera", neighbours: dict[str, int] | None = None) -> dict:
    """``neighbours``: other processes the upload makes work (name -> pid: the S3 server,
    PostgreSQL's postmaster), whose CPU seconds per upload are reported with the server's."""
    import statistics

    import httpx

    from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive

    from cloud.ingest import check_frame

    make = {"camera": _camera_frames, "noise": _noise_frames}[kind]
    uploads, copies, ratios, rss_peak = [], [], [], 0
    decodes, decode_ratios = [], []
    procs = {"api server": (pid, False), **{name: (p, True) for name, p in (neighbours or {}).items()}}
    cpu: dict[str, list[float]] = {name: [] for name in procs}
    rss_before = _rss_kb(pid)
    archive_size = n_frames = 0
    headers = {"Authorization": f"Bearer {token}", "Content-Type": UPLOAD_CONTENT_TYPE}
    with httpx.Client(timeout=300) as http:
        # one upload first, not measured: a long-running service is measured, not its first request
        # (lazy imports, the first connections to the database and the object store, statements not
        # yet prepared); what it took is reported as "first_upload_s"
        warm = build_upload_archive(make(int(upload_mb * 1e6), seed=99))
        t0 = time.perf_counter()
        resp = http.post(f"{url}/v1/uploads", content=warm, headers=headers)
        first_s = time.perf_counter() - t0
        if resp.status_code != 201:
            raise RuntimeError(f"the first upload failed: {resp.status_code} {resp.text[:200]}")
        del warm
        for r in range(repeats):
            frames = make(int(upload_mb * 1e6), seed=100 + r)  # new content each time
            n_frames = len(frames)
            body = build_upload_archive(frames)
            archive_size = len(body)
            src = data_dir.parent / "archive.tar"
            src.write_bytes(body)
            del body
            # the floor any service meeting "every frame must decode" pays: the same check the
            # service runs on each frame, nothing else (no HTTP, parsing, hashing or writes)
            t0 = time.perf_counter()
            for _, jpg in frames:
                if check_frame(jpg) is None:
                    raise RuntimeError("a benchmark frame does not decode")
            decode_s = time.perf_counter() - t0
            del frames
            dst = data_dir / "copy.tar"
            t0 = time.perf_counter()
            shutil.copyfile(src, dst)
            with open(dst, "rb") as fh:
                os.fsync(fh.fileno())
            copy_s = time.perf_counter() - t0
            dst.unlink()

            stop = threading.Event()
            peak = [0]

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_kb(pid))
                    time.sleep(0.005)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()

            def stream():  # from the file, in chunks, as a headset would send it
                with open(src, "rb") as fh:
                    while block := fh.read(1 << 20):
                        yield block
            cpu0 = {name: _cpu_s(p, tree) for name, (p, tree) in procs.items()}
            t0 = time.perf_counter()
            resp = http.post(f"{url}/v1/uploads", content=stream(),
                             headers={**headers, "Content-Length": str(archive_size)})
            elapsed = time.perf_counter() - t0
            for name, (p, tree) in procs.items():
                cpu[name].append(_cpu_s(p, tree) - cpu0[name])
            stop.set()
            sampler.join()
            if resp.status_code != 201:
                raise RuntimeError(f"large upload failed: {resp.status_code} {resp.text[:200]}")
            uploads.append(elapsed)
            copies.append(copy_s)
            ratios.append(copy_s / elapsed)
            decodes.append(decode_s)
            decode_ratios.append(copy_s / decode_s)
            rss_peak = max(rss_peak, peak[0])
            src.unlink()
    up, cp = statistics.median(uploads), statistics.median(copies)
    return {"frames": kind, "frame_count": n_frames, "archive_mb": round(archive_size / 1e6, 1),
            "upload_s": round(up, 3), "copy_s": round(cp, 4),
            "upload_mb_per_s": round(archive_size / 1e6 / up, 1), "copy_mb_per_s": round(archive_size / 1e6 / cp, 1),
            "ratio_per_repeat": [round(x, 3) for x in ratios],
            "upload_s_per_repeat": [round(x, 3) for x in uploads], "first_upload_s": round(first_s, 3),
            "decode_only_s_per_repeat": [round(x, 3) for x in decodes],
            "decode_only_s": round(statistics.median(decodes), 3),
            "decode_only_mb_per_s": round(archive_size / 1e6 / statistics.median(decodes), 1),
            "ceiling_decode_only/copy": round(statistics.median(decode_ratios), 3),
            # CPU seconds during one upload (median; 10 ms ticks), against decode_only_s on one core
            "cpu_s_per_upload": {name: round(statistics.median(v), 3) for name, v in cpu.items()},
            "server_rss_mb": {"before": round(rss_before / 1024, 1), "peak_during_upload": round(rss_peak / 1024, 1),
                              "growth": round((rss_peak - rss_before) / 1024, 1)},
            "ratio": statistics.median(ratios)}


def post_batches(url: str, tokens: list[str], bodies: list[list[bytes]], attempts: int = 8,
                 max_sleep: float = 30.0) -> tuple[list[int], list[str], float]:
    """Every device (a thread) posts its upload bodies at once, retrying with backoff like the sync
    client; (acknowledged uploads per device, the errors retried, seconds)."""
    import httpx

    from shared.wire import UPLOAD_CONTENT_TYPE

    acked: list[int] = [0] * len(tokens)
    errors: list[str] = []

    def device(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            for body in bodies[i]:
                for attempt in range(attempts):
                    try:
                        r = http.post(f"{url}/v1/uploads", content=body, headers={
                            "Authorization": f"Bearer {tokens[i]}", "Content-Type": UPLOAD_CONTENT_TYPE})
                        if r.status_code in (200, 201):
                            acked[i] += 1
                            break
                        errors.append(f"{r.status_code} {r.text[:100]}")
                    except httpx.HTTPError as exc:  # e.g. a killed API process: retry, as a headset does
                        errors.append(type(exc).__name__)
                    time.sleep(min(max_sleep, 0.2 * 2 ** attempt))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked, errors, time.perf_counter() - t0


def bench_concurrent(url: str, data_dir: Path, devices: int, batches: int, per_batch: int) -> dict:
    from cloud.storage import SQLiteStorage
    from shared.wire import build_upload_archive

    tokens = [_add_device(data_dir, f"sim{i:02d}") for i in range(devices)]
    bodies = [[build_upload_archive(_scene_frames(per_batch, (d * batches + b) * per_batch))
               for b in range(batches)] for d in range(devices)]
    acked, errors, elapsed = post_batches(url, tokens, bodies, attempts=8)
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    try:
        stored = sum(s.upload_count(s.device_by_name(f"sim{i:02d}").id) for i in range(devices))
        frames = sum(s.frame_count(s.device_by_name(f"sim{i:02d}").id) for i in range(devices))
    finally:
        s.close()
    sent = devices * batches
    return {"devices": devices, "uploads_sent": sent, "uploads_acknowledged": sum(acked), "uploads_stored": stored,
            "frames_stored": frames, "frames_expected": sent * per_batch, "retries": len(errors),
            "errors": errors[:5], "seconds": round(elapsed, 2),
            "uploads_per_s": round(sent / elapsed, 1), "lost": sent - stored}


def bench_latency(work: Path, base_run: Path, journal_frames: int) -> dict:
    """A headset journals frames, syncs; a real personalisation job runs; the model is swapped in."""
    import httpx

    from device.engine import load_model
    from device.hotswap import ModelManager
    from device.journal import Journal
    from device.sync import SyncClient
    from shared.hashing import read_key
    from shared.worlds import render_scene

    data = work / "latency-data"
    token = _add_device_fresh(data, base_run)
    key = read_key(data / "signing.pub")
    server = _Server(data, "--auto-job-frames", str(journal_frames), "--base-data", "synthetic:64", "--epochs", "1",
                     "--max-steps-per-epoch", "4", "--lr", "3e-3", "--batch-size", "8", "--tolerance", "0.5")
    try:
        journal = Journal(work / "journal").start()
        for i in range(journal_frames):
            journal.submit(render_scene("forest", 9, i, 32)[0], {"frame_index": i})
            time.sleep(0.002)
        journal.close()
        boot = SyncClient(server.url, token, trust_key=key, download_dir=work / "dl", offer=lambda f: None,
                          current_version=lambda: None, log=lambda m: None)
        manager = ModelManager(load_model(boot.check_for_model(), public_key=key), public_key=key, log=lambda m: None)
        boot.stop()
        base_version = manager.active.version
        sync = SyncClient(server.url, token, trust_key=key, download_dir=work / "dl", journal=journal,
                          offer=manager.offer, current_version=lambda: manager.active.version, upload_interval=0.05,
                          log=lambda m: None).start()
        last_seq = journal_frames - 1
        while journal.uploaded_through() < last_seq:
            time.sleep(0.005)
        t_uploaded = time.time()
        deadline = time.time() + 600
        while manager.active.version == base_version:
            manager.between_frames()
            if time.time() > deadline:
                raise RuntimeError("no new model within 600 s")
            time.sleep(0.005)
        t_serving = time.time()
        sync.stop()
        headers = {"Authorization": f"Bearer {token}"}
        job = httpx.get(f"{server.url}/v1/jobs", headers=headers).json()[0]
    finally:
        server.stop()
    st = job["progress"].get("stages", {})
    dev = {e["event"]: e["t"] for e in sync.stats.timeline}
    # the job is queued by the upload request itself (auto-job) before the headset sees the ack:
    # the clock starts at whichever came first
    t_uploaded = min(t_uploaded, job["created"])
    marks = [("last upload acknowledged -> job queued", t_uploaded, job["created"]),
             ("queued -> worker started", job["created"], job["started"]),
             ("training + gate", st.get("training", job["started"]), st.get("exporting")),
             ("ONNX export + signing", st.get("exporting"), job["finished"]),
             ("push (event reaches the device)", job["finished"], dev.get("event")),
             ("download + verify", dev.get("event"), dev.get("downloaded")),
             ("hot-swap (load, warm, swap)", dev.get("downloaded"), t_serving)]
    stages = {name: (round(b - a, 3) if a is not None and b is not None else None) for name, a, b in marks}
    return {"seconds": round(t_serving - t_uploaded, 2), "stages_s": stages, "job_state": job["state"],
            "new_version": job["result_version"], "frames": job["frames"],
            "note": "tiny model and budget (32x32, 1 epoch of 4 steps): the stages' split, not the training time, "
                    "is what carries over"}


def _add_device_fresh(data: Path, base_run: Path) -> str:
    from cloud.services import Services
    from cloud.settings import Settings

    services = Services.open(Settings(data_dir=data, worker=False))
    try:
        services.registry.import_base(base_run, version="base-v1")
    finally:
        services.storage.close()
    return _add_device(data, "headset")


def _scale(work: Path, base_run: Path, args: argparse.Namespace) -> dict:
    from hmd import bench_cloud_scale

    why = None if args.scale else "--no-scale"
    why = why or bench_cloud_scale.available()
    if why:
        return {"skipped": why}
    return bench_cloud_scale.run_scale(work, base_run, args, sys.modules[__name__])


def run(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hmd-bench-cloud-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base_run = work / "base-run"
        train(TrainConfig(data="synthetic:64", size=32, epochs=1, max_steps_per_epoch=2, width=8, decoder_width=16),
              base_run, log=lambda s: None)
        data = work / "data"
        token = _add_device_fresh(data, base_run)
        limit = str(int(args.upload_mb * 1e6 * 1.5) + 1_000_000)
        server = _Server(data, "--auto-job-frames", "0", "--max-upload-bytes", limit, "--no-worker",
                         env={"HMD_CLOUD_MAX_FRAMES_PER_UPLOAD": "100000"})  # ~5000 camera frames in 48 MB
        try:
            upload = bench_upload(server.url, token, server.proc.pid, data, args.upload_mb, args.repeats, "camera")
            noise = bench_upload(server.url, token, server.proc.pid, data, args.upload_mb, args.repeats, "noise")
            concurrent = bench_concurrent(server.url, data, args.devices, args.batches, args.frames_per_batch)
        finally:
            server.stop()
        latency = None if args.skip_latency else bench_latency(work, base_run, args.journal_frames)
        scale = _scale(work, base_run, args)
        result = {
            "ratios": {"upload/copy throughput": round(upload.pop("ratio"), 3),
                       "upload/decode-ceiling": round(upload["decode_only_s"] / upload["upload_s"], 3),
                       **({"upload/decode-ceiling, postgresql+s3": scale["upload/decode-ceiling"],
                           "api-2/api-1": scale["api-2/api-1"]} if "api-2/api-1" in scale else {}),
                       "upload/copy throughput, noise JPEGs (worst case)": round(noise.pop("ratio"), 3),
                       # what "every frame must decode" alone allows: decode time vs copy time
                       "ceiling: decode-only/copy throughput": upload["ceiling_decode_only/copy"]},
            "lost_uploads": concurrent["lost"],
            "upload": upload,
            "upload_noise_jpegs": noise,
            "concurrent_devices": concurrent,
            "upload_to_serving": latency,
            "scale": scale,
            "command": "hmd bench cloud " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "hmd bench cloud",
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
