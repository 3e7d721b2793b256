"""The OpenAPI document (valid, and exactly the registered routes), Prometheus metrics, the decision log,
and the daemon's HTTP application."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from api_support import AUTH, CALLER_ID, NOW, NUMBER, Api, legal_setup, make_api

from pbxguard.api import DecisionLog, Metrics
from pbxguard.api.openapi import document
from pbxguard.api.routes import ROUTES
from pbxguard.config import Config, DatabaseConfig, HttpConfig, LogConfig, Secret
from pbxguard.daemon import Daemon
from pbxguard.ledger.store import Ledger
from pbxguard.logs import JsonFormatter
from pbxguard.policy.model import CallAttempt, Decision, Reason, Verdict

pytestmark = pytest.mark.timeout(60)


# -- OpenAPI --------------------------------------------------------------------------------------------


async def test_openapi_document_is_valid(api: Api) -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="pip install openapi-spec-validator")
    response = await api.client.get("/v1/openapi.json")
    assert response.status == 200
    spec = await response.json()
    assert spec["openapi"].startswith("3.1")
    validator.validate(spec)


async def test_every_registered_route_is_documented_and_vice_versa(api: Api) -> None:
    spec = await (await api.client.get("/v1/openapi.json")).json()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    registered = set()
    for route in api.client.app.router.routes():  # type: ignore[union-attr]
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        registered.add((route.method, path))
    assert registered == documented
    assert len(documented) == len(ROUTES)


def test_documented_parameters_match_the_path_templates() -> None:
    spec = document(ROUTES)
    for path, ops in spec["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            in_path = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert in_path == names, (path, op["operationId"])
            assert op["responses"], op["operationId"]
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_schema_reference_resolves() -> None:
    spec = document(ROUTES)
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"])


# -- metrics --------------------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels):
            return float(value)
    return None


async def test_metrics_after_decisions(api: Api) -> None:
    await legal_setup(api.ledger)
    for number in ("0612345678", "0698765432"):
        await api.client.post(
            "/v1/check",
            json={"number": number, "campaign": "c1", "caller_id": CALLER_ID, "reserve": True},
            headers=AUTH,
        )
    weekend = CallAttempt(number="+33698765432", campaign_id="c1", caller_id=CALLER_ID, gate="ami")
    await api.guard.decide(weekend, NOW + timedelta(days=4), reserve=True)
    api.links.update({"ami": True, "ari": False})
    response = await api.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert sample(text, "pbxguard_decisions_total", gate="http", verdict="allow", reason="none") == 1
    assert sample(text, "pbxguard_decisions_total", gate="http", verdict="block", reason="NO_CONSENT") == 1
    assert sample(text, "pbxguard_decisions_total", gate="ami", verdict="block", reason="NO_CONSENT") == 1
    assert sample(text, "pbxguard_block_reasons_total", gate="ami", reason="WEEKEND") == 1
    assert sample(text, "pbxguard_block_reasons_total", gate="ami", reason="NO_CONSENT") == 1
    assert sample(text, "pbxguard_decision_seconds_count", gate="http") == 2
    assert sample(text, "pbxguard_decision_seconds_bucket", gate="http", le="1.0") == 2
    assert sample(text, "pbxguard_decision_seconds_bucket", gate="http", le="0.0005") is not None
    assert sample(text, "pbxguard_ledger_seconds_count") == 3
    assert sample(text, "pbxguard_link_up", link="postgresql") == 1
    assert sample(text, "pbxguard_link_up", link="ami") == 1
    assert sample(text, "pbxguard_link_up", link="ari") == 0
    assert sample(text, "pbxguard_journal_unsealed") == 3  # nothing sealed them in this test


async def test_two_apps_do_not_share_metrics(ledger: Ledger) -> None:
    first, second = await make_api(ledger), await make_api(ledger)
    try:
        await legal_setup(ledger)
        await first.client.post("/v1/check", json={"number": NUMBER, "campaign": "c1", "caller_id": CALLER_ID},
                                headers=AUTH)  # fmt: skip
        text = await (await second.client.get("/metrics")).text()
        assert sample(text, "pbxguard_decisions_total", gate="http", verdict="allow", reason="none") is None
    finally:
        await first.client.close()
        await second.client.close()


def test_a_failing_observer_does_not_change_the_decision() -> None:
    metrics = Metrics()
    decision = _decision()
    metrics.observe_decision(decision, 0.002)
    text = metrics.render().decode()
    assert sample(text, "pbxguard_decisions_total", gate="ami", verdict="block", reason="NO_CONSENT") == 1


async def test_guard_survives_a_broken_observer(api: Api) -> None:
    await legal_setup(api.ledger)

    def broken(decision: Decision, seconds: float) -> None:
        raise RuntimeError("observer bug")

    def broken_ledger(seconds: float) -> None:
        raise RuntimeError("observer bug")

    api.guard.observers.insert(0, broken)
    api.guard.ledger_observers.insert(0, broken_ledger)
    decision = await api.guard.decide(CallAttempt(NUMBER, "c1", CALLER_ID, gate="ami"), NOW, reserve=False)
    assert decision.allowed
    text = await (await api.client.get("/metrics")).text()
    assert sample(text, "pbxguard_decisions_total", gate="ami", verdict="allow", reason="none") == 1


# -- the decision log -----------------------------------------------------------------------------------


def _decision(**kw: Any) -> Decision:
    values: dict[str, Any] = dict(
        id="5b0c1c44-0000-4000-8000-000000000001", verdict=Verdict.BLOCK,
        reasons=(Reason.NO_CONSENT, Reason.WEEKEND), next_allowed_at=None, consumer=NUMBER, territories=("FR",),
        zones=("Europe/Paris",), campaign_id="c1", order_giver="ACME", caller_id=CALLER_ID, gate="ami",
        decided_at=NOW, call_key="k1",
    )  # fmt: skip
    values.update(kw)
    return Decision(**values)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture() -> Any:
    logger = logging.getLogger("pbxguard.test.decisions")
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


def test_decision_log_line_masks_the_number(capture: Any) -> None:
    logger, handler = capture
    DecisionLog(logger=logger)(_decision(), 0.0123456)
    (line,) = handler.lines
    entry = json.loads(line)
    assert (
        entry["msg"] == "decision"
        and entry["level"] == "info"
        and entry["logger"] == "pbxguard.test.decisions"
    )
    assert entry["number"] == "********5678"
    assert NUMBER not in line
    assert entry["decision"] == "5b0c1c44-0000-4000-8000-000000000001"
    assert entry["gate"] == "ami" and entry["campaign"] == "c1" and entry["verdict"] == "block"
    assert entry["reasons"] == ["NO_CONSENT", "WEEKEND"]
    assert entry["latency_ms"] == 12.346
    assert entry["call_key"] == "k1"


def test_decision_log_full_numbers_and_quiet_batches(capture: Any) -> None:
    logger, handler = capture
    DecisionLog(full_numbers=True, logger=logger)(_decision(), 0.001)
    assert json.loads(handler.lines[-1])["number"] == NUMBER
    logger.setLevel(logging.INFO)
    DecisionLog(logger=logger)(_decision(gate="http-batch"), 0.001)
    assert len(handler.lines) == 1  # batch pre-checks log at debug level
    DecisionLog(logger=logger)(_decision(consumer=None, verdict=Verdict.ALLOW, reasons=()), 0.001)
    assert json.loads(handler.lines[-1])["number"] is None


# -- the daemon's application ---------------------------------------------------------------------------


async def test_daemon_serves_the_api_metrics_and_logs(database_url: str, ledger: Ledger) -> None:
    await legal_setup(ledger)
    config = Config(
        database=DatabaseConfig(url=Secret(database_url)), http=HttpConfig(token=Secret("daemon-token")),
        log=LogConfig(numbers="masked"),
    )  # fmt: skip
    daemon = Daemon(config)
    daemon.ledger, daemon.ledger_ready = ledger, True
    daemon.guard.ledger = ledger
    daemon.readiness["ami"] = lambda: False
    handler = Capture()
    decisions_log = logging.getLogger("pbxguard.decisions")
    decisions_log.addHandler(handler)
    previous = decisions_log.level
    decisions_log.setLevel(logging.INFO)
    client: TestClient[Any, Any] = TestClient(TestServer(daemon.http_app()))
    await client.start_server()
    try:
        body = {
            "number": NUMBER,
            "campaign": "c1",
            "caller_id": CALLER_ID,
            "at": NOW.isoformat(),
            "reserve": True,
        }
        response = await client.post("/v1/check", json=body, headers={"Authorization": "Bearer daemon-token"})
        assert response.status == 200, await response.text()
        assert (await response.json())["verdict"] == "allow"
        assert (await client.post("/v1/check", json=body)).status == 401
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["checks"] == {"ledger": True, "ami": False}
        text = await (await client.get("/metrics")).text()
        assert sample(text, "pbxguard_decisions_total", gate="http", verdict="allow", reason="none") == 1
        assert sample(text, "pbxguard_link_up", link="ami") == 0
        assert sample(text, "pbxguard_link_up", link="postgresql") == 1
        entries = [json.loads(line) for line in handler.lines]
        assert [e["verdict"] for e in entries] == ["allow"]
        assert entries[0]["number"] == "********5678" and entries[0]["gate"] == "http"
    finally:
        await client.close()
        decisions_log.removeHandler(handler)
        decisions_log.setLevel(previous)


async def test_the_running_daemon_serves_everything_on_its_port(database_url: str, ledger: Ledger) -> None:
    import asyncio
    import socket

    import aiohttp

    await legal_setup(ledger)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config(
        database=DatabaseConfig(url=Secret(database_url), pool_min=1, pool_max=4),
        http=HttpConfig(listen=f"127.0.0.1:{port}", token=Secret("live-token")),
    )
    daemon = Daemon(config)
    await asyncio.wait_for(daemon.start(), 30)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200
            body = {
                "number": NUMBER,
                "campaign": "c1",
                "caller_id": CALLER_ID,
                "at": NOW.isoformat(),
                "reserve": True,
            }
            headers = {"Authorization": "Bearer live-token"}
            async with session.post(f"{base}/v1/check", json=body, headers=headers) as response:
                decision = await response.json()
                assert decision["verdict"] == "allow" and decision["counted"] is True
            for _ in range(50):  # the daemon's sealer links the new journal row into the chain
                async with session.get(f"{base}/metrics") as response:
                    text = await response.text()
                if sample(text, "pbxguard_journal_unsealed") == 0:
                    break
                await asyncio.sleep(0.1)
            assert sample(text, "pbxguard_journal_unsealed") == 0
            assert sample(text, "pbxguard_decisions_total", gate="http", verdict="allow", reason="none") == 1
            assert sample(text, "pbxguard_link_up", link="postgresql") == 1
            async with session.get(f"{base}/", headers=headers) as response:
                assert response.status == 200 and "compliance dashboard" in await response.text()
    finally:
        await asyncio.wait_for(daemon.stop(), 30)
