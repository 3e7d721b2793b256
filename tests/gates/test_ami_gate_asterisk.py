"""The AMI gate in front of a real Asterisk (skipped without one: see PBXGUARD_ASTERISK_BIN).

What reached Asterisk is read from Asterisk itself: a second AMI connection with every event (the
harness account) and its CDRs, never from pbxguard.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import pytest
from asterisk_harness import (  # the fixtures too: `pytest_plugins` here would import it too late
    DIAL_CONTEXT,
    SKIP_MESSAGE,
    AmiClient,
    AsteriskInstance,
    ami,
    asterisk,
    channel_events,
    find_asterisk,
    hangup_event,
    reached_context,
    variable_value,
)
from fake_asterisk_ami import AmiTestClient

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
from pbxguard.gates.ami_proxy import NOT_CONNECTED, AmiGate
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message, md5_challenge_key

pytestmark = [pytest.mark.asterisk, pytest.mark.skipif(find_asterisk() is None, reason=SKIP_MESSAGE)]
__all__ = ["ami", "asterisk"]  # fixtures, used by name

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)  # Tuesday 10:30 in Paris (pbxguard's clock)
CONSENTED = "0612345678"
NO_CONSENT = "0698765432"
NPV = "0162123456"
USER, SECRET = "dialer", "dialer-secret"
_ids = itertools.count(1)


def call_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}-{uuid.uuid4().hex[:6]}"


def originate(number: str, action_id: str, channel_id: str) -> Message:
    """How a dialer places a call through the dialplan: Local/NUMBER@context, the ;1 leg parked."""
    return Message.action(
        "Originate",
        [
            ("ActionID", action_id),
            ("Channel", f"Local/{number}@{DIAL_CONTEXT}"),
            ("Context", "pbxguard-test-park"),
            ("Exten", "s"),
            ("Priority", "1"),
            ("CallerID", f'"ACME" <{NPV}>'),
            ("Async", "true"),
            ("Timeout", "10000"),
            ("ChannelId", f"{channel_id}-1"),
            ("OtherChannelId", f"{channel_id}-2"),
        ],
    )


@pytest.fixture
async def gate(asterisk: AsteriskInstance, ledger: Ledger) -> AsyncIterator[AmiGate]:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent("+33612345678", "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    config = Config(
        asterisk=AsteriskConfig(
            ami=AmiUpstreamConfig(
                "127.0.0.1", asterisk.ami_port, asterisk.ami_username, Secret(asterisk.ami_secret)
            )
        ),
        gates=GatesConfig(
            ami=AmiGateConfig(
                listen="127.0.0.1:5039", users=(AmiUserConfig(USER, Secret(SECRET), campaign="c1"),)
            )
        ),
    )
    g = AmiGate(
        config,
        Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5),
        clock=lambda: NOW,
        listen=("127.0.0.1", 0),
        reconnect_min=0.05,
        reconnect_max=0.5,
        boot_grace=0.3,  # the shipped account does not read "system": no FullyBooted
    )
    await g.start()
    try:
        async with asyncio.timeout(10):
            while not g.ready():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        yield g
    finally:
        await g.stop()


@pytest.fixture
async def dialer(gate: AmiGate) -> AsyncIterator[AmiTestClient]:
    client = await AmiTestClient.login(*gate.address, USER, SECRET)
    try:
        yield client
    finally:
        await client.close()


async def test_allowed_originate_creates_the_call_and_its_outcome_is_recorded(
    gate: AmiGate, dialer: AmiTestClient, ami: AmiClient, ledger: Ledger, asterisk: AsteriskInstance
) -> None:
    leg = call_id("ok")
    dialer.send(originate(CONSENTED, "dial-1", leg))
    response = await dialer.response("dial-1")
    assert response.get("Response") == "Success", response
    # Asterisk created the call and ran the dial context on ;2, with pbxguard's token on the channel.
    await ami.wait_for(lambda events: hangup_event(events, f"{leg}-2") is not None)
    assert any(e.get("Event") == "Newchannel" for e in channel_events(ami.events, f"{leg}-1"))
    assert reached_context(ami.events, f"{leg}-2", DIAL_CONTEXT)
    token = variable_value(ami.events, f"{leg}-1", "__PBXGUARD_TOKEN")
    assert token is not None
    assert variable_value(ami.events, f"{leg}-1", "__PBXGUARD_CAMPAIGN") == "c1"
    originate_responses = [
        e for e in ami.events if e.get("Event") == "OriginateResponse" and e.get("Uniqueid") == f"{leg}-1"
    ]
    assert originate_responses and originate_responses[0].get("Response") == "Success"
    assert (originate_responses[0].action_id or "").startswith("pbxg-")  # Asterisk saw pbxguard's id...
    await dialer.wait_for(lambda _: bool(dialer.events("OriginateResponse")))
    assert dialer.events("OriginateResponse")[0].action_id == "dial-1"  # ...the dialer its own
    # The monitor followed the call on pbxguard's own connection: answered, about a second of talk.
    async with asyncio.timeout(10):
        while True:
            row = await ledger.decision(uuid.UUID(token))
            assert row is not None
            if row["outcome"] is not None:
                break
            await asyncio.sleep(0.05)
    assert row["verdict"] == "allow"
    assert row["outcome"] == "answered"
    assert row["duration_s"] in (0, 1, 2)


async def test_blocked_originate_never_reaches_asterisk(
    gate: AmiGate, dialer: AmiTestClient, ami: AmiClient, asterisk: AsteriskInstance
) -> None:
    blocked, allowed = call_id("blk"), call_id("after")
    dialer.send(originate(NO_CONSENT, "no", blocked))
    response = await dialer.response("no")
    assert response.get("Message") == "Originate blocked by pbxguard: NO_CONSENT"
    await dialer.wait_for(lambda _: bool(dialer.events("OriginateResponse")))
    assert dialer.events("OriginateResponse")[0].get("Response") == "Failure"
    # The gate forwards in order: once a later call has come and gone, the blocked one never will.
    dialer.send(originate(CONSENTED, "yes", allowed))
    await ami.wait_for(lambda events: hangup_event(events, f"{allowed}-2") is not None)
    assert [e for e in ami.events if (e.get("Uniqueid") or "").startswith(blocked)] == []
    rows = await asterisk.wait_cdrs(lambda rows: any(r["uniqueid"].startswith(allowed) for r in rows))
    assert not any(r["uniqueid"].startswith(blocked) for r in rows)


async def test_md5_login_and_asterisks_own_answers(gate: AmiGate, asterisk: AsteriskInstance) -> None:
    client = await AmiTestClient.connect(*gate.address)
    try:
        challenge = (await client.action("Challenge", AuthType="MD5")).get("Challenge") or ""
        login = await client.action(
            "Login", Username=USER, AuthType="MD5", Key=md5_challenge_key(challenge, SECRET)
        )
        assert login.get("Message") == "Authentication accepted"
        pong = await client.action("Ping", ActionID="mine")
        assert (pong.get("Ping"), pong.action_id) == ("Pong", "mine")
        assert pong.get("Timestamp")  # answered by Asterisk, not by pbxguard
        unknown = await client.action("Status", ActionID="st")
        assert unknown.get("Response") == "Success"  # a list response from Asterisk, routed back
        await client.wait_for(lambda _: bool(client.events("StatusComplete")))
        assert client.events("StatusComplete")[0].action_id == "st"
    finally:
        await client.close()
    bad = await AmiTestClient.connect(*gate.address)
    refused = await bad.action("Login", Username=USER, Secret="wrong")
    assert refused.get("Message") == "Authentication failed"
    await bad.wait_closed()


async def test_asterisk_restart_mid_test_replays_nothing(
    gate: AmiGate, dialer: AmiTestClient, asterisk: AsteriskInstance, ledger: Ledger
) -> None:
    before, during, after = call_id("pre"), call_id("dur"), call_id("post")
    dialer.send(originate(CONSENTED, "before", before))
    assert (await dialer.response("before")).get("Response") == "Success"
    await asterisk.wait_cdrs(lambda rows: any(r["uniqueid"] == f"{before}-1" for r in rows))
    connections = gate.link.connections

    restart = asyncio.create_task(asyncio.to_thread(asterisk.restart))
    try:
        async with asyncio.timeout(10):
            while gate.ready():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # While Asterisk is away: an immediate error, nothing kept for later.
        dialer.send(originate(CONSENTED, "during", during))
        assert (await dialer.response("during")).get("Message") == NOT_CONNECTED
        assert (await dialer.action("Ping", ActionID="p")).get("Message") == NOT_CONNECTED
    finally:
        await restart
    async with asyncio.timeout(15):
        while not (gate.ready() and gate.link.connections > connections):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    # Service resumes without restarting pbxguard.
    observer = await AmiClient.connect(
        "127.0.0.1", asterisk.ami_port, asterisk.harness_username, asterisk.harness_secret
    )
    try:
        dialer.send(originate(CONSENTED, "after", after))
        assert (await dialer.response("after")).get("Response") == "Success"
        await observer.wait_for(lambda events: hangup_event(events, f"{after}-2") is not None)
        rows = await asterisk.wait_cdrs(lambda rows: any(r["uniqueid"] == f"{after}-1" for r in rows))
    finally:
        await observer.close()
    # The call placed before the restart exists once (not replayed), the one refused during it never.
    assert [r["uniqueid"] for r in rows if r["uniqueid"].startswith(before)].count(f"{before}-1") == 1
    assert [r["uniqueid"] for r in rows if r["uniqueid"].startswith(after)].count(f"{after}-1") == 1
    assert not any(r["uniqueid"].startswith(during) for r in rows)
    async with ledger.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pbxguard.attempts") == 2


async def test_two_clients_at_once_and_a_dangerous_originate(
    gate: AmiGate, dialer: AmiTestClient, ami: AmiClient, asterisk: AsteriskInstance
) -> None:
    other = await AmiTestClient.login(*gate.address, USER, SECRET)
    try:
        mine, theirs, evil = call_id("a"), call_id("b"), call_id("evil")
        # Same ActionIDs on both connections, interleaved: each gets its own answers only.
        for n in range(20):
            dialer.send(Message.action("Ping", ActionID=f"p{n}"))
            other.send(Message.action("Ping", ActionID=f"p{n}"))
        dialer.send(originate(CONSENTED, "same", mine))
        other.send(originate(NO_CONSENT, "same", theirs))
        system = originate(CONSENTED, "evil", evil)
        other.send(
            Message(
                (
                    *(h for h in system.headers if h[0] not in ("Context", "Exten", "Priority")),
                    ("Application", "System"),
                    ("Data", "touch /tmp/pwned"),
                )
            )
        )
        for client in (dialer, other):
            await client.wait_for(
                lambda _, c=client: len([m for m in c.messages if m.get("Ping") == "Pong"]) == 20
            )
            await client.wait_for(lambda _, c=client: len(c.responses("same")) == 1)
        assert [m.action_id for m in dialer.messages if m.get("Ping") == "Pong"] == [
            f"p{n}" for n in range(20)
        ]
        assert [m.action_id for m in other.messages if m.get("Ping") == "Pong"] == [
            f"p{n}" for n in range(20)
        ]
        assert dialer.responses("same")[0].get("Response") == "Success"
        assert other.responses("same")[0].get("Message") == "Originate blocked by pbxguard: NO_CONSENT"
        refused = await other.response("evil")
        assert (
            refused.get("Message")
            == "Originate refused by pbxguard: application System is not allowed for this user"
        )
        await ami.wait_for(lambda events: hangup_event(events, f"{mine}-2") is not None)
        assert [e for e in ami.events if (e.get("Uniqueid") or "").startswith((theirs, evil))] == []
    finally:
        await other.close()
