"""Where an upload's time goes inside the service, without HTTP: the upload parser over a prepared
body of camera frames (as `hmd bench cloud` makes them), then the commit, on the embedded back-end
(SQLite + the packing folder store), against the decode-only ceiling of the same frames.

    python scripts/profile_ingest.py [--mb 4] [--repeats 6]

One line per repeat, seconds: the parser's tar loop (hashing, pack writes, frames handed to the
decode pool), waiting for the pool after it, validating the index, the commit, and decode-only."""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import queue
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cloud.ingest as ingest  # noqa: E402
from cloud.blobs import LocalBlobStore  # noqa: E402
from cloud.keys import new_token, token_sha256  # noqa: E402
from cloud.storage import SQLiteStorage  # noqa: E402
from hmd.bench_cloud import _camera_frames  # noqa: E402
from shared.wire import build_upload_archive  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hmd-profile-ingest-"))
    storage = SQLiteStorage(work / "cloud.sqlite3")
    blobs = LocalBlobStore(work / "blobs")
    blobs.attach_index(storage)
    device = storage.add_device("profile", token_sha256(new_token("profile")))
    marks: dict[str, float] = {}
    wait = concurrent.futures.wait

    def timed_wait(*a, **k):  # the parser waits for its decode checks once, after its loop
        marks["loop_end"] = time.perf_counter()
        try:
            return wait(*a, **k)
        finally:
            marks["wait_end"] = time.perf_counter()
    ingest.concurrent.futures.wait = timed_wait
    for r in range(args.repeats):
        frames = _camera_frames(int(args.mb * 1e6), seed=r)
        body = build_upload_archive(frames)
        t0 = time.perf_counter()
        for _, jpg in frames:
            ingest.check_frame(jpg)
        decode = time.perf_counter() - t0
        q: queue.Queue = queue.Queue()
        for i in range(0, len(body), 65536):
            q.put(body[i:i + 65536])
        q.put(None)
        p = ingest._Parser(q, blobs, work / "spool", max_frames=100_000, max_frame_bytes=10 ** 7)
        t0 = time.perf_counter()
        received = p._parse()
        t1 = time.perf_counter()
        received.size = len(body)
        ingest.commit(received, device.id, storage, blobs)
        t2 = time.perf_counter()
        print(json.dumps({"frames": len(frames), "loop_s": round(marks["loop_end"] - t0, 3),
                          "pool_after_loop_s": round(marks["wait_end"] - marks["loop_end"], 3),
                          "validate_s": round(t1 - marks["wait_end"], 3), "commit_s": round(t2 - t1, 3),
                          "total_s": round(t2 - t0, 3), "decode_only_s": round(decode, 3),
                          "decode_only/total": round(decode / (t2 - t0), 3)}))
    storage.close()


if __name__ == "__main__":
    main()
