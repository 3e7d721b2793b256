"""The ledger on a real PostgreSQL: migrations, the reserve statement, idempotency, the cap under
concurrency from several pools, the journal, and parity between SQL and the pure rules."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import until

from pbxguard.config import Mode
from pbxguard.guard import Guard, consumer_key
from pbxguard.ledger import store
from pbxguard.ledger.migrate import Migration, MigrationError, bundled, migrate
from pbxguard.ledger.store import DecideRequest, Ledger
from pbxguard.policy import rules
from pbxguard.policy.model import (
    CallAttempt,
    Campaign,
    ConsumerFacts,
    Decision,
    Purpose,
    Reason,
    Residence,
    Sector,
)
from pbxguard.policy.numbers import classify_caller_id, parse_destination
from pbxguard.policy.settings import PolicySettings

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)
NUMBER = "+33612345678"
NPV = "0162123456"


async def legal_setup(ledger: Ledger, number: str = NUMBER, campaign: Campaign | None = None) -> None:
    await ledger.add_campaign(campaign or Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, "contract 42")
    await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC), source="web form")


def attempt(number: str = NUMBER, key: str | None = None, **kw: str) -> CallAttempt:
    return CallAttempt(number=number, campaign_id=kw.pop("campaign", "c1"), caller_id=NPV, call_key=key, **kw)


# -- migrations ---------------------------------------------------------------------------------


async def test_migrations_are_applied_once(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn) == []  # the template was migrated already
        versions = await conn.fetch("SELECT version FROM pbxguard.schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [m.version for m in bundled()]
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        first = bundled()[0]
        edited = [Migration(first.version, first.name, first.sql + "\n-- edited\n"), *bundled()[1:]]
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


async def test_a_newer_database_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO pbxguard.schema_migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x')"
        )
        with pytest.raises(MigrationError, match="newer version"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_new_migration_applies_in_order(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        extra = Migration(9000, "9000_extra.sql", "CREATE TABLE pbxguard.extra (x int);")
        assert await migrate(conn, [*bundled(), extra]) == ["9000_extra.sql"]
        assert await conn.fetchval("SELECT count(*) FROM pbxguard.extra") == 0
    finally:
        await conn.close()


# -- reserving ----------------------------------------------------------------------------------


async def test_allowed_call_is_counted_and_journaled(ledger: Ledger) -> None:
    await legal_setup(ledger)
    decision = await Guard(ledger).decide(attempt(key="k1"), NOW)
    assert decision.allowed and decision.counted
    row = await ledger.decision(uuid.UUID(decision.id))
    assert row is not None
    assert row["verdict"] == "allow" and row["counted"] and row["reasons"] == []
    assert row["order_giver"] == "ACME" and row["gate"] == "cli" and row["call_key"] == "k1"
    assert await ledger.attempts_count(NUMBER, "ACME") == 1


async def test_blocked_call_is_journaled_not_counted(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    saturday = datetime(2026, 12, 5, 11, 0, tzinfo=PARIS)
    decision = await guard.decide(attempt(), saturday)
    assert decision.reasons == (Reason.WEEKEND,)
    assert decision.next_allowed_at == datetime(2026, 12, 7, 10, 0, tzinfo=PARIS)
    assert not decision.counted
    assert await ledger.attempts_count(NUMBER, "ACME") == 0
    await guard.flush()
    row = await ledger.decision(uuid.UUID(decision.id))
    assert row is not None and row["verdict"] == "block" and row["reasons"] == ["WEEKEND"]
    assert row["next_allowed_at"] == decision.next_allowed_at


async def test_check_without_reserve_writes_nothing(ledger: Ledger) -> None:
    await legal_setup(ledger)
    decision = await Guard(ledger).decide(attempt(), NOW, reserve=False)
    assert decision.allowed and not decision.counted
    assert await ledger.attempts_count(NUMBER, "ACME") == 0
    assert await ledger.decision(uuid.UUID(decision.id)) is None


async def test_same_call_key_is_decided_once(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    first = await guard.decide(attempt(key="dialer-1:42"), NOW)
    again = await guard.decide(attempt(key="dialer-1:42"), NOW + timedelta(seconds=5))
    assert again.replayed and again.id == first.id and again.allowed
    assert await ledger.attempts_count(NUMBER, "ACME") == 1


async def test_concurrent_duplicates_of_one_key_count_once(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    results = await asyncio.gather(*(guard.decide(attempt(key="same"), NOW) for _ in range(10)))
    assert {d.id for d in results} == {results[0].id}
    assert sum(not d.replayed for d in results) == 1
    assert await ledger.attempts_count(NUMBER, "ACME") == 1


async def test_fifty_concurrent_reservations_from_three_pools_allow_exactly_four(database_url: str) -> None:
    ledgers = [await Ledger.connect(database_url, min_size=5, max_size=10) for _ in range(3)]
    try:
        await legal_setup(ledgers[0])
        guards = [Guard(ledger) for ledger in ledgers]
        decisions = await asyncio.gather(
            *(guards[i % 3].decide(attempt(key=f"call-{i}"), NOW) for i in range(50))
        )
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 4
        assert all(d.reasons == (Reason.FREQUENCY_CAP,) for d in decisions if not d.allowed)
        assert await ledgers[0].attempts_count(NUMBER, "ACME") == 4
        async with ledgers[1].pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pbxguard.decisions") == 50
    finally:
        for ledger in ledgers:
            await ledger.close()


async def test_cap_is_per_order_giver(ledger: Ledger) -> None:
    await legal_setup(ledger)
    await ledger.add_campaign(Campaign("other", "GLOBEX", automated=True))
    await ledger.authorize_caller_id("+33162123456", "GLOBEX", date(2026, 1, 1), None, None)
    await ledger.add_consent(NUMBER, "GLOBEX", datetime(2026, 11, 1, tzinfo=UTC))
    guard = Guard(ledger)
    for i in range(4):
        assert (await guard.decide(attempt(key=f"a{i}"), NOW)).allowed
    assert not (await guard.decide(attempt(key="a5"), NOW)).allowed
    assert (await guard.decide(attempt(key="b1", campaign="other"), NOW)).allowed


async def test_token_from_another_gate_passes_without_a_second_count(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    first = await guard.decide(attempt(key="ami:1", gate="ami"), NOW)
    hook = await guard.decide(
        attempt(key="agi:uniq-1", gate="agi", token=first.id), NOW + timedelta(seconds=2)
    )
    assert hook.allowed and not hook.counted
    assert await ledger.attempts_count(NUMBER, "ACME") == 1
    # A token for another number, or a forged one, is evaluated and counted as any call.
    await ledger.add_consent("+33612345679", "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    other = await guard.decide(attempt("+33612345679", key="agi:2", gate="agi", token=first.id), NOW)
    assert other.allowed and other.counted
    forged = await guard.decide(attempt(key="agi:3", gate="agi", token=str(uuid.uuid4())), NOW)
    assert forged.counted


async def test_token_of_a_blocked_decision_is_worthless(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    blocked = await guard.decide(attempt(key="x"), datetime(2026, 12, 5, 11, 0, tzinfo=PARIS))
    assert not blocked.allowed
    hook = await guard.decide(
        attempt(key="y", token=blocked.id), datetime(2026, 12, 5, 11, 0, 5, tzinfo=PARIS)
    )
    assert not hook.allowed and hook.reasons == (Reason.WEEKEND,)


async def test_shadow_mode_lets_through_and_counts(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger, mode=Mode.SHADOW)
    saturday = datetime(2026, 12, 5, 11, 0, tzinfo=PARIS)
    decision = await guard.decide(attempt(key="s1"), saturday)
    assert not decision.allowed and decision.shadow and decision.permits_call
    assert decision.counted  # the call really happens, so it counts
    row = await ledger.decision(uuid.UUID(decision.id))
    assert row is not None and row["verdict"] == "block" and row["shadow"]


async def test_unknown_campaign_is_journaled(ledger: Ledger) -> None:
    decision = await Guard(ledger).decide(attempt(campaign="nope", key="u1"), NOW)
    assert Reason.UNKNOWN_CAMPAIGN in decision.reasons and decision.order_giver is None
    row = await ledger.decision(uuid.UUID(decision.id))
    assert row is not None and "UNKNOWN_CAMPAIGN" in row["reasons"]


async def test_residence_set_by_the_crm_is_honoured(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    assert (await guard.decide(attempt(), NOW, reserve=False)).allowed
    # Known to live in Réunion: 10:30 in Paris is 13:30 there.
    await ledger.set_residence(NUMBER, "RE", None)
    decision = await guard.decide(attempt(key="r1"), NOW)
    assert decision.reasons == (Reason.OUTSIDE_HOURS,)
    assert set(decision.zones) == {"Europe/Paris", "Indian/Reunion"}


async def test_store_down_blocks_within_the_bound(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger, timeout=0.5)
    await ledger.pool.close()
    started = asyncio.get_running_loop().time()
    decision = await guard.decide(attempt(), NOW)
    assert decision.reasons == (Reason.STORE_UNAVAILABLE,)
    assert not decision.permits_call
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_no_ledger_blocks() -> None:
    decision = await Guard(None).decide(attempt(caller_id="x") if False else attempt(), NOW)
    assert decision.reasons == (Reason.STORE_UNAVAILABLE,)


async def test_refusal_and_opposition_feedback(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    assert await guard.record_feedback("0612345678", kind="refusal", now=NOW, campaign_id="c1")
    decision = await guard.decide(attempt(), NOW + timedelta(minutes=5), reserve=False)
    assert decision.reasons == (Reason.REFUSAL_QUIET_PERIOD,)
    # Allowed again from refusal date + 61 days at 00:00: 31 January 2027, a Sunday -> Monday 1 Feb 10:00.
    assert decision.next_allowed_at == datetime(2027, 2, 1, 10, 0, tzinfo=PARIS)
    assert await guard.record_feedback("0612345678", kind="opposition", now=NOW)  # every order giver
    decision = await guard.decide(attempt(), NOW + timedelta(minutes=6), reserve=False)
    assert decision.reasons == (Reason.OPPOSED, Reason.REFUSAL_QUIET_PERIOD)
    assert not await guard.record_feedback("not a number", kind="refusal", now=NOW, campaign_id="c1")
    assert not await guard.record_feedback("0612345678", kind="refusal", now=NOW, campaign_id="unknown")


async def test_consent_revocation_is_immediate(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    assert await ledger.revoke_consent(NUMBER, "ACME", NOW) == 1
    decision = await guard.decide(attempt(), NOW + timedelta(seconds=1), reserve=False)
    assert decision.reasons == (Reason.NO_CONSENT,)


async def test_bloctel_import_is_all_or_nothing_and_latest_wins(ledger: Ledger) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    guard = Guard(ledger)
    june = datetime(2026, 6, 2, 10, 30, tzinfo=PARIS)
    await ledger.import_bloctel([NUMBER, "+33612345679"], "ACME", date(2026, 5, 20), "cleared", "f1.csv")
    assert (await guard.decide(attempt(), june, reserve=False)).allowed
    await ledger.import_bloctel([NUMBER], "ACME", date(2026, 5, 25), "registered", "f2.csv")
    assert (await guard.decide(attempt(), june, reserve=False)).reasons == (Reason.BLOCTEL_REGISTERED,)
    # An older file does not override a newer answer.
    await ledger.import_bloctel([NUMBER], "ACME", date(2026, 5, 21), "cleared", "old.csv")
    assert (await guard.decide(attempt(), june, reserve=False)).reasons == (Reason.BLOCTEL_REGISTERED,)


async def test_outcomes_of_many_calls_in_one_write(ledger: Ledger) -> None:
    await legal_setup(ledger)
    numbers = [f"+3361234{i:04d}" for i in range(5)]
    for number in numbers:
        await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    guard = Guard(ledger)
    ids = [uuid.UUID((await guard.decide(attempt(n), NOW)).id) for n in numbers]
    later = NOW + timedelta(seconds=30)
    taken = await ledger.record_outcomes(
        [(ids[0], "answered", later, 12), (ids[1], "busy", later, None), (ids[0], "failed", later, 0)]
        + [(i, "no_answer", later, None) for i in ids[2:]]
    )
    # The first outcome of a call stays, in the journal and on the attempt.
    assert taken == 5
    assert await ledger.record_outcomes([(ids[1], "answered", later, 3)]) == 0
    async with ledger.pool.acquire() as conn:
        rows = dict(await conn.fetch("SELECT decision_id, outcome FROM pbxguard.attempts"))
        journal = dict(await conn.fetch("SELECT id, outcome FROM pbxguard.decisions"))
    assert rows == journal == {ids[0]: "answered", ids[1]: "busy"} | {i: "no_answer" for i in ids[2:]}


async def test_outcome_is_recorded_once(ledger: Ledger) -> None:
    await legal_setup(ledger)
    decision = await Guard(ledger).decide(attempt(key="o1"), NOW)
    assert await ledger.record_outcome(uuid.UUID(decision.id), "answered", NOW + timedelta(seconds=40), 35)
    assert not await ledger.record_outcome(uuid.UUID(decision.id), "failed", NOW + timedelta(seconds=41), 0)
    async with ledger.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT outcome, duration_s FROM pbxguard.attempts")
    assert row is not None and (row["outcome"], row["duration_s"]) == ("answered", 35)


# -- parity: the SQL function and the pure rules agree on random facts ---------------------------

parity_facts = st.fixed_dictionaries(
    {
        "purpose": st.sampled_from(list(Purpose)),
        "sector": st.sampled_from([Sector.GENERAL, Sector.RENOVATION_ENERGETIQUE, Sector.PRESS]),
        "automated": st.booleans(),
        "prerecorded": st.booleans(),
        "caller": st.sampled_from([NPV, "0142123456", "0612345678", "0810123456", "", "3010"]),
        "authorized": st.booleans(),
        "number": st.sampled_from([NUMBER, "+262692123456", "+590590271234", "0800123456"]),
        "residence": st.sampled_from([None, "57", "RE"]),
        "consent_days": st.none() | st.integers(-5, 400),
        "off_hours_days": st.none() | st.integers(-5, 400),
        "revoked": st.booleans(),
        "contract_days": st.none() | st.integers(-10, 10),
        "refusal_days": st.none() | st.integers(0, 70),
        "opposition": st.sampled_from([None, "ACME", "ALL", "OTHER"]),
        "bloctel": st.none() | st.tuples(st.sampled_from(["cleared", "registered"]), st.integers(-3, 40)),
        "attempt_days": st.lists(st.integers(0, 40), max_size=6),
        "now": st.sampled_from(
            [
                NOW,
                datetime(2026, 12, 5, 11, tzinfo=PARIS),
                datetime(2026, 6, 2, 19, 59, tzinfo=PARIS),
                datetime(2026, 8, 10, 21, 30, tzinfo=UTC),
                datetime(2026, 12, 1, 6, 30, tzinfo=UTC),
            ]
        ),
        "max_age": st.sampled_from([None, 30, 365]),
    }
)


def through_batches(ledger: Ledger) -> None:
    """Sends every decision of `ledger` through decide_batch, beside another consumer's."""

    async def decide(request: DecideRequest, patience: float | None = None) -> asyncpg.Record:
        other = dataclasses.replace(
            request, decision_id=uuid.uuid4(), consumer="+33699999999", call_key=None, reserve=False
        )
        results = await ledger.decide_batch([request, other])
        assert isinstance(results[1], asyncpg.Record)
        if isinstance(results[0], BaseException):
            raise results[0]
        row = results[0]
        if row["status"] != "retry":  # a residence the guard did not know yet: decide() alone says so
            assert row["status"] == "decided" and "ord" in row, "decide_batch itself decided"
        return row

    ledger.decide = decide  # type: ignore[method-assign]


