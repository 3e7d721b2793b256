"""The ARI gate against a fake ARI server (aiohttp: the REST calls pbxguard makes and the event
WebSocket), with the shapes a real Asterisk 22 sends (recorded from one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from pbxguard.config import AriUpstreamConfig, AsteriskConfig, Config, Mode, Secret
from pbxguard.gates.ari import AriGate, authorization_header, base_url, events_url, parse_stasis_start
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign, Decision
from pbxguard.policy.settings import PolicySettings

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)
NUMBER = "0612345678"
E164 = "+33612345678"
NPV = "0162123456"
USER, PASSWORD = "pbxguard", "sécret:with colon"
LOG = "pbxguard.gates.ari"


async def legal_setup(ledger: Ledger) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent(E164, "ACME", datetime(2026, 11, 1, tzinfo=UTC))


async def attempts(ledger: Ledger) -> int:
    async with ledger.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pbxguard.attempts"))


_ids = iter(range(1, 1_000_000))


def stasis_start(
    number: str = NUMBER,
    campaign: str | None = "c1",
    *,
    caller: str = NPV,
    name: str | None = None,
    args: list[str] | None = None,
    app: str = "pbxguard",
) -> dict[str, Any]:
    """A StasisStart as Asterisk 22 sends it for ``Stasis(pbxguard,NUMBER,CAMPAIGN)`` on a Local ;2 leg."""
    channel_id = f"1795897683.{next(_ids)}"
    if args is None:
        args = [number] if campaign is None else [number, campaign]
    return {
        "type": "StasisStart",
        "timestamp": "2026-12-01T09:30:00.000+0000",
        "args": args,
        "channel": {
            "id": channel_id,
            "name": name or f"Local/{number}@pbxguard-outbound-ari-00000002;2",
            "state": "Ring",
            "protocol_id": "",
            "caller": {"name": "ACME", "number": caller},
            "connected": {"name": "ACME", "number": caller},
            "accountcode": "",
            "dialplan": {
                "context": "pbxguard-outbound-ari",
                "exten": number,
                "priority": 6,
                "app_name": "Stasis",
                "app_data": ",".join([app, *args]),
            },
            "creationtime": "2026-12-01T09:30:00.000+0000",
            "language": "en",
        },
        "asterisk_id": "02:fc:00:00:00:01",
        "application": app,
    }


# -- the fake ARI server ------------------------------------------------------------------------------


@dataclass
class FakeAri:
    """Asterisk's ARI as far as pbxguard uses it. ``calls`` lists (method, path, query) in order."""

    variables: dict[str, dict[str, str]] = field(default_factory=dict)  # channel id -> variables
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    connects: int = 0
    accept: bool = True  # False: answer the event stream with 401
    gone: set[str] = field(default_factory=set)  # channels that hung up
    delay: float = 0.0  # slow REST
    runner: web.AppRunner | None = None
    port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ari/events", self.events)
        app.router.add_get("/ari/channels/{id}/variable", self.get_var)
        app.router.add_post("/ari/channels/{id}/variable", self.set_var)
        app.router.add_post("/ari/channels/{id}/continue", self.cont)
        app.router.add_delete("/ari/channels/{id}", self.hangup)
        return app

    async def start(self, port: int = 0) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in self.sockets:
            # A client that is already gone never answers the close: do not wait for it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.close(), 0.2)
        self.sockets.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return request.headers.get("Authorization") == expected

    def _record(self, request: web.Request) -> None:
        self.calls.append((request.method, request.path, dict(request.query)))
        self.changed.set()

    async def events(self, request: web.Request) -> web.StreamResponse:
        if not self.accept or not self._authorized(request):
            return web.json_response({"message": "Authentication required"}, status=401)
        assert request.query.get("app") == "pbxguard"
        assert request.query.get("subscribeAll") == "false"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connects += 1
        self.sockets.append(ws)
        self.changed.set()
        async for _ in ws:
            pass
        return ws

    async def _channel(self, request: web.Request) -> str:
        if not self._authorized(request):
            raise web.HTTPUnauthorized()
        self._record(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        channel_id = request.match_info["id"]
        if channel_id in self.gone:
            raise web.HTTPNotFound(text='{"message":"Channel not found"}', content_type="application/json")
        return channel_id

    async def get_var(self, request: web.Request) -> web.Response:
        channel_id = await self._channel(request)
        value = self.variables.get(channel_id, {}).get(request.query["variable"])
        if value is None:
            return web.json_response({"message": "Provided variable was not found"}, status=404)
        return web.json_response({"value": value})

    async def set_var(self, request: web.Request) -> web.Response:
        channel_id = await self._channel(request)
        self.variables.setdefault(channel_id, {})[request.query["variable"]] = request.query.get("value", "")
        return web.Response(status=204)

    async def cont(self, request: web.Request) -> web.Response:
        await self._channel(request)
        return web.Response(status=204)

    async def hangup(self, request: web.Request) -> web.Response:
        await self._channel(request)
        return web.Response(status=204)

    async def send(self, event: dict[str, Any]) -> str:
        await self.wait(lambda: bool(self.sockets))
        await self.sockets[-1].send_str(json.dumps(event))
        return str(event["channel"]["id"])

    async def wait(self, condition: Callable[[], bool], limit: float = 3.0) -> None:
        async with asyncio.timeout(limit):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def final(self, channel_id: str) -> tuple[str, str, dict[str, str]] | None:
        for method, path, query in self.calls:
            if path.endswith(f"/{channel_id}/continue") or (method == "DELETE" and path.endswith(channel_id)):
                return (method, path, query)
        return None

    async def outcome(self, channel_id: str) -> tuple[str, dict[str, str]]:
        """``("continue", vars)`` or ``("hangup:21", vars)`` once the gate answered the channel."""
        await self.wait(lambda: self.final(channel_id) is not None)
        final = self.final(channel_id)
        assert final is not None
        method, _, query = final
        verdict = "continue" if method == "POST" else f"hangup:{query.get('reason_code')}"
        return verdict, self.variables.get(channel_id, {})


def make_config(url: str, timeout_ms: int = 2000, mode: Mode = Mode.ENFORCE) -> Config:
    ari = AriUpstreamConfig(
        url=url, username=USER, password=Secret(PASSWORD), app="pbxguard", timeout_ms=timeout_ms
    )
    return Config(mode=mode, asterisk=AsteriskConfig(ari=ari))


@pytest.fixture
async def fake() -> AsyncIterator[FakeAri]:
    server = FakeAri()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def guard(ledger: Ledger) -> Guard:
    await legal_setup(ledger)
    return Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5)


