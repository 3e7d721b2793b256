"""The decision journal: sealing into a hash chain, tamper detection, export for an inspection."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)


def generic_canonical(row: dict[str, object]) -> bytes:
    """The chain's rendering as first defined: every field through journal._value, then json.dumps."""
    values = [journal._value(row[name]) for name in journal.CHAINED_FIELDS]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode()


_texts = st.text(max_size=12)
_instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.sampled_from([UTC, PARIS])
)
_rows = st.fixed_dictionaries(
    {
        "id": st.uuids(),
        "consumer": _texts,
        "call_key": st.none() | _texts,
        "decided_at": _instants,
        "gate": _texts,
        "campaign": _texts,
        "order_giver": st.none() | _texts,
        "caller_id": _texts,
        "verdict": st.sampled_from(["allow", "block"]),
        "reasons": st.lists(_texts, max_size=4) | st.tuples(_texts),
        "shadow": st.booleans(),
        "counted": st.booleans(),
        "via_token": st.none() | st.uuids(),
        "territories": st.lists(_texts, max_size=3),
        "zones": st.lists(_texts, max_size=3),
    }
)


@given(_rows)
def test_the_sealer_s_rendering_is_the_chain_s_definition(row: dict[str, object]) -> None:
    # canonical() spells the fields out for speed; a byte of difference would break every chain.
    assert journal.canonical(row) == generic_canonical(row)


def test_the_rendering_follows_the_chained_fields_in_order() -> None:
    row = {name: f"<{name}>" for name in journal.CHAINED_FIELDS}
    assert json.loads(journal.canonical(row)) == [f"<{name}>" for name in journal.CHAINED_FIELDS]


async def fill(ledger: Ledger, count: int = 12) -> list[str]:
    """Decisions for several consumers, some allowed and some blocked."""
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    guard = Guard(ledger)
    ids = []
    for i in range(count):
        number = f"+3361234{5600 + i % 4:04d}"
        if i % 3 == 0:
            await ledger.add_consent(number, "ACME", datetime(2026, 11, 1, tzinfo=UTC))
        decision = await guard.decide(
            CallAttempt(number, "c1", "0162123456", call_key=f"k{i}"), NOW + timedelta(seconds=i)
        )
        ids.append(decision.id)
    return ids


async def sealed(ledger: Ledger, key: bytes | None = None) -> asyncpg.pool.PoolConnectionProxy:
    conn = await ledger.pool.acquire()
    while await journal.seal(conn, key):
        pass
    return conn