@pytest.mark.parametrize("path", ["single", "batch"])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=parity_facts)
async def test_sql_and_policy_agree(ledger: Ledger, path: str, case: dict[str, object]) -> None:
    now: datetime = case["now"]  # type: ignore[assignment]
    destination = parse_destination(str(case["number"]))
    consumer = consumer_key(destination)  # the guard's key, also for an invalid number
    og = f"OG{uuid.uuid4().hex[:8]}"
    campaign = Campaign(
        f"camp-{og}",
        og,
        purpose=case["purpose"],
        sector=case["sector"],  # type: ignore[arg-type]
        automated=bool(case["automated"]),
        prerecorded=bool(case["prerecorded"]),
    )
    await ledger.add_campaign(campaign)
    caller = classify_caller_id(str(case["caller"]))
    if case["authorized"] and caller.e164:
        await ledger.authorize_caller_id(caller.e164, og, date(2026, 1, 1), None, None)
    async with ledger.pool.acquire() as conn:
        await conn.execute("DELETE FROM pbxguard.consumers; DELETE FROM pbxguard.oppositions")
    residence = Residence()
    if case["residence"] == "57":
        residence = Residence(departement="57")
    elif case["residence"] == "RE":
        residence = Residence(territory="RE")
    if case["residence"]:
        await ledger.set_residence(consumer, residence.territory, residence.departement)
    day = timedelta(days=1)
    consent_at = off_at = None
    if case["consent_days"] is not None:
        consent_at = now - day * int(case["consent_days"])  # type: ignore[call-overload]
        await ledger.add_consent(consumer, og, consent_at)
    if case["off_hours_days"] is not None:
        off_at = now - day * int(case["off_hours_days"])  # type: ignore[call-overload]
        await ledger.add_consent(consumer, og, off_at, off_hours=True)
    if case["revoked"] and (consent_at or off_at):
        await ledger.revoke_consent(consumer, og, now - timedelta(hours=1))
    contract_until = None
    if case["contract_days"] is not None:
        contract_until = now.astimezone(PARIS).date() + day * int(case["contract_days"])  # type: ignore[call-overload]
        await ledger.add_contract(consumer, og, contract_until, None)
    if case["refusal_days"] is not None:
        await ledger.add_refusal(consumer, og, now - day * int(case["refusal_days"]), None)  # type: ignore[call-overload]
    if case["opposition"] == "ACME":
        await ledger.add_opposition(consumer, og, now, None)
    elif case["opposition"] == "ALL":
        await ledger.add_opposition(consumer, None, now, None)
    bloctel = case["bloctel"]
    if bloctel is not None:
        status, age = bloctel  # type: ignore[misc]
        await ledger.import_bloctel([consumer], og, now.date() - day * age, status, None)
    async with ledger.pool.acquire() as conn:
        for days in case["attempt_days"]:  # type: ignore[attr-defined]
            await conn.execute(
                "INSERT INTO pbxguard.attempts (consumer, order_giver, campaign, decision_id, attempted_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                consumer,
                og,
                campaign.id,
                uuid.uuid4(),
                now - day * days,
            )
    policy = PolicySettings(consent_max_age_days=case["max_age"])  # type: ignore[arg-type]
    if path == "batch":
        through_batches(ledger)
    decision = await Guard(ledger, policy).decide(
        CallAttempt(str(case["number"]), campaign.id, str(case["caller"])), now, reserve=False
    )
    assert Reason.STORE_UNAVAILABLE not in decision.reasons
    # The guard fails closed with the union when both sides disagree; rebuild the facts the
    # ledger should have read and check that the pure rules give exactly the guard's answer.
    async with ledger.pool.acquire() as conn:
        recent = [
            r["attempted_at"]
            for r in await conn.fetch(
                "SELECT attempted_at FROM pbxguard.attempts WHERE consumer = $1 AND order_giver = $2"
                " ORDER BY attempted_at DESC LIMIT 4",
                consumer,
                og,
            )
        ]
        consents = await conn.fetchrow(
            "SELECT max(given_at) FILTER (WHERE true) AS c, max(given_at) FILTER (WHERE off_hours) AS o"
            " FROM pbxguard.consents WHERE consumer = $1 AND order_giver = $2 AND given_at <= $3"
            " AND (revoked_at IS NULL OR revoked_at > $3)",
            consumer,
            og,
            now,
        )
        status_row = await conn.fetchrow(
            "SELECT status, cleaned_on FROM pbxguard.bloctel_status WHERE consumer = $1 AND order_giver = $2",
            consumer,
            og,
        )
        refused = await conn.fetchval(
            "SELECT max(refused_at) FROM pbxguard.refusals WHERE consumer = $1 AND order_giver = $2",
            consumer,
            og,
        )
    assert consents is not None
    facts = ConsumerFacts(
        opposed=case["opposition"] in ("ACME", "ALL"),
        last_refusal_at=refused,
        consent_at=consents["c"],
        off_hours_consent_at=consents["o"],
        contract_until=contract_until,
        bloctel_status=status_row["status"] if status_row else None,
        bloctel_on=status_row["cleaned_on"] if status_row else None,
        recent_attempts=tuple(recent),
        caller_id_authorized=bool(case["authorized"] and caller.e164),
        residence=residence,
    )
    expected = rules.evaluate(campaign, destination, caller, facts, now, policy)
    assert decision.reasons == expected.reasons
    assert decision.next_allowed_at == expected.next_allowed_at


