"""The FastAGI gate against a scripted client that speaks Asterisk's side of the protocol.

The fake plays what a real Asterisk 22 sends (environment block, one reply per command, ``HANGUP``
lines that are not replies, ``200 result=0`` for an unset variable) and keeps the variables the gate
sets, so each test reads the channel the way the dialplan would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from agi_channel import NPV, Channel, agi_arguments, application_arguments, expand, mset_pairs
from asterisk_harness import CONF_DIR
from hypothesis import assume, given
from hypothesis import strategies as st

from pbxguard.config import AgiGateConfig, Config, GatesConfig, Mode
from pbxguard.gates.fastagi import (
    ARGUMENT_FACTS,
    CHANNEL_FACTS,
    AgiRequest,
    FastAgiGate,
    _AgiConnection,
    mset_data,
    parse_request,
    split_argument_facts,
    split_channel_facts,
    unavailable_decision,
    verdict_variables,
)
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign, Decision, Reason, Verdict
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.agi import AgiProtocolError, Environment, quote_argument

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)  # a Tuesday, within legal hours
EVENING = datetime(2026, 12, 1, 20, 30, tzinfo=PARIS)  # same day, after 20:00
NUMBER = "0612345678"
E164 = "+33612345678"
LOG = "pbxguard.gates.agi"


async def legal_setup(ledger: Ledger) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent(E164, "ACME", datetime(2026, 11, 1, tzinfo=UTC))


async def attempts(ledger: Ledger) -> int:
    async with ledger.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pbxguard.attempts"))


# -- the fake Asterisk side ---------------------------------------------------------------------------

_counter = iter(range(1, 1_000_000))


def environment(
    script: str = "check",
    args: tuple[str, ...] = (NUMBER, "c1"),
    *,
    extension: str = NUMBER,
    callerid: str = NPV,
    uniqueid: str | None = None,
) -> bytes:
    uid = uniqueid or f"1795900000.{next(_counter)}"
    pairs = [
        ("agi_network", "yes"),
        ("agi_network_script", script),
        ("agi_request", f"agi://127.0.0.1/{script}"),
        ("agi_channel", f"Local/{extension}@pbxguard-outbound-00000001;2"),
        ("agi_language", "en"),
        ("agi_type", "Local"),
        ("agi_uniqueid", uid),
        ("agi_version", "22.10.1"),
        ("agi_callerid", callerid or "unknown"),
        ("agi_calleridname", "ACME"),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", "pbxguard-check"),
        ("agi_extension", "s" if args else extension),
        ("agi_priority", "10"),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "140710775441088"),
    ]
    pairs += [(f"agi_arg_{i}", a) for i, a in enumerate(args, 1)]
    return "".join(f"{k}: {v}\n" for k, v in pairs).encode() + b"\n"


async def fake_call(
    port: int,
    channel: Channel | None = None,
    *,
    env: bytes | None = None,
    on_command: Callable[[str, Channel], str | None] | None = None,
    limit: float = 5.0,
) -> Channel:
    """One FastAGI session as Asterisk runs it; returns the channel once the server closes."""
    channel = channel or Channel()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(env if env is not None else environment(callerid=channel.caller_id))
        await writer.drain()
        async with asyncio.timeout(limit):
            while line := await reader.readline():
                text = line.decode().rstrip("\n")
                answer = on_command(text, channel) if on_command else None
                writer.write(((answer if answer is not None else channel.reply(text)) + "\n").encode())
                await writer.drain()
        channel.closed_by_server = True
    finally:
        writer.close()
    return channel


# -- fixtures -----------------------------------------------------------------------------------------


def make_config(timeout_ms: int = 2000, max_connections: int = 512, mode: Mode = Mode.ENFORCE) -> Config:
    agi = AgiGateConfig(listen="127.0.0.1:0", timeout_ms=timeout_ms, max_connections=max_connections)
    return Config(mode=mode, gates=GatesConfig(agi=agi))


@pytest.fixture
async def guard(ledger: Ledger) -> Guard:
    await legal_setup(ledger)
    return Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5)


async def start_gate(guard: Guard, now: datetime = NOW, **config: object) -> FastAgiGate:
    gate = FastAgiGate(make_config(**config), guard, clock=lambda: now)  # type: ignore[arg-type]
    await gate.start()
    return gate


@pytest.fixture
async def gate(guard: Guard) -> AsyncIterator[FastAgiGate]:
    server = await start_gate(guard)
    try:
        yield server
    finally:
        await server.stop()


# -- pure part ----------------------------------------------------------------------------------------


def env_of(data: bytes) -> Environment:
    pairs = [line.split(": ", 1) for line in data.decode().splitlines() if line]
    return Environment({k: v for k, v in pairs})


def test_parse_request_number_and_campaign_precedence() -> None:
    r = parse_request(env_of(environment("check?campaign=q1", (NUMBER, "a1"))))
    assert (r.script, r.number, r.campaign) == ("check", NUMBER, "a1")
    r = parse_request(env_of(environment("check?campaign=q1", (NUMBER,))))
    assert r.campaign == "q1"
    r = parse_request(env_of(environment("check?campaign=q1", (NUMBER, "  "))))
    assert r.campaign == "q1"
    r = parse_request(env_of(environment("check", ())))
    assert (r.number, r.campaign) == (NUMBER, None)  # agi_extension
    r = parse_request(env_of(environment("refusal", ())))
    assert r.number is None  # the channel's PBXGUARD_NUMBER is asked for first


def test_parse_request_caller_id_placeholder_and_key() -> None:
    r = parse_request(env_of(environment(callerid="", uniqueid="17.5")))
    assert r == AgiRequest("check", NUMBER, "c1", "17.5", "", f"Local/{NUMBER}@pbxguard-outbound-00000001;2")


@pytest.mark.parametrize("script", ["", "nope", "check/../x", "CHECK"])
def test_parse_request_unknown_script(script: str) -> None:
    with pytest.raises(AgiProtocolError):
        parse_request(env_of(environment(script)))


def _decision(**kw: object) -> Decision:
    base: dict[str, object] = {
        "id": "d1",
        "verdict": Verdict.BLOCK,
        "reasons": (Reason.OUTSIDE_HOURS, Reason.FREQUENCY_CAP),
        "next_allowed_at": datetime(2026, 12, 2, 10, 0, tzinfo=PARIS),
        "consumer": E164,
        "territories": ("FR",),
        "zones": ("Europe/Paris",),
        "campaign_id": "c1",
        "order_giver": "ACME",
        "caller_id": NPV,
        "gate": "agi",
        "decided_at": NOW,
    }
    base.update(kw)
    return Decision(**base)  # type: ignore[arg-type]


def test_verdict_variables_block_allow_shadow() -> None:
    assert verdict_variables(_decision()) == [
        ("PBXGUARD_REASONS", "OUTSIDE_HOURS,FREQUENCY_CAP"),
        ("PBXGUARD_NEXT", "2026-12-02T10:00:00+01:00"),
        ("PBXGUARD_DECISION", "d1"),
        ("PBXGUARD_VERDICT", "BLOCK"),
    ]
    allowed = verdict_variables(_decision(verdict=Verdict.ALLOW, reasons=(), next_allowed_at=None))
    assert dict(allowed) == {
        "PBXGUARD_REASONS": "",
        "PBXGUARD_NEXT": "",
        "PBXGUARD_DECISION": "d1",
        "PBXGUARD_VERDICT": "ALLOW",
    }
    # Shadow mode lets a blocked call through and still tells why.
    shadow = dict(verdict_variables(_decision(shadow=True)))
    assert shadow["PBXGUARD_VERDICT"] == "ALLOW"
    assert shadow["PBXGUARD_REASONS"] == "OUTSIDE_HOURS,FREQUENCY_CAP"


@given(caller_id=st.text(), token=st.text(), campaign=st.text())
def test_channel_facts_are_cut_back_exactly_as_asterisk_expands_them(
    caller_id: str, token: str, campaign: str
) -> None:
    facts = {"CALLERID(num)": caller_id, "PBXGUARD_TOKEN": token, "PBXGUARD_CAMPAIGN": campaign}
    # Lone surrogates cannot come out of UTF-8: what Asterisk sends never holds one.
    assume(all(not ("\ud800" <= c <= "\udfff") for value in facts.values() for c in value))
    split = split_channel_facts(expand(CHANNEL_FACTS, facts.__getitem__))
    if any(c in "()\ufffd" for value in facts.values() for c in value):
        # Asterisk may have cut LEN short there (see the next test): read one at a time instead.
        assert split is None
    else:
        assert split == (caller_id, token, campaign)


@pytest.mark.parametrize(
    "value",
    [
        "::0162123456",  # no LEN in this Asterisk: read one at a time
        "",
        "10:0",
        "10:0:016212345",  # shorter than its lengths say
        "x:0:0162123456",
        "-1:0:0162123456",
        "2:0:\ufffd",  # invalid UTF-8 became U+FFFD: its bytes no longer match
        "6:3:\ufffd12345tokc1",  # ... even where the lengths happen to fit
        # Caller number "0612345678):0": Asterisk reads ${LEN(0612345678):0)} as LEN(0612345678)
        # with offset 0, so the lengths describe another cut than the values.
        "10:0:0612345678):0c1",
        "1:0:(c1",
        "\u00b2:0:0162123456",  # a digit to str.isdigit(), not to int()
    ],
)
def test_channel_facts_that_do_not_parse(value: str) -> None:
    assert split_channel_facts(value) is None


def facts_argument(channel: Channel, head: str = f"{NUMBER},c1") -> str:
    """The check's third argument as the shipped dialplan has Asterisk build it for ``channel``."""
    return application_arguments(f"{head},{channel.expand(ARGUMENT_FACTS)}")[2]


