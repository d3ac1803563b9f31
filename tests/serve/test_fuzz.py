"""Schemathesis fuzzes every operation of the live server's OpenAPI document: no answer may be a 5xx.

Both valid (positive) and invalid (negative) requests, a bounded number per operation and mode (~30 s in all).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from .helpers import API_KEY, Server, require_module

EXAMPLES = 50
#: uvicorn's own plain-text answer to bytes that are not an HTTP request (a negative case's header with a value no
#: HTTP parser accepts, such as a malformed Content-Length): the request never reaches the app, which answers every
#: request it receives with a JSON error
INVALID_HTTP = "Invalid HTTP request received."


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_error_for_any_generated_request(server: Server, mode: str) -> None:
    schemathesis = require_module("schemathesis")
    hypothesis = require_module("hypothesis")
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    generation = schemathesis.GenerationMode(mode)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    seen: dict[str, Counter[int]] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/diagnose",
        "POST /v1/score",
        "POST /v1/embed",
        "POST /v1/retrieve",
    }
    for op in operations:
        statuses = seen.setdefault(op.label, Counter())
        try:
            _fuzz(hypothesis, op, generation, headers, statuses)()
        except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (GET /v1/health has no input)
            assert mode == "negative", op.label
    print(mode, dict(seen))
    assert all(max(s, default=0) < 500 for s in seen.values()), seen
    assert sum(seen["POST /v1/diagnose"].values()) > 1, seen


def _fuzz(hypothesis: Any, op: Any, generation: Any, headers: dict[str, str], statuses: Counter[int]) -> Any:
    from schemathesis.checks import not_a_server_error

    @hypothesis.given(case=op.as_strategy(generation_mode=generation))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def call(case: Any) -> None:
        resp = case.call(headers=headers, timeout=60)
        statuses[resp.status_code] += 1
        case.validate_response(resp, checks=[not_a_server_error])
        if resp.status_code == 400 and resp.text == INVALID_HTTP:  # refused by the HTTP server, not the app
            return
        if resp.status_code >= 400:
            body = resp.json()
            assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body

    return call
