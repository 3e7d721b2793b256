"""Schemathesis against the HTTP API's own OpenAPI document (`GET /v1/openapi.json`), in process: the
aiohttp application on a real (per-test) PostgreSQL ledger, with the bearer token. Every operation gets
valid and invalid inputs; no answer may be a 5xx, and every answer must conform to the document (status
code, content type, headers, body schema). Bounded: a fixed number of examples per operation and mode.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import requests
from api_support import AUTH, Api, legal_setup, make_api

from pbxguard.ledger.store import Ledger

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 40  # per operation and generation mode
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    await legal_setup(ledger)
    made = await make_api(ledger)
    try:
        yield made
    finally:
        await made.client.close()


def fuzz_operation(
    operation: Any, mode: Any, base_url: str, session: requests.Session, statuses: Counter[int]
) -> int:
    # Positive data: also re-sent without the token, which must be refused (ignored_auth). Negative data:
    # no 5xx and a documented answer; schemathesis' negative_data_rejection is not used, as the token
    # forced on every request undoes its "no Authorization header" mutations.
    checks = [*CONFORMANCE, ignored_auth] if mode is GenerationMode.POSITIVE else CONFORMANCE
    sent = 0

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal sent
        response = case.call(base_url=base_url, session=session, headers=AUTH, timeout=10)
        sent += 1
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks, headers=AUTH)

    try:
        run()
    except Unsatisfiable:  # an operation without inputs has no invalid input to send
        assert mode is GenerationMode.NEGATIVE
    return sent


def fuzz(document: dict[str, Any], base_url: str) -> tuple[Counter[str], Counter[int]]:
    """Runs in a worker thread (requests is blocking; the server runs on the test's event loop)."""
    schema = schemathesis.openapi.from_dict(document)
    operations = Counter[str]()
    statuses = Counter[int]()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                operations[operation.label] += fuzz_operation(operation, mode, base_url, session, statuses)
    return operations, statuses


@pytest.mark.timeout(180)
async def test_schemathesis_finds_no_server_error_and_no_drift(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    client = api.client
    document = await (await client.get("/v1/openapi.json")).json()
    base_url = str(client.make_url("")).rstrip("/")
    started = time.monotonic()
    operations, statuses = await asyncio.to_thread(fuzz, document, base_url)
    took = time.monotonic() - started
    total = sum(operations.values())
    with capsys.disabled():
        print(
            f"\nschemathesis: {total} requests over {len(operations)} operations in {took:.1f} s "
            f"(statuses {dict(sorted(statuses.items()))})"
        )
    assert len(operations) == len(document["paths"]) or len(operations) >= 20
    assert not any(status >= 500 for status in statuses)


@pytest.mark.timeout(30)
async def test_an_enormous_stats_period_is_refused_not_computed(api: Api) -> None:
    """Found by this fuzzing: `until=7741-10-23` made /v1/stats build a row per day for 5,700 years,
    holding the event loop (which serves the gates too) for longer than any timeout."""
    started = time.monotonic()
    response = await api.client.get("/v1/stats?since=0001-01-01&until=9999-12-31", headers=AUTH)
    assert response.status == 422
    assert (await response.json())["error"]["field"] == "since"
    response = await api.client.get("/v1/stats?until=7741-10-23", headers=AUTH)
    assert response.status == 422
    page = await api.client.get("/?from=0001-01-01&to=9999-12-31", headers=AUTH)
    assert page.status == 200 and "the period is longer than" in await page.text()
    assert time.monotonic() - started < 2
    ok = await api.client.get("/v1/stats?since=2024-01-01&until=2026-12-01", headers=AUTH)
    assert ok.status == 200 and len((await ok.json())["by_day"]) == 1066
