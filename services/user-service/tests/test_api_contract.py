"""schemathesis against the running service's own OpenAPI: no 5xx, nothing off-schema.

Driven from a plain test (schemathesis' lazy pytest fixture does not work with pytest 9):
every operation in ``/openapi.json`` gets generated requests, valid and invalid, each
checked against the documented status codes, content types, headers and schemas.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok

from tests.support.processes import ServiceRunner

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


def test_api_answers_within_its_contract(
    services: ServiceRunner, amqp_url: str, redis_url: str, redis_prefix: str
) -> None:
    service = services.start(
        "user-service",
        {
            "COURIER_AMQP_URL": amqp_url,
            "COURIER_REDIS_URL": redis_url,
            "COURIER_REDIS_PREFIX": redis_prefix,
        },
    )
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the schema does not load: {result}"
        operations.append(result.ok())
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /v1/users",
        "GET /v1/users",
        "GET /v1/users/{user_id}",
        "PATCH /v1/users/{user_id}",
        "DELETE /v1/users/{user_id}",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: Any) -> None:
            case.call_and_validate(base_url=service.url, checks=CHECKS)

        exercise()
    logs = service.logs(tail=10_000_000)
    assert "Traceback" not in logs
    assert logs.count('"http_request"') >= 100  # the generated requests really reached it
