"""Where an upload's time goes inside the service, without HTTP: the upload parser over a prepared
body of camera frames (as `hmd bench cloud` makes them), then the commit, on the embedded back-end
(SQLite + the packing folder store) or on PostgreSQL + S3 (throwaway servers, as the tests and
`hmd bench cloud` start them), against the decode-only ceiling of the same frames.

    python scripts/profile_ingest.py [--mb 4] [--repeats 6] [--backend embedded|scale]

One line per repeat, seconds: the parser's tar loop (hashing, pack writes, frames handed to the
decode pool), finishing the pack (its last write and fsync, or the start of its PUT, while the
pool decodes), waiting for the pool after that, validating the index, the commit (on an object
store: waiting for the pack's PUT, then the database transaction, or only its COMMIT where it was
opened early: "committed_early"), and decode-only."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
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


@contextlib.contextmanager
def _backend(kind: str, work: Path):
    if kind == "embedded":
        storage = SQLiteStorage(work / "cloud.sqlite3")
        blobs = LocalBlobStore(work / "blobs")
        yield storage, blobs
        storage.close()
        return
    from cloud.postgres import PostgresStorage
    from cloud.s3 import S3BlobStore
    from cloud.throwaway import S3_ENV, PostgresServer, S3Server

    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    with PostgresServer(fsync=True) as pg, S3Server() as s3:
        storage = PostgresStorage(pg.new_database("profile"))
        yield storage, S3BlobStore("s3://hmd-profile/blobs", endpoint_url=s3.endpoint)
        storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--backend", choices=("embedded", "scale"), default="embedded",
                        help="embedded: SQLite + folder; scale: PostgreSQL + S3 (moto's server)")
    parser.add_argument("--no-early-transaction", dest="early", action="store_false",
                        help="PostgreSQL: commit in one transaction at the end (HMD_CLOUD_EARLY_TRANSACTION=0)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hmd-profile-ingest-"))
    with _backend(args.backend, work) as (storage, blobs):
        blobs.attach_index(storage)
        device = storage.add_device("profile", token_sha256(new_token("profile")))
        marks: dict[str, float] = {}

        def timed(name: str, method):
            def wrapper(*a, **k):
                marks[name + "_start"] = time.perf_counter()
                try:
                    return method(*a, **k)
                finally:
                    marks[name + "_end"] = time.perf_counter()
            return wrapper
        storage.commit_upload = timed("transaction", storage.commit_upload)  # the usual commit, when it runs
        for r in range(args.repeats):
            marks.clear()
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
            prepare = getattr(storage, "prepare_upload", None) if args.early else None  # PostgreSQL: opened early
            p = ingest._Parser(q, blobs, work / "spool", max_frames=100_000, max_frame_bytes=10 ** 7,
                               prepare=None if prepare is None else functools.partial(prepare, device.id))
            p._finish_pack = timed("finish_pack", p._finish_pack)  # the loop's end: the pack's last write and fsync
            p._validate = timed("validate", p._validate)  # called once the decode pool is done
            t0 = time.perf_counter()
            received = p._parse()
            t1 = time.perf_counter()
            received.size = len(body)
            ingest.commit(received, device.id, storage, blobs)
            t2 = time.perf_counter()
            print(json.dumps({"frames": len(frames), "loop_s": round(marks["finish_pack_start"] - t0, 3),
                              "finish_pack_s": round(marks["finish_pack_end"] - marks["finish_pack_start"], 3),
                              "pool_after_s": round(marks["validate_start"] - marks["finish_pack_end"], 3),
                              "validate_s": round(marks["validate_end"] - marks["validate_start"], 3),
                              "commit_s": round(t2 - t1, 3),
                              **({"commit_before_transaction_s": round(marks["transaction_start"] - t1, 3),
                                  "transaction_s": round(marks["transaction_end"] - marks["transaction_start"], 3)}
                                 if "transaction_start" in marks else {"committed_early": True}),
                              "total_s": round(t2 - t0, 3), "decode_only_s": round(decode, 3),
                              "decode_only/total": round(decode / (t2 - t0), 3)}), flush=True)


if __name__ == "__main__":
    main()