# -- batches: decisions that reach the ledger together share one transaction --------------------


@contextlib.contextmanager
def capturing(ledger: Ledger) -> Iterator[list[DecideRequest]]:
    """The requests the guard sends to `ledger` meanwhile (they are still decided)."""
    captured: list[DecideRequest] = []
    original = ledger.decide

    async def capture(request: DecideRequest, patience: float | None = None) -> asyncpg.Record:
        captured.append(request)
        return await original(request, patience)

    ledger.decide = capture  # type: ignore[method-assign]
    try:
        yield captured
    finally:
        ledger.decide = original  # type: ignore[method-assign]


async def test_concurrent_decisions_share_transactions_and_stay_exact(database_url: str) -> None:
    ledger = await Ledger.connect(database_url, min_size=2, max_size=4)
    ledger.decide_concurrency = 1  # every decision that arrives while one is under way queues
    try:
        await legal_setup(ledger)
        numbers = [f"+3361234{i:04d}" for i in range(40)]
        for number in numbers:
            await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
        guard = Guard(ledger)
        # 40 consumers once each, and NUMBER eight times: the cap holds across batches.
        attempts = [attempt(n, key=f"k-{n}") for n in numbers] + [attempt(key=f"dup-{i}") for i in range(8)]
        decisions = await asyncio.gather(*(guard.decide(a, NOW) for a in attempts))
        assert all(d.allowed for d in decisions[:40])
        assert sum(d.allowed for d in decisions[40:]) == 4
        assert all(d.reasons == (Reason.FREQUENCY_CAP,) for d in decisions[40:] if not d.allowed)
        assert await ledger.attempts_count(NUMBER, "ACME") == 4
        async with ledger.pool.acquire() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM pbxguard.decisions")
            transactions = await conn.fetchval("SELECT count(DISTINCT xid) FROM pbxguard.decisions")
            attempts_rows = await conn.fetchval("SELECT count(*) FROM pbxguard.attempts")
        assert rows == 48 and attempts_rows == 44
        # Batched: far fewer transactions than decisions.
        assert transactions < 20
        # Each decision is its own, on the right consumer.
        for d in decisions:
            stored = await ledger.decision(uuid.UUID(d.id))
            assert stored is not None and stored["consumer"] == d.consumer
    finally:
        await ledger.close()