async def write_decision(conn: asyncpg.Connection, number: str, *, xid_ahead: int = 0) -> uuid.UUID:
    """A blocked decision written straight into the journal, as another writer would. Its xid is the
    writing transaction's, or ``xid_ahead`` past it: a row restored from an older cluster."""
    decision_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign, caller_id, verdict,
               reasons, xid)
           VALUES ($1, $2, now(), 'cli', 'c1', '0162123456', 'block', '{WEEKEND}',
               (pg_current_xact_id()::text::numeric + $3)::text::xid8)""",
        number,
        decision_id,
        xid_ahead,
    )
    return decision_id


async def test_every_decision_is_sealed_and_verifies(ledger: Ledger) -> None:
    ids = await fill(ledger)
    conn = await sealed(ledger)
    try:
        result = await journal.verify(conn)
        assert result.ok, result.problems
        assert result.checked == len(ids) and (result.first_seq, result.last_seq) == (1, len(ids))
        assert result.unsealed == 0
        # More decisions later extend the same chain.
        await Guard(ledger).decide(CallAttempt("+33612345600", "c1", "0162123456", call_key="late"), NOW)
        assert await journal.seal(conn) == 1
        assert (await journal.verify(conn)).checked == len(ids) + 1
    finally:
        await ledger.pool.release(conn)


async def test_seal_waits_for_transactions_in_flight(ledger: Ledger) -> None:
    await fill(ledger, 2)
    writer = await ledger.pool.acquire()
    conn = await ledger.pool.acquire()
    try:
        tx = writer.transaction()
        await tx.start()
        # A decision written by a transaction that has not committed yet ...
        await write_decision(writer, "+33612345699")
        # ... holds back rows committed after it started, so nothing can slip in behind the head.
        await Guard(ledger).decide(CallAttempt("+33612345600", "c1", "0162123456", call_key="after"), NOW)
        assert await journal.seal(conn) == 2
        assert await journal.unsealed(conn) == 1  # the uncommitted row is not visible yet
        await tx.commit()
        assert await journal.seal(conn) == 2
        assert (await journal.verify(conn)).ok
    finally:
        await ledger.pool.release(writer)
        await ledger.pool.release(conn)


async def test_rows_restored_from_another_cluster_are_sealed(ledger: Ledger) -> None:
    """pg_dump and restore into a younger cluster keep each row's xid: an unsealed row may carry an
    xid this cluster has not reached.  Its transaction ended where it ran, so it is sealed now."""
    await fill(ledger, 3)
    conn = await ledger.pool.acquire()
    try:
        restored = await write_decision(conn, "+33612345698", xid_ahead=50_000_000)
        while await journal.seal(conn):
            pass
        assert await journal.unsealed(conn) == 0
        assert await conn.fetchval("SELECT seq FROM pbxguard.decisions WHERE id = $1", restored) == 4
        result = await journal.verify(conn)
        assert result.ok and result.checked == 4, result.problems
    finally:
        await ledger.pool.release(conn)


async def test_a_sealer_never_seals_its_own_transaction_s_rows(ledger: Ledger) -> None:
    """A transaction's own xid can be at or above its snapshot's xmax (no later transaction has ended
    yet): its uncommitted rows, which it alone sees, must wait for its commit like anyone's."""
    await fill(ledger, 2)
    conn = await ledger.pool.acquire()
    try:
        while await journal.seal(conn):
            pass
        async with conn.transaction():
            await write_decision(conn, "+33612345697")
            own = await conn.fetchval(
                "SELECT pg_current_xact_id() >= pg_snapshot_xmax(pg_current_snapshot())"
            )
            assert await journal.seal(conn) == 0
            assert await journal.unsealed(conn) == 1
        assert await journal.seal(conn) == 1
        assert (await journal.verify(conn)).ok
        # The case this test is about did occur (no other transaction ended in between).
        assert own
    finally:
        await ledger.pool.release(conn)


TAMPERING = {
    "edit a verdict": "UPDATE pbxguard.decisions SET verdict = CASE verdict WHEN 'allow' THEN 'block' ELSE 'allow' END WHERE seq = 5",
    "edit a reason": "UPDATE pbxguard.decisions SET reasons = array_append(reasons, 'NO_CONSENT') WHERE seq = 5",
    "edit the number": "UPDATE pbxguard.decisions SET consumer = '+33600000000' WHERE seq = 5",
    "edit the time": "UPDATE pbxguard.decisions SET decided_at = decided_at - interval '1 day' WHERE seq = 5",
    "delete a row": "DELETE FROM pbxguard.decisions WHERE seq = 5",
    "delete the last rows": "DELETE FROM pbxguard.decisions WHERE seq > 10",
    "reorder two rows": "UPDATE pbxguard.decisions SET seq = CASE seq WHEN 5 THEN 6 ELSE 5 END WHERE seq IN (5, 6)",
    "insert a row": "INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign, caller_id, verdict,"
    " reasons, seq, prev_hash, entry_hash) SELECT consumer, gen_random_uuid(), decided_at, gate, campaign,"
    " caller_id, 'allow', '{}', 5, prev_hash, entry_hash FROM pbxguard.decisions WHERE seq = 5",
}


@pytest.mark.parametrize("how", list(TAMPERING))
async def test_tampering_is_caught(ledger: Ledger, how: str) -> None:
    await fill(ledger)
    conn = await sealed(ledger)
    try:
        assert (await journal.verify(conn)).ok
        await conn.execute(TAMPERING[how])
        result = await journal.verify(conn)
        assert not result.ok
        assert any(p.startswith(("seq 5", "seq 6", "seq 11", "seq 12")) for p in result.problems), (
            result.problems
        )
    finally:
        await ledger.pool.release(conn)


