"""Schemathesis against /openapi.json, in-process (WSGI): no 5xx, no response that breaks the schema."""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.api import api_app, register

# With both modes over every operation: > 1000 requests (issue 8). `make fuzz` runs ten times more,
# not derandomized: new examples on every run.
MAX_EXAMPLES = int(os.environ.get("MARKETPLACE_FUZZ_EXAMPLES", "30"))
DERANDOMIZE = "MARKETPLACE_FUZZ_EXAMPLES" not in os.environ

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


@pytest.fixture(scope="module")
def fuzz_app(stack):  # type: ignore[no-untyped-def]
    return api_app()


@pytest.fixture(scope="module")
def fuzz_user(fuzz_app):  # type: ignore[no-untyped-def]
    return register(fuzz_app.test_client())


def test_api_conforms_to_its_openapi(fuzz_app, fuzz_user):  # type: ignore[no-untyped-def]
    """Every operation, a bounded number of generated requests each (schemathesis' pytest
    loader trips over this pytest version, so operations are driven through hypothesis here)."""
    from hypothesis import given

    api = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    failures: list[str] = []
    operations = 0

    def headers_for(path: str) -> dict[str, str]:
        headers = dict(fuzz_user["headers"])
        if path == "/v1/auth/logout":
            # logging out must not revoke the token the other operations use
            c = fuzz_app.test_client()
            tokens = c.post("/v1/auth/login", json={"email": fuzz_user["email"], "password": fuzz_user["password"]})
            headers["Authorization"] = f"Bearer {tokens.get_json()['access_token']}"
        return headers

    calls = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                case.call_and_validate(headers=headers_for(case.operation.path), checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.path  # nothing to break: no params, no body
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report them together
                failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert operations >= 15 and calls >= 1000, (operations, calls)
    assert not failures, "\n\n".join(failures)
