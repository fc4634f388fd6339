"""What every `hmd` command owes a user: --version, defaults in --help, descriptions, one clear
line and exit 2 on a bad start (a port in use), and the cloud's device administration
(`hmd cloud devices`, `hmd cloud rotate-token`) checked over real HTTP."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hmd import cli
from hmd.bench import BENCHES
from tests.cloud.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _hmd(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hmd", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"hmd (great-hmd) {importlib.metadata.version('great-hmd')}"


def _parsers(parser: argparse.ArgumentParser):
    """The parser and every sub-parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _command_parser(name: str) -> argparse.ArgumentParser:
    """The parser `hmd NAME` builds (what `hmd NAME --help` prints)."""
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = cli.ArgumentParser(prog=f"hmd {name}", description=cli.COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def _bench_parser(what: str) -> argparse.ArgumentParser:
    """The parser `hmd bench WHAT` builds."""
    module = importlib.import_module(BENCHES[what][0])
    parser = cli.ArgumentParser(prog=f"hmd bench {what}")
    specific = f"add_arguments_{what}"
    (getattr(module, specific) if hasattr(module, specific) else module.add_arguments)(parser)
    return parser


@pytest.mark.parametrize("name", list(cli.COMMANDS) + [f"bench {what}" for what in BENCHES])
def test_help_shows_every_default(name):
    """Every option with a default says what it is in --help, in every command and sub-command."""
    top = _bench_parser(name.split()[1]) if name.startswith("bench ") else _command_parser(name)
    for parser in _parsers(top):
        assert isinstance(parser.formatter_class(parser.prog), cli.HelpFormatter), parser.prog
        text = re.sub(r"\s+", "", parser.format_help())  # argparse wraps lines, even inside a value
        for action in parser._actions:
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.default is None
                    or action.default is False or action.default == argparse.SUPPRESS):
                continue
            shown = parser.formatter_class(parser.prog)._get_help_string(action)
            assert shown and "default" in shown, f"{parser.prog} {action.option_strings[0]}: {shown!r}"
            if "%(default)" in shown:  # the formatter's own "(default: X)": X is the real default
                shown_default = re.sub(r"\s+", "", f"(default: {action.default})")
                assert shown_default in text, f"{parser.prog} {action.option_strings[0]}"


def test_help_spot_checks():
    device = re.sub(r"\s+", " ", _command_parser("device").format_help())
    assert "--journal-mb JOURNAL_MB journal disk budget in MB (default: 64.0)" in device
    assert "(default: edges)" in device and "synthetic camera WIDTHxHEIGHT (default 320x240)" in device
    cloud = _command_parser("cloud")
    subs = {p.prog: p for p in _parsers(cloud)}
    for prog in ("hmd cloud serve", "hmd cloud add-device", "hmd cloud devices", "hmd cloud rotate-token"):
        assert subs[prog].description and len(subs[prog].description) > 60, prog
        assert subs[prog].formatter_class is cli.HelpFormatter


def test_serve_logging_one_format_and_no_onnx_chatter():
    from cloud.cli import LOG_FORMAT, configure_logging

    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        configure_logging("info")
        assert root.handlers[0].formatter._fmt == LOG_FORMAT
        assert logging.getLogger("uvicorn.error").isEnabledFor(logging.INFO)
        for name in ("onnx_ir.passes.common.unused_removal", "onnxscript.optimizer._constant_folding"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
        configure_logging("debug")
        assert logging.getLogger("onnx_ir.passes").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_serve_on_a_port_in_use_fails_first_and_creates_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _hmd("cloud", "serve", "--data-dir", tmp_path / "data", "--port", port)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"hmd cloud: error: port {port} on 127.0.0.1 is already in use "
                                        f"(another `hmd cloud serve`?): stop that one or choose another --port"]
    assert not (tmp_path / "data").exists()  # no data folder, no signing key
    (tmp_path / "file").write_text("")
    proc = _hmd("cloud", "serve", "--data-dir", tmp_path / "file", "--port", free_port())
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"hmd cloud: error: --data-dir {tmp_path / 'file'} is a file, not a folder"]


def _serve(tmp_path, data, port, **popen) -> tuple[subprocess.Popen, object]:
    """`hmd cloud serve --no-worker` in its own process, logging to tmp_path/serve.log, once it
    answers /healthz: (the process, the open log file)."""
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "hmd", "cloud", "serve", "--data-dir", str(data), "--port",
                               str(port), "--no-worker"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdout=log, stderr=subprocess.STDOUT, text=True, **popen)

    def up():
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for(up, timeout=120, interval=0.2, what="hmd cloud serve")
    except BaseException:
        server.kill()
        server.wait(20)
        log.close()
        raise
    return server, log