async def test_recomputing_the_hash_without_the_key_is_caught(ledger: Ledger) -> None:
    """With [journal] key, a forger with database access cannot rebuild a valid chain."""
    key = b"journal-secret"
    await fill(ledger, 6)
    conn = await sealed(ledger, key)
    try:
        assert (await journal.verify(conn, key)).ok
        assert not (await journal.verify(conn)).ok  # a plain SHA-256 chain is not this chain
        row = await conn.fetchrow("SELECT * FROM pbxguard.decisions WHERE seq = 3")
        forged = dict(row)
        forged["verdict"] = "allow"
        digest = journal.entry_hash(bytes(row["prev_hash"]), forged, None)
        await conn.execute(
            "UPDATE pbxguard.decisions SET verdict = 'allow', entry_hash = $1 WHERE seq = 3", digest
        )
        result = await journal.verify(conn, key)
        assert not result.ok and result.problems[0].startswith("seq 3")
    finally:
        await ledger.pool.release(conn)


async def test_annotations_do_not_break_the_chain(ledger: Ledger) -> None:
    ids = await fill(ledger, 4)
    conn = await sealed(ledger)
    try:
        await ledger.record_outcome(uuid.UUID(ids[0]), "answered", NOW + timedelta(minutes=1), 42)
        assert (await journal.verify(conn)).ok
    finally:
        await ledger.pool.release(conn)


async def test_verify_a_time_range(ledger: Ledger) -> None:
    await fill(ledger, 10)
    conn = await sealed(ledger)
    try:
        middle = await conn.fetchval("SELECT recorded_at FROM pbxguard.decisions WHERE seq = 4")
        result = await journal.verify(conn, since=middle)
        assert result.ok and result.first_seq == 4 and result.last_seq == 10
    finally:
        await ledger.pool.release(conn)


async def test_concurrent_sealers_build_one_chain(ledger: Ledger) -> None:
    await fill(ledger, 30)
    conns = [await ledger.pool.acquire() for _ in range(3)]
    try:
        counts = await asyncio.gather(*(journal.seal(c, batch=7) for c in conns))
        while any(counts):
            counts = await asyncio.gather(*(journal.seal(c, batch=7) for c in conns))
        result = await journal.verify(conns[0])
        assert result.ok and result.checked == 30
    finally:
        for conn in conns:
            await ledger.pool.release(conn)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_export_round_trip(ledger: Ledger, fmt: str) -> None:
    ids = await fill(ledger, 9)
    conn = await sealed(ledger)
    try:
        rows = [
            row
            async for row in journal.export_rows(
                conn, NOW - timedelta(hours=1), NOW + timedelta(hours=1), order_giver="ACME"
            )
        ]
        out = io.StringIO()
        journal.write_rows(rows, out, fmt, header=True)
        text = out.getvalue()
        parsed = (
            list(csv.DictReader(io.StringIO(text)))
            if fmt == "csv"
            else [json.loads(line) for line in text.splitlines()]
        )
        assert [r["decision_id"] for r in parsed] == ids
        first = parsed[0]
        assert set(journal.EXPORT_FIELDS) <= set(first)
        assert first["order_giver"] == "ACME" and first["campaign"] == "c1"
        blocked = [r for r in parsed if r["verdict"] == "block"]
        assert blocked and all(r["reasons"] and r["rules"] for r in blocked)
        # The exported hashes are the chain's: an inspector can check them against `audit verify`.
        stored = await conn.fetchval(
            "SELECT entry_hash FROM pbxguard.decisions WHERE id = $1", uuid.UUID(ids[0])
        )
        assert first["entry_hash"] == bytes(stored).hex()
        assert [r async for r in journal.export_rows(conn, NOW, NOW, order_giver="ACME")] == []
        assert [
            r async for r in journal.export_rows(conn, NOW - timedelta(1), NOW + timedelta(1), "NOBODY")
        ] == []
    finally:
        await ledger.pool.release(conn)
