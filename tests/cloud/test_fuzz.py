"""Bounded fuzzing in CI: the atheris harness of the upload parser (scripts/fuzz_upload.py) runs
for a fixed budget from the seed corpus in the repository and must find no crash.

HMD_FUZZ_SECONDS sets the budget (default 60); longer runs: see the script's docstring."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz_corpus" / "upload"


@pytest.mark.slow(seconds=60)
def test_upload_parser_fuzzing_finds_no_crash(tmp_path):
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("HMD_FUZZ_SECONDS", "60"))
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)  # the fuzzer adds what it finds to a copy, never to the repository
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_upload.py"), f"-max_total_time={seconds}",
                           "-rss_limit_mb=2048", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(corpus)],
                          cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))[-3000:]
    assert proc.returncode == 0, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*")), tail
    runs = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert runs and int(runs[-1].split()[1]) > 100, tail  # it really ran
