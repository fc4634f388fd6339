"""Property-based tests of the running service from its own OpenAPI schema (schemathesis): no
request it describes gets a 500, and no response breaks the schema."""
from __future__ import annotations

import shutil

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from cloud.app import create_app  # noqa: E402
from cloud.settings import Settings  # noqa: E402
from shared.wire import UPLOAD_CONTENT_TYPE, build_upload_archive  # noqa: E402
from tests.cloud import fakes  # noqa: E402
from tests.cloud.conftest import ThreadedServer, jpeg_frames, provision  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory, registry_template):
    data = tmp_path_factory.mktemp("schema") / "data"
    shutil.copytree(registry_template, data)
    token = provision(data, "wearer1")
    with ThreadedServer(create_app(Settings(data_dir=data, auto_job_frames=0), runner=fakes.accept_job)) as srv:
        r = httpx.post(f"{srv.url}/v1/uploads", content=build_upload_archive(jpeg_frames(3)),
                       headers={"Authorization": f"Bearer {token}", "Content-Type": UPLOAD_CONTENT_TYPE})
        assert r.status_code == 201
        yield srv, token


def test_api_never_answers_500_nor_breaks_its_schema(live):
    from hypothesis import given

    srv, token = live
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json").exclude(path="/v1/events")  # endless stream
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    checked = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=srv.url, headers={"Authorization": f"Bearer {token}"},
                                   checks=[not_a_server_error, response_schema_conformance])
        run()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert "POST /v1/uploads" in checked and "GET /v1/models/{version}/model.onnx" in checked


def test_event_stream_is_documented_and_answers(live):
    srv, token = live
    spec = httpx.get(f"{srv.url}/openapi.json").json()
    assert "text/event-stream" in spec["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]
    with httpx.stream("GET", f"{srv.url}/v1/events", headers={"Authorization": f"Bearer {token}"}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