_ALTERED_OR_UNTRUSTED = '()"\\,\ufffd'


@given(caller_id=st.text(), token=st.text(), campaign=st.text())
def test_argument_facts_are_exact_or_refused(caller_id: str, token: str, campaign: str) -> None:
    channel = Channel(variables={"PBXGUARD_TOKEN": token, "PBXGUARD_CAMPAIGN": campaign}, caller_id=caller_id)
    assume(all(not ("\ud800" <= c <= "\udfff") for c in caller_id + token + campaign))
    split = split_argument_facts(facts_argument(channel))
    # Never values cut in the wrong place: what Asterisk's splitter altered is refused, and the gate
    # reads the channel instead.
    assert split in (None, (caller_id, token, campaign))
    if not any(c in _ALTERED_OR_UNTRUSTED for c in caller_id + token + campaign):
        assert split == (caller_id, token, campaign)


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ('ab"cd', "the splitter drops the quote"),
        ("ab\\cd", "the splitter drops the backslash"),
        ("ab,cd", "the splitter cuts at the comma"),
        ("ab(cd", "a parenthesis may end LEN early"),
    ],
)
def test_argument_facts_a_splitter_altered_are_refused(token: str, why: str) -> None:
    channel = Channel(variables={"PBXGUARD_TOKEN": token, "PBXGUARD_CAMPAIGN": "c1"})
    assert split_argument_facts(facts_argument(channel)) is None, why


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":::",
        "10:0:0",
        "10:0:0:016212345",
        "10:0:2:0162123456c1x",
        "x:0:0:0",
        "-1:0:0:",
        "1:0:0:\ufffd",
        "\u00b2:0:0:ab",
    ],
)
def test_argument_facts_that_do_not_parse(value: str) -> None:
    assert split_argument_facts(value) is None


