"""The decision journal: sealing into a hash chain, tamper detection, export for an inspection."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.migrate import bundled, migrate
from pbxguard.ledger.pgcluster import LocalCluster
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
        assert await conn.fetchval("SELECT seq FROM pbxguard.journal_chain WHERE id = $1", restored) == 4
        result = await journal.verify(conn)
        assert result.ok and result.checked == 4, result.problems
        # Linked, restored rows are not read again by every seal: the bound has passed them.
        bound = await conn.fetchval(
            "SELECT restored_below FROM pbxguard.journal_checkpoints ORDER BY seq DESC LIMIT 1"
        )
        assert bound > await conn.fetchval("SELECT xid FROM pbxguard.decisions WHERE id = $1", restored)
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


# The decision that link 5 names, for an UPDATE or DELETE of pbxguard.decisions d.
_LINK_5 = "pbxguard.journal_chain c WHERE c.seq = 5 AND d.consumer = c.consumer AND d.id = c.id"
_COPY_ID = "'00000000-0000-4000-8000-000000000005'"
TAMPERING = {
    "edit a verdict": "UPDATE pbxguard.decisions d SET verdict = CASE d.verdict WHEN 'allow' THEN 'block'"
    f" ELSE 'allow' END FROM {_LINK_5}",
    "edit a reason": f"UPDATE pbxguard.decisions d SET reasons = array_append(d.reasons, 'NO_CONSENT') FROM {_LINK_5}",
    "edit the number": f"UPDATE pbxguard.decisions d SET consumer = '+33600000000' FROM {_LINK_5}",
    "edit the number and its link": f"UPDATE pbxguard.decisions d SET consumer = '+33600000000' FROM {_LINK_5};"
    " UPDATE pbxguard.journal_chain SET consumer = '+33600000000' WHERE seq = 5",
    "edit the time": f"UPDATE pbxguard.decisions d SET decided_at = d.decided_at - interval '1 day' FROM {_LINK_5}",
    "delete a row": f"DELETE FROM pbxguard.decisions d USING {_LINK_5}",
    "delete a link": "DELETE FROM pbxguard.journal_chain WHERE seq = 5",
    "delete the last rows": "DELETE FROM pbxguard.journal_chain WHERE seq > 10",
    "reorder two rows": "UPDATE pbxguard.journal_chain SET seq = seq + 1000 WHERE seq IN (5, 6);"
    " UPDATE pbxguard.journal_chain SET seq = CASE seq WHEN 1005 THEN 6 ELSE 5 END WHERE seq > 1000",
    # Every link from 5 on moves up one, and a copy of decision 5 takes link 5 with its hashes.
    "insert a row": "UPDATE pbxguard.journal_chain SET seq = seq + 1001 WHERE seq >= 5;"
    " UPDATE pbxguard.journal_chain SET seq = seq - 1000 WHERE seq > 1000;"
    " INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign, caller_id, verdict, reasons)"
    f" SELECT d.consumer, {_COPY_ID}, d.decided_at, d.gate, d.campaign, d.caller_id, 'allow', '{{}}'"
    " FROM pbxguard.decisions d JOIN pbxguard.journal_chain c ON d.consumer = c.consumer AND d.id = c.id"
    " WHERE c.seq = 6;"
    f" INSERT INTO pbxguard.journal_chain SELECT 5, consumer, {_COPY_ID}, prev_hash, entry_hash"
    " FROM pbxguard.journal_chain WHERE seq = 6",
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
        row = await conn.fetchrow(
            "SELECT * FROM pbxguard.decisions JOIN pbxguard.journal_chain USING (consumer, id) WHERE seq = 3"
        )
        forged = dict(row)
        forged["verdict"] = "allow"
        digest = journal.entry_hash(bytes(row["prev_hash"]), forged, None)
        await conn.execute("UPDATE pbxguard.decisions SET verdict = 'allow' WHERE id = $1", row["id"])
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
        middle = await conn.fetchval(
            "SELECT recorded_at FROM pbxguard.decisions JOIN pbxguard.journal_chain USING (consumer, id)"
            " WHERE seq = 4"
        )
        result = await journal.verify(conn, since=middle)
        assert result.ok and result.first_seq == 4 and result.last_seq == 10
        result = await journal.verify(conn, until=middle)
        assert result.ok and result.first_seq == 1 and result.last_seq == 4
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


async def test_rows_inserted_behind_the_sealer_are_reported(ledger: Ledger) -> None:
    """A row with a transaction id the sealer has passed will never be linked: verify says so."""
    await fill(ledger, 3)
    conn = await sealed(ledger)
    try:
        assert (await journal.verify(conn)).ok
        await conn.execute(
            """INSERT INTO pbxguard.decisions (consumer, id, decided_at, gate, campaign, caller_id, verdict,
                   reasons, xid)
               VALUES ('+33612345696', gen_random_uuid(), now(), 'cli', 'c1', '0162123456', 'allow', '{}', '3')"""
        )
        assert await journal.seal(conn) == 0
        result = await journal.verify(conn)
        assert result.problems == ["1 decision(s) below the sealed horizon are not in the chain (inserted)"]
        assert result.checked == 3 and result.unsealed == 0
    finally:
        await ledger.pool.release(conn)


async def test_a_batch_may_end_inside_one_transaction_s_rows(ledger: Ledger) -> None:
    """Rows of one transaction share an xid: the next seal takes up the rest of them."""
    await fill(ledger, 2)
    conn = await ledger.pool.acquire()
    try:
        async with conn.transaction():
            for i in range(5):
                await write_decision(conn, f"+3361234569{i}")
        counts = []
        while count := await journal.seal(conn, batch=2):
            counts.append(count)
        assert counts == [2, 2, 2, 1]
        result = await journal.verify(conn)
        assert result.ok and result.checked == 7 and result.unsealed == 0, result.problems
    finally:
        await ledger.pool.release(conn)


async def test_a_horizon_from_another_cluster_is_not_trusted(ledger: Ledger) -> None:
    """A restored journal's last horizon is another counter's: the sealer reads from the start."""
    await fill(ledger, 2)
    conn = await sealed(ledger)
    try:
        ahead = "(pg_current_xact_id()::text::numeric + 50000000)::text::xid8"
        await conn.execute(f"UPDATE pbxguard.journal_checkpoints SET sealed_below = {ahead}")
        # Nothing to seal: the one read from the start records this cluster's horizon instead.
        assert await journal.seal(conn) == 0
        assert await conn.fetchval(
            "SELECT max(sealed_below) < pg_current_xact_id() FROM pbxguard.journal_checkpoints"
        )
        await conn.execute(f"UPDATE pbxguard.journal_checkpoints SET sealed_below = {ahead}")
        await write_decision(conn, "+33612345695")
        assert await journal.unsealed(conn) == 1
        assert await journal.seal(conn) == 1
        result = await journal.verify(conn)
        assert result.ok and result.checked == 3 and result.unsealed == 0, result.problems
    finally:
        await ledger.pool.release(conn)


async def _seal_the_old_way(conn: asyncpg.Connection, upto: int) -> None:
    """What sealing wrote before the chain had a table of its own: each decision's own row."""
    rows = await conn.fetch(
        f"SELECT {', '.join(journal.CHAINED_FIELDS)} FROM pbxguard.decisions ORDER BY recorded_at, id"
    )
    previous = journal.GENESIS
    for seq, row in enumerate(rows[:upto], 1):
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
        upto,
        previous,
        upto,
    )


