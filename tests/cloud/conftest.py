"""Cloud test fixtures: one tiny base run and one registry with it imported, made once per session."""
from __future__ import annotations

import io
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import cv2
import pytest

from shared.worlds import render_scene

TINY_BASE = dict(data="synthetic:64", size=32, epochs=1, max_steps=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_frames(n: int, world: str = "forest", size: int = 32, start: int = 0) -> list[tuple[dict, bytes]]:
    """(journal-like entry, JPEG bytes) for ``n`` rendered scenes."""
    out = []
    for i in range(start, start + n):
        rgb, _ = render_scene(world, 7, i, size)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        out.append(({"seq": i, "width": size, "height": size, "reason": "every-k"}, jpg.tobytes()))
    return out


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_SESSION: dict[str, Path] = {}  # shared by every module that imports these fixtures (tests/device too)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    if "base_run" not in _SESSION:
        from models.train import TrainConfig, train

        out = tmp_path_factory.mktemp("base") / "run"
        cfg = TrainConfig(data=TINY_BASE["data"], size=TINY_BASE["size"], epochs=TINY_BASE["epochs"],
                          max_steps_per_epoch=TINY_BASE["max_steps"], width=8, decoder_width=16)
        train(cfg, out, log=lambda s: None)
        _SESSION["base_run"] = out
    return _SESSION["base_run"]


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory, base_run) -> Path:
    """A data dir with the base version imported (the one ONNX export of the unit tests)."""
    if "template" not in _SESSION:
        from cloud.services import Services
        from cloud.settings import Settings

        data = tmp_path_factory.mktemp("template") / "data"
        services = Services.open(Settings(data_dir=data, worker=False))
        try:
            services.registry.import_base(base_run, version="base-v1")
        finally:
            services.storage.close()
        _SESSION["template"] = data
    return _SESSION["template"]


@pytest.fixture
def data_dir(tmp_path, registry_template) -> Path:
    dest = tmp_path / "data"
    shutil.copytree(registry_template, dest)
    return dest


class ThreadedServer:
    """uvicorn serving an app on 127.0.0.1:free port in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def provision(data: Path, name: str) -> str:
    """Add a device straight into the data dir's database; returns its token."""
    from cloud.keys import new_token, token_sha256
    from cloud.storage import SQLiteStorage

    storage = SQLiteStorage(data / "cloud.sqlite3")
    try:
        token = new_token(name)
        storage.add_device(name, token_sha256(token))
    finally:
        storage.close()
    return token


def public_key(data: Path) -> bytes:
    from shared.hashing import read_key

    return read_key(data / "signing.pub")



# -- the scaled back-ends (issue 15): real servers, started once per session -------------------
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL on 127.0.0.1 (as the `postgres` user when we are root); skips if it cannot run."""
    from cloud.throwaway import PostgresServer, postgres_available

    why = postgres_available()
    if why:
        pytest.skip(why)
    if "pg" not in _SESSION:
        _SESSION["pg"] = PostgresServer().start()  # type: ignore[assignment]
        import atexit

        atexit.register(_SESSION["pg"].stop)  # type: ignore[attr-defined]
    return _SESSION["pg"]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API in server mode on 127.0.0.1 (a separate process); skips if not installed."""
    import os

    from cloud.throwaway import S3_ENV, S3Server, s3_available

    why = s3_available()
    if why:
        pytest.skip(why)
    if "s3" not in _SESSION:
        for k, v in S3_ENV.items():
            os.environ.setdefault(k, v)
        _SESSION["s3"] = S3Server().start()  # type: ignore[assignment]
        import atexit

        atexit.register(_SESSION["s3"].stop)  # type: ignore[attr-defined]
    return _SESSION["s3"]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Each back-end's URL for an empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cloud.sqlite3'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture(params=["file", "s3"])
def blob_url(request, tmp_path) -> tuple[str, str | None]:
    """(blob URL, S3 endpoint) of an empty store on each back-end."""
    if request.param == "file":
        return f"file://{tmp_path / 'blobs'}", None
    import secrets

    return f"s3://hmd-test-{secrets.token_hex(4)}/blobs", request.getfixturevalue("s3_server").endpoint