async def test_batch_hands_rare_paths_to_decide(ledger: Ledger) -> None:
    """A replayed call key, a token from another gate, an unknown campaign and a residence the guard
    did not know yet, all in one batch: each gets decide()'s answer."""
    await legal_setup(ledger)
    other = "+33612340000"
    moved = "+33612340001"
    for number in (other, moved):
        await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    await ledger.set_residence(moved, "RE", None)
    guard = Guard(ledger)
    first = await guard.decide(attempt(key="twice"), NOW)
    granted = await guard.decide(attempt(other, key="ami-1"), NOW)
    with capturing(ledger) as captured:
        await guard.decide(attempt(key="twice"), NOW, reserve=False)
        await guard.decide(attempt(other, key="agi-1", token=granted.id), NOW, reserve=False)
        await guard.decide(attempt("+33612340002", campaign="nope"), NOW, reserve=False)
        await guard.decide(attempt(moved), NOW, reserve=False)
    requests = [dataclasses.replace(r, reserve=True) for r in captured[:4]]
    results = await ledger.decide_batch(requests)
    statuses = [r["status"] for r in results if isinstance(r, asyncpg.Record)]
    assert statuses == ["replayed", "token", "decided", "retry"]
    assert results[0]["decision_id"] == uuid.UUID(first.id)  # type: ignore[index]
    assert list(results[2]["reasons"]) == ["UNKNOWN_CAMPAIGN"]  # type: ignore[index]
    assert await ledger.attempts_count(NUMBER, "ACME") == 1
    assert await ledger.attempts_count(other, "ACME") == 1


