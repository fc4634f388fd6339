"""The short fault soak: 3 simulated headsets against a real server process that is SIGKILLed and
restarted mid-upload, starts with a full quota, and gets every bad-input class."""
from __future__ import annotations

import argparse
import json

from hmd import bench_soak


def test_short_soak_loses_nothing_and_leaves_nothing(tmp_path, capsys):
    args = argparse.Namespace(headsets=3, seconds=12.0, kills=1, fps=3.0, quota_bytes=20_000,
                              base_run=str(bench_soak.ROOT / "hmd" / "assets" / "base-studio"),
                              work=str(tmp_path / "soak"), out=str(tmp_path / "soak.json"))
    assert bench_soak.run(args) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["frames_journaled"] >= 10 and report["frames_lost"] == 0, report
    assert report["orphan_files_after_restart"] == 0 and report["jobs_lost"] == 0, report
    assert report["uploads_acknowledged"] > 0 and report["refused_batches"] == 0, report
    assert report["quota_phase_failures"] > 0, report  # the full quota answered 507 and the headsets kept their frames
    assert report["server_peak_rss_mb"] > 0
    for name, status in report["bad_inputs"].items():
        assert isinstance(status, int) and 400 <= status < 500 or name == "too large", (name, status)