def test_verdict_variables_go_through_one_mset_unchanged() -> None:
    for decision in (
        _decision(),
        _decision(verdict=Verdict.ALLOW, reasons=(), next_allowed_at=None),
        _decision(reasons=tuple(Reason)),
    ):
        variables = verdict_variables(decision)
        data = mset_data(variables)
        assert data is not None
        assert mset_pairs(data) == variables
        # Through the AGI line too: quoted by the codec, unquoted by res_agi.
        assert mset_pairs(agi_arguments(f"EXEC MSet {quote_argument(data)}")[2]) == variables


@pytest.mark.parametrize("value", ['a"b', "a\\b", "${X}", "a=b", "a(b)", "a|b", "a;b", "é", " a", "a b"])
def test_a_value_mset_could_misread_is_set_on_its_own(value: str) -> None:
    assert mset_data([("PBXGUARD_REASONS", value), ("PBXGUARD_VERDICT", "BLOCK")]) is None


def test_unavailable_decision() -> None:
    attempt = CallAttempt(NUMBER, "c1", NPV, gate="agi", call_key="k")
    decision = unavailable_decision(attempt, NOW, shadow=False)
    assert dict(verdict_variables(decision)) == {
        "PBXGUARD_REASONS": "STORE_UNAVAILABLE",
        "PBXGUARD_NEXT": "",
        "PBXGUARD_DECISION": "",
        "PBXGUARD_VERDICT": "BLOCK",
    }
    assert unavailable_decision(attempt, NOW, shadow=True).permits_call


# -- decisions ---------------------------------------------------------------------------------------


