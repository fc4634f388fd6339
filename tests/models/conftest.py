import pytest

from tests.models.pinned_runs import run_all


@pytest.fixture(scope="session")
def pinned_runs(tmp_path_factory):
    """The folder holding the short runs of :data:`tests.models.pinned_runs.RUNS` (one per name)
    and, in ``printed.json``, what each command printed."""
    import json

    root = tmp_path_factory.mktemp("pinned")
    (root / "printed.json").write_text(json.dumps(run_all(root)))
    return root