async def start_gate(fake: FakeAri, guard: Guard, **kw: Any) -> AriGate:
    gate = AriGate(
        make_config(f"http://127.0.0.1:{fake.port}", **kw),
        guard,
        clock=lambda: NOW,
        backoff_initial=0.02,
        backoff_max=0.1,
    )
    await gate.start()
    await fake.wait(lambda: fake.connects > 0)
    return gate


@pytest.fixture
async def gate(fake: FakeAri, guard: Guard) -> AsyncIterator[AriGate]:
    server = await start_gate(fake, guard)
    try:
        yield server
    finally:
        await server.stop()


# -- pure part ----------------------------------------------------------------------------------------


def test_parse_stasis_start_from_args() -> None:
    call = parse_stasis_start(stasis_start(), "pbxguard")
    assert call is not None
    assert (call.number, call.campaign, call.caller_id) == (NUMBER, "c1", NPV)


def test_parse_stasis_start_defaults() -> None:
    # Stasis(pbxguard): the number is the extension; the campaign is read from the channel.
    call = parse_stasis_start(stasis_start(args=[]), "pbxguard")
    assert call is not None and (call.number, call.campaign) == (NUMBER, None)
    call = parse_stasis_start(stasis_start(args=["", ""]), "pbxguard")
    assert call is not None and (call.number, call.campaign) == (NUMBER, None)


def test_parse_stasis_start_ignores_what_is_not_ours() -> None:
    assert parse_stasis_start(stasis_start(app="other"), "pbxguard") is None
    assert parse_stasis_start({**stasis_start(), "type": "StasisEnd"}, "pbxguard") is None
    assert parse_stasis_start({"type": "StasisStart", "application": "pbxguard"}, "pbxguard") is None
    # The ;1 leg of a Local channel: it enters only after the ;2 leg answered.
    one = stasis_start(name=f"Local/{NUMBER}@pbxguard-test-dial-00000003;1", args=[])
    assert parse_stasis_start(one, "pbxguard") is None