async def test_allowed_call_sets_variables(gate: FastAgiGate, ledger: Ledger) -> None:
    channel = await fake_call(gate.port)
    v = channel.variables
    assert v["PBXGUARD_VERDICT"] == "ALLOW"
    assert v["PBXGUARD_REASONS"] == ""
    assert v["PBXGUARD_NEXT"] == ""
    uuid.UUID(v["PBXGUARD_DECISION"])
    assert channel.closed_by_server
    # Two commands: the caller ID, token and campaign read together, then the four variables set
    # together, the verdict last.
    assert channel.commands == [f'GET FULL VARIABLE "{CHANNEL_FACTS}"', channel.commands[1]]
    assert channel.commands[1].startswith('EXEC "MSet" "PBXGUARD_REASONS=,')
    assert channel.commands[1].endswith(',PBXGUARD_VERDICT=ALLOW"')
    assert await attempts(ledger) == 1


async def test_facts_given_as_the_third_argument_spare_the_read(gate: FastAgiGate, ledger: Ledger) -> None:
    # The caller ID Asterisk will present is a mobile number, while agi_callerid says otherwise: the
    # argument, like CALLERID(num) read from the channel, is what counts.
    channel = Channel(caller_id="0611111111")
    args = (NUMBER, "c1", facts_argument(channel))
    await fake_call(gate.port, channel, env=environment(args=args, callerid=NPV))
    assert [c.split(" ")[0] for c in channel.commands] == ["EXEC"]
    assert channel.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "CALLER_ID_MOBILE" in channel.variables["PBXGUARD_REASONS"].split(",")
    assert await attempts(ledger) == 0


async def test_facts_argument_that_does_not_add_up_is_read_from_the_channel(
    gate: FastAgiGate, ledger: Ledger
) -> None:
    channel = Channel(variables={"PBXGUARD_TOKEN": 'not"a-token'})
    args = (NUMBER, "c1", facts_argument(channel))
    await fake_call(gate.port, channel, env=environment(args=args))
    assert [c.split(" ")[0] for c in channel.commands] == ["GET", "EXEC"]
    assert channel.variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert await attempts(ledger) == 1


@pytest.mark.parametrize(("has_len", "has_mset"), [(False, True), (True, False), (False, False)])
async def test_an_asterisk_without_len_or_mset_gets_one_command_per_value(
    gate: FastAgiGate, ledger: Ledger, has_len: bool, has_mset: bool
) -> None:
    channel = Channel(
        variables={"PBXGUARD_CAMPAIGN": "ignored: ARG2 wins"}, has_len=has_len, has_mset=has_mset
    )
    await fake_call(gate.port, channel)
    assert channel.variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert channel.variables["PBXGUARD_REASONS"] == ""
    uuid.UUID(channel.variables["PBXGUARD_DECISION"])
    reads = [c for c in channel.commands if c.startswith("GET")]
    if has_len:
        assert reads == [f'GET FULL VARIABLE "{CHANNEL_FACTS}"']
    else:
        # The campaign came as ARG2: not asked for again.
        assert reads == [
            f'GET FULL VARIABLE "{CHANNEL_FACTS}"',
            'GET FULL VARIABLE "${CALLERID(num)}"',
            'GET VARIABLE "PBXGUARD_TOKEN"',
        ]
    if not has_mset:
        assert [c.split('"')[1] for c in channel.commands if c.startswith("SET")] == [
            "PBXGUARD_REASONS", "PBXGUARD_NEXT", "PBXGUARD_DECISION", "PBXGUARD_VERDICT",
        ]  # fmt: skip
    assert await attempts(ledger) == 1


async def test_blocked_call_sets_variables(gate: FastAgiGate, ledger: Ledger) -> None:
    channel = await fake_call(gate.port, env=environment(args=("0698765432", "c1")))
    v = channel.variables
    assert v["PBXGUARD_VERDICT"] == "BLOCK"
    assert "NO_CONSENT" in v["PBXGUARD_REASONS"].split(",")
    assert v["PBXGUARD_NEXT"] == ""  # consent does not come with time
    uuid.UUID(v["PBXGUARD_DECISION"])
    assert await attempts(ledger) == 0


async def test_outside_hours_gives_next_legal_instant(guard: Guard) -> None:
    gate = await start_gate(guard, now=EVENING)
    try:
        channel = await fake_call(gate.port)
    finally:
        await gate.stop()
    v = channel.variables
    assert v["PBXGUARD_VERDICT"] == "BLOCK"
    assert v["PBXGUARD_REASONS"] == "OUTSIDE_HOURS"
    nxt = datetime.fromisoformat(v["PBXGUARD_NEXT"])
    assert nxt.tzinfo is not None
    assert nxt.astimezone(PARIS) == datetime(2026, 12, 2, 10, 0, tzinfo=PARIS)