@contextlib.asynccontextmanager
async def journal_before_0005(
    pg_cluster: LocalCluster, name: str
) -> AsyncIterator[tuple[asyncpg.Connection, list[str]]]:
    """A database migrated up to 0004 with six decisions, the first four sealed as 0004 sealed them."""
    admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = pg_cluster.dsn(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            before = [m for m in bundled() if m.version < 5]
            assert [m.version for m in before] == [1, 2, 3, 4]
            await migrate(conn, before)
            ledger = await Ledger.connect(url, min_size=1, max_size=2, run_migrations=False)
            try:
                ids = await fill(ledger, 6)
            finally:
                await ledger.close()
            await _seal_the_old_way(conn, upto=4)
            yield conn, ids
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_the_chain_table_migration_keeps_the_chain(pg_cluster: LocalCluster) -> None:
    """A journal sealed under migration 0004 verifies after 0005, and its unsealed rows are sealed."""
    async with journal_before_0005(pg_cluster, "chain_migration") as (conn, ids):
        assert await migrate(conn) == ["0005_journal_chain_table.sql"]
        result = await journal.verify(conn)
        assert result.ok and result.checked == 4 and result.unsealed == 2, result.problems
        assert await journal.seal(conn) == 2
        result = await journal.verify(conn)
        assert result.ok and result.checked == 6 and result.unsealed == 0, result.problems
        linked = await conn.fetch("SELECT id::text FROM pbxguard.journal_chain ORDER BY seq")
        assert [r["id"] for r in linked] == ids


async def test_the_chain_table_migration_refuses_a_damaged_chain(pg_cluster: LocalCluster) -> None:
    async with journal_before_0005(pg_cluster, "chain_migration_damaged") as (conn, _):
        await conn.execute("UPDATE pbxguard.decisions SET seq = 2 WHERE seq = 3")
        with pytest.raises(asyncpg.RaiseError, match="hash chain is damaged"):
            await migrate(conn)
        assert await conn.fetchval("SELECT to_regclass('pbxguard.journal_chain')") is None


async def test_the_sealer_carries_on_after_a_cut_or_a_lost_checkpoint(ledger: Ledger) -> None:
    """Neither stops the sealer (a unique violation at every seal), and verify reports both."""
    await fill(ledger, 6)
    conn = await sealed(ledger)
    try:
        await conn.execute("DELETE FROM pbxguard.journal_checkpoints WHERE seq = 6")  # the only one
        assert (await journal.verify(conn)).problems == [
            "seq 1: after the last checkpoint (links added outside the sealer, or a checkpoint deleted)"
        ]
        await Guard(ledger).decide(CallAttempt("+33612345600", "c1", "0162123456", call_key="k6"), NOW)
        assert await journal.seal(conn) == 1
        assert await conn.fetchval("SELECT max(seq) FROM pbxguard.journal_chain") == 7
        await conn.execute("DELETE FROM pbxguard.journal_chain WHERE seq > 5")
        await Guard(ledger).decide(CallAttempt("+33612345601", "c1", "0162123456", call_key="k7"), NOW)
        assert await journal.seal(conn) == 1
        assert await conn.fetchval("SELECT max(seq) FROM pbxguard.journal_chain") == 8
        assert (await journal.verify(conn)).problems[0] == "seq 6: missing (deleted) up to 7"
    finally:
        await ledger.pool.release(conn)


async def test_a_link_numbered_below_one_is_reported(ledger: Ledger) -> None:
    await fill(ledger, 3)
    conn = await sealed(ledger)
    try:
        await conn.execute(
            """ALTER TABLE pbxguard.journal_chain DROP CONSTRAINT journal_chain_seq_check;
               INSERT INTO pbxguard.journal_chain SELECT -1, consumer, gen_random_uuid(), prev_hash, entry_hash
                 FROM pbxguard.journal_chain WHERE seq = 1"""
        )
        assert (await journal.verify(conn)).problems == [
            "1 link(s) outside the chain's numbering (seq below 1)"
        ]
    finally:
        await ledger.pool.release(conn)
