"""Schemathesis against the running service's own OpenAPI schema: no 5xx, every answer matches the schema.

The operations and their example requests come from ``/openapi.json`` of a real
``pneumoscan serve`` process; Hypothesis (derandomised) generates the requests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import live_server

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]  # fmt: skip


def test_generated_requests_get_no_5xx_and_match_the_schema(shipped_model: Path, tmp_path: Path) -> None:
    statuses: dict[str, list[int]] = {}
    with live_server(tmp_path) as (base, _):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /api/v1/predictions", "GET /api/v1/predictions/{prediction_id}"}
        for operation in operations:
            sent = statuses.setdefault(operation.label, [])

            @given(case=operation.as_strategy())
            @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def check(case) -> None:  # type: ignore[no-untyped-def]
                response = case.call(base_url=base, timeout=30)
                sent.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
                # every check but "positive data acceptance": arbitrary bytes match the schema of an upload,
                # yet are rightly refused as not an image
                case.validate_response(response, checks=CHECKS)

            check()
    total = sum(len(s) for s in statuses.values())
    print(f"schemathesis: {total} requests", {label: len(s) for label, s in statuses.items()})
    assert total >= 500, {label: len(s) for label, s in statuses.items()}
