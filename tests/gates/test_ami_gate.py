"""The AMI gate against a scripted fake Asterisk (tests/gates/fake_asterisk_ami.py) and a real ledger.

Every test is bounded: waits are on events with timeouts, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime

import pytest
from fake_asterisk_ami import AmiTestClient, FakeAsterisk
from polling import until

from pbxguard.config import (
    AmiGateConfig,
    AmiUpstreamConfig,
    AmiUserConfig,
    AsteriskConfig,
    Config,
    GatesConfig,
    Mode,
    Secret,
)
from pbxguard.gates.ami_proxy import (
    LINK_LOST,
    LINK_PREFIX,
    NOT_CONNECTED,
    ActionRouter,
    AmiGate,
    Pending,
    UpstreamLink,
    blocked_message,
    with_token,
)
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.monitor import CallTracker, Feedback, Outcome, outcome_for
from pbxguard.policy.model import CallAttempt, Campaign, Decision
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message, encode, md5_challenge_key

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)  # Tuesday 10:30 in Paris
EVENING = datetime(2026, 12, 1, 19, 30, tzinfo=UTC)  # Tuesday 20:30 in Paris: outside hours
CONSENTED = "0612345678"
NO_CONSENT = "0698765432"
CALLER = '"ACME" <0162123456>'
USER, SECRET = "dialer", "dialer-secret"
ADMIN, ADMIN_SECRET = "admin", "admin-secret"


async def until_async(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def originate(
    number: str = CONSENTED,
    action_id: str | None = "o1",
    *,
    channel: str | None = None,
    is_async: bool = True,
    extra: list[tuple[str, str]] | None = None,
) -> Message:
    headers: list[tuple[str, str]] = []
    if action_id is not None:
        headers.append(("ActionID", action_id))
    headers += [
        ("Channel", channel or f"PJSIP/{number}@trunk"),
        ("Context", "agents"),
        ("Exten", "100"),
        ("Priority", "1"),
        ("CallerID", CALLER),
    ]
    if is_async:
        headers.append(("Async", "true"))
    headers += extra or []
    return Message.action("Originate", headers)


def make_config(fake: FakeAsterisk, mode: Mode = Mode.ENFORCE, **gate: object) -> Config:
    users = (
        AmiUserConfig(USER, Secret(SECRET), campaign="c1"),
        AmiUserConfig(ADMIN, Secret(ADMIN_SECRET), campaign="c1", allow_dangerous=True),
    )
    ami = dataclasses.replace(AmiGateConfig(listen="127.0.0.1:5039", users=users), **gate)  # type: ignore[arg-type]
    return Config(
        mode=mode,
        asterisk=AsteriskConfig(
            ami=AmiUpstreamConfig("127.0.0.1", fake.port, fake.username, Secret(fake.secret))
        ),
        gates=GatesConfig(ami=ami),
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    server = FakeAsterisk()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


@pytest.fixture
async def legal(ledger: Ledger) -> Ledger:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent("+33612345678", "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    return ledger


GateFactory = Callable[..., Awaitable[AmiGate]]


@pytest.fixture
async def make_gate(fake: FakeAsterisk, legal: Ledger) -> AsyncIterator[GateFactory]:
    started: list[AmiGate] = []

    async def factory(
        mode: Mode = Mode.ENFORCE,
        clock: Callable[[], datetime] = lambda: NOW,
        guard: Guard | None = None,
        wait_ready: bool = True,
        **gate: object,
    ) -> AmiGate:
        config = make_config(fake, mode, **gate)
        g = AmiGate(
            config,
            guard or Guard(legal, PolicySettings(), mode, timeout=1.5),
            clock=clock,
            listen=("127.0.0.1", 0),
            auth_failure_delay=0.01,
            reconnect_min=0.02,
            reconnect_max=0.1,
            boot_grace=0.1,
        )
        await g.start()
        started.append(g)
        if wait_ready:
            await until(g.ready)
        return g

    try:
        yield factory
    finally:
        for g in started:
            await g.stop()


@pytest.fixture
async def gate(make_gate: GateFactory) -> AmiGate:
    return await make_gate()


@pytest.fixture
async def client(gate: AmiGate) -> AsyncIterator[AmiTestClient]:
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    try:
        yield c
    finally:
        await c.close()


def token_of(message: Message) -> str:
    tokens = [v.split("=", 1)[1] for v in message.get_all("Variable") if v.startswith("__PBXGUARD_TOKEN=")]
    assert len(tokens) == 1, message
    return tokens[0]


async def decision_row(ledger: Ledger, decision_id: str) -> dict[str, object]:
    row = await ledger.decision(uuid.UUID(decision_id))
    assert row is not None
    return dict(row)


# -- allowed and blocked ------------------------------------------------------------------------------


async def test_banner_is_asterisks(gate: AmiGate) -> None:
    c = await AmiTestClient.connect(*gate.address)
    await c.wait_for(lambda _: c.banner is not None)
    assert c.banner is not None
    assert c.banner.text == "Asterisk Call Manager/11.0.0"
    await c.close()


async def test_allowed_originate_reaches_asterisk_with_the_token(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(originate(action_id="dial-1"))
    response = await client.response("dial-1")
    assert response.get("Response") == "Success"
    assert response.get("Message") == "Originate successfully queued"
    assert len(fake.originates) == 1
    sent = fake.originates[0]
    assert (sent.action_id or "").startswith("pbxg-")
    assert sent.effective("Channel") == f"PJSIP/{CONSENTED}@trunk"
    assert "__PBXGUARD_CAMPAIGN=c1" in sent.get_all("Variable")
    token = token_of(sent)
    row = await decision_row(legal, token)
    assert row["verdict"] == "allow"
    assert row["counted"] is True
    assert row["gate"] == "ami"
    assert str(row["call_key"]).endswith(":dial-1")
    # The call's OriginateResponse reaches the client with its own ActionID.
    await client.wait_for(lambda _: bool(client.events("OriginateResponse")))
    event = client.events("OriginateResponse")[0]
    assert event.action_id == "dial-1"
    assert event.get("Response") == "Success"


async def test_blocked_originate_never_reaches_asterisk(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(originate(NO_CONSENT, "dial-2", is_async=False))
    response = await client.response("dial-2")
    assert response.get("Response") == "Error"
    assert response.get("Message") == "Originate blocked by pbxguard: NO_CONSENT"
    ping = await client.action("Ping")
    assert ping.get("Response") == "Success"
    assert fake.originates == []
    assert client.events("OriginateResponse") == []  # a synchronous Originate gets no event
    assert await legal.attempts_count("+33698765432", "ACME") == 0


async def test_blocked_message_names_reasons_and_next_allowed_instant(
    make_gate: GateFactory, fake: FakeAsterisk
) -> None:
    gate = await make_gate(clock=lambda: EVENING)
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    c.send(originate(action_id="late"))
    response = await c.response("late")
    assert (
        response.get("Message")
        == "Originate blocked by pbxguard: OUTSIDE_HOURS (next allowed 2026-12-02T10:00:00+01:00)"
    )
    assert fake.originates == []
    await c.close()


async def test_async_blocked_originate_gets_its_originate_response(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk
) -> None:
    client.send(originate(NO_CONSENT, "async-1"))
    await client.wait_for(lambda _: bool(client.events("OriginateResponse")))
    response = client.responses("async-1")[0]
    assert response.get("Response") == "Error"
    event = client.events("OriginateResponse")[0]
    assert client.messages.index(response) < client.messages.index(event)
    assert event.action_id == "async-1"
    assert event.get("Response") == "Failure"
    assert event.get("Reason") == "0"
    assert event.get("Channel") == f"PJSIP/{NO_CONSENT}@trunk"
    assert event.get("Uniqueid") == "<unknown>"
    assert event.get("CallerIDNum") == "0162123456"
    assert fake.originates == []
    # As in Asterisk, OriginateResponse is a "call" event: a client not reading call events gets none.
    quiet = await AmiTestClient.login(*gate.address, USER, SECRET, events="system")
    quiet.send(originate(NO_CONSENT, "async-2"))
    await quiet.response("async-2")
    await quiet.action("Ping")
    assert quiet.events("OriginateResponse") == []
    await quiet.close()


async def test_unreadable_channel_is_blocked_as_invalid_destination(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(originate(channel="PJSIP/agent-desk-12", action_id="weird"))
    response = await client.response("weird")
    assert response.get("Message") == "Originate blocked by pbxguard: INVALID_DESTINATION"
    assert fake.originates == []


async def test_malformed_originate_is_answered_like_asterisk_without_a_decision(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(Message.action("Originate", ActionID="m1", Exten="100", Context="x", Priority="1"))
    assert (await client.response("m1")).get("Message") == "Channel not specified"
    client.send(
        Message.action("Originate", ActionID="m2", Channel="PJSIP0612345678", Exten="1", Priority="1")
    )
    assert (await client.response("m2")).get("Message") == "Invalid channel"
    client.send(Message.action("Originate", ActionID="m3", Channel="PJSIP/0612345678@t", Exten="100"))
    assert (await client.response("m3")).get(
        "Message"
    ) == "Originate with 'Exten' requires 'Context' and 'Priority'"
    assert fake.originates == []
    async with legal.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pbxguard.decisions") == 0


async def test_store_unavailable_blocks(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    gate = await make_gate(guard=Guard(None, PolicySettings(), Mode.ENFORCE, timeout=0.2))
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    c.send(originate(action_id="db"))
    response = await c.response("db")
    assert response.get("Response") == "Error"
    assert "STORE_UNAVAILABLE" in (response.get("Message") or "")
    assert fake.originates == []
    await c.close()


class StuckGuard(Guard):
    """A guard whose decision never comes back (a wedged ledger driver, say)."""

    async def decide(self, attempt: CallAttempt, now: datetime, *, reserve: bool = True) -> Decision:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_stuck_guard_blocks_the_originate_within_its_bound(
    make_gate: GateFactory, fake: FakeAsterisk
) -> None:
    gate = await make_gate(guard=StuckGuard(None, PolicySettings(), Mode.ENFORCE, timeout=0.1))
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    started = time.monotonic()
    c.send(originate(action_id="stuck"))
    response = await c.response("stuck")
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 3.0  # the guard's timeout plus the gate's 2 s of reserve
    assert response.get("Response") == "Error"
    assert "STORE_UNAVAILABLE" in (response.get("Message") or "")
    assert fake.originates == []
    await c.close()


async def test_a_reused_action_id_is_a_new_call(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(originate(action_id="same"))
    client.send(originate(action_id="same"))
    await client.wait_for(lambda _: len(client.responses("same")) == 2)
    assert [r.get("Response") for r in client.responses("same")] == ["Success", "Success"]
    assert len(fake.originates) == 2
    assert token_of(fake.originates[0]) != token_of(fake.originates[1])
    assert await legal.attempts_count("+33612345678", "ACME") == 2


async def test_campaign_and_caller_id_come_from_variables(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    await legal.add_campaign(Campaign("c2", "OTHER", automated=True))
    # Campaign c2 has no consent for the number: the variable, not the user's default, decides.
    client.send(originate(action_id="v1", extra=[("Variable", "__PBXGUARD_CAMPAIGN=c2")]))
    response = await client.response("v1")
    assert "NO_CONSENT" in (response.get("Message") or "")
    # A withheld number (CALLERID(num-pres)) is a missing caller ID.
    client.send(originate(action_id="v2", extra=[("Variable", "CALLERID(num-pres)=prohib")]))
    response = await client.response("v2")
    assert "CALLER_ID_MISSING" in (response.get("Message") or "")
    # Without a number in the CallerID header, a CALLERID(num) variable is what the consumer sees.
    no_header = Message(tuple(h for h in originate(action_id="v3").headers if h[0] != "CallerID"))
    client.send(no_header.with_header("Variable", "FOO=1,CALLERID(num)=0611111111"))
    assert "CALLER_ID_MOBILE" in ((await client.response("v3")).get("Message") or "")
    assert fake.originates == []
    # With one, the header wins (Asterisk applies it after the variables).
    client.send(originate(action_id="v4", extra=[("Variable", "CALLERID(num)=0611111111")]))
    assert (await client.response("v4")).get("Response") == "Success"


# -- authentication and permissions ------------------------------------------------------------------


async def test_md5_login(gate: AmiGate, fake: FakeAsterisk) -> None:
    c = await AmiTestClient.connect(*gate.address)
    challenge = await c.action("Challenge", AuthType="MD5")
    value = challenge.get("Challenge")
    assert value and value.isdigit()
    ok = await c.action("Login", Username=USER, AuthType="MD5", Key=md5_challenge_key(value, SECRET))
    assert ok.get("Response") == "Success"
    assert ok.get("Message") == "Authentication accepted"
    assert (await c.action("Ping")).get("Ping") == "Pong"
    await c.close()
    bad = await AmiTestClient.connect(*gate.address)
    value = (await bad.action("Challenge", AuthType="MD5")).get("Challenge") or ""
    refused = await bad.action("Login", Username=USER, AuthType="MD5", Key=md5_challenge_key(value, "wrong"))
    assert refused.get("Message") == "Authentication failed"
    await bad.wait_closed()


async def test_md5_login_without_challenge_fails(gate: AmiGate) -> None:
    c = await AmiTestClient.connect(*gate.address)
    refused = await c.action("Login", Username=USER, AuthType="MD5", Key=md5_challenge_key("", SECRET))
    assert refused.get("Response") == "Error"
    await c.wait_closed()


@pytest.mark.parametrize(("username", "secret"), [(USER, "wrong"), ("nobody", SECRET), ("", "")])
async def test_wrong_credentials_get_asterisks_error_and_nothing_reaches_asterisk(
    gate: AmiGate, fake: FakeAsterisk, username: str, secret: str
) -> None:
    before = len(fake.actions)
    c = await AmiTestClient.connect(*gate.address)
    response = await c.action("Login", Username=username, Secret=secret)
    assert response.get("Response") == "Error"
    assert response.get("Message") == "Authentication failed"
    await c.wait_closed()
    assert fake.actions[before:] == []


async def test_usernames_are_case_insensitive_like_asterisk(gate: AmiGate) -> None:
    c = await AmiTestClient.login(*gate.address, USER.upper(), SECRET)
    await c.close()


async def test_actions_before_login_are_refused(gate: AmiGate, fake: FakeAsterisk) -> None:
    before = len(fake.actions)
    c = await AmiTestClient.connect(*gate.address)
    assert (await c.action("Ping")).get("Message") == "Permission denied"
    c.send(originate(action_id="early"))
    assert (await c.response("early")).get("Message") == "Permission denied"
    c.send(Message((("ActionID", "x1"), ("Foo", "bar"))))
    assert (await c.response("x1")).get("Message") == "Missing action in request"
    assert fake.actions[before:] == []
    await c.close()


@pytest.mark.parametrize(
    "action", ["Command", "UpdateConfig", "GetConfig", "GetConfigJSON", "Reload", "ModuleLoad", "Agi"]
)
async def test_command_and_configuration_actions_are_refused(
    client: AmiTestClient, fake: FakeAsterisk, action: str
) -> None:
    response = await client.action(action, Command="core stop now", Filename="manager.conf")
    assert response.get("Response") == "Error"
    assert response.get("Message") == f"Permission denied: pbxguard does not allow {action} for this user"
    assert fake.actions_named(action) == []


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("Application", "System"), ("Data", "rm -rf /")], "application System"),
        ([("Application", "  trysystem"), ("Data", "id")], "application trysystem"),
        ([("Application", "Exec"), ("Data", "System(id)")], "function SYSTEM()"),
        ([("Application", "ExternalIVR"), ("Data", "/bin/sh")], "application ExternalIVR"),
        ([("Application", "AGI"), ("Data", "agi://10.1.2.3/evil")], "AGI to another host"),
        ([("Application", "AGI"), ("Data", "/bin/sh,-c,id")], "AGI of a program outside agi-bin"),
        ([("Application", "Playback"), ("Data", "${SHELL(id)}")], "function SHELL()"),
        ([("Variable", "X=${shell(curl evil)}")], "function SHELL()"),
        ([("Variable", "FILE(/etc/passwd)=x")], "function FILE()"),
        ([("Variable", "X=${SH${EMPTY}ELL(id)}")], "run-time built"),
    ],
)
async def test_dangerous_originates_are_refused(
    client: AmiTestClient, fake: FakeAsterisk, headers: list[tuple[str, str]], why: str
) -> None:
    base = [h for h in originate().headers if h[0] not in ("Context", "Exten", "Priority", "ActionID")]
    message = Message((*base, ("ActionID", "bad"), *headers))
    if not any(k == "Application" for k, _ in headers):
        message = Message((*message.headers, ("Context", "a"), ("Exten", "1"), ("Priority", "1")))
    client.send(message)
    response = await client.response("bad")
    assert response.get("Response") == "Error"
    text = response.get("Message") or ""
    assert text.startswith("Originate refused by pbxguard: "), text
    assert why in text
    assert text.endswith("is not allowed for this user")
    # Async: the dialer also gets its OriginateResponse Failure.
    await client.wait_for(lambda _: bool(client.events("OriginateResponse")))
    assert fake.originates == []


async def test_local_agi_is_allowed_and_allow_dangerous_users_may_run_system(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk
) -> None:
    local = originate(action_id="agi", extra=[("Application", "AGI"), ("Data", "agi://127.0.0.1:4573/check")])
    client.send(local)
    assert (await client.response("agi")).get("Response") == "Success"
    admin = await AmiTestClient.login(*gate.address, ADMIN, ADMIN_SECRET)
    admin.send(originate(action_id="sys", extra=[("Application", "System"), ("Data", "true")]))
    assert (await admin.response("sys")).get("Response") == "Success"
    assert len(fake.originates) == 2
    await admin.close()


async def test_pbxguard_token_cannot_be_forged(client: AmiTestClient, fake: FakeAsterisk) -> None:
    forged = f"__PBXGUARD_TOKEN={uuid.uuid4()}"
    client.send(originate(action_id="f1", extra=[("Variable", forged)]))
    assert "PBXGUARD_TOKEN is reserved" in ((await client.response("f1")).get("Message") or "")
    client.send(originate(action_id="f2", extra=[("Variable", f"A=1,{forged}")]))
    assert "PBXGUARD_TOKEN is reserved" in ((await client.response("f2")).get("Message") or "")
    response = await client.action("Setvar", Channel="PJSIP/x-1", Variable="_PBXGUARD_TOKEN", Value="x")
    assert "PBXGUARD_TOKEN is reserved" in (response.get("Message") or "")
    assert fake.originates == []
    assert fake.actions_named("Setvar") == []


async def test_token_variables_come_first() -> None:
    message = Message.action("Originate", [("ActionID", "1"), ("Variable", "A=1")], Channel="Local/1@x")
    out = with_token(message, "abc", "c,1")
    assert out.headers[1] == ("Variable", "__PBXGUARD_TOKEN=abc")
    assert out.headers[2] == ("Variable", "__PBXGUARD_CAMPAIGN=c\\,1")


# -- multiplexing ---------------------------------------------------------------------------------------


async def test_action_ids_are_preserved(client: AmiTestClient, fake: FakeAsterisk) -> None:
    for action_id in ("1", "dialer-42", "with spaces and : colon", "ünïcödé"):
        response = await client.action("Ping", ActionID=action_id)
        assert response.action_id == action_id
    client.send(Message.action("Ping"))
    await client.wait_for(lambda ms: any(m.get("Ping") == "Pong" and m.action_id is None for m in ms))
    # Asterisk saw only pbxguard's own ids.
    assert all((a.action_id or "").startswith("pbxg-") for a in fake.actions_named("Ping"))
    # A list response: the response and every event of the list carry the client's ActionID.
    client.send(Message.action("CoreShowChannels", ActionID="list-1"))
    await client.wait_for(lambda _: bool(client.events("CoreShowChannelsComplete")))
    assert client.responses("list-1")[0].get("EventList") == "start"
    assert [e.action_id for e in client.events("CoreShowChannel")] == ["list-1"] * 3
    assert client.events("CoreShowChannelsComplete")[0].action_id == "list-1"
    # Asterisk's own error answers come back unchanged, with the client's ActionID.
    response = await client.action("QueueStatus", ActionID="q")
    assert response.get("Message", "").startswith("Invalid/unknown command: QueueStatus")  # type: ignore[union-attr]


async def test_two_clients_at_once_each_get_only_their_responses(gate: AmiGate, fake: FakeAsterisk) -> None:
    a = await AmiTestClient.login(*gate.address, USER, SECRET, events="off")
    b = await AmiTestClient.login(*gate.address, USER, SECRET, events="off")
    for n in range(50):
        a.send(Message.action("Ping", ActionID=f"p{n}"))
        b.send(Message.action("Ping", ActionID=f"p{n}"))
    a.send(Message.action("CoreShowChannels", ActionID="list"))
    b.send(Message.action("CoreShowChannels", ActionID="list"))
    a.send(originate(action_id="o"))
    b.send(originate(NO_CONSENT, action_id="o"))
    for c in (a, b):
        await c.wait_for(lambda _, c=c: bool(c.events("CoreShowChannelsComplete")) and bool(c.responses("o")))
    await a.action("Ping", ActionID="last")
    await b.action("Ping", ActionID="last")
    for c in (a, b):
        pings = [m for m in c.messages if m.get("Ping") == "Pong"]
        assert [m.action_id for m in pings] == [f"p{n}" for n in range(50)] + ["last"]
        assert len(c.events("CoreShowChannel")) == 3
        assert len(c.responses("o")) == 1
    assert a.responses("o")[0].get("Response") == "Success"
    assert b.responses("o")[0].get("Response") == "Error"
    await a.close()
    await b.close()


async def test_events_follow_each_clients_mask(gate: AmiGate, fake: FakeAsterisk) -> None:
    off = await AmiTestClient.login(*gate.address, USER, SECRET, events="off")
    call = await AmiTestClient.login(*gate.address, USER, SECRET, events="call")
    system = await AmiTestClient.login(*gate.address, USER, SECRET, events="system,user")
    assert system.events("FullyBooted"), "a client reading system events is told Asterisk is up"
    fake.emit(Message.event("Newchannel", Privilege="call,all", Channel="PJSIP/x-1", Uniqueid="1.1"))
    fake.emit(Message.event("Reload", Privilege="system,all", Module="x"))
    fake.emit(Message.event("UserEvent", Privilege="user,all", UserEvent="Hello"))
    await call.wait_for(lambda _: bool(call.events("Newchannel")))
    await system.wait_for(lambda _: bool(system.events("UserEvent")))
    await off.action("Ping")
    assert [m.kind[1] for m in call.messages if m.kind[0] == "event"] == ["Newchannel"]
    assert [m.kind[1] for m in system.messages if m.kind[0] == "event"] == [
        "FullyBooted",
        "Reload",
        "UserEvent",
    ]
    assert [m for m in off.messages if m.kind[0] == "event"] == []
    # The Events action changes the mask of this session only, and is answered by pbxguard.
    response = await off.action("Events", EventMask="call")
    assert response.get("Events") == "On"
    assert (await off.action("Events", EventMask="")).get("Message") == "Invalid event mask"
    fake.emit(Message.event("Hangup", Privilege="call,all", Channel="PJSIP/x-1", Uniqueid="1.1", Cause="16"))
    await off.wait_for(lambda _: bool(off.events("Hangup")))
    await call.wait_for(lambda _: bool(call.events("Hangup")))
    assert fake.actions_named("Events") == []
    assert (await call.action("Events", EventMask="off")).get("Events") == "Off"
    for c in (off, call, system):
        await c.close()


async def test_filter_is_applied_per_session(gate: AmiGate, fake: FakeAsterisk) -> None:
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    assert (await c.action("Filter", Operation="Add", Filter="Event: Newchannel")).get(
        "Response"
    ) == "Success"
    assert (await c.action("Filter", Operation="Add", Filter="!Channel: Local/")).get("Response") == "Success"
    too_complex = await c.action("Filter", Operation="Add", Filter="(a+)+b")
    assert too_complex.get("Response") == "Error"
    assert fake.actions_named("Filter") == []
    fake.emit(Message.event("Newchannel", Privilege="call,all", Channel="Local/1@x-1;1"))
    fake.emit(Message.event("Hangup", Privilege="call,all", Channel="PJSIP/x-2"))
    fake.emit(Message.event("Newchannel", Privilege="call,all", Channel="PJSIP/x-3"))
    await c.wait_for(lambda _: bool(c.events("Newchannel")))
    await c.action("Ping")
    assert [e.get("Channel") for e in c.messages if e.kind[0] == "event" and e.kind[1] != "FullyBooted"] == [
        "PJSIP/x-3"
    ]
    await c.close()


async def test_wait_event_is_answered_here(client: AmiTestClient, fake: FakeAsterisk) -> None:
    client.send(Message.action("WaitEvent", ActionID="w", Timeout="5"))
    await asyncio.sleep(0)
    fake.emit(Message.event("Newchannel", Privilege="call,all", Channel="PJSIP/x-1"))
    await client.wait_for(lambda _: bool(client.events("WaitEventComplete")))
    assert client.responses("w")[0].get("Message") == "Waiting for Event completed."
    client.send(Message.action("WaitEvent", ActionID="w0", Timeout="0"))
    await client.wait_for(lambda _: len(client.events("WaitEventComplete")) == 2)
    assert fake.actions_named("WaitEvent") == []


async def test_logoff(client: AmiTestClient, fake: FakeAsterisk) -> None:
    response = await client.action("Logoff")
    assert response.get("Response") == "Goodbye"
    assert response.get("Message") == "Thanks for all the fish."
    await client.wait_closed()
    assert fake.actions_named("Logoff") == []


async def test_pipelined_input_is_answered_in_order(gate: AmiGate, fake: FakeAsterisk) -> None:
    c = await AmiTestClient.connect(*gate.address)
    batch = b"".join(
        encode(m)
        for m in (
            Message.action("Login", ActionID="1", Username=USER, Secret=SECRET, Events="off"),
            Message.action("Ping", ActionID="2"),
            originate(action_id="3"),
            Message.action("Ping", ActionID="4"),
            originate(NO_CONSENT, action_id="5"),
            Message.action("Ping", ActionID="6"),
        )
    )
    for i in range(0, len(batch), 7):  # split anywhere
        c.send_raw(batch[i : i + 7])
    await c.wait_for(lambda ms: len([m for m in ms if m.kind[0] == "response"]) == 6)
    assert [m.action_id for m in c.messages if m.kind[0] == "response"] == ["1", "2", "3", "4", "5", "6"]
    await c.close()


async def test_replies_made_here_wait_for_asterisks_answers_to_earlier_actions(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk
) -> None:
    # Asterisk answers a session's actions in order; pbxguard's own replies must not overtake.
    fake.held_actions = {"ping"}
    client.send(Message.action("Ping", ActionID="slow"))
    client.send(originate(NO_CONSENT, "blocked", is_async=False))
    client.send(Message.action("Events", ActionID="ev", EventMask="off"))
    (session,) = gate.sessions

    def held() -> int:
        last = session._last_forward
        return len(last.after) if last is not None else 0

    ids = ("slow", "blocked", "ev")

    def answered() -> list[str | None]:
        return [m.action_id for m in client.messages if m.kind[0] == "response" and m.action_id in ids]

    await until(lambda: held() == 2)
    assert answered() == []
    fake.release()
    await client.wait_for(lambda _: len(answered()) == 3)
    assert answered() == ["slow", "blocked", "ev"]


async def test_synchronous_originate_is_answered_when_the_call_is(
    client: AmiTestClient, fake: FakeAsterisk
) -> None:
    client.send(originate(action_id="sync", is_async=False))
    response = await client.response("sync")
    assert response.get("Response") == "Success"
    assert response.get("Message") == "Originate successfully queued"
    # Sent to Asterisk as Async (a synchronous one would hold pbxguard's shared session)...
    assert fake.originates[0].effective("Async") == "true"
    # ... and the client, which asked for a synchronous Originate, gets no OriginateResponse.
    await client.action("Ping")
    assert client.events("OriginateResponse") == []
    # A failed synchronous Originate is answered as Asterisk does.
    client.send(originate(action_id="sync-fail", channel=f"Local/{CONSENTED}@fail", is_async=False))
    assert (await client.response("sync-fail")).get("Message") == "Originate failed"


# -- upstream supervision ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_link(fake: FakeAsterisk, keepalive: float) -> AsyncIterator[UpstreamLink]:
    """pbxguard's own link to the fake Asterisk, logged in, stopped on the way out."""
    link = UpstreamLink(
        fake.host,
        fake.port,
        fake.username,
        fake.secret,
        on_message=lambda message: None,
        on_state=lambda up: None,
        reconnect_min=0.02,
        reconnect_max=0.05,
        boot_grace=0.1,
        keepalive=keepalive,
    )
    await link.start()
    try:
        await until(lambda: link.ready)
        yield link
    finally:
        await link.stop()


