"""The decision journal: sealing into a hash chain, verification, export for an inspection.

Each sealed decision's `entry_hash` is SHA-256 (or HMAC-SHA-256 with `[journal] key`) over the
previous entry's hash and a canonical JSON rendering of the decision's own fields.  Verification
recomputes the chain here, in Python, from the rows alone: an edited, deleted, inserted or reordered
row breaks it at that row.  `next_allowed_at` and the call outcome are annotations written after
the decision and are not part of the chain.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import asyncpg

from pbxguard.policy.model import RULE_REFERENCES, Reason

GENESIS = b"\x00" * 32
SEAL_BATCH = 1000
# Rows hashed between two returns to the event loop: hashing runs beside the gates on one loop, and a
# few hundred rows at ~35 µs each would hold every call waiting for an answer.
_HASHES_PER_TURN = 16
# Only one daemon seals at a time; the others find the lock taken and skip their turn.
_SEAL_LOCK = 0x70626A6C

CHAINED_FIELDS = (
    "id", "consumer", "call_key", "decided_at", "gate", "campaign", "order_giver", "caller_id",
    "verdict", "reasons", "shadow", "counted", "via_token", "territories", "zones",
)  # fmt: skip
_COLUMNS = ", ".join(CHAINED_FIELDS)


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    return value


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _texts(value: Any) -> Any:
    # A text[] column arrives as a list of str, which JSON takes as it is.
    if type(value) is list and all(type(item) is str for item in value):
        return value
    return _value(value)


def canonical(row: asyncpg.Record | dict[str, Any]) -> bytes:
    """The decision's chained fields as compact JSON, in CHAINED_FIELDS order.

    Spelled out field by field rather than converting every value generically: the sealer renders
    each decision once, on the event loop the gates share, and the generic walk took two thirds of
    the time. ``_value`` stays the definition: tests/ledger/test_journal.py holds both to the same
    bytes.
    """
    return _ENCODER.encode(
        [
            _value(row["id"]),
            row["consumer"],
            row["call_key"],
            _value(row["decided_at"]),
            row["gate"],
            row["campaign"],
            row["order_giver"],
            row["caller_id"],
            row["verdict"],
            _texts(row["reasons"]),
            row["shadow"],
            row["counted"],
            _value(row["via_token"]),
            _texts(row["territories"]),
            _texts(row["zones"]),
        ]
    ).encode()


def entry_hash(previous: bytes, row: asyncpg.Record | dict[str, Any], key: bytes | None) -> bytes:
    payload = previous + canonical(row)
    if key:
        return hmac.new(key, payload, hashlib.sha256).digest()
    return hashlib.sha256(payload).digest()


async def seal(conn: asyncpg.Connection, key: bytes | None = None, batch: int = SEAL_BATCH) -> int:
    """Seals committed, unsealed decisions into the chain; returns how many it sealed."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _SEAL_LOCK):
            return 0
        head = await conn.fetchrow(
            "SELECT seq, entry_hash FROM pbxguard.journal_checkpoints ORDER BY seq DESC LIMIT 1"
        )
        seq, previous = (head["seq"], bytes(head["entry_hash"])) if head else (0, GENESIS)
        # A row is sealed once every transaction that could still commit an earlier one has ended:
        # its xid is below the snapshot's xmin.  A row this snapshot sees was committed before it,
        # so in this cluster its xid is below the snapshot's xmax (one past the latest completed
        # xid), unless the row is this transaction's own.  Any other visible row at or above xmax
        # was written under another cluster's counter (pg_dump restored into a younger cluster):
        # its transaction ended there, and waiting for this counter to reach it could leave it
        # unsealed for millions of transactions.
        # No FOR UPDATE: the advisory lock keeps other sealers out, and nothing else changes a chained
        # field (outcomes and next_allowed_at are annotations; a row edited in between is hashed as it
        # was read, and verify reports it altered). Locking the rows cost a WAL record each, and an
        # outcome being recorded waited through the hashing as well as the UPDATE.
        rows = await conn.fetch(
            f"""
            SELECT {_COLUMNS} FROM pbxguard.decisions
             WHERE seq IS NULL
               AND (xid < pg_snapshot_xmin(pg_current_snapshot())
                    OR (xid >= pg_snapshot_xmax(pg_current_snapshot())
                        AND xid IS DISTINCT FROM pg_current_xact_id_if_assigned()))
             ORDER BY recorded_at, id
             LIMIT $1
            """,
            batch,
        )
        if not rows:
            return 0
        consumers, ids, seqs, prevs, hashes = [], [], [], [], []
        for done, row in enumerate(rows, 1):
            if done % _HASHES_PER_TURN == 0:
                await asyncio.sleep(0)
            seq += 1
            digest = entry_hash(previous, row, key)
            consumers.append(row["consumer"])
            ids.append(row["id"])
            seqs.append(seq)
            prevs.append(previous)
            hashes.append(digest)
            previous = digest
        await conn.execute(
            """
            UPDATE pbxguard.decisions d SET seq = u.seq, prev_hash = u.prev, entry_hash = u.hash
              FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bytea[], $5::bytea[])
                   AS u(consumer, id, seq, prev, hash)
             WHERE d.consumer = u.consumer AND d.id = u.id
            """,
            consumers,
            ids,
            seqs,
            prevs,
            hashes,
        )
        await conn.execute(
            "INSERT INTO pbxguard.journal_checkpoints (seq, entry_hash, rows) VALUES ($1, $2, $3)",
            seq,
            previous,
            len(rows),
        )
    return len(rows)


