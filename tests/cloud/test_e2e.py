"""End to end over real HTTP: `hmd cloud serve` in its own process on 127.0.0.1, driven the way a
headset drives it (journal -> sync uploads -> automatic GREAT personalisation job -> signed new
version -> event -> download, verification, hot-swap in the device runtime); then a restart in
the middle of a job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from device.journal import Journal
from device.sync import SyncClient
from shared.hashing import unb64
from shared.worlds import render_scene
from tests.cloud.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def hmd(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hmd", *args], cwd=ROOT, env={**os.environ, **(env or {})}, **kw)


def add_device(data_dir: Path, name: str) -> tuple[str, bytes]:
    out = subprocess.run([sys.executable, "-m", "hmd", "cloud", "add-device", name, "--data-dir", str(data_dir)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["token"], unb64(fields["trust-key"])


class Server:
    def __init__(self, data_dir: Path, *flags: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log or data_dir.parent / f"server-{self.port}.log", "wb")
        self.proc = hmd("cloud", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port",
                        str(self.port), *flags, env={"OMP_NUM_THREADS": "2", **(env or {})},
                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, timeout=60, interval=0.2, what=f"the server on {self.url}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:  # a crash: no shutdown code runs
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.mark.slow(seconds=30)
def test_headset_round_trip_with_real_training(data_dir, tmp_path):
    from device.engine import load_model
    from device.hotswap import ModelManager

    token, trust_key = add_device(data_dir, "wearer1")
    assert trust_key == unb64((data_dir / "signing.pub").read_text())
    journal = Journal(tmp_path / "journal").start()
    for i in range(20):  # the wearer's world differs from the base training world
        assert journal.submit(render_scene("forest", 11, i, 32)[0], {"frame_index": i, "reason": "every-k"})
        time.sleep(0.003)
    journal.close()

    server = Server(data_dir, "--auto-job-frames", "20", "--base-data", "synthetic:64", "--epochs", "1",
                    "--max-steps-per-epoch", "4", "--lr", "3e-3", "--batch-size", "8", "--tolerance", "0.5")
    sync = None
    try:
        # the headset starts on the base version, fetched and verified like any other
        boot = SyncClient(server.url, token, trust_key=trust_key, download_dir=tmp_path / "models",
                          offer=lambda folder: None, current_version=lambda: None, log=lambda m: None)
        base_folder = boot.check_for_model()
        boot.stop()
        manager = ModelManager(load_model(base_folder, public_key=trust_key), public_key=trust_key,
                               log=lambda m: None)
        assert manager.active.version == "base-v1"

        sync = SyncClient(server.url, token, trust_key=trust_key, download_dir=tmp_path / "models", journal=journal,
                          offer=manager.offer, current_version=lambda: manager.active.version, upload_interval=0.2,
                          backoff_initial=0.2, backoff_max=1.0, log=lambda m: None).start()
        wait_for(lambda: journal.uploaded_through() == 19, timeout=20, what="the upload")
        headers = {"Authorization": f"Bearer {token}"}
        jobs = wait_for(lambda: httpx.get(f"{server.url}/v1/jobs", headers=headers).json(), what="a job")
        job_id = jobs[0]["job_id"]

        def swapped():
            manager.between_frames()  # what the frame loop does before each frame
            return manager.active.version != "base-v1"
        wait_for(swapped, timeout=150, interval=0.2, what="the personalised model to be swapped in")
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()
        assert job["state"] == "accepted", job
        assert manager.active.version == job["result_version"]
        assert job["evaluation"]["wearer"]["after"] and job["evaluation"]["base"]["after"]
        assert job["evaluation"]["wearer_score"] < 0
        assert manager.active.manifest.parent_version == "base-v1"
        assert sync.stats.models_offered == 1 and sync.stats.uploaded_frames == 20
        assert httpx.get(f"{server.url}/v1/models/current", headers=headers).json()["version"] == job["result_version"]
    finally:
        if sync is not None:
            sync.stop()
        server.stop()


def test_restart_in_the_middle_of_a_job_resumes_it(data_dir, tmp_path):
    from tests.cloud.conftest import jpeg_frames
    from shared.wire import build_upload_archive

    token, _ = add_device(data_dir, "wearer1")
    headers = {"Authorization": f"Bearer {token}"}
    env = {"HMD_CLOUD_RUNNER": "tests.cloud.fakes:slow_job", "HMD_TEST_FIRST_ATTEMPT_SECONDS": "120",
           "HMD_CLOUD_AUTO_JOB_FRAMES": "4"}
    server = Server(data_dir, env=env)
    try:
        r = httpx.post(f"{server.url}/v1/uploads", content=build_upload_archive(jpeg_frames(4)),
                       headers={**headers, "Content-Type": "application/x-tar"})
        job_id = r.json()["job_id"]
        wait_for(lambda: httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()["state"] == "running",
                 what="the job to start")
        wait_for(lambda: (data_dir / f"attempt-{job_id}-1").exists(), what="the first attempt")
    finally:
        server.kill()
    server = Server(data_dir, env=env)
    try:
        job = wait_for(lambda: (j := httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json())["state"]
                       == "accepted" and j, timeout=30, what="the re-run")
        assert job["attempts"] == 2 and (data_dir / f"attempt-{job_id}-2").exists()
        assert httpx.get(f"{server.url}/v1/models/current", headers=headers).json()["version"] == job["result_version"]
        assert len(httpx.get(f"{server.url}/v1/jobs", headers=headers).json()) == 1
    finally:
        server.stop()
