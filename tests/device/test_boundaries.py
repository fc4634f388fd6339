"""device/ must run on a headset: onnxruntime, OpenCV, numpy and shared/ only, never torch or models/."""
import ast

from tests.conftest import parse_source
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "models", "torchvision")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(parse_source(path)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_device_source_imports_torch_or_models():
    files = sorted((ROOT / "device").rglob("*.py"))
    assert len(files) >= 8
    offenders = [(f.name, n) for f in files for n in _imports(f) if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_device_module_loads_no_torch():
    modules = sorted(f"device.{p.stem}" for p in (ROOT / "device").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'models'))))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