def link_pings(fake: FakeAsterisk) -> list[Message]:
    return [a for a in fake.actions_named("Ping") if (a.action_id or "").startswith(LINK_PREFIX)]


async def test_a_silent_asterisk_is_pinged_then_dropped_and_dialled_again(
    fake: FakeAsterisk, caplog: pytest.LogCaptureFixture
) -> None:
    fake.held_actions = {"ping"}  # alive at the TCP level, answering nothing
    async with running_link(fake, keepalive=0.5) as link:
        logged_in = time.monotonic()
        await until(lambda: len(link_pings(fake)) == 1)
        pinged = time.monotonic()
        # Margins for a loaded machine: each instant is seen by a poll that may come late.
        assert pinged - logged_in >= 0.3  # a ping only after keepalive seconds of silence
        await until(lambda: fake.logins == 2)
        assert time.monotonic() - pinged >= 0.3  # dropped only once the ping went unanswered as long
        assert any("no answer from Asterisk for 1 s" in r.getMessage() for r in caplog.records)
        await until(lambda: link.ready)


async def test_an_asterisk_that_answers_its_pings_keeps_the_link(fake: FakeAsterisk) -> None:
    async with running_link(fake, keepalive=0.5) as link:
        await until(lambda: len(link_pings(fake)) >= 3, within=10)
        assert fake.logins == 1 and link.ready


