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

from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.migrate import bundled, migrate
from pbxguard.ledger.pgcluster import LocalCluster
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Campaign

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)


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
        await writer.execute(
            """INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign, caller_id, verdict, reasons)
               VALUES ('+33612345699', $1, now(), 'cli', 'c1', '0162123456', 'block', '{WEEKEND}')""",
            uuid.uuid4(),
        )
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


# The decision sealed at a place of the chain.
def at(seq: int) -> str:
    return f"(consumer, id) IN (SELECT consumer, id FROM pbxguard.journal_chain WHERE seq = {seq})"


TAMPERING = {
    "edit a verdict": "UPDATE pbxguard.decisions SET verdict = CASE verdict WHEN 'allow' THEN 'block' ELSE 'allow' END"
    f" WHERE {at(5)}",
    "edit a reason": f"UPDATE pbxguard.decisions SET reasons = array_append(reasons, 'NO_CONSENT') WHERE {at(5)}",
    "edit the number": f"UPDATE pbxguard.decisions SET consumer = '+33600000000' WHERE {at(5)}",
    "edit the time": f"UPDATE pbxguard.decisions SET decided_at = decided_at - interval '1 day' WHERE {at(5)}",
    "delete a decision": f"DELETE FROM pbxguard.decisions WHERE {at(5)}",
    "delete an entry": "DELETE FROM pbxguard.journal_chain WHERE seq = 5",
    "delete the last rows": "DELETE FROM pbxguard.decisions WHERE (consumer, id) IN"
    " (SELECT consumer, id FROM pbxguard.journal_chain WHERE seq > 10);"
    " DELETE FROM pbxguard.journal_chain WHERE seq > 10",
    # The primary key refuses a swap in one statement: three steps.
    "reorder two entries": "UPDATE pbxguard.journal_chain SET seq = -5 WHERE seq = 5;"
    " UPDATE pbxguard.journal_chain SET seq = 5 WHERE seq = 6;"
    " UPDATE pbxguard.journal_chain SET seq = 6 WHERE seq = -5",
    "swap in another decision": "INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign,"
    " caller_id, verdict, reasons) SELECT consumer, '00000000-0000-0000-0000-000000000005', decided_at, gate,"
    f" campaign, caller_id, 'allow', '{{}}' FROM pbxguard.decisions WHERE {at(5)};"
    " UPDATE pbxguard.journal_chain SET id = '00000000-0000-0000-0000-000000000005' WHERE seq = 5",
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
        row = await conn.fetchrow(f"SELECT * FROM pbxguard.decisions WHERE {at(3)}")
        previous = await conn.fetchval("SELECT prev_hash FROM pbxguard.journal_chain WHERE seq = 3")
        forged = dict(row)
        forged["verdict"] = "allow"
        digest = journal.entry_hash(bytes(previous), forged, None)
        await conn.execute(f"UPDATE pbxguard.decisions SET verdict = 'allow' WHERE {at(3)}")
        await conn.execute("UPDATE pbxguard.journal_chain SET entry_hash = $1 WHERE seq = 3", digest)
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
        middle = await conn.fetchval(f"SELECT recorded_at FROM pbxguard.decisions WHERE {at(4)}")
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
            "SELECT entry_hash FROM pbxguard.journal_chain WHERE id = $1", uuid.UUID(ids[0])
        )
        assert first["entry_hash"] == bytes(stored).hex()
        assert [r async for r in journal.export_rows(conn, NOW, NOW, order_giver="ACME")] == []
        assert [
            r async for r in journal.export_rows(conn, NOW - timedelta(1), NOW + timedelta(1), "NOBODY")
        ] == []
    finally:
        await ledger.pool.release(conn)


async def test_a_chain_sealed_before_migration_0005_carries_on(pg_cluster: LocalCluster) -> None:
    """Migration 0005 moves the entries 0003 kept in the decisions into the chain table; decisions
    0003 had left unsealed, even below entries it had sealed, are sealed next, once each."""
    name = f"legacy_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        conn = await asyncpg.connect(pg_cluster.dsn(name))
        try:
            before_0005 = [m for m in bundled() if m.version < 5]
            await migrate(conn, before_0005)
            ledger = await Ledger.connect(pg_cluster.dsn(name), min_size=1, max_size=2, run_migrations=False)
            try:
                await fill(ledger, 8)
            finally:
                await ledger.close()
            rows = await conn.fetch("SELECT * FROM pbxguard.decisions ORDER BY recorded_at, id")
            # What 0003's sealer wrote, for rows 0-3 and 6-7; rows 4 and 5 were still unsealed.
            previous, seq = journal.GENESIS, 0
            for row in [*rows[:4], *rows[6:]]:
                seq += 1
                digest = journal.entry_hash(previous, row, None)
                await conn.execute(
                    "UPDATE pbxguard.decisions SET seq = $1, prev_hash = $2, entry_hash = $3 WHERE id = $4",
                    seq,
                    previous,
                    digest,
                    row["id"],
                )
                previous = digest
            await conn.execute(
                "INSERT INTO pbxguard.journal_checkpoints (seq, entry_hash, rows) VALUES ($1, $2, $3)",
                seq,
                previous,
                seq,
            )
            applied = await migrate(conn)
            assert applied[0] == "0005_journal_chain_table.sql"
            assert await journal.unsealed(conn) == 2
            assert await journal.seal(conn) == 2
            assert await journal.seal(conn) == 0
            result = await journal.verify(conn)
            assert result.ok, result.problems
            assert (result.checked, result.unsealed) == (8, 0)
            sealed_last = await conn.fetch("SELECT id FROM pbxguard.journal_chain WHERE seq > 6 ORDER BY seq")
            assert [r["id"] for r in sealed_last] == [rows[4]["id"], rows[5]["id"]]
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
