#!/usr/bin/env python
"""Coverage-guided fuzzing (atheris / libFuzzer) of the cloud's upload parser.

Each input is one of (first byte mod 3):
  0  a raw request body, parsed exactly as ``POST /v1/uploads`` parses it (tar stream, index.json,
     every frame's JPEG check), against a throw-away blob store;
  1  an archive built from the input: a fuzzed index.json and one fuzzed frame, so the mutations
     reach the index and frame checks behind a well-formed tar;
  2  one frame given to the JPEG header parser and the frame check.
Every input must end in an accepted upload or an :class:`UploadRejected` 4xx; anything else (an
exception, a 5xx without a storage fault) is a crash, written as ``crash-*`` and failing the run.

    python scripts/fuzz_upload.py -max_total_time=60 tests/fuzz_corpus/upload   # what CI runs (copy the corpus)
    python scripts/fuzz_upload.py -max_total_time=3600 -jobs=2 CORPUS_COPY      # longer, on demand
    python scripts/fuzz_upload.py --make-corpus tests/fuzz_corpus/upload         # rewrite the seed corpus
"""
from __future__ import annotations

import json
import queue
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris  # noqa: E402
import cv2  # noqa: E402,F401  (the libraries first, uninstrumented: only the parsing code is traced)
import numpy  # noqa: E402,F401
import pydantic  # noqa: E402,F401
import simplejpeg  # noqa: E402,F401

from cloud.blobs import LocalBlobStore  # noqa: E402
import cloud.storage  # noqa: E402,F401
import shared.errors  # noqa: E402,F401

sys.modules.pop("tarfile", None)
with atheris.instrument_imports(include=["tarfile", "cloud.ingest", "shared.wire"]):
    import tarfile  # noqa: E402
    import cloud.ingest as ingest
    import shared.wire as wire

WORK = Path(tempfile.mkdtemp(prefix="hmd-fuzz-"))
BLOBS = LocalBlobStore(WORK / "blobs")
LIMITS = dict(max_frames=64, max_frame_bytes=1 << 20, max_pixels=4096 * 4096, max_meta_bytes=4096)


def parse_body(body: bytes) -> None:
    q: queue.Queue = queue.Queue()
    for i in range(0, len(body), 4096):
        q.put(body[i:i + 4096])
    q.put(None)
    parser = ingest._Parser(q, BLOBS, WORK / "spool", **LIMITS)
    try:
        received = parser._parse()
    except ingest.UploadRejected as exc:
        if exc.status >= 500:
            raise AssertionError(f"a 5xx for a client's input: {exc.status} {exc.detail}") from None
        return
    finally:
        parser.cleanup()
    assert received.rows and len(received.rows) == len(received.index.frames)


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        parse_body(rest)
    elif mode == 1:
        fdp = atheris.FuzzedDataProvider(rest)
        index = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        frame = fdp.ConsumeBytes(fdp.remaining_bytes())
        parse_body(wire.tar_members([(wire.INDEX_NAME, index), ("frames/0000000000.jpg", frame)]))
    else:
        ingest.jpeg_header(rest)
        try:
            ingest.check_frame(rest, LIMITS["max_pixels"])
        except ingest.UploadRejected as exc:
            assert exc.status == 400


def make_corpus(folder: Path) -> None:
    """Seed inputs: valid uploads, and one of each bad-input class the service refuses."""
    import hashlib

    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (24, 32, 3), np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    prog = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    frames = [({"seq": i, "width": 32, "height": 24, "reason": "every-k"}, d) for i, d in enumerate((jpg, prog))]
    valid = wire.build_upload_archive(frames, 0, 1)
    index = json.dumps({"format": 1, "frames": [{"file": "frames/0000000000.jpg", "sha256":
                                                 hashlib.sha256(jpg).hexdigest(), "bytes": len(jpg)}]}).encode()
    seeds = {
        "valid-upload": b"\0" + valid,
        "truncated-upload": b"\0" + valid[: len(valid) // 2],
        "png-frame": b"\0" + wire.tar_members([("index.json", index.replace(hashlib.sha256(jpg).hexdigest().encode(),
                                                                    hashlib.sha256(png).hexdigest().encode())),
                                         ("frames/0000000000.jpg", png)]),
        "index-and-frame": b"\1" + bytes([0, 0, 0, len(index) & 0xFF]) + index + jpg,
        "jpeg": b"\2" + jpg,
        "progressive-jpeg": b"\2" + prog,
        "half-jpeg-with-eoi": b"\2" + jpg[: len(jpg) // 2] + b"\xff\xd9",
        "png": b"\2" + png,
    }
    for name, data in seeds.items():
        (folder / name).write_bytes(data)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        sys.exit(0)
    try:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