def test_devices_and_rotate_token_over_http(tmp_path):
    data = tmp_path / "data"
    missing = _hmd("cloud", "devices", "--data-dir", data)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"hmd cloud: error: no cloud data in {data} (`hmd cloud add-device` or `serve` creates it)")
    assert not data.exists()

    def add(name):
        out = _hmd("cloud", "add-device", name, "--data-dir", data)
        assert out.returncode == 0, out.stderr
        return dict(line.split(": ", 1) for line in out.stdout.splitlines())["token"]

    old = add("headset-1")
    add("headset-2")
    port = free_port()
    server, log = _serve(tmp_path, data, port)
    url = f"http://127.0.0.1:{port}"
    try:
        def status(token):
            return httpx.get(f"{url}/v1/models/current", headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code
        assert status(old) == 404  # authenticated; there is no base model in this data folder

        listing = _hmd("cloud", "devices", "--data-dir", data)
        assert listing.returncode == 0, listing.stderr
        rows = [line.split() for line in listing.stdout.splitlines()]
        assert rows[0] == ["NAME", "ADDED", "CURRENT", "VERSION", "UPLOADS", "FRAMES"]
        assert [r[0] for r in rows[1:]] == ["headset-1", "headset-2"]
        assert rows[1][-3:] == ["(base)", "0", "0"]

        rotated = _hmd("cloud", "rotate-token", "headset-1", "--data-dir", data)  # while the service runs
        assert rotated.returncode == 0, rotated.stderr
        new = dict(line.split(": ", 1) for line in rotated.stdout.splitlines())["token"]
        assert new != old and new.startswith("headset-1.")
        assert status(old) == 401 and status(new) == 404

        unknown = _hmd("cloud", "rotate-token", "nobody", "--data-dir", data)
        assert unknown.returncode == 2
        assert unknown.stderr.strip() == "hmd cloud: error: no device named 'nobody' (see `hmd cloud devices`)"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(20)
        log.close()
    # the service's log: one format for its own, uvicorn's and the access lines, and "serving" only
    # once it was (after the application started)
    lines = (tmp_path / "serve.log").read_text().splitlines()
    pattern = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
    assert [line for line in lines if not pattern.match(line)] == ["hmd cloud: interrupted"]
    serving = [i for i, line in enumerate(lines) if "hmd.cloud: serving" in line]
    ready = [i for i, line in enumerate(lines) if "Application startup complete" in line]
    assert len(serving) == 1 and ready and serving[0] > ready[0]
    assert f"on http://127.0.0.1:{port}" in lines[serving[0]]


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers that run something: sub-parsers' leaves, or the parser itself."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for sub in action.choices.values():
            yield from _leaf_parsers(sub)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_takes_v_and_q(name):
    parser = _command_parser(name)
    cli.add_verbosity_arguments(parser)
    for leaf in _leaf_parsers(parser):
        assert {"-v", "-q", "--verbose", "--quiet"} <= set(leaf._option_string_actions), leaf.prog


def test_int8_quality_line_is_a_readable_line():
    from models.cli_export import int8_quality_line

    quant = {"fp32_quality": {"class_error_pct": 12.5, "rmse_colour": 0.1301, "rmse_edges": 0.2, "rmse_denoised": 0.09},
             "int8_quality": {"class_error_pct": 13.75, "rmse_colour": 0.1301 - 6.4e-07, "rmse_edges": 0.2012,
                              "rmse_denoised": 0.09},
             "class_agreement_pct": 98.44}
    assert int8_quality_line(quant) == (
        "INT8 vs FP32: class error 12.50% -> 13.75% (+1.25), colour RMSE 0.1301 -> 0.1301 (+0.0000), "
        "edges RMSE 0.2000 -> 0.2012 (+0.0012), denoised RMSE 0.0900 -> 0.0900 (+0.0000), "
        "class agreement with FP32 98.4%")


def test_a_truncated_mp4_as_training_data_gives_only_our_line(tmp_path):
    """FFmpeg's own "moov atom not found" is silenced for every command, not only `hmd device`."""
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + os.urandom(3000))
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}  # set by in-process runs
    proc = subprocess.run([sys.executable, "-m", "hmd", "train", "--data", f"video:{bad}", "--out",
                           str(tmp_path / "run")], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("hmd train: error: "), proc.stderr
    assert "moov" not in proc.stderr and not (tmp_path / "run").exists()


def test_ctrl_c_ends_serve_as_interrupted_even_when_its_parent_ignored_sigint(tmp_path):
    """A process started with SIGINT ignored (a test runner's worker, nohup) still stops on Ctrl+C
    as `hmd cloud: interrupted`, exit 130: uvicorn's re-raised signal would otherwise be dropped."""
    server, log = _serve(tmp_path, tmp_path / "data", free_port(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    server.send_signal(signal.SIGINT)
    code = server.wait(20)
    log.close()
    assert code == 130
    assert (tmp_path / "serve.log").read_text().splitlines()[-1] == "hmd cloud: interrupted"
