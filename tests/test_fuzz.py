"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI document —
fitting it and deliberately not — against a live server; none may get a 5xx, and every
4xx must be an OpenAI-shaped error. Generation is bounded by a small context and a
request timeout so that the valid requests finish quickly."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.app import create_app
from server.settings import Settings
from tests.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    live = start_server("--draft", "none", "--max-concurrency", "2", "--ctx-size", "160",
                        "--request-timeout", "5", log_path=log_path)
    yield live
    stop_server(live)
    assert "Traceback" not in log_path.read_text()


# The app's document, built without loading a model; the requests go to the live server.
schema = schemathesis.openapi.from_dict(create_app(Settings(draft="none")).openapi())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_no_request_the_schema_can_describe_gets_a_5xx(case, fuzz_server):
    response = case.call(base_url=fuzz_server.base_url, headers=fuzz_server.headers,
                         timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert {"type", "param", "code"} <= error.keys()