async def test_one_failing_decision_does_not_fail_its_batch(ledger: Ledger) -> None:
    await legal_setup(ledger)
    with capturing(ledger) as captured:
        await Guard(ledger).decide(attempt(), NOW, reserve=False)
    good = dataclasses.replace(captured[0], reserve=True, call_key="good")
    # A negative cap makes PostgreSQL refuse this decision's LIMIT: an error for it alone.
    bad = dataclasses.replace(captured[0], consumer="+33612349999", cap=-1, decision_id=uuid.uuid4())
    results = await ledger.decide_batch([bad, good])
    assert isinstance(results[0], asyncpg.PostgresError)
    assert isinstance(results[1], asyncpg.Record) and results[1]["status"] == "decided"
    assert await ledger.attempts_count(NUMBER, "ACME") == 1


async def test_a_batch_refuses_two_decisions_for_one_consumer(ledger: Ledger) -> None:
    await legal_setup(ledger)
    request = DecideRequest(
        uuid.uuid4(), None, NOW, NUMBER, True, "c1", "+33162123456", "npv", True, "t", False, False,
        "|", [], [], NOW, NOW, NOW.date(), NOW.date(), None, True, 4, ["FR"], ["Europe/Paris"], None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="one decision per consumer"):
        await ledger.decide_batch([request, dataclasses.replace(request, decision_id=uuid.uuid4())])


