"""The short fault soak: 3 simulated headsets against a real server process that is SIGKILLed and
restarted mid-upload (once: when the "disk full" phase ends), starts with a full quota, has its connections cut by the proxy, gets a
large upload and an 8 MB index at once, and gets every bad-input class."""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import threading

import pytest

from hmd import bench_soak
from hmd.soak_proxy import FlakyProxy


@pytest.mark.slow(seconds=20)
def test_short_soak_loses_nothing_and_leaves_nothing(tmp_path, data_dir):
    # the session's data folder with a base version already imported: the server starts without
    # exporting one (torch) first
    shutil.copytree(data_dir, tmp_path / "soak" / "data")
    args = argparse.Namespace(headsets=3, seconds=12.0, kills=0, fps=3.0, quota_bytes=20_000,
                              cut_fraction=0.6, cut_within_kib=16, memory_uploads=1, drain_seconds=600.0,
                              base_run=str(bench_soak.ROOT / "hmd" / "assets" / "base-studio"),
                              work=str(tmp_path / "soak"), out=str(tmp_path / "soak.json"))
    assert bench_soak.run(args) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["frames_journaled"] >= 10 and report["frames_lost"] == 0, report
    assert report["frames_stored"] == report["frames_journaled"] and report["frames_still_in_journals"] == 0
    assert report["orphan_files_after_restart"] == 0 and report["jobs_lost"] == 0, report
    assert report["uploads_acknowledged"] > 0 and report["refused_batches"] == 0, report
    assert report["quota_phase_failures"] > 0, report  # the full quota answered 507 and the headsets kept their frames
    assert report["jobs_completed_twice"] == 0 and report["frames_stored_twice"] == 0, report
    cut = report["connections_cut"]
    assert cut["cut_upstream"] + cut["cut_downstream"] > 0, cut  # the proxy did cut, and nothing was lost
    assert report["memory_phase"]["large_frame_uploads"] == [201], report["memory_phase"]
    assert report["memory_phase"]["8 MB index of metadata"] == 400, report["memory_phase"]
    assert report["server_peak_rss_mb"] > 0 and report["peak_rss_over_bound"] < 1, report
    for name, status in report["bad_inputs"].items():
        assert isinstance(status, int) and 400 <= status < 500 or name == "too large", (name, status)


def test_the_proxy_forwards_or_cuts_part_way(capfd):
    """Half the connections cut at a random point: the others arrive whole; a cut one never
    delivers more than was sent, and the stats count each cut once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def echo():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # the test closed the server: done
                return

            def handle(c=conn):
                with contextlib.suppress(OSError), c:
                    while data := c.recv(65536):
                        c.sendall(data)
            threading.Thread(target=handle, daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    proxy = FlakyProxy(server.getsockname()[1], cut_fraction=0.5, upstream_cut_bytes=4096, seed=1).start()
    whole = 0
    try:
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                got = b""
                with contextlib.suppress(OSError):
                    s.sendall(b"x" * 8192)
                    while len(got) < 8192 and (data := s.recv(65536)):
                        got += data
                assert set(got) <= {ord("x")} and len(got) <= 8192
                whole += len(got) == 8192
    finally:
        proxy.stop()
        server.close()
    stats = proxy.stats
    assert stats.connections == 30 and stats.refused == 0
    assert 5 <= stats.cut_upstream + stats.cut_downstream <= 25 and whole == 30 - stats.cut_upstream - \
        stats.cut_downstream
    assert "Task was destroyed" not in capfd.readouterr().err
