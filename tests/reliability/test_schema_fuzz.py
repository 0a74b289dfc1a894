"""Schemathesis against the live server's own OpenAPI schema: no 5xx, no answer
that breaks the schema (status codes, content types, bodies, headers).

A real process on the tiny model (fast examples), real HTTP on loopback. Each
operation gets ``max_examples`` generated cases (more with
``CHANSEG_RELIABILITY=long``).

Every built-in check runs but ``positive_data_acceptance``: the schema can say
"a binary file", not "a decodable image", so random bytes that fit it are
rightly refused with 400 (the hypothesis test in tests/service/test_fuzz.py
covers image bytes: only 200 or 4xx, never 5xx).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.reliability.conftest import LONG, report, start_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def live_schema(tiny_artifact, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("schema"),
        CHANSEG_MODEL_PATH=tiny_artifact,
        CHANSEG_MAX_IMAGE_PIXELS="4000000",
    )
    try:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    finally:
        server.stop()


def _fuzz(operation, calls: dict) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=200 if LONG else 25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        calls[operation.label] = calls.get(operation.label, 0) + 1
        case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

    check()


def test_every_operation_conforms_to_its_schema(live_schema):
    operations = [result.ok() for result in live_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/predict", "/v1/model", "/v2/models/{name}/infer"} <= paths, paths
    calls: dict = {}
    for operation in operations:
        _fuzz(operation, calls)
    report("schemathesis", operations=len(operations), cases=sum(calls.values()))
