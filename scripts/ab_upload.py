"""Two settings of the scaled cloud side by side: the large upload of `hmd bench cloud` (one
unmeasured upload, then the median of N) on PostgreSQL + S3 (throwaway servers, as the bench
starts them), a fresh `hmd cloud serve` per run, the two settings alternating, K pairs.

    python scripts/ab_upload.py --a HMD_CLOUD_S3_MULTIPART_MB=0 --b HMD_CLOUD_S3_MULTIPART_MB=64 --mb 48 --pairs 4
    python scripts/ab_upload.py --a HMD_CLOUD_EARLY_TRANSACTION=1 --b HMD_CLOUD_EARLY_TRANSACTION=0 --uploads 8

Prints one JSON line per run and a summary: each setting's upload/decode-ceiling ratios, their
mean, and the CPU seconds one upload cost the API server, moto and PostgreSQL."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("HMD_CLOUD_"):
            raise SystemExit(f"ab_upload: {item!r} is not HMD_CLOUD_NAME=VALUE")
        out[name] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", required=True, metavar="HMD_CLOUD_NAME=VALUE", help="the first setting")
    parser.add_argument("--b", nargs="+", required=True, metavar="HMD_CLOUD_NAME=VALUE", help="the second setting")
    parser.add_argument("--mb", type=float, default=4.0, help="size of each upload (4 MB)")
    parser.add_argument("--uploads", type=int, default=3, help="measured uploads per run (the median is taken)")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    variants = {"a": _env(args.a), "b": _env(args.b)}

    from cloud.keys import new_token, token_sha256
    from cloud.services import Services
    from cloud.settings import Settings
    from cloud.throwaway import S3_ENV, PostgresServer, S3Server, postgres_available, s3_available
    from hmd import bench_cloud as bench

    why = postgres_available() or s3_available()
    if why:
        raise SystemExit(f"ab_upload: {why}")
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    work = Path(tempfile.mkdtemp(prefix="hmd-ab-upload-"))
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with PostgresServer(fsync=True) as pg, S3Server() as s3:
        db = pg.new_database("ab")
        env = {"HMD_CLOUD_DATABASE_URL": db, "HMD_CLOUD_BLOB_URL": "s3://hmd-ab/blobs",
               "HMD_CLOUD_S3_ENDPOINT_URL": s3.endpoint, "HMD_CLOUD_MAX_FRAMES_PER_UPLOAD": "100000", **S3_ENV}
        data = work / "data"
        services = Services.open(Settings(data_dir=data, database_url=db, blob_url=env["HMD_CLOUD_BLOB_URL"],
                                          s3_endpoint_url=s3.endpoint, worker=False))
        try:
            services.registry.import_base(Path(__file__).resolve().parents[1] / "hmd" / "assets" / "base-studio",
                                          version="base-v1")
            for pair in range(args.pairs):
                for name, setting in variants.items():
                    device = f"ab-{pair}-{name}"  # a new device each run: its uploads are new, never repeats
                    token = new_token(device)
                    services.storage.add_device(device, token_sha256(token))
                    server = bench._Server(data, "--auto-job-frames", "0", "--no-worker", "--max-upload-bytes",
                                           str(int(args.mb * 2e6) + 1_000_000), env={**env, **setting})
                    try:
                        up = bench.bench_upload(server.url, token, server.proc.pid, data, args.mb, args.uploads,
                                                "camera", {"s3 (moto)": s3.proc.pid, "postgresql": pg.proc.pid})
                    finally:
                        server.stop()
                    run = {"pair": pair, "setting": name, **setting,
                           "upload/decode-ceiling": round(up["decode_only_s"] / up["upload_s"], 3),
                           "upload_s": up["upload_s"], "decode_only_s": up["decode_only_s"],
                           "cpu_s_per_upload": up["cpu_s_per_upload"]}
                    runs[name].append(run)
                    print(json.dumps(run), flush=True)
        finally:
            services.storage.close()
    summary = {}
    for name, rs in runs.items():
        ratios = [r["upload/decode-ceiling"] for r in rs]
        cpu = {k: [r["cpu_s_per_upload"][k] for r in rs] for k in rs[0]["cpu_s_per_upload"]}
        summary[name] = {"setting": variants[name], "upload/decode-ceiling": ratios,
                         "mean": round(statistics.mean(ratios), 3), "cpu_s_per_upload": cpu}
    print(json.dumps({"mb": args.mb, "uploads": args.uploads, "pairs": args.pairs, **summary}))


if __name__ == "__main__":
    main()
