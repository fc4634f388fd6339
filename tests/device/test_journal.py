import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.capture import ArraySource
from device.journal import Journal, JournalSampler
from device.runtime import HeadsetRuntime, RuntimeConfig
from tests.device.conftest import ROOT, gray_frames


def _noise(i, size=(48, 64)):
    return np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_sampler_every_k_and_on_scene_change():
    s = JournalSampler(every=10, scene_threshold=0)
    assert [i for i in range(35) if s.reason(gray_frames([100])[0])] == [0, 10, 20, 30]
    s = JournalSampler(every=0, scene_threshold=0.1)
    frames = gray_frames([100, 101, 102, 200, 201, 100])
    assert [s.reason(f) for f in frames] == ["scene-change", None, None, "scene-change", None, "scene-change"]


def test_frames_and_index_lines_are_written_and_readable(tmp_path):
    j = Journal(tmp_path / "j").start()
    for i in range(5):
        assert j.submit(_noise(i), {"frame_index": i, "model_version": "v1"})
    j.close()
    entries = j.entries()
    assert [e["seq"] for e in entries] == list(range(5)) and j.written == 5
    img = cv2.imread(str(tmp_path / "j" / entries[2]["file"]))
    assert img.shape == (48, 64, 3)
    assert np.abs(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(int) - _noise(2)).mean() < 60  # JPEG of that frame
    assert entries[2]["model_version"] == "v1" and entries[2]["width"] == 64
    assert json.loads((tmp_path / "j" / "journal.json").read_text())["format"] == 1


def test_disk_budget_evicts_oldest_first(tmp_path):
    j = Journal(tmp_path / "j", max_bytes=60_000, queue_size=64).start()  # noise JPEGs of 48x64 are ~7 KB
    for i in range(40):
        j.submit(_noise(i), {"i": i})
    j.close()
    entries = j.entries()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "j").rglob("*") if p.is_file() and p.name != "journal.json")
    assert on_disk <= 60_000 + 200  # journal.json aside
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(40 - len(seqs), 40)) and 3 <= len(seqs) < 40  # the newest survive
    assert j.evicted == 40 - len(seqs) and j.overflow == 0


def test_a_full_queue_drops_frames_and_counts_them_without_blocking(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j", queue_size=2)
    gate = threading.Event()
    real_write = j._write
    monkeypatch.setattr(j, "_write", lambda *a: (gate.wait(10), real_write(*a)))  # a stalled disk
    j.start()
    t0 = time.perf_counter()
    results = [j.submit(_noise(i), {}) for i in range(20)]
    assert time.perf_counter() - t0 < 0.5  # never blocks the frame loop
    gate.set()
    j.close()
    assert j.overflow == results.count(False) >= 17 and j.written == results.count(True)


def test_pending_batches_and_mark_uploaded(tmp_path):
    j = Journal(tmp_path / "j").start()
    for i in range(7):
        j.submit(_noise(i), {"i": i})
    j.close()
    reader = Journal(tmp_path / "j")  # a sync client needs no writer thread
    batches = reader.pending_batches(max_frames=3)
    assert [[e["seq"] for e in b.entries] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    loaded = batches[0].load()
    assert len(loaded) == 3 and loaded[0][1][:2] == b"\xff\xd8"  # JPEG bytes
    with pytest.raises(ValueError, match="oldest first"):
        reader.mark_uploaded(batches[1])
    reader.mark_uploaded(batches[0])
    reader.mark_uploaded(batches[0])  # idempotent
    assert [b.first_seq for b in reader.pending_batches(max_frames=3)] == [3, 6]
    assert json.loads((tmp_path / "j" / "uploaded.json").read_text()) == {"through_seq": 2}
    # a restart continues the sequence and keeps the upload mark
    j2 = Journal(tmp_path / "j").start()
    j2.submit(_noise(9), {})
    j2.close()
    assert [e["seq"] for e in j2.entries()][-1] == 7
    assert [e["seq"] for b in j2.pending_batches(10) for e in b.entries] == [3, 4, 5, 6, 7]


def test_recovery_skips_torn_lines_and_removes_orphan_jpegs(tmp_path):
    j = Journal(tmp_path / "j").start()
    for i in range(3):
        j.submit(_noise(i), {})
    j.close()
    root = tmp_path / "j"
    (root / "frames" / "0000000003.jpg").write_bytes(b"\xff\xd8 jpeg whose line never came")
    with open(root / "index" / "000000.jsonl", "ab") as fh:
        fh.write(b'{"seq": 4, "file": "frames/00')  # a crash mid-line
    (root / "frames" / ".0000000005.jpg.x.tmp").write_bytes(b"half")
    assert [e["seq"] for e in Journal(root).entries()] == [0, 1, 2]
    j = Journal(root).start()
    j.submit(_noise(5), {})
    j.close()
    assert sorted(p.name for p in (root / "frames").iterdir()) == [f"{i:010d}.jpg" for i in (0, 1, 2, 4)]
    assert [e["seq"] for e in j.entries()] == [0, 1, 2, 4]  # seq 3 was used once: never reused


def test_runtime_journals_every_kth_frame_only_when_asked(toy, tmp_path):
    frames = [_noise(i) for i in range(20)]
    rt = HeadsetRuntime(ArraySource(frames), toy("v1"), RuntimeConfig(headless=True, lockstep=True))
    assert rt.run()["journal"] is None and not list(tmp_path.glob("j*"))
    cfg = RuntimeConfig(headless=True, lockstep=True, journal_dir=str(tmp_path / "j"), journal_every=5,
                        journal_scene_threshold=0)
    summary = HeadsetRuntime(ArraySource(frames), toy("v1"), cfg).run()
    entries = Journal(tmp_path / "j").entries()
    assert [e["frame_index"] for e in entries] == [0, 5, 10, 15]
    assert summary["journal"]["written"] == 4 and summary["journal"]["overflow"] == 0
    assert entries[0]["model_version"] == "v1" and entries[0]["outputs"]["class"] == "ring"
    assert entries[0]["reason"] == "every-k"


def test_a_killed_headset_leaves_a_readable_journal(toy, tmp_path):
    model = toy("v1")
    cmd = [sys.executable, "-m", "hmd", "device", "--source", "synthetic", "--size", "64x48", "--fps", "200",
           "--model", str(model), "--headless", "--journal", str(tmp_path / "j"), "--journal-every", "2",
           "--journal-mb", "0.2", "--duration", "60"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and len(list((tmp_path / "j" / "frames").glob("*.jpg"))
                                         if (tmp_path / "j" / "frames").is_dir() else []) < 10:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    entries = Journal(tmp_path / "j").entries()
    assert len(entries) >= 5
    for e in entries:
        data = (tmp_path / "j" / e["file"]).read_bytes()
        assert len(data) == e["bytes"]
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
    j = Journal(tmp_path / "j").start()  # and a restart picks up from it
    j.close()
    assert j.entries() == entries