async def test_events_keep_a_link_from_pinging(fake: FakeAsterisk) -> None:
    async with running_link(fake, keepalive=1.0):
        for _ in range(12):
            fake.emit(
                Message.event("DeviceStateChange", Privilege="call,all", Device="Local/x", State="INUSE")
            )
            await asyncio.sleep(0.2)
        assert link_pings(fake) == [] and fake.logins == 1


async def test_asterisk_restart_no_queueing_no_replay(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    client.send(originate(action_id="before"))
    assert (await client.response("before")).get("Response") == "Success"
    assert fake.logins == 1
    await fake.kill()
    await until(lambda: not gate.ready())
    # During the outage: an error at once, nothing queued.
    started = time.monotonic()
    ping = await client.action("Ping", ActionID="during")
    assert ping.get("Message") == NOT_CONNECTED
    client.send(originate(action_id="during-o"))
    response = await client.response("during-o")
    assert response.get("Message") == NOT_CONNECTED
    assert time.monotonic() - started < 0.5
    assert await legal.attempts_count("+33612345678", "ACME") == 1  # no decision while down
    await fake.start()
    await until(gate.ready)
    await fake.wait_for(lambda: fake.logins == 2)
    assert (await client.action("Ping", ActionID="after")).get("Ping") == "Pong"
    # Nothing sent during the outage reached Asterisk afterwards.
    assert len(fake.originates) == 1
    client.send(originate(action_id="after-o"))
    assert (await client.response("after-o")).get("Response") == "Success"
    assert [o.effective("Channel") for o in fake.originates] == [f"PJSIP/{CONSENTED}@trunk"] * 2
    assert not fake.actions_named("Ping") or all(
        a.action_id and a.action_id.startswith("pbxg-") for a in fake.actions_named("Ping")
    )


async def test_action_in_flight_when_the_link_drops_gets_an_error(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk
) -> None:
    fake.auto_calls = False
    client.send(originate(action_id="inflight", is_async=False))  # answered only on OriginateResponse
    await fake.wait_for(lambda: len(fake.originates) == 1)
    await fake.kill()
    response = await client.response("inflight")
    assert response.get("Response") == "Error"
    assert response.get("Message") == LINK_LOST
    await fake.start()
    await until(gate.ready)
    assert len(fake.originates) == 1


async def test_readiness_follows_the_link_and_backs_off(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    await fake.kill()
    gate = await make_gate(wait_ready=False)
    assert not gate.ready()
    await fake.start()
    await until(gate.ready)


async def test_gate_waits_for_fully_booted_or_the_grace(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    fake.send_fully_booted = False
    gate = await make_gate(wait_ready=False)
    await fake.wait_for(lambda: fake.logins == 1)
    assert not gate.ready()
    await until(gate.ready, 2)


# -- shadow mode --------------------------------------------------------------------------------------


async def test_shadow_mode_forwards_and_journals(
    make_gate: GateFactory, fake: FakeAsterisk, legal: Ledger
) -> None:
    gate = await make_gate(mode=Mode.SHADOW)
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    c.send(originate(NO_CONSENT, "shadow"))
    assert (await c.response("shadow")).get("Response") == "Success"
    assert len(fake.originates) == 1
    row = await decision_row(legal, token_of(fake.originates[0]))
    assert row["verdict"] == "block"
    assert row["shadow"] is True
    assert row["reasons"] == ["NO_CONSENT"]
    # Dangerous content stays refused in shadow mode: it is a security control.
    c.send(originate(action_id="sys", extra=[("Application", "System"), ("Data", "id")]))
    assert (await c.response("sys")).get("Response") == "Error"
    assert len(fake.originates) == 1
    await c.close()


# -- the monitor --------------------------------------------------------------------------------------


async def outcome_of(ledger: Ledger, decision_id: str) -> tuple[object, object]:
    row = await decision_row(ledger, decision_id)
    return row["outcome"], row["duration_s"]


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (f"PJSIP/{CONSENTED}@trunk", "answered"),
        (f"Local/{CONSENTED}@busy", "busy"),
        (f"Local/{CONSENTED}@fail", "failed"),
    ],
)
async def test_monitor_records_the_outcome(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger, channel: str, expected: str
) -> None:
    fake.timestamps = True
    client.send(originate(action_id="mon", channel=channel))
    await client.response("mon")
    token = token_of(fake.originates[0])

    async def recorded() -> bool:
        return (await outcome_of(legal, token))[0] is not None

    await until_async(recorded)
    outcome, duration = await outcome_of(legal, token)
    assert outcome == expected
    if expected == "answered":
        assert duration == 42  # from Asterisk's event timestamps
    else:
        assert duration is None
    # A call that failed before dialling still counts as an attempt (the law counts attempts).
    assert await legal.attempts_count("+33612345678", "ACME") == 1
    async with legal.pool.acquire() as conn:
        assert await conn.fetchval("SELECT outcome FROM pbxguard.attempts") == expected


async def test_rejected_originate_is_journaled_as_failed(
    gate: AmiGate, client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    # An allowed Originate Asterisk answers with an error (no such extension, ...): nothing dialled.
    response = gate.monitor.tracker.observe(Message.response("Error", ActionID="nope"), NOW)
    assert response is None
    gate.monitor.expect("pbxg-x-1", str(uuid.uuid4()))
    outcome = gate.monitor.tracker.observe(
        Message.response("Error", ActionID="pbxg-x-1", Message="Extension does not exist."), NOW
    )
    assert isinstance(outcome, Outcome)
    assert outcome.outcome == "failed"


async def test_userevent_refusal_is_recorded(
    client: AmiTestClient, fake: FakeAsterisk, legal: Ledger
) -> None:
    response = await client.action(
        "UserEvent", ActionID="ue", UserEvent="PbxguardRefusal", Number=CONSENTED, Campaign="c1"
    )
    assert response.get("Message") == "Event Sent"
    response = await client.action(
        "UserEvent", UserEvent="PbxguardRefusal", Number=NO_CONSENT, OrderGiver="ACME", Kind="opposition"
    )
    # The client reads user events: it sees its UserEvent, with its own ActionID.
    await client.wait_for(lambda _: len(client.events("UserEvent")) == 2)
    assert client.events("UserEvent")[0].action_id == "ue"

    async def recorded() -> bool:
        async with legal.pool.acquire() as conn:
            refusals = await conn.fetchval("SELECT count(*) FROM pbxguard.refusals")
            oppositions = await conn.fetchval("SELECT count(*) FROM pbxguard.oppositions")
        return bool(refusals == 1 and oppositions == 1)

    await until_async(recorded)
    async with legal.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT consumer, order_giver, source FROM pbxguard.refusals")
    assert dict(row) == {"consumer": "+33612345678", "order_giver": "ACME", "source": "ami:UserEvent"}
    # The refusal now blocks the next call to that number.
    client.send(originate(action_id="again"))
    assert "REFUSAL_QUIET_PERIOD" in ((await client.response("again")).get("Message") or "")


# -- bounded resources ----------------------------------------------------------------------------------


async def test_slow_client_is_dropped_and_others_keep_going(
    make_gate: GateFactory, fake: FakeAsterisk
) -> None:
    gate = await make_gate(client_buffer_bytes=65536)
    fast = await AmiTestClient.login(*gate.address, USER, SECRET, events="call")
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_sock.connect(gate.address)
    slow_sock.sendall(encode(Message.action("Login", Username=USER, Secret=SECRET, Events="call")))
    await until(lambda: len(gate._listeners) == 2)
    padding = "x" * 1000
    for n in range(3000):
        fake.emit(Message.event("Newchannel", Privilege="call,all", Channel=f"PJSIP/{n}", Pad=padding))
        if n % 100 == 0:
            await asyncio.sleep(0)
    await fast.wait_for(lambda _: len(fast.events("Newchannel")) == 3000, within=10)
    await until(lambda: len(gate.sessions) == 1)
    assert (await fast.action("Ping")).get("Ping") == "Pong"
    slow_sock.close()
    await fast.close()


async def test_connection_cap_and_login_timeout(make_gate: GateFactory) -> None:
    gate = await make_gate(max_clients=2, login_timeout_ms=200)
    a = await AmiTestClient.login(*gate.address, USER, SECRET)
    idle = await AmiTestClient.connect(*gate.address)
    third = await AmiTestClient.connect(*gate.address)
    await third.wait_closed()
    assert third.messages[0].get("Message") == "pbxguard: too many connections"
    started = time.monotonic()
    await idle.wait_closed(within=2)
    assert time.monotonic() - started < 1.5
    assert (await a.action("Ping")).get("Ping") == "Pong"  # a logged-in client has no idle limit
    for c in (a, idle, third):
        await c.close()


async def test_oversized_input_is_an_error_not_a_crash(gate: AmiGate) -> None:
    c = await AmiTestClient.connect(*gate.address)
    c.send_raw(b"Action: Login\r\nUsername: " + b"u" * 20000 + b"\r\n\r\n")
    await c.wait_closed()
    assert c.messages and c.messages[0].get("Response") == "Error"
    ok = await AmiTestClient.login(*gate.address, USER, SECRET)
    await ok.close()


# -- a third-party client -------------------------------------------------------------------------------


async def test_panoramisk_manager_works_through_the_proxy(gate: AmiGate, fake: FakeAsterisk) -> None:
    from panoramisk import Manager

    host, port = gate.address
    manager = Manager(
        host=host, port=port, username=USER, secret=SECRET, ping_delay=60, loop=asyncio.get_running_loop()
    )
    try:
        await asyncio.wait_for(manager.connect(), 5)
        await until(lambda: manager.authenticated)
        pong = await asyncio.wait_for(manager.send_action({"Action": "Ping"}), 5)
        assert pong.ping == "Pong"
        result = await asyncio.wait_for(
            manager.send_action(
                {
                    "Action": "Originate",
                    "Channel": f"PJSIP/{CONSENTED}@trunk",
                    "Context": "agents",
                    "Exten": "100",
                    "Priority": "1",
                    "CallerID": CALLER,
                    "Async": "true",
                }
            ),
            5,
        )
        # panoramisk waits for the OriginateResponse of an async Originate: [response, event].
        assert result[0].response == "Success"
        assert result[-1].event == "OriginateResponse"
        assert result[-1].response == "Success"
        blocked = await asyncio.wait_for(
            manager.send_action(
                {
                    "Action": "Originate",
                    "Channel": f"PJSIP/{NO_CONSENT}@trunk",
                    "Context": "agents",
                    "Exten": "100",
                    "Priority": "1",
                    "CallerID": CALLER,
                    "Async": "false",
                }
            ),
            5,
        )
        assert blocked.response == "Error"
        assert blocked.message == "Originate blocked by pbxguard: NO_CONSENT"
        assert len(fake.originates) == 1
    finally:
        manager.close()


# -- pure parts -----------------------------------------------------------------------------------------


def _pending(router: ActionRouter, client_id: str | None, action: str = "ping", **kw: object) -> Pending:
    pending = Pending(router.new_id("s"), None, client_id, action, 1e9, **kw)  # type: ignore[arg-type]
    router.add(pending)
    return pending


def test_router_restores_ids_and_routes_lists() -> None:
    router = ActionRouter()
    p = _pending(router, "mine")
    route = router.route(Message.response("Success", ActionID=p.upstream_id, Ping="Pong"))
    assert route is not None and route.finished and route.pending is p
    assert route.to_owner is not None and route.to_owner.action_id == "mine"
    assert len(router) == 0
    # Unknown and stale responses go nowhere.
    assert router.route(Message.response("Success", ActionID="pbxg-zzz-1")) is None
    assert router.route(Message.response("Success")) is None
    # A list: events stay with the owner until the Complete one.
    p = _pending(router, None, "status")
    assert router.route(Message.response("Success", ActionID=p.upstream_id, EventList="start"))
    member = router.route(Message.event("Status", ActionID=p.upstream_id, Channel="x"))
    assert member is not None and member.broadcast is None and member.to_owner is not None
    assert member.to_owner.action_id is None  # the client sent none: Asterisk would show none
    done = router.route(Message.event("StatusComplete", ActionID=p.upstream_id, EventList="Complete"))
    assert done is not None and done.finished
    # Events without our id are broadcast untouched.
    plain = Message.event("Newchannel", Channel="x")
    route = router.route(plain)
    assert route is not None and route.broadcast is plain


def test_router_originate_async_sync_and_early_event() -> None:
    router = ActionRouter()
    a = _pending(router, "a", "originate", awaits_event=True)
    ack = router.route(Message.response("Success", ActionID=a.upstream_id))
    assert ack is not None and ack.to_owner is not None and not ack.finished
    event = router.route(Message.event("OriginateResponse", ActionID=a.upstream_id, Response="Success"))
    assert event is not None and event.finished and event.to_owner is None
    assert event.broadcast is not None and event.broadcast.action_id == "a"
    # Synchronous: the ack is swallowed, the event becomes the answer, nothing is broadcast.
    s = _pending(router, "s", "originate", awaits_event=True, sync_originate=True)
    ack = router.route(Message.response("Success", ActionID=s.upstream_id))
    assert ack is not None and ack.to_owner is None
    event = router.route(Message.event("OriginateResponse", ActionID=s.upstream_id, Response="Failure"))
    assert event is not None and event.broadcast is None and event.finished
    assert event.to_owner is not None and event.to_owner.get("Message") == "Originate failed"
    # The event overtakes the response.
    e = _pending(router, "e", "originate", awaits_event=True, sync_originate=True)
    early = router.route(Message.event("OriginateResponse", ActionID=e.upstream_id, Response="Success"))
    assert early is not None and early.to_owner is None and not early.finished
    late = router.route(Message.response("Success", ActionID=e.upstream_id))
    assert late is not None and late.finished
    assert late.to_owner is not None and late.to_owner.get("Message") == "Originate successfully queued"
    # A UserEvent echoing a finished action's id gets the client's id back.
    u = _pending(router, "ue", "userevent")
    router.route(Message.response("Success", ActionID=u.upstream_id))
    echoed = router.route(Message.event("UserEvent", ActionID=u.upstream_id, UserEvent="X"))
    assert echoed is not None and echoed.broadcast is not None and echoed.broadcast.action_id == "ue"


def test_router_expiry_and_link_loss() -> None:
    router = ActionRouter()
    old = Pending(router.new_id("s"), None, "1", "ping", 5.0)
    new = Pending(router.new_id("s"), None, "2", "ping", 50.0)
    router.add(old)
    router.add(new)
    assert router.expire(10.0) == [old]
    assert router.fail_all() == [new]
    assert len(router) == 0


def test_blocked_message_without_next_instant() -> None:
    from pbxguard.policy.model import Decision, Reason, Verdict

    decision = Decision(
        id="x", verdict=Verdict.BLOCK, reasons=(Reason.NO_CONSENT, Reason.OPPOSED), next_allowed_at=None,
        consumer=None, territories=(), zones=(), campaign_id="c1", order_giver=None, caller_id="",
        gate="ami", decided_at=NOW,
    )  # fmt: skip
    assert blocked_message(decision) == "Originate blocked by pbxguard: NO_CONSENT,OPPOSED"


def _ev(name: str, **headers: str) -> Message:
    return Message.event(name, **headers)


def test_tracker_follows_a_call_by_token_and_originate_response() -> None:
    tracker = CallTracker()
    t0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    tracker.expect("pbxg-a-1", "d1", 0.0)
    # The token is inherited by the Local legs and the trunk leg: all are followed.
    for uid, chan in (
        ("u1", "Local/0612345678@out-1;1"),
        ("u2", "Local/0612345678@out-1;2"),
        ("u3", "PJSIP/trunk-1"),
    ):
        assert (
            tracker.observe(
                _ev("VarSet", Uniqueid=uid, Channel=chan, Variable="__PBXGUARD_TOKEN", Value="d1"), t0
            )
            is None
        )
    assert tracker.observe(_ev("Newstate", Uniqueid="u3", ChannelState="6"), t0.replace(second=2)) is None
    assert (
        tracker.observe(_ev("OriginateResponse", ActionID="pbxg-a-1", Response="Success", Uniqueid="u1"), t0)
        is None
    )
    assert (
        tracker.observe(
            _ev("Hangup", Uniqueid="u3", Channel="PJSIP/trunk-1", Cause="16"), t0.replace(second=40)
        )
        is None
    )
    assert (
        tracker.observe(_ev("Hangup", Uniqueid="u2", Channel="Local/x;2", Cause="16"), t0.replace(second=40))
        is None
    )
    done = tracker.observe(
        _ev("Hangup", Uniqueid="u1", Channel="Local/x;1", Cause="16"), t0.replace(second=41)
    )
    assert done == Outcome("d1", "answered", t0.replace(second=41), 39)
    assert len(tracker) == 0


def test_tracker_unanswered_causes_and_reasons() -> None:
    t0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    tracker = CallTracker()
    tracker.expect("a", "d", 0.0)
    tracker.observe(_ev("VarSet", Uniqueid="u", Variable="__PBXGUARD_TOKEN", Value="d"), t0)
    # The Hangup may come before the OriginateResponse: the outcome waits for both.
    assert tracker.observe(_ev("Hangup", Uniqueid="u", Channel="PJSIP/t-1", Cause="19"), t0) is None
    done = tracker.observe(
        _ev("OriginateResponse", ActionID="a", Response="Failure", Reason="3", Uniqueid="<unknown>"), t0
    )
    assert done is not None and isinstance(done, Outcome) and done.outcome == "no_answer"
    assert outcome_for(False, [(True, 16), (False, 17)], None) == "busy"
    assert outcome_for(False, [], 5) == "busy"
    assert outcome_for(False, [], 0) == "failed"
    assert outcome_for(False, [(False, 34)], None) == "failed"
    # Unknown ActionIDs and foreign tokens are ignored; a lost link forgets calls with no channel.
    tracker.expect("b", "d2", 0.0)
    assert (
        tracker.observe(_ev("OriginateResponse", ActionID="zzz", Response="Success", Uniqueid="q"), t0)
        is None
    )
    tracker.link_lost()
    assert len(tracker) == 0
    tracker.expect("c", "d3", 0.0)
    assert tracker.expire(1e9) == 1


def test_refusal_events_are_parsed() -> None:
    t0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    tracker = CallTracker()
    ok = tracker.observe(
        _ev("UserEvent", UserEvent="PbxguardRefusal", Number="0612345678", Campaign="c1"), t0
    )
    assert ok == Feedback("0612345678", "refusal", "c1", None, t0, "ami:UserEvent")
    opp = tracker.observe(
        _ev("UserEvent", UserEvent="pbxguardrefusal", Number="1", OrderGiver="A", Kind="Opposition"), t0
    )
    assert isinstance(opp, Feedback) and opp.kind == "opposition" and opp.order_giver == "A"
    assert (
        tracker.observe(_ev("UserEvent", UserEvent="PbxguardRefusal", Number="1", Kind="maybe"), t0) is None
    )
    assert tracker.observe(_ev("UserEvent", UserEvent="Other", Number="1"), t0) is None

    # A dialplan UserEvent can carry any header, "Action" included: what Asterisk sends is classed by
    # its first header, so this is still a refusal, not an action.
    carried = Message(
        (("Event", "UserEvent"), ("Action", "Originate"), ("UserEvent", "PbxguardRefusal"), ("Number", "2"))
    )
    assert isinstance(tracker.observe(carried, t0), Feedback)


# -- configuration ----------------------------------------------------------------------------------


def _table(**ami: object) -> dict[str, object]:
    gate: dict[str, object] = {
        "listen": "127.0.0.1:5039",
        "users": [
            {"username": "d", "secret": "s", "campaign": "c1", "allowed_actions": ["Ping", "originate"]}
        ],
    }
    gate.update(ami)
    return {"gates": {"ami": gate}, "asterisk": {"ami": {"username": "pbxguard", "secret": "x"}}}


def test_configuration_keys() -> None:
    from pbxguard.config import DEFAULT_AMI_ACTIONS, parse

    config = parse(
        _table(
            dial_patterns=[r"Motif/[^/]+/(?P<number>[0-9]+)"],
            strip_prefixes=["9"],
            international_prefix="00",
            internal_channels=[r"PJSIP/[0-9]{4}"],
            max_clients=10,
            login_timeout_ms=5000,
            client_buffer_bytes=65536,
            max_pending_actions=50,
        )
    )
    ami = config.gates.ami
    assert ami.users[0].allowed_actions == ("Ping", "originate")
    assert ami.dial_patterns == (r"Motif/[^/]+/(?P<number>[0-9]+)",)
    assert (ami.max_clients, ami.login_timeout_ms, ami.client_buffer_bytes) == (10, 5000, 65536)
    defaults = parse(_table()).gates.ami
    assert (defaults.max_clients, defaults.login_timeout_ms, defaults.client_buffer_bytes) == (
        256,
        30000,
        1048576,
    )
    assert defaults.international_prefix == "00" and defaults.builtin_dial_patterns
    assert "Command" not in DEFAULT_AMI_ACTIONS and "Originate" in DEFAULT_AMI_ACTIONS


@pytest.mark.parametrize(
    ("ami", "error"),
    [
        ({"dial_patterns": ["PJSIP/([0-9]+)"]}, "gates.ami.dial_patterns[0]: needs a (?P<number>...) group"),
        ({"dial_patterns": ["("]}, "gates.ami.dial_patterns[0]: not a valid regex"),
        ({"internal_channels": ["[x"]}, "gates.ami.internal_channels[0]: not a valid regex"),
        ({"max_clients": 0}, "gates.ami"),
        ({"strip_prefix": ["9"]}, "gates.ami.strip_prefix: unknown setting"),
    ],
)
def test_configuration_errors_name_the_key(ami: dict[str, object], error: str) -> None:
    from pbxguard.config import ConfigError, parse

    with pytest.raises(ConfigError) as info:
        parse(_table(**ami))
    assert error in str(info.value)


async def test_allowed_actions_are_per_user(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    users = (AmiUserConfig("pinger", Secret("p"), campaign="c1", allowed_actions=("ping",)),)
    gate = await make_gate(users=users)
    c = await AmiTestClient.login(*gate.address, "pinger", "p")
    assert (await c.action("Ping")).get("Ping") == "Pong"
    c.send(originate(action_id="no"))
    assert (await c.response("no")).get(
        "Message"
    ) == "Permission denied: pbxguard does not allow Originate for this user"
    assert (await c.action("Events", EventMask="on")).get("Response") == "Error"
    assert fake.originates == []
    await c.close()


async def test_allowed_but_link_lost_before_sending_is_journaled_failed(
    make_gate: GateFactory, fake: FakeAsterisk, legal: Ledger
) -> None:
    holder: list[AmiGate] = []

    class LinkDiesDuringDecision(Guard):
        async def decide(self, *args: object, **kw: object) -> Decision:  # type: ignore[override]
            decision = await super().decide(*args, **kw)  # type: ignore[arg-type]
            await fake.kill()
            await until(lambda: not holder[0].ready())
            return decision

    gate = await make_gate(guard=LinkDiesDuringDecision(legal, PolicySettings(), Mode.ENFORCE, timeout=1.5))
    holder.append(gate)
    c = await AmiTestClient.login(*gate.address, USER, SECRET)
    c.send(originate(action_id="lost"))
    assert (await c.response("lost")).get("Message") == NOT_CONNECTED
    await c.wait_for(lambda _: bool(c.events("OriginateResponse")))
    assert fake.originates == []
    async with legal.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT verdict, outcome FROM pbxguard.decisions")
    assert row is not None and row["verdict"] == "allow"

    async def recorded() -> bool:
        async with legal.pool.acquire() as conn:
            return await conn.fetchval("SELECT outcome FROM pbxguard.decisions") == "failed"

    await until_async(recorded)
    await c.close()