async def test_caller_id_comes_from_the_channel_not_the_environment(gate: FastAgiGate) -> None:
    # The dialplan changed CALLERID(num) to a mobile after AGI's environment was built.
    channel = Channel(caller_id="0611111111")
    channel = await fake_call(gate.port, channel, env=environment(callerid=NPV))
    assert channel.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "CALLER_ID_MOBILE" in channel.variables["PBXGUARD_REASONS"]


async def test_empty_caller_id_is_missing(gate: FastAgiGate) -> None:
    channel = await fake_call(gate.port, Channel(caller_id=""), env=environment(callerid=""))
    assert channel.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "CALLER_ID_MISSING" in channel.variables["PBXGUARD_REASONS"]


async def test_campaign_from_query_then_channel_variable(gate: FastAgiGate, ledger: Ledger) -> None:
    # The query beats the variable (read along with the caller ID anyway).
    from_query = await fake_call(
        gate.port,
        Channel(variables={"PBXGUARD_CAMPAIGN": "nope"}),
        env=environment("check?campaign=c1", (NUMBER,)),
    )
    assert from_query.variables["PBXGUARD_VERDICT"] == "ALLOW"
    from_variable = await fake_call(
        gate.port, Channel(variables={"PBXGUARD_CAMPAIGN": "c1"}), env=environment(args=(NUMBER,))
    )
    assert from_variable.variables["PBXGUARD_VERDICT"] == "ALLOW"
    none = await fake_call(gate.port, env=environment(args=(NUMBER,)))
    assert none.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "UNKNOWN_CAMPAIGN" in none.variables["PBXGUARD_REASONS"]
    # The argument beats the variable.
    arg = await fake_call(
        gate.port, Channel(variables={"PBXGUARD_CAMPAIGN": "nope"}), env=environment(args=(NUMBER, "c1"))
    )
    assert arg.variables["PBXGUARD_VERDICT"] == "ALLOW"


async def test_number_defaults_to_the_extension(gate: FastAgiGate) -> None:
    channel = await fake_call(
        gate.port, Channel(variables={"PBXGUARD_CAMPAIGN": "c1"}), env=environment(args=())
    )
    assert channel.variables["PBXGUARD_VERDICT"] == "ALLOW"


async def test_token_hand_off_does_not_count_twice(gate: FastAgiGate, ledger: Ledger) -> None:
    first = await fake_call(gate.port)
    assert first.variables["PBXGUARD_VERDICT"] == "ALLOW"
    token = first.variables["PBXGUARD_DECISION"]
    assert await attempts(ledger) == 1
    # Another channel (another uniqueid) of the same call carries the token: allowed, not counted.
    second = await fake_call(gate.port, Channel(variables={"PBXGUARD_TOKEN": token}))
    assert second.variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert second.variables["PBXGUARD_DECISION"] != token
    assert await attempts(ledger) == 1
    # A token is no pass for another number.
    other = await fake_call(
        gate.port, Channel(variables={"PBXGUARD_TOKEN": token}), env=environment(args=("0698765432", "c1"))
    )
    assert other.variables["PBXGUARD_VERDICT"] == "BLOCK"
    # Nor is garbage.
    garbage = await fake_call(gate.port, Channel(variables={"PBXGUARD_TOKEN": "not-a-uuid"}))
    assert garbage.variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert await attempts(ledger) == 2


async def test_same_channel_checked_twice_counts_once(gate: FastAgiGate, ledger: Ledger) -> None:
    env = environment(uniqueid="1795900000.999")
    first = await fake_call(gate.port, env=env)
    second = await fake_call(gate.port, env=env)
    assert first.variables["PBXGUARD_DECISION"] == second.variables["PBXGUARD_DECISION"]
    assert await attempts(ledger) == 1


async def test_shadow_mode_lets_a_blocked_call_through(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger, PolicySettings(), Mode.SHADOW, timeout=1.5)
    gate = await start_gate(guard)
    try:
        channel = await fake_call(gate.port, env=environment(args=("0698765432", "c1")))
    finally:
        await gate.stop()
    assert channel.variables["PBXGUARD_VERDICT"] == "ALLOW"
    assert "NO_CONSENT" in channel.variables["PBXGUARD_REASONS"]


# -- feedback scripts --------------------------------------------------------------------------------


async def test_refusal_is_recorded_and_then_blocks(gate: FastAgiGate) -> None:
    channel = await fake_call(gate.port, env=environment("refusal", (NUMBER, "c1")))
    assert channel.variables == {"PBXGUARD_RECORDED": "1"}
    after = await fake_call(gate.port)
    assert after.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert after.variables["PBXGUARD_REASONS"] == "REFUSAL_QUIET_PERIOD"
    assert after.variables["PBXGUARD_NEXT"]  # the quiet period ends