async def decide_consenting_at_once(ledger: Ledger, count: int) -> list[Decision]:
    """Decisions for `count` consenting numbers, all asked at once."""
    numbers = [f"+3361234{i:04d}" for i in range(count)]
    for number in numbers:
        await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
    return await asyncio.gather(*(Guard(ledger).decide(attempt(n), NOW) for n in numbers))


async def test_batches_of_one_send_every_decision_alone(database_url: str) -> None:
    ledger = await Ledger.connect(database_url, min_size=1, max_size=2)
    ledger.decide_concurrency, ledger.decide_batch_max = 1, 1  # database.decide_batch_max = 1
    try:
        await legal_setup(ledger)
        assert all(d.allowed for d in await decide_consenting_at_once(ledger, 10))
        async with ledger.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(DISTINCT xid) FROM pbxguard.decisions") == 10
    finally:
        await ledger.close()


async def test_decisions_keep_one_connection_between_round_trips(ledger: Ledger) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger)
    await guard.decide(attempt(key="k1"), NOW)
    idle = ledger.pool.get_idle_size()
    for key in ("k2", "k3", "k4"):
        assert (await guard.decide(attempt(key=key), NOW)).allowed
    # The pool saw no acquire or release: the same connection served every decision.
    assert ledger.pool.get_idle_size() == idle
    assert ledger.pool.get_size() - idle == 1


