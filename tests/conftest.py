import os

import pytest

# Two cores on CI: keep torch from oversubscribing when tests run beside servers. Under
# pytest-xdist (`-n 2`, the README's test command) each worker and what it spawns gets one thread.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_THREADS = 1 if _WORKERS > 1 else 2
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


def pytest_collection_modifyitems(config, items):
    """Files with a slow test first, the slowest first (``@pytest.mark.slow(seconds=...)``), each file's
    tests kept together and in order: under pytest-xdist the long end-to-end tests then start at once
    on different workers instead of leaving one worker running the last of them alone."""
    first: dict[str, float] = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            first[item.nodeid.split("::")[0]] = max(first.get(item.nodeid.split("::")[0], 0.0),
                                                    float(mark.kwargs.get("seconds", 1)))
    items.sort(key=lambda item: -first.get(item.nodeid.split("::")[0], 0.0))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # device-only environments
        yield
        return
    torch.set_num_threads(_THREADS)
    yield


@pytest.fixture(scope="session")
def tiny_camera_run(tmp_path_factory):
    """A tiny multi-task run with the headset's camera decoder at a 4:3 size (2 training steps)."""
    from models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-camera") / "run"
    train(TrainConfig(method="great", data="synthetic:24", epochs=1, batch_size=8, size=(48, 64), width=4,
                      decoder_width=8, decoder="camera", max_steps_per_epoch=2), out, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_camera_model(tiny_camera_run):
    """``tiny_camera_run`` exported to ONNX (model.onnx + model.manifest.json)."""
    from models.export_run import export_run

    onnx = tiny_camera_run.parent / "export" / "model.onnx"
    export_run(tiny_camera_run, onnx, frames=4)
    return onnx


def parse_source(path):
    """``ast.parse`` of a file. CPython 3.11's AST conversion can raise a spurious "AST constructor
    recursion depth mismatch" SystemError (python/cpython gh-106905; seen here once in a full run,
    in a worker where earlier tests left threads behind). Parse again then; a real syntax error
    raises a SyntaxError both times."""
    import ast

    text = path.read_text()
    try:
        return ast.parse(text, str(path))
    except SystemError:
        return ast.parse(text, str(path))