async def test_refusal_from_channel_variables(gate: FastAgiGate) -> None:
    # An IVR on the dialled channel: number and campaign inherited from pbxguard-check.
    channel = Channel(variables={"PBXGUARD_NUMBER": NUMBER, "PBXGUARD_CAMPAIGN": "c1"})
    await fake_call(gate.port, channel, env=environment("refusal", (), extension="9"))
    assert channel.variables["PBXGUARD_RECORDED"] == "1"
    after = await fake_call(gate.port)
    assert after.variables["PBXGUARD_REASONS"] == "REFUSAL_QUIET_PERIOD"


async def test_refusal_survives_a_hangup(gate: FastAgiGate) -> None:
    # "Press 9", then the consumer hangs up at once: the refusal is recorded all the same.
    def hang_up(line: str, channel: Channel) -> str | None:
        if "PBXGUARD_NUMBER" in line:
            return "HANGUP\n" + channel.reply(line)
        return None

    channel = Channel(variables={"PBXGUARD_NUMBER": NUMBER, "PBXGUARD_CAMPAIGN": "c1"})
    await fake_call(gate.port, channel, env=environment("refusal", ()), on_command=hang_up)
    after = await fake_call(gate.port)
    assert after.variables["PBXGUARD_REASONS"] == "REFUSAL_QUIET_PERIOD"


async def test_opposition_is_recorded(gate: FastAgiGate) -> None:
    channel = await fake_call(gate.port, env=environment("opposition", (NUMBER, "c1")))
    assert channel.variables["PBXGUARD_RECORDED"] == "1"
    after = await fake_call(gate.port)
    assert after.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "OPPOSED" in after.variables["PBXGUARD_REASONS"]


async def test_refusal_without_campaign_is_not_recorded(
    gate: FastAgiGate, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, LOG):
        channel = await fake_call(gate.port, env=environment("refusal", (NUMBER,)))
    assert channel.variables["PBXGUARD_RECORDED"] == "0"
    assert any("NOT recorded" in r.getMessage() for r in caplog.records)


# -- misbehaving clients -----------------------------------------------------------------------------


def gate_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno >= logging.INFO]


