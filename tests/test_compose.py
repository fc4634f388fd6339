"""docker-compose.yml: no Docker engine runs here, so check that the file parses and that every
service's command is a real `hmd` command that `hmd`'s own argument parsers accept."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from hmd.cli import COMMANDS

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def parse_hmd(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` exactly as ``hmd`` would (raises SystemExit on anything it would refuse)."""
    assert argv[0] == "hmd", argv
    name = argv[1]
    assert name in COMMANDS, f"unknown hmd command {name!r}"
    parser = argparse.ArgumentParser(prog=f"hmd {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser.parse_args(argv[2:])


def services() -> dict:
    return compose()["services"]


@pytest.mark.parametrize("name", sorted(services()))
def test_every_service_runs_a_real_hmd_command(name):
    command = services()[name]["command"]
    assert isinstance(command, list), "commands are exec-form lists (no shell)"
    argv = [_VAR.sub(lambda m: f"<{m.group(1)}>", str(a)) for a in command]
    try:
        parse_hmd(argv)
    except SystemExit as exc:
        pytest.fail(f"service {name}: `{' '.join(argv)}` is not a valid hmd command (exit {exc.code})")


def test_cloud_service_has_a_volume_and_a_healthcheck():
    data = compose()
    cloud = data["services"]["cloud"]
    args = parse_hmd(cloud["command"])
    assert args.action == "serve"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in cloud["volumes"]}
    assert str(args.data_dir) in mounts and mounts[str(args.data_dir)] in data["volumes"], "named volume"
    test = " ".join(cloud["healthcheck"]["test"])
    assert "/healthz" in test and f":{args.port}/" in test


def test_headset_is_simulated_headless_recording_and_talks_to_the_cloud():
    data = compose()
    headset = data["services"]["headset"]
    argv = [_VAR.sub("<token>", a) for a in headset["command"]]
    args = parse_hmd(argv)
    assert args.source.startswith("synthetic") and args.headless and args.record
    volumes = {v.split(":")[1]: v.split(":")[0] for v in headset["volumes"]}
    assert str(Path(args.record).parent) in volumes and volumes[str(Path(args.record).parent)] in data["volumes"]
    cloud_args = parse_hmd(data["services"]["cloud"]["command"])
    assert args.cloud == f"http://cloud:{cloud_args.port}" and args.token
    assert headset["depends_on"]["cloud"]["condition"] == "service_healthy"
