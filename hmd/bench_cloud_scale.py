"""The scaled cloud measured by `hmd bench cloud` (issue 15): the same large upload on
PostgreSQL + S3 (moto's S3 server, a real HTTP API on 127.0.0.1) as on the embedded SQLite +
folder; one API process against two on the same concurrent upload load; and a round in which an
API process and a job worker are SIGKILLed while devices upload and jobs run, counting what was
lost. Every figure is a ratio or a count from one run, side by side."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cloud.throwaway import S3_ENV, PostgresServer, S3Server, postgres_available, s3_available

KILL_RUNNER = "hmd.bench_soak:resign_job"  # no training: the queue, leases and versions are what is measured


def available() -> str | None:
    return postgres_available() or s3_available()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_processes(proc: subprocess.Popen, n: int, timeout: float = 180.0) -> None:
    """`serve --workers N`: until N API children run (each takes a while to import)."""
    deadline = time.time() + timeout
    while len(_children(proc.pid)) < n:
        if time.time() > deadline:
            raise RuntimeError(f"{n} API processes did not start")
        time.sleep(0.2)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every core together, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _load(bench, url: str, tokens: list[str], bodies: list[list[bytes]]) -> dict:
    busy0, total0 = _cpu_jiffies()
    acked, errors, elapsed = bench.post_batches(url, tokens, bodies, attempts=12, max_sleep=5.0)
    busy1, total1 = _cpu_jiffies()
    sent = sum(len(b) for b in bodies)
    # how busy the whole machine was (API processes, PostgreSQL, the S3 server and this load
    # generator share its cores): near 1, a second API process has no idle core to run on
    return {"uploads_sent": sent, "uploads_acknowledged": sum(acked), "seconds": round(elapsed, 2),
            "uploads_per_s": round(sent / elapsed, 2), "retried_errors": len(errors),
            "machine_busy_fraction": round((busy1 - busy0) / max(1, total1 - total0), 3)}


def run_scale(work: Path, base_run: Path, args, bench) -> dict:
    """``bench``: the hmd.bench_cloud module (its server wrapper, upload bench and frame makers;
    passed in, not imported, so the two modules do not import each other)."""
    from cloud.keys import new_token, token_sha256
    from cloud.services import Services
    from cloud.settings import Settings

    server_cls, add_upload_bench, _scene_frames = bench._Server, bench.bench_upload, bench._scene_frames

    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    with PostgresServer(fsync=True) as pg, S3Server() as s3:
        db = pg.new_database("bench")
        env = {"HMD_CLOUD_DATABASE_URL": db, "HMD_CLOUD_BLOB_URL": "s3://hmd-bench/blobs",
               "HMD_CLOUD_S3_ENDPOINT_URL": s3.endpoint, "HMD_CLOUD_MAX_FRAMES_PER_UPLOAD": "100000", **S3_ENV}
        data = work / "scale-data"
        settings = Settings(data_dir=data, database_url=db, blob_url=env["HMD_CLOUD_BLOB_URL"],
                            s3_endpoint_url=s3.endpoint, worker=False)
        services = Services.open(settings)
        storage = services.storage
        try:
            services.registry.import_base(base_run, version="base-v1")
            tokens = {}
            for name in ["headset", *[f"sim{i:02d}" for i in range(args.devices)]]:
                tokens[name] = new_token(name)
                storage.add_device(name, token_sha256(tokens[name]))

            # 1. the large upload against its decode-only ceiling, as on the embedded back-end
            limit = str(int(args.upload_mb * 1e6 * 1.5) + 1_000_000)
            server = server_cls(data, "--auto-job-frames", "0", "--max-upload-bytes", limit, "--no-worker", env=env)
            try:
                upload = add_upload_bench(server.url, tokens["headset"], server.proc.pid, data, args.upload_mb,
                                          args.repeats, "camera", {"s3 (moto)": s3.proc.pid, "postgresql": pg.proc.pid})
            finally:
                server.stop()

            # 2. one API process against two, the same load (new content each round), side by side
            sims = [tokens[f"sim{i:02d}"] for i in range(args.devices)]
            per = args.frames_per_batch
            rounds = {}
            for n, seed in ((1, 0), (2, 1), (1, 2), (2, 3)):
                bodies = [[_body(_scene_frames, per, ((seed * args.devices + d) * args.batches + b) * per)
                           for b in range(args.batches)] for d in range(args.devices)]
                server = server_cls(data, "--auto-job-frames", "0", "--no-worker", "--workers", str(n), env=env)
                try:
                    _wait_processes(server.proc, n) if n > 1 else None
                    rounds.setdefault(n, []).append(_load(bench, server.url, sims, bodies))
                finally:
                    server.stop()
            per_s = {n: sum(r["uploads_per_s"] for r in rs) / len(rs) for n, rs in rounds.items()}

            # 3. kills: two API processes and two workers; one of each is SIGKILLed mid-run
            kills = _kill_round(bench, data, env, storage, tokens, args)
        finally:
            storage.close()
    return {"upload/decode-ceiling": round(upload["decode_only_s"] / upload["upload_s"], 3), "upload": upload,
            "api-2/api-1": round(per_s[2] / per_s[1], 3), "api_rounds": {str(k): v for k, v in rounds.items()},
            "machine_busy_fraction_with_1_api_process": round(sum(r["machine_busy_fraction"] for r in rounds[1])
                                                              / len(rounds[1]), 3),
            "killed": kills, "database": "PostgreSQL (fsync on)", "blobs": "S3 HTTP API (moto server, 127.0.0.1)"}


def _body(make, n: int, start: int) -> bytes:
    from shared.wire import build_upload_archive

    return build_upload_archive(make(n, start))


def _kill_round(bench, data: Path, env: dict, storage, tokens: dict, args) -> dict:
    server_cls, _scene_frames = bench._Server, bench._scene_frames
    kill_env = {**env, "HMD_CLOUD_RUNNER": KILL_RUNNER, "HMD_CLOUD_JOB_LEASE_S": "3"}
    per = args.frames_per_batch
    sims = [tokens[f"sim{i:02d}"] for i in range(args.devices)]
    bodies = [[_body(_scene_frames, per, 10_000_000 + (d * args.batches + b) * per) for b in range(args.batches)]
              for d in range(args.devices)]
    def stored_uploads() -> int:
        return sum(storage.upload_count(storage.device_by_name(f"sim{i:02d}").id) for i in range(args.devices))
    before = stored_uploads()  # the api-2/api-1 rounds' uploads, by the same devices
    server = server_cls(data, "--auto-job-frames", str(per), "--no-worker", "--workers", "2", env=kill_env)

    def worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hmd", "cloud", "worker", "--data-dir", str(data), "-q"],
                                env={**os.environ, **kill_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = [worker(), worker()]
    killed = {"api_processes": 0, "workers": 0}
    try:
        _wait_processes(server.proc, 2)
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(_load(bench, server.url, sims, bodies)))
        loader.start()
        time.sleep(2.0)
        victim = _children(server.proc.pid)[0]  # uvicorn's supervisor starts a new one in its place
        os.kill(victim, signal.SIGKILL)
        killed["api_processes"] += 1
        deadline = time.time() + 120
        while not any(j.state == "running" for j in storage.jobs()) and time.time() < deadline:
            time.sleep(0.05)
        workers[0].send_signal(signal.SIGKILL)  # mid-job (or as close as the load allows)
        workers[0].wait()
        killed["workers"] += 1
        workers[0] = worker()
        loader.join()
        deadline = time.time() + 300  # drain: every job ends (leases of the dead expire meanwhile)
        while any(j.state in ("queued", "running") for j in storage.jobs()) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
        server.stop()
    jobs = storage.jobs()
    stored = stored_uploads() - before
    versions = [r for r in storage._query("SELECT job_id, COUNT(*) FROM versions WHERE job_id IS NOT NULL "  # noqa: SLF001
                                         "GROUP BY job_id")]
    return {**killed, "uploads_acknowledged": result.get("uploads_acknowledged"), "uploads_stored": stored,
            "uploads_lost": result.get("uploads_acknowledged", 0) - stored,
            "jobs": len(jobs), "jobs_lost": sum(j.state in ("queued", "running") for j in jobs),
            "jobs_accepted": sum(j.state == "accepted" for j in jobs),
            "jobs_failed": sum(j.state == "failed" for j in jobs),
            "jobs_rerun_after_a_kill": sum(j.attempts > 1 for j in jobs),
            "jobs_completed_twice": sum(int(r[1]) > 1 for r in versions),
            "retried_errors": result.get("retried_errors")}