def test_urls_and_authorization() -> None:
    assert str(base_url("http://127.0.0.1:8088")) == "http://127.0.0.1:8088/ari"
    assert str(base_url("http://127.0.0.1:8088/ari/")) == "http://127.0.0.1:8088/ari"
    ws = events_url(base_url("https://pbx:8089/"), "pbx guard")
    assert ws.scheme == "wss" and ws.path == "/ari/events"
    assert dict(ws.query) == {"app": "pbx guard", "subscribeAll": "false"}
    assert authorization_header("u", "p") == "Basic dTpw"
    with pytest.raises(ValueError):
        base_url("127.0.0.1:8088")


# -- decisions ---------------------------------------------------------------------------------------


async def test_allowed_channel_gets_variables_and_continues(
    fake: FakeAri, gate: AriGate, ledger: Ledger
) -> None:
    assert gate.ready()
    channel_id = await fake.send(stasis_start())
    verdict, variables = await fake.outcome(channel_id)
    assert verdict == "continue"
    assert variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert variables["PBXGUARD_REASONS"] == ""
    assert variables["PBXGUARD_DECISION"]
    # The verdict is set last, and before the channel is let go.
    paths = [(m, p, q.get("variable")) for m, p, q in fake.calls]
    assert paths[-2] == ("POST", f"/ari/channels/{channel_id}/variable", "PBXGUARD_VERDICT")
    assert paths[-1] == ("POST", f"/ari/channels/{channel_id}/continue", None)
    assert await attempts(ledger) == 1


async def test_blocked_channel_gets_variables_and_cause_21(
    fake: FakeAri, gate: AriGate, ledger: Ledger
) -> None:
    channel_id = await fake.send(stasis_start("0698765432"))
    verdict, variables = await fake.outcome(channel_id)
    assert verdict == "hangup:21"
    assert variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "NO_CONSENT" in variables["PBXGUARD_REASONS"].split(",")
    assert await attempts(ledger) == 0


async def test_caller_id_of_the_channel_is_used(fake: FakeAri, gate: AriGate) -> None:
    channel_id = await fake.send(stasis_start(caller="0611111111"))
    verdict, variables = await fake.outcome(channel_id)
    assert verdict == "hangup:21"
    assert "CALLER_ID_MOBILE" in variables["PBXGUARD_REASONS"]


async def test_campaign_from_channel_variable(fake: FakeAri, gate: AriGate) -> None:
    event = stasis_start(args=[])
    fake.variables[event["channel"]["id"]] = {"PBXGUARD_CAMPAIGN": "c1"}
    verdict, _ = await fake.outcome(await fake.send(event))
    assert verdict == "continue"
    unknown = await fake.send(stasis_start(args=[NUMBER]))
    verdict, variables = await fake.outcome(unknown)
    assert verdict == "hangup:21"
    assert "UNKNOWN_CAMPAIGN" in variables["PBXGUARD_REASONS"]


async def test_token_hand_off(fake: FakeAri, gate: AriGate, ledger: Ledger) -> None:
    first = await fake.send(stasis_start())
    _, variables = await fake.outcome(first)
    token = variables["PBXGUARD_DECISION"]
    event = stasis_start()
    fake.variables[event["channel"]["id"]] = {"PBXGUARD_TOKEN": token}
    verdict, _ = await fake.outcome(await fake.send(event))
    assert verdict == "continue"
    assert await attempts(ledger) == 1


async def test_other_local_leg_is_left_alone(
    fake: FakeAri, gate: AriGate, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, LOG):
        await fake.send(stasis_start(name=f"Local/{NUMBER}@x-00000003;1", args=[]))
        # A decided channel right after it shows the ignored one was processed (events are in order).
        verdict, _ = await fake.outcome(await fake.send(stasis_start()))
    assert verdict == "continue"
    assert not any(";1" in path for _, path, _ in fake.calls)
    assert any("after the call was placed" in r.getMessage() for r in caplog.records)


async def test_many_channels_at_once(fake: FakeAri, gate: AriGate, ledger: Ledger) -> None:
    ids = [await fake.send(stasis_start()) for _ in range(12)]
    outcomes = [await fake.outcome(i) for i in ids]
    assert [v for v, _ in outcomes].count("continue") == 4  # the frequency cap
    assert [v for v, _ in outcomes].count("hangup:21") == 8
    assert await attempts(ledger) == 4


async def test_channel_gone_costs_one_log_line(
    fake: FakeAri, gate: AriGate, caplog: pytest.LogCaptureFixture
) -> None:
    event = stasis_start()
    fake.gone.add(event["channel"]["id"])
    with caplog.at_level(logging.INFO, LOG):
        await fake.send(event)
        await fake.wait(lambda: any(m == "POST" for m, _, _ in fake.calls))
        await asyncio.sleep(0.05)
    assert gate.pending == 0
    lines = [r.getMessage() for r in caplog.records if r.name == LOG and "hung up" in r.getMessage()]
    assert len(lines) == 1


