"""docker-compose.yml: no Docker engine runs here, so check that the file parses and that every
service's command is a real `hmd` command that `hmd`'s own argument parsers accept (or, for the
object store, a Python module that is installed); the scaled profile's shape is checked too."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    service = services()[name]
    if "command" not in service:  # an upstream image's own entry point (postgres)
        assert "build" not in service and ":" in service["image"], f"service {name}: pinned image, no command"
        return
    command = service["command"]
    assert isinstance(command, list), "commands are exec-form lists (no shell)"
    if command[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(command[2]) is not None, f"service {name}: no module {command[2]}"
        return
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


def test_scale_profile_two_apis_two_workers_one_database_and_object_store():
    data = compose()
    scale = {n: s for n, s in data["services"].items() if "scale" in s.get("profiles", [])}
    apis = {n: parse_hmd(s["command"]) for n, s in scale.items() if s.get("command", [None])[0] == "hmd"
            and s["command"][1:3] == ["cloud", "serve"]}
    workers = {n: parse_hmd(s["command"]) for n, s in scale.items() if s.get("command", [None])[0] == "hmd"
               and s["command"][1:3] == ["cloud", "worker"]}
    assert len(apis) == 2 and len(workers) == 2
    assert all(args.worker is False for args in apis.values()), "jobs run in the worker containers"
    envs = [scale[n]["environment"] for n in [*apis, *workers]]
    assert all(e == envs[0] for e in envs), "one database and one object store for all"
    db, blob, endpoint = (envs[0][k] for k in ("HMD_CLOUD_DATABASE_URL", "HMD_CLOUD_BLOB_URL",
                                               "HMD_CLOUD_S3_ENDPOINT_URL"))
    assert db.startswith("postgresql://") and "@postgres:" in db and blob.startswith("s3://")
    assert endpoint.startswith("http://s3:") and "pg_isready" in scale["postgres"]["healthcheck"]["test"]
    assert scale["s3"]["command"][-1] in endpoint  # the port the store listens on
    for name in [*apis, *workers]:  # the signing key and run folders on one shared volume
        assert scale[name]["volumes"] == ["scale-data:/data"]
    headset = parse_hmd([_VAR.sub("<token>", a) for a in scale["headset-scale"]["command"]])
    host = headset.cloud.split("//")[1].split(":")[0]
    assert host in apis and headset.headless and headset.source.startswith("synthetic")
    assert "profiles" not in data["services"]["cloud"], "the single-process service stays the default"
