"""The short fault soak: 3 simulated headsets against a real server process that is SIGKILLed and
restarted mid-upload (once: when the "disk full" phase ends), starts with a full quota, has its connections cut by the proxy, gets a
large upload and an 8 MB index at once, and gets every bad-input class."""
from __future__ import annotations

import argparse
import json

from hmd import bench_soak


def test_short_soak_loses_nothing_and_leaves_nothing(tmp_path, capsys):
    args = argparse.Namespace(headsets=3, seconds=12.0, kills=0, fps=3.0, quota_bytes=20_000,
                              cut_fraction=0.6, cut_within_kib=16, memory_uploads=1,
                              base_run=str(bench_soak.ROOT / "hmd" / "assets" / "base-studio"),
                              work=str(tmp_path / "soak"), out=str(tmp_path / "soak.json"))
    assert bench_soak.run(args) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["frames_journaled"] >= 10 and report["frames_lost"] == 0, report
    assert report["orphan_files_after_restart"] == 0 and report["jobs_lost"] == 0, report
    assert report["uploads_acknowledged"] > 0 and report["refused_batches"] == 0, report
    assert report["quota_phase_failures"] > 0, report  # the full quota answered 507 and the headsets kept their frames
    assert report["jobs_completed_twice"] == 0, report
    cut = report["connections_cut"]
    assert cut["cut_upstream"] + cut["cut_downstream"] > 0, cut  # the proxy did cut, and nothing was lost
    assert report["memory_phase"]["large_frame_uploads"] == [201], report["memory_phase"]
    assert report["memory_phase"]["8 MB index of metadata"] == 400, report["memory_phase"]
    assert report["server_peak_rss_mb"] > 0 and report["peak_rss_over_bound"] < 1, report
    for name, status in report["bad_inputs"].items():
        assert isinstance(status, int) and 400 <= status < 500 or name == "too large", (name, status)