# -- failures -------------------------------------------------------------------------------------------


async def test_store_down_blocks(fake: FakeAri) -> None:
    gate = await start_gate(fake, Guard(None))
    try:
        verdict, variables = await fake.outcome(await fake.send(stasis_start()))
    finally:
        await gate.stop()
    assert verdict == "hangup:21"
    assert variables["PBXGUARD_REASONS"] == "STORE_UNAVAILABLE"


class StuckGuard(Guard):
    async def decide(self, attempt: CallAttempt, now: datetime, *, reserve: bool = True) -> Decision:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stuck_guard_hangs_up_within_the_bound(fake: FakeAri) -> None:
    gate = await start_gate(fake, StuckGuard(None), timeout_ms=300)
    try:
        started = time.monotonic()
        verdict, variables = await fake.outcome(await fake.send(stasis_start()))
        assert time.monotonic() - started < 0.5
    finally:
        await gate.stop()
    assert verdict == "hangup:21"
    assert variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert variables["PBXGUARD_DECISION"] == ""


async def test_shadow_mode_continues_a_blocked_channel(fake: FakeAri, ledger: Ledger) -> None:
    await legal_setup(ledger)
    gate = await start_gate(fake, Guard(ledger, PolicySettings(), Mode.SHADOW, timeout=1.5))
    try:
        verdict, variables = await fake.outcome(await fake.send(stasis_start("0698765432")))
    finally:
        await gate.stop()
    assert verdict == "continue"
    assert variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert "NO_CONSENT" in variables["PBXGUARD_REASONS"]


# -- the link ---------------------------------------------------------------------------------------------


async def test_reconnects_after_the_websocket_drops(fake: FakeAri, gate: AriGate) -> None:
    assert fake.connects == 1
    await fake.sockets.pop().close()
    await fake.wait(lambda: fake.connects == 2)
    verdict, _ = await fake.outcome(await fake.send(stasis_start()))
    assert verdict == "continue"
    assert gate.ready()


async def test_resubscribes_after_asterisk_restarts(fake: FakeAri, guard: Guard) -> None:
    gate = await start_gate(fake, guard)
    try:
        port = fake.port
        await fake.stop()
        await asyncio.sleep(0.05)
        assert not gate.ready()
        # Asterisk back, on the same port, knowing nothing of us: the gate registers the app again.
        fake.connects = 0
        await fake.start(port)
        await fake.wait(lambda: fake.connects == 1)
        verdict, _ = await fake.outcome(await fake.send(stasis_start()))
        assert verdict == "continue"
        assert gate.ready()
    finally:
        await gate.stop()


async def test_bad_credentials_keep_the_gate_unready(
    fake: FakeAri, guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    fake.accept = False
    with caplog.at_level(logging.WARNING, LOG):
        gate = AriGate(
            make_config(f"http://127.0.0.1:{fake.port}"), guard, clock=lambda: NOW, backoff_initial=0.02
        )
        await gate.start()
        try:
            await asyncio.sleep(0.1)
            assert not gate.ready()
        finally:
            await gate.stop()
    assert any("401" in r.getMessage() for r in caplog.records)


async def test_nothing_listening_then_asterisk_appears(guard: Guard) -> None:
    fake = FakeAri()
    await fake.start()
    port = fake.port
    await fake.stop()
    gate = AriGate(
        make_config(f"http://127.0.0.1:{port}"),
        guard,
        clock=lambda: NOW,
        backoff_initial=0.02,
        backoff_max=0.05,
    )
    await gate.start()
    try:
        await asyncio.sleep(0.1)
        assert not gate.ready()
        await fake.start(port)
        await fake.wait(lambda: fake.connects == 1)
        verdict, _ = await fake.outcome(await fake.send(stasis_start()))
        assert verdict == "continue"
    finally:
        await gate.stop()
        await fake.stop()


async def test_stop_is_prompt_with_pending_decisions(fake: FakeAri) -> None:
    gate = await start_gate(fake, StuckGuard(None), timeout_ms=5000)
    await fake.send(stasis_start())
    await fake.wait(lambda: bool(fake.calls))
    started = time.monotonic()
    await gate.stop()
    assert time.monotonic() - started < 1.0
    assert not gate.ready()