async def unsealed(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pbxguard.decisions WHERE seq IS NULL"))


@dataclass
class Verification:
    checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)
    unsealed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify(
    conn: asyncpg.Connection,
    key: bytes | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    page: int = 10000,
) -> Verification:
    """Recomputes the chain from the rows.  With a time range, the chain is checked over the sealed
    rows recorded in it, anchored on the stored hash of the entry just before."""
    result = Verification()
    low = 0
    if since is not None:
        low = int(
            await conn.fetchval(
                "SELECT coalesce(min(seq), 0) - 1 FROM pbxguard.decisions WHERE seq IS NOT NULL AND recorded_at >= $1",
                since,
            )
        )
        low = max(low, 0)
    if low == 0:
        previous = GENESIS
    else:
        anchor = await conn.fetchval("SELECT entry_hash FROM pbxguard.decisions WHERE seq = $1", low)
        if anchor is None:
            result.problems.append(f"seq {low}: missing (the entry before the range was deleted)")
            return result
        previous = bytes(anchor)
    expected = low + 1
    checkpoints = {
        r["seq"]: bytes(r["entry_hash"])
        for r in await conn.fetch(
            "SELECT seq, entry_hash FROM pbxguard.journal_checkpoints WHERE seq > $1", low
        )
    }
    last_hash: dict[int, bytes] = {}
    cursor = low
    while True:
        rows = await conn.fetch(
            f"""
            SELECT seq, prev_hash, entry_hash, recorded_at, {_COLUMNS} FROM pbxguard.decisions
             WHERE seq IS NOT NULL AND seq > $1 ORDER BY seq, id LIMIT $2
            """,
            cursor,
            page,
        )
        if not rows:
            break
        for row in rows:
            if until is not None and row["recorded_at"] > until:
                rows = []
                break
            seq = row["seq"]
            if seq < expected:
                result.problems.append(f"seq {seq}: duplicate entry (a row was inserted or copied)")
                return result
            if seq > expected:
                result.problems.append(
                    f"seq {expected}: missing (deleted)" + (f" up to {seq - 1}" if seq - 1 > expected else "")
                )
                return result
            if bytes(row["prev_hash"] or b"") != previous:
                result.problems.append(
                    f"seq {seq}: chain broken (reordered, or the entry before it was altered)"
                )
                return result
            digest = entry_hash(previous, row, key)
            if bytes(row["entry_hash"] or b"") != digest:
                result.problems.append(f"seq {seq}: altered (decision {row['id']} does not match its hash)")
                return result
            result.first_seq = result.first_seq or seq
            result.last_seq = seq
            result.checked += 1
            last_hash[seq] = digest
            previous = digest
            expected = seq + 1
            cursor = seq
        if not rows:
            break
    for seq, digest in sorted(checkpoints.items()):
        if until is None and seq > (result.last_seq or low):
            result.problems.append(
                f"seq {seq}: missing (the journal ends at {result.last_seq}, a checkpoint says {seq})"
            )
            break
        if seq in last_hash and last_hash[seq] != digest:
            result.problems.append(f"seq {seq}: does not match its checkpoint")
            break
    result.unsealed = await unsealed(conn)
    return result


EXPORT_FIELDS = (
    "decided_at", "consumer", "order_giver", "campaign", "caller_id", "gate", "verdict", "reasons",
    "rules", "shadow", "counted", "outcome", "outcome_at", "duration_s", "next_allowed_at", "decision_id",
    "seq", "entry_hash",
)  # fmt: skip


async def export_rows(
    conn: asyncpg.Connection,
    since: datetime,
    until: datetime,
    order_giver: str | None = None,
    page: int = 5000,
) -> AsyncIterator[dict[str, Any]]:
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        cursor = conn.cursor(
            """
            SELECT * FROM pbxguard.decisions
             WHERE decided_at >= $1 AND decided_at < $2 AND ($3::text IS NULL OR order_giver = $3)
             ORDER BY decided_at, id
            """,
            since,
            until,
            order_giver,
            prefetch=page,
        )
        async for row in cursor:
            reasons = list(row["reasons"])
            yield {
                "decided_at": row["decided_at"].astimezone(UTC).isoformat(),
                "consumer": row["consumer"],
                "order_giver": row["order_giver"],
                "campaign": row["campaign"],
                "caller_id": row["caller_id"],
                "gate": row["gate"],
                "verdict": row["verdict"],
                "reasons": reasons,
                "rules": [RULE_REFERENCES[Reason(r)] for r in reasons if r in Reason.__members__],
                "shadow": row["shadow"],
                "counted": row["counted"],
                "outcome": row["outcome"],
                "outcome_at": row["outcome_at"].astimezone(UTC).isoformat() if row["outcome_at"] else None,
                "duration_s": row["duration_s"],
                "next_allowed_at": row["next_allowed_at"].astimezone(UTC).isoformat()
                if row["next_allowed_at"]
                else None,
                "decision_id": str(row["id"]),
                "seq": row["seq"],
                "entry_hash": bytes(row["entry_hash"]).hex() if row["entry_hash"] else None,
            }


def write_rows(rows: Sequence[dict[str, Any]], out: TextIO, fmt: str, header: bool) -> None:
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["reasons"] = ",".join(row["reasons"])
        flat["rules"] = " | ".join(row["rules"])
        writer.writerow(flat)
    out.write(buffer.getvalue())