async def test_a_connection_the_server_closed_is_not_used_again(ledger: Ledger, database_url: str) -> None:
    await legal_setup(ledger)
    guard = Guard(ledger, timeout=2.0)
    assert (await guard.decide(attempt(key="k1"), NOW)).allowed
    idle = ledger.pool.get_idle_size()
    admin = await asyncpg.connect(database_url)  # not from the pool, whose counts the test reads
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%decide(%'"
        )
    finally:
        await admin.close()
    assert killed == 1
    # asyncpg hands a connection it has seen closed back to the pool, which reconnects it.
    await until(lambda: ledger.pool.get_idle_size() == idle + 1)
    assert (await guard.decide(attempt(key="k2"), NOW)).allowed
    assert await ledger.attempts_count(NUMBER, "ACME") == 2


async def test_kept_connections_go_back_to_the_pool_when_calls_stop(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "HELD_IDLE_SECONDS", 0.3)
    await legal_setup(ledger)
    assert (await Guard(ledger).decide(attempt(key="k1"), NOW)).allowed
    assert ledger.pool.get_size() - ledger.pool.get_idle_size() == 1
    # No decision comes after it: the connection goes back anyway, to the pool's own idle timeout.
    await until(lambda: ledger.pool.get_size() == ledger.pool.get_idle_size())


