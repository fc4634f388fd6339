"""The cloud's personalisation jobs on N processes (issue 15 step 4): the worker setting
(``--nproc`` / HMD_CLOUD_JOB_NPROC) reaches models.distributed.launch through the real job runner.
That 2 ranks train the 1-process candidate is tests/models/test_distributed.py's."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cloud.app import create_app
from cloud.settings import Settings
from shared.errors import UserError
from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive
from tests.cloud.conftest import jpeg_frames, provision, wait_for
from tests.models.fixtures import write_video


def test_job_nproc_comes_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    from cloud.cli import add_arguments, settings_from_args
    from hmd.cli import ArgumentParser

    monkeypatch.setenv("HMD_CLOUD_JOB_NPROC", "2")
    assert Settings.from_sources({"data_dir": tmp_path}).job_nproc == 2
    parser = ArgumentParser(prog="hmd cloud")
    add_arguments(parser)
    args = parser.parse_args(["worker", "--data-dir", str(tmp_path), "--nproc", "4"])
    assert settings_from_args(args).job_nproc == 4  # the flag wins
    monkeypatch.setenv("HMD_CLOUD_JOB_NPROC", "0")
    with pytest.raises(UserError, match="job_nproc must be >= 1"):
        Settings.from_sources({"data_dir": tmp_path})
    monkeypatch.delenv("HMD_CLOUD_JOB_NPROC")
    assert Settings.from_sources({"data_dir": tmp_path}).job_nproc == 1


def test_a_job_asks_the_launcher_for_job_nproc_processes(data_dir, tmp_path, monkeypatch):
    import models.distributed as distributed

    asked = []
    real_launch = distributed.launch

    def launch(cfg, out, nproc, **kwargs):  # records the setting, trains on one process (the 2-rank run: above)
        asked.append(nproc)
        return real_launch(cfg, out, 1, **kwargs)

    monkeypatch.setattr(distributed, "launch", launch)
    token = provision(data_dir, "alice")
    replay = f"video:{write_video(tmp_path / 'replay.avi', frames=40, size=32)}"  # unlabelled, as the wearer's frames
    # tolerance -1: a gate no candidate passes, so the job ends without an ONNX export (not what is tested)
    settings = Settings(data_dir=data_dir, auto_job_frames=12, job_nproc=2, base_data=replay, epochs=1,
                        max_steps_per_epoch=1, batch_size=8, tolerance=-1.0)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/uploads", content=build_upload_archive(jpeg_frames(12)),
                   headers={"Authorization": f"Bearer {token}", "Content-Type": UPLOAD_CONTENT_TYPE})
        job_id = r.json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}).json())
                       ["state"] in ("accepted", "rejected", "failed") and j, timeout=120, what="the job")
    assert job["state"] == "rejected" and "worse on the base validation set" in job["reason"], job
    assert asked == [2]
