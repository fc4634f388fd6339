"""Throwaway PostgreSQL and S3 servers on 127.0.0.1, for the tests and `hmd bench cloud`.

Both are the real thing over the network, started from what is installed: Debian's PostgreSQL
(``initdb``, ``postgres``; it refuses to run as root, so as root the server runs as the
``postgres`` user, and it dies with the process that started it) and moto's S3 HTTP API in server mode (``python -m moto.server``).
:func:`postgres_available`/:func:`s3_available` say why not when they cannot start.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"  # who runs the server when we are root
_LIBC = ctypes.CDLL(None, use_errno=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin_dir() -> Path | None:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    return Path(found[-1]) if found and (Path(found[-1]) / "initdb").exists() else None


def postgres_available() -> str | None:
    """None when :class:`PostgresServer` can start here, else why not."""
    if pg_bin_dir() is None:
        return "PostgreSQL's initdb/postgres are not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'great-hmd[scale]')"
    return None


def s3_available() -> str | None:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'great-hmd[scale]')"
    return None


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class PostgresServer:
    """A fresh cluster in a temporary folder, listening on 127.0.0.1:free port; trust auth for
    the local superuser ``hmd``. ``url(dbname)``; :meth:`new_database` makes an empty one."""

    def __init__(self, fsync: bool = False):
        why = postgres_available()
        if why:
            raise RuntimeError(why)
        self.bin = pg_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hmd-pg-"))
        self.data = self.root / "data"
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as PG_USER, who must own its folder
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _preexec(self, die_with_parent: bool = False):
        """In the child: become the unprivileged user (as root) and, for the server, die with us
        (a test run killed by a timeout leaves no server behind)."""
        uid_gid = (pwd.getpwnam(PG_USER).pw_uid, pwd.getpwnam(PG_USER).pw_gid) if os.geteuid() == 0 else None

        def run() -> None:
            if die_with_parent:
                _LIBC.prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG: SIGQUIT is PostgreSQL's immediate shutdown
            if uid_gid is not None:
                os.setgroups([])
                os.setgid(uid_gid[1])
                os.setuid(uid_gid[0])
        return run

    def start(self) -> "PostgresServer":
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "hmd", "--auth=trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.root, preexec_fn=self._preexec())
        log = open(self.root / "log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1",
             "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=200",
             "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "full_page_writes=off", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, preexec_fn=self._preexec(die_with_parent=True))
        log.close()
        _wait_port(self.port, self.proc, "PostgreSQL", timeout=60)
        import psycopg

        deadline = time.time() + 60
        while True:  # listening is not yet accepting connections (it may still be starting up)
            try:
                psycopg.connect(self.url(), connect_timeout=5).close()
                return self
            except psycopg.OperationalError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"PostgreSQL did not start: {(self.root / 'log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://hmd@127.0.0.1:{self.port}/{dbname}"

    def new_database(self, prefix: str = "t") -> str:
        """An empty database; its URL."""
        import psycopg

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: the data is thrown away anyway
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "hmd-test", "AWS_SECRET_ACCESS_KEY": "hmd-test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's S3 API in server mode (a separate process) on 127.0.0.1:free port. Clients need
    credentials of any value: :data:`S3_ENV`."""

    def __init__(self):
        why = s3_available()
        if why:
            raise RuntimeError(why)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **S3_ENV},
                                     preexec_fn=lambda: _LIBC.prctl(1, signal.SIGTERM))  # dies with us
        _wait_port(self.port, self.proc, "moto's S3 server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