async def test_closing_waits_for_a_decision_under_way_and_does_not_keep_its_connection(
    database_url: str,
) -> None:
    ledger = await Ledger.connect(database_url, min_size=1, max_size=4)
    await legal_setup(ledger)
    blocker = await asyncpg.connect(database_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        # The lock decide() takes for this consumer and order giver: the decision waits on it.
        await blocker.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))", NUMBER, "ACME"
        )
        decision = asyncio.create_task(Guard(ledger, timeout=10).decide(attempt(key="k1"), NOW))
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%decide(%'"
        )
        async with asyncio.timeout(5):
            while not await blocker.fetchval(waiting):
                # Inside a transaction, pg_stat_activity is read once unless told otherwise.
                await blocker.execute("SELECT pg_stat_clear_snapshot()")
                await asyncio.sleep(0.01)
        closing = asyncio.create_task(ledger.close())
        await asyncio.sleep(0.1)
        await lock.commit()
        assert (await decision).allowed
        async with asyncio.timeout(5):  # asyncpg waits for every acquired connection to come back
            await closing
        assert ledger.pool.get_size() == 0
    finally:
        await blocker.close()


async def test_a_pool_of_one_is_not_kept_by_the_decisions(database_url: str) -> None:
    ledger = await Ledger.connect(database_url, min_size=1, max_size=1)
    try:
        await legal_setup(ledger)
        assert (await Guard(ledger).decide(attempt(key="k1"), NOW)).allowed
        # Held, the only connection would leave the CRM writes waiting for ever.
        async with asyncio.timeout(5):
            await ledger.add_refusal(NUMBER, "ACME", NOW, "phone")
            assert (await Guard(ledger).decide(attempt(key="k2"), NOW)).reasons == (
                Reason.REFUSAL_QUIET_PERIOD,
            )
    finally:
        async with asyncio.timeout(5):
            await ledger.close()


async def test_closing_the_ledger_returns_the_kept_connections(database_url: str) -> None:
    ledger = await Ledger.connect(database_url, min_size=1, max_size=4)
    await legal_setup(ledger)
    assert all(d.allowed for d in await decide_consenting_at_once(ledger, 8))
    async with asyncio.timeout(5):  # asyncpg waits for every acquired connection to come back
        await ledger.close()
    assert ledger.pool.get_size() == 0
