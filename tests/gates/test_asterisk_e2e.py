"""The shipped dialplan and both gates on a real Asterisk (skipped without one).

Every outcome is read from Asterisk itself: its AMI events (``Hangup`` cause, ``Newexten`` in the dial
context, ``VarSet``) and its CDRs, never from pbxguard's logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from asterisk_harness import (  # the fixtures too: `pytest_plugins` here would import it too late
    DIAL_CONTEXT,
    AmiClient,
    AsteriskInstance,
    ami,
    asterisk,
    channel_events,
    find_asterisk,
    free_port,
    hangup_event,
    originate_local,
    reached_context,
    skip_reason,
    start_instance,
    variable_value,
)

from pbxguard.config import (
    AgiGateConfig,
    AriUpstreamConfig,
    AsteriskConfig,
    Config,
    GatesConfig,
    Mode,
    Secret,
)
from pbxguard.gates.ari import AriGate
from pbxguard.gates.fastagi import FastAgiGate
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message

# Skipped before any fixture (PostgreSQL included) is set up when there is no binary.
pytestmark = [pytest.mark.asterisk, pytest.mark.skipif(find_asterisk() is None, reason=skip_reason())]
__all__ = ["ami", "asterisk"]  # fixtures, used by name

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)  # pbxguard's clock; Asterisk's does not matter
NPV = "0162123456"
CONSENTED = ("+33612345678", "+33612345679", "+33612345670", "+33612345671", "+33612345672")
_ids = itertools.count(1)


def call_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


async def legal_setup(ledger: Ledger) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    for number in CONSENTED:
        await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    await ledger.add_opposition("+33612345670", "ACME", NOW - timedelta(days=3), "test")
    await ledger.add_refusal("+33612345671", "ACME", NOW - timedelta(days=10), "test")


async def attempts(ledger: Ledger) -> int:
    async with ledger.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pbxguard.attempts"))


@pytest.fixture
async def guard(ledger: Ledger) -> Guard:
    await legal_setup(ledger)
    return Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5)


@pytest.fixture
async def agi_gate(asterisk: AsteriskInstance, guard: Guard) -> AsyncIterator[FastAgiGate]:
    config = Config(gates=GatesConfig(agi=AgiGateConfig(listen=f"127.0.0.1:{asterisk.agi_port}")))
    gate = FastAgiGate(config, guard, clock=lambda: NOW)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.stop()


@contextlib.contextmanager
def agi_unreachable(asterisk: AsteriskInstance) -> Iterator[None]:
    """Points the dialplan's FastAGI hook at a port where nothing listens, then back at the gate."""
    asterisk.set_global("PBXGUARD_AGI", f"agi://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        asterisk.set_global("PBXGUARD_AGI", asterisk.agi_url)


async def finished_call(
    ami: AmiClient,
    number: str,
    context: str = "pbxguard-outbound",
    *,
    call_id: str,
    caller_id: str | None = None,
    variables: dict[str, str] | None = None,
) -> str:
    """Originates ``Local/NUMBER@CONTEXT`` and waits until its ``;2`` leg, which runs the dialplan,
    has hung up; returns that leg's uniqueid."""
    _, leg = await originate_local(
        ami, number, context, call_id=call_id, caller_id=caller_id, variables=variables
    )
    await ami.wait_for(lambda events: hangup_event(events, leg) is not None)
    return leg


@dataclass(frozen=True)
class Case:
    number: str
    verdict: str  # ALLOW | BLOCK
    reason: str = ""  # one reason the block must list
    caller_id: str = NPV
    campaign: str = "c1"


# 20 calls: 5 legal ones (never more than the cap of 4 per number) and 15 that break one rule each.
CALLS = [
    *[Case("0612345678", "ALLOW")] * 3,
    *[Case("+33612345679", "ALLOW")] * 2,
    *[Case("0698765432", "BLOCK", "NO_CONSENT")] * 3,
    *[Case("0612345678", "BLOCK", "CALLER_ID_MOBILE", caller_id="0611111111")] * 2,
    *[Case("0612345678", "BLOCK", "CALLER_ID_FORBIDDEN", caller_id="0899123456")] * 2,
    Case("0612345678", "BLOCK", "CALLER_ID_MISSING", caller_id=""),
    *[Case("0612345678", "BLOCK", "UNKNOWN_CAMPAIGN", campaign="nope")] * 2,
    Case("0012", "BLOCK", "INVALID_DESTINATION"),
    *[Case("0612345670", "BLOCK", "OPPOSED")] * 2,
    *[Case("0612345671", "BLOCK", "REFUSAL_QUIET_PERIOD")] * 2,
]


async def test_twenty_calls_through_the_sample_dialplan(
    asterisk: AsteriskInstance, ami: AmiClient, agi_gate: FastAgiGate, ledger: Ledger
) -> None:
    assert len(CALLS) == 20
    legs: list[str] = []
    for case in CALLS:
        _, leg2 = await originate_local(
            ami,
            case.number,
            call_id=call_id("mix"),
            caller_id=f'"ACME" <{case.caller_id}>' if case.caller_id else "",
            variables={"__PBXGUARD_CAMPAIGN": case.campaign},
        )
        legs.append(leg2)
    await ami.wait_for(lambda events: all(hangup_event(events, leg) for leg in legs), limit=20)
    rows = await asterisk.wait_cdrs(lambda rows: {r["uniqueid"] for r in rows} >= set(legs))
    cdrs = {r["uniqueid"]: r for r in rows}

    for case, leg in zip(CALLS, legs, strict=True):
        hangup = hangup_event(ami.events, leg)
        assert hangup is not None
        verdict = variable_value(ami.events, leg, "PBXGUARD_VERDICT")
        reasons = (variable_value(ami.events, leg, "PBXGUARD_REASONS") or "").split(",")
        cdr = cdrs[leg]
        where = f"{case} on {leg}: cause {hangup.get('Cause')}, reasons {reasons}, cdr {cdr}"
        assert verdict == case.verdict, where
        if case.verdict == "ALLOW":
            # Reached the "trunk", which answered and hung up normally.
            assert reached_context(ami.events, leg, DIAL_CONTEXT), where
            assert hangup.get("Cause") == "16", where
            assert cdr["dcontext"] == DIAL_CONTEXT and cdr["disposition"] == "ANSWERED", where
        else:
            assert case.reason in reasons, where
            assert not reached_context(ami.events, leg, DIAL_CONTEXT), where
            assert hangup.get("Cause") == "21", where
            assert hangup.get("Cause-txt") == "Call Rejected", where
            # The CDR keeps the context the call was placed in and the application that ended it.
            assert (cdr["dcontext"], cdr["lastapp"], cdr["lastdata"]) == (
                "pbxguard-outbound",
                "Hangup",
                "21",
            ), where
            assert (cdr["disposition"], cdr["billsec"]) == ("NO ANSWER", "0"), where
        assert cdr["dst"] == case.number and cdr["src"] == case.caller_id, where
    assert await attempts(ledger) == 5


def agi_commands(events: list[Message], uniqueid: str) -> list[str]:
    """The AGI commands Asterisk ran on a channel, as its AGIExecStart events report them."""
    return [
        e.get("Command", "") for e in channel_events(events, uniqueid) if e.get("Event") == "AGIExecStart"
    ]


async def test_a_check_is_one_agi_command_and_keeps_commas_in_reasons(
    ami: AmiClient, agi_gate: FastAgiGate
) -> None:
    # Two rules broken at once: the reasons hold a comma, which MSet must not take for a separator.
    leg = await finished_call(
        ami,
        "0698765432",
        call_id=call_id("two"),
        caller_id='"ACME" <0611111111>',
        variables={"__PBXGUARD_CAMPAIGN": "c1"},
    )
    reasons = (variable_value(ami.events, leg, "PBXGUARD_REASONS") or "").split(",")
    assert {"NO_CONSENT", "CALLER_ID_MOBILE"} <= set(reasons)
    assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") == "BLOCK"
    # The caller ID came as the AGI's third argument (CALLER_ID_MOBILE above says it was read right):
    # the answer is the only command.
    commands = agi_commands(ami.events, leg)
    assert [c.split(" ")[0] for c in commands] == ["EXEC"], commands


# (what the Originate sends, what the channel then holds): AMI splits a Variable header as the
# dialplan splits arguments, so the quote and the backslash reach the channel only escaped.
SPLITTER_ALTERED = [('ab\\"cd', 'ab"cd'), ("ab\\\\cd", "ab\\cd")]


@pytest.mark.parametrize(("sent", "token"), SPLITTER_ALTERED, ids=["quote", "backslash"])
async def test_a_value_the_argument_splitter_alters_is_read_from_the_channel(
    ami: AmiClient, agi_gate: FastAgiGate, ledger: Ledger, sent: str, token: str
) -> None:
    # Asterisk drops the quote or the backslash from the AGI's arguments: the lengths no longer add
    # up, so the gate reads the channel (one GET) rather than take values cut in the wrong place.
    leg = await finished_call(
        ami,
        "0612345678",
        call_id=call_id("split"),
        caller_id=NPV,
        variables={"__PBXGUARD_CAMPAIGN": "c1", "__PBXGUARD_TOKEN": sent},
    )
    # VarSet reports a value C-escaped (ast_escape_c): the channel holds the quote or the backslash.
    assert variable_value(ami.events, leg, "__PBXGUARD_TOKEN") == token.replace("\\", "\\\\").replace(
        '"', '\\"'
    )
    commands = agi_commands(ami.events, leg)
    assert [c.split(" ")[0] for c in commands] == ["GET", "EXEC"], commands
    # Not a decision id: the call is decided and counted as any other, with the caller ID intact.
    assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") == "ALLOW"
    assert await attempts(ledger) == 1


async def test_an_asterisk_without_len_still_gets_its_check(
    asterisk: AsteriskInstance, ami: AmiClient, agi_gate: FastAgiGate, ledger: Ledger
) -> None:
    asterisk.cli("module unload func_strings.so")
    try:
        leg = await finished_call(
            ami,
            "0612345678",
            call_id=call_id("nolen"),
            caller_id=NPV,
            variables={"__PBXGUARD_CAMPAIGN": "c1"},
        )
    finally:
        asterisk.cli("module load func_strings.so")
    assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") == "ALLOW"
    assert reached_context(ami.events, leg, DIAL_CONTEXT)
    # The combined read, then caller ID and token one at a time (the campaign came as ARG2).
    assert len([c for c in agi_commands(ami.events, leg) if c.startswith("GET")]) == 3
    assert await attempts(ledger) == 1


async def test_a_parenthesis_in_a_value_is_read_on_its_own(ami: AmiClient, agi_gate: FastAgiGate) -> None:
    # Asterisk parses ${LEN(x):0)} as LEN(x) with an offset: the lengths then describe another cut,
    # so the gate must not trust them and read each value alone.
    leg = await finished_call(
        ami,
        "0612345678",
        call_id=call_id("paren"),
        caller_id=NPV,
        variables={"__PBXGUARD_CAMPAIGN": "c1", "__PBXGUARD_TOKEN": "x):0"},
    )
    assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") in ("ALLOW", "BLOCK")
    assert len([c for c in agi_commands(ami.events, leg) if c.startswith("GET")]) == 3


async def test_agi_server_down_blocks(asterisk: AsteriskInstance, ami: AmiClient, guard: Guard) -> None:
    # Nothing listens on agi_port (no gate started) nor on the port we point the dialplan at.
    with agi_unreachable(asterisk):
        leg = await finished_call(
            ami, "0612345678", call_id=call_id("down"), caller_id=NPV, variables={"__PBXGUARD_CAMPAIGN": "c1"}
        )
    hangup = hangup_event(ami.events, leg)
    assert hangup is not None and hangup.get("Cause") == "21"
    assert variable_value(ami.events, leg, "AGISTATUS") == "FAILURE"
    assert not variable_value(ami.events, leg, "PBXGUARD_VERDICT")
    assert not reached_context(ami.events, leg, DIAL_CONTEXT)


async def test_stale_allow_on_the_channel_does_not_pass(
    asterisk: AsteriskInstance, ami: AmiClient, guard: Guard
) -> None:
    # A verdict that arrives with the channel (set by whoever originated it) is cleared before asking.
    with agi_unreachable(asterisk):
        leg = await finished_call(
            ami,
            "0612345678",
            call_id=call_id("stale"),
            caller_id=NPV,
            variables={"__PBXGUARD_CAMPAIGN": "c1", "__PBXGUARD_VERDICT": "ALLOW"},
        )
    hangup = hangup_event(ami.events, leg)
    assert hangup is not None and hangup.get("Cause") == "21"
    assert not reached_context(ami.events, leg, DIAL_CONTEXT)


async def test_token_from_the_originate_is_honoured(
    ami: AmiClient, agi_gate: FastAgiGate, guard: Guard, ledger: Ledger
) -> None:
    # What the AMI gate does: decide (and count) first, stamp __PBXGUARD_TOKEN on the Originate.
    first = await guard.decide(CallAttempt("0612345678", "c1", NPV, gate="ami", call_key="ami:1"), NOW)
    assert first.allowed and await attempts(ledger) == 1
    leg = await finished_call(
        ami,
        "0612345678",
        call_id=call_id("tok"),
        caller_id=NPV,
        variables={"__PBXGUARD_CAMPAIGN": "c1", "__PBXGUARD_TOKEN": first.id},
    )
    assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") == "ALLOW"
    assert reached_context(ami.events, leg, DIAL_CONTEXT)
    assert await attempts(ledger) == 1  # not counted twice


async def test_refusal_and_opposition_hooks(ami: AmiClient, agi_gate: FastAgiGate, ledger: Ledger) -> None:
    refusal = await originate_local(
        ami, "90612345678", "pbxguard-test-ivr", call_id=call_id("ivr"), variables={"PBXGUARD_CAMPAIGN": "c1"}
    )
    opposition = await originate_local(
        ami, "80612345679", "pbxguard-test-ivr", call_id=call_id("ivr"), variables={"PBXGUARD_CAMPAIGN": "c1"}
    )
    legs = [refusal[1], opposition[1]]
    await ami.wait_for(lambda events: all(hangup_event(events, leg) for leg in legs))
    assert [variable_value(ami.events, leg, "PBXGUARD_RECORDED") for leg in legs] == ["1", "1"]
    # Both consumers are now blocked, for the reason recorded.
    blocked = []
    for number in ("0612345678", "0612345679"):
        _, leg = await originate_local(
            ami, number, call_id=call_id("after"), caller_id=NPV, variables={"__PBXGUARD_CAMPAIGN": "c1"}
        )
        blocked.append(leg)
    await ami.wait_for(lambda events: all(hangup_event(events, leg) for leg in blocked))
    reasons = [variable_value(ami.events, leg, "PBXGUARD_REASONS") for leg in blocked]
    assert reasons == ["REFUSAL_QUIET_PERIOD", "OPPOSED"]
    assert all(hangup_event(ami.events, leg).get("Cause") == "21" for leg in blocked)  # type: ignore[union-attr]


# -- the Stasis gate --------------------------------------------------------------------------------------


@pytest.fixture
async def ari_gate(asterisk: AsteriskInstance, guard: Guard) -> AsyncIterator[AriGate]:
    ari = AriUpstreamConfig(
        url=asterisk.ari_url,
        username=asterisk.ari_username,
        password=Secret(asterisk.ari_password),
        app=asterisk.ari_app,
    )
    gate = AriGate(Config(asterisk=AsteriskConfig(ari=ari)), guard, clock=lambda: NOW, backoff_initial=0.05)
    await gate.start()
    try:
        async with asyncio.timeout(5):
            while not gate.ready():  # noqa: ASYNC110 - the gate has no event to wait on
                await asyncio.sleep(0.01)
        yield gate
    finally:
        await gate.stop()


async def test_stasis_gate_end_to_end(ami: AmiClient, ari_gate: AriGate, ledger: Ledger) -> None:
    cases = [
        Case("0612345678", "ALLOW"),
        Case("0698765432", "BLOCK", "NO_CONSENT"),
        Case("0612345678", "BLOCK", "CALLER_ID_MOBILE", caller_id="0611111111"),
        Case("0612345670", "BLOCK", "OPPOSED"),
    ]
    legs = []
    for case in cases:
        _, leg = await originate_local(
            ami,
            case.number,
            "pbxguard-outbound-ari",
            call_id=call_id("ari"),
            caller_id=case.caller_id,
            variables={"__PBXGUARD_CAMPAIGN": case.campaign},
        )
        legs.append(leg)
    await ami.wait_for(lambda events: all(hangup_event(events, leg) for leg in legs), limit=15)
    for case, leg in zip(cases, legs, strict=True):
        hangup = hangup_event(ami.events, leg)
        assert hangup is not None
        assert variable_value(ami.events, leg, "PBXGUARD_VERDICT") == case.verdict
        if case.verdict == "ALLOW":
            assert reached_context(ami.events, leg, DIAL_CONTEXT)
            assert hangup.get("Cause") == "16"
        else:
            assert case.reason in (variable_value(ami.events, leg, "PBXGUARD_REASONS") or "").split(",")
            assert not reached_context(ami.events, leg, DIAL_CONTEXT)
            assert hangup.get("Cause") == "21"
    assert await attempts(ledger) == 1


async def test_stasis_without_pbxguard_blocks(ami: AmiClient, guard: Guard) -> None:
    # No ARI client registered the application: Stasis() fails at once and the dialplan hangs up.
    leg = await finished_call(
        ami,
        "0612345678",
        "pbxguard-outbound-ari",
        call_id=call_id("noari"),
        caller_id=NPV,
        variables={"__PBXGUARD_CAMPAIGN": "c1"},
    )
    hangup = hangup_event(ami.events, leg)
    assert hangup is not None and hangup.get("Cause") == "21"
    assert variable_value(ami.events, leg, "STASISSTATUS") == "FAILED"
    assert not reached_context(ami.events, leg, DIAL_CONTEXT)


async def test_stasis_gate_reconnects_after_asterisk_restart(guard: Guard) -> None:
    # A private instance: restarting the shared one would pull it from under other tests.
    private = await asyncio.to_thread(start_instance)
    ari = AriUpstreamConfig(
        url=private.ari_url,
        username=private.ari_username,
        password=Secret(private.ari_password),
        app=private.ari_app,
    )
    gate = AriGate(Config(asterisk=AsteriskConfig(ari=ari)), guard, clock=lambda: NOW, backoff_initial=0.05)
    await gate.start()
    client: AmiClient | None = None
    try:
        async with asyncio.timeout(5):
            while not gate.ready():  # noqa: ASYNC110 - the gate has no event to wait on
                await asyncio.sleep(0.01)
        before = gate.connections
        await asyncio.to_thread(private.restart)
        async with asyncio.timeout(10):
            while gate.connections == before or not gate.ready():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        client = await AmiClient.connect(
            "127.0.0.1", private.ami_port, private.harness_username, private.harness_secret
        )
        _, leg = await originate_local(
            client,
            "0612345678",
            "pbxguard-outbound-ari",
            call_id=call_id("rst"),
            caller_id=NPV,
            variables={"__PBXGUARD_CAMPAIGN": "c1"},
        )
        await client.wait_for(lambda events: hangup_event(events, leg) is not None)
        assert variable_value(client.events, leg, "PBXGUARD_VERDICT") == "ALLOW"
        assert reached_context(client.events, leg, DIAL_CONTEXT)
    finally:
        if client is not None:
            await client.close()
        await gate.stop()
        await asyncio.to_thread(private.cleanup)