async def eventually(condition: Callable[[], bool], limit: float = 2.0) -> None:
    """Polls a condition the gate does not signal (its connection count), for at most ``limit`` s."""
    for _ in range(int(limit / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


async def wait_idle(gate: FastAgiGate) -> None:
    await eventually(lambda: gate.active_connections == 0)


async def test_early_close_costs_one_log_line(gate: FastAgiGate, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, LOG):
        for payload in (b"", b"agi_network: yes\nagi_channel: Local/x;2\n", b"agi_netw"):
            _, writer = await asyncio.open_connection("127.0.0.1", gate.port)
            writer.write(payload)
            await writer.drain()
            writer.close()
            await wait_idle(gate)
    lines = gate_lines(caplog)
    assert len(lines) == 3, lines
    assert all("closed the connection" in line for line in lines)
    # And the server still serves.
    assert (await fake_call(gate.port)).variables["PBXGUARD_VERDICT"] == "ALLOW"


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\xff" * 5000 + b"\n",
        b"x" * 20000,
        b"\n",
        b"agi_network_script: check\nagi_network_script: check\n\n",
        environment("no-such-script"),
    ],
    ids=["http", "binary", "long-line", "empty-env", "duplicate", "unknown-script"],
)
async def test_garbage_costs_one_log_line(
    gate: FastAgiGate, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    with caplog.at_level(logging.INFO, LOG):
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(2):
            assert await reader.read() == b""  # the server closed, having sent nothing
        writer.close()
        await wait_idle(gate)
    assert len(gate_lines(caplog)) == 1, gate_lines(caplog)


async def test_hangup_mid_exchange_stops_before_deciding(
    gate: FastAgiGate, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def hang_up(line: str, channel: Channel) -> str | None:
        if "PBXGUARD_TOKEN" in line:
            # Asterisk's notice, then the reply to the pending command on the dead channel.
            return "HANGUP\n511 Command Not Permitted on a dead channel or intercept routine"
        return None

    with caplog.at_level(logging.INFO, LOG):
        channel = await fake_call(gate.port, on_command=hang_up)
        await wait_idle(gate)
    assert channel.closed_by_server
    assert not any(c.startswith("SET") for c in channel.commands)
    assert await attempts(ledger) == 0
    lines = gate_lines(caplog)
    assert len(lines) == 1 and "hung up" in lines[0]


async def test_hangup_after_the_reply_is_not_taken_for_one(gate: FastAgiGate) -> None:
    # HANGUP right after a reply: still one log line, nothing set after it, no shifted replies.
    def late(line: str, channel: Channel) -> str | None:
        if line.startswith('SET VARIABLE "PBXGUARD_REASONS"'):
            return channel.reply(line) + "\nHANGUP"
        return None

    # An Asterisk without MSet, so that the variables are set one command at a time.
    channel = await fake_call(gate.port, Channel(has_mset=False), on_command=late)
    assert channel.variables["PBXGUARD_REASONS"] == ""
    assert "PBXGUARD_VERDICT" not in channel.variables  # the channel is gone: the dialplan blocks anyway


async def test_a_client_talking_out_of_turn_is_cut_off(
    gate: FastAgiGate, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    # Lines nobody asked for: past a few unread, the client is dropped as talking out of turn
    # instead of having them buffered.
    def flood(line: str, channel: Channel) -> str | None:
        return "\n".join(["HANGUP"] * 40) if line.startswith("GET FULL VARIABLE") else None

    with caplog.at_level(logging.INFO, LOG):
        channel = await fake_call(gate.port, on_command=flood)
        await wait_idle(gate)
    assert channel.closed_by_server
    assert channel.variables == {}
    assert await attempts(ledger) == 0
    lines = gate_lines(caplog)
    assert len(lines) == 1 and "out of turn" in lines[0], lines
    assert (await fake_call(gate.port)).variables["PBXGUARD_VERDICT"] == "ALLOW"


async def test_slow_client_is_cut_within_the_bound(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    gate = await start_gate(guard, timeout_ms=300)
    try:
        with caplog.at_level(logging.INFO, LOG):
            # Half an environment, then silence.
            reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
            writer.write(environment()[:50])
            await writer.drain()
            started = time.monotonic()
            # Meanwhile a real call is served at once.
            assert (await fake_call(gate.port)).variables["PBXGUARD_VERDICT"] == "ALLOW"
            async with asyncio.timeout(2):
                assert await reader.read() == b""
            elapsed = time.monotonic() - started
            writer.close()
            await wait_idle(gate)
        assert elapsed < 0.6
        lines = gate_lines(caplog)
        assert len(lines) == 1 and "too slow" in lines[0]
    finally:
        await gate.stop()


async def test_client_slow_to_answer_commands_is_cut(guard: Guard, ledger: Ledger) -> None:
    gate = await start_gate(guard, timeout_ms=300)
    try:
        started = time.monotonic()
        channel = Channel()
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
        writer.write(environment())
        await writer.drain()
        first = await reader.readline()
        assert first.startswith(b"GET FULL VARIABLE")
        async with asyncio.timeout(2):
            assert await reader.read() == b""  # never answered: closed
        assert time.monotonic() - started < 0.6
        writer.close()
        assert not channel.variables
        assert await attempts(ledger) == 0
    finally:
        await gate.stop()


# -- the store and the guard fail --------------------------------------------------------------------


async def assert_unavailable(gate: FastAgiGate, bound: float) -> None:
    started = time.monotonic()
    channel = await fake_call(gate.port)
    assert time.monotonic() - started < bound
    assert channel.variables["PBXGUARD_VERDICT"] == "BLOCK"
    assert "STORE_UNAVAILABLE" in channel.variables["PBXGUARD_REASONS"].split(",")


async def test_no_ledger_blocks_store_unavailable() -> None:
    gate = await start_gate(Guard(None, PolicySettings(), Mode.ENFORCE, timeout=1.5))
    try:
        await assert_unavailable(gate, 1.0)
    finally:
        await gate.stop()


def test_the_gate_serves_on_uvloop_as_the_daemon_runs_it() -> None:
    # The daemon installs uvloop, whose transports are not asyncio.Transport subclasses; the rest of
    # this file runs on asyncio's own loop.
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(test_no_ledger_blocks_store_unavailable())


async def test_closed_pool_blocks_store_unavailable(database_url: str) -> None:
    ledger = await Ledger.connect(database_url, min_size=1, max_size=2)
    await ledger.close()
    gate = await start_gate(Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5))
    try:
        await assert_unavailable(gate, 2.0)
    finally:
        await gate.stop()


class StuckGuard(Guard):
    """A guard whose ledger never answers (a hung PostgreSQL, a lock held forever)."""

    async def decide(self, attempt: CallAttempt, now: datetime, *, reserve: bool = True) -> Decision:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stuck_guard_blocks_within_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    gate = await start_gate(StuckGuard(None), timeout_ms=400)
    try:
        with caplog.at_level(logging.WARNING, LOG):
            started = time.monotonic()
            channel = await fake_call(gate.port)
            elapsed = time.monotonic() - started
        assert elapsed < 0.45  # answered before timeout_ms, the reply reserve included
        assert channel.variables == {
            "PBXGUARD_REASONS": "STORE_UNAVAILABLE",
            "PBXGUARD_NEXT": "",
            "PBXGUARD_DECISION": "",
            "PBXGUARD_VERDICT": "BLOCK",
        }
        assert any("STORE_UNAVAILABLE" in line for line in gate_lines(caplog))
    finally:
        await gate.stop()


# -- load and life cycle -----------------------------------------------------------------------------


async def test_idle_connections_do_not_block_a_real_one(gate: FastAgiGate) -> None:
    idle = []
    for _ in range(200):
        idle.append(await asyncio.open_connection("127.0.0.1", gate.port))
    try:
        started = time.monotonic()
        channel = await fake_call(gate.port)
        assert channel.variables["PBXGUARD_VERDICT"] == "ALLOW"
        assert time.monotonic() - started < 1.0
    finally:
        for _, writer in idle:
            writer.close()


async def test_connections_over_the_cap_are_refused(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    gate = await start_gate(guard, max_connections=3)
    idle = []
    try:
        for _ in range(3):
            idle.append(await asyncio.open_connection("127.0.0.1", gate.port))
        await eventually(lambda: gate.active_connections == 3)
        with caplog.at_level(logging.WARNING, LOG):
            reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
            writer.write(environment())
            async with asyncio.timeout(2):
                # Closed at once, nothing said: a reset or a plain EOF, depending on timing.
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
            writer.close()
        assert any("max_connections" in line for line in gate_lines(caplog))
        for _, w in idle:
            w.close()
        await wait_idle(gate)
        assert (await fake_call(gate.port)).variables["PBXGUARD_VERDICT"] == "ALLOW"
    finally:
        for _, w in idle:
            w.close()
        await gate.stop()


async def test_concurrent_calls(gate: FastAgiGate, ledger: Ledger) -> None:
    channels = await asyncio.gather(*(fake_call(gate.port) for _ in range(40)))
    verdicts = [c.variables["PBXGUARD_VERDICT"] for c in channels]
    # The frequency cap lets 4 attempts per 30 days through; everything else is blocked, none lost.
    assert verdicts.count("ALLOW") == 4
    assert verdicts.count("BLOCK") == 36
    assert await attempts(ledger) == 4


class RecordingTransport(asyncio.Transport):
    """Just enough of a socket's transport to see whether the gate closed it."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 4573) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def test_a_connection_stopped_before_it_is_served_is_closed(guard: Guard) -> None:
    # stop() right after accepting: the connection's task is cancelled before its first step, and
    # its socket must still be closed (Asterisk would wait on it).
    gate = await start_gate(guard)
    transport = RecordingTransport()
    _AgiConnection(gate).connection_made(transport)
    assert gate.active_connections == 1
    await gate.stop()
    await asyncio.sleep(0)  # the task's done callbacks run on the next turn of the loop
    assert transport.closed
    assert gate.active_connections == 0


async def test_stop_with_open_connections_is_prompt(guard: Guard) -> None:
    gate = await start_gate(guard)
    conns = [await asyncio.open_connection("127.0.0.1", gate.port) for _ in range(5)]
    await eventually(lambda: gate.active_connections == 5)
    assert gate.ready()
    started = time.monotonic()
    await gate.stop()
    assert time.monotonic() - started < 1.0
    assert not gate.ready()
    for _, writer in conns:
        writer.close()


def test_config_defaults() -> None:
    assert AgiGateConfig().max_connections == 512
    assert AgiGateConfig().timeout_ms == 2000


def test_the_shipped_dialplan_hands_the_check_its_facts() -> None:
    # The dialplan and the gate must spell the facts alike, or every check would read the channel.
    dialplan = CONF_DIR / "extensions_pbxguard.conf"
    checks = [
        line for line in dialplan.read_text(encoding="utf-8").splitlines() if "AGI(${agi}/check," in line
    ]
    assert len(checks) == 1
    assert checks[0].rstrip().endswith(f"AGI(${{agi}}/check,${{ARG1}},${{ARG2}},{ARGUMENT_FACTS})")
