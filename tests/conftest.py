import os

import pytest

# Two cores on CI: keep torch from oversubscribing when tests run beside servers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # device-only environments
        yield
        return
    torch.set_num_threads(2)
    yield
