"""The decision journal: sealing into a hash chain, verification, export for an inspection.

The chain is `pbxguard.journal_chain`: one link per sealed decision, numbered by `seq` without gaps,
naming its decision by (consumer, id).  Each link's `entry_hash` is SHA-256 (or HMAC-SHA-256 with
`[journal] key`) over the previous link's hash and a canonical JSON rendering of the decision's own
fields.  Verification recomputes the chain here, in Python, from the rows alone: an edited, deleted,
inserted or reordered row breaks it at that row.  `next_allowed_at` and the call outcome are
annotations written after the decision and are not part of the chain.
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
_CHAINED_COLUMNS = ", ".join("d." + name for name in CHAINED_FIELDS)
# The chain in order, each link with the decision it names (none when that row is gone).
_VERIFY_PAGE_SQL = f"""
SELECT c.seq, c.prev_hash, c.entry_hash, c.id AS chained_id, d.recorded_at, {_CHAINED_COLUMNS}
  FROM pbxguard.journal_chain c
  LEFT JOIN pbxguard.decisions d ON d.consumer = c.consumer AND d.id = c.id
 WHERE c.seq > $1
 ORDER BY c.seq
 LIMIT $2
"""


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


# Where the sealer starts: the last seal's horizon (every decision of a transaction below it is in the
# chain), unless that was recorded in another cluster (a journal restored by pg_dump), whose
# transaction ids mean nothing here: then from the start.  It travels as a parameter, not as a
# subquery, so that the planner knows how few rows lie above it: with an unknown bound it plans for a
# third of the journal and hashes the whole chain for the anti-join.
_FOREIGN = "(sealed_below IS NULL OR sealed_below > pg_snapshot_xmax(pg_current_snapshot()))"
_SINCE = f"CASE WHEN {_FOREIGN} THEN '0' ELSE sealed_below END"
# The last link and the newest checkpoint (the same seq, unless one was deleted), the bounds, and
# this seal's horizon: every transaction below the snapshot's xmin has ended, so every decision they
# committed is visible from here on and none can still commit behind the head.
_HEAD_SQL = f"""
SELECT l.seq AS link_seq, l.entry_hash AS link_hash, k.seq AS checkpoint_seq, k.entry_hash AS checkpoint_hash,
       coalesce(k.since, '0') AS since, coalesce(k.foreign_horizon, true) AS foreign_horizon,
       coalesce(k.restored_below, '0') AS restored_below, pg_snapshot_xmin(pg_current_snapshot()) AS horizon
  FROM (SELECT 1) AS one
  LEFT JOIN (SELECT seq, entry_hash FROM pbxguard.journal_chain ORDER BY seq DESC LIMIT 1) AS l ON true
  LEFT JOIN (SELECT seq, entry_hash, {_SINCE} AS since, {_FOREIGN} AS foreign_horizon,
                    CASE WHEN {_FOREIGN} THEN NULL ELSE restored_below END AS restored_below
               FROM pbxguard.journal_checkpoints ORDER BY seq DESC LIMIT 1) AS k ON true
"""
# A seal's plans are made for its own bounds: its prepared statements must not fall back to generic
# plans, which know neither.  And the pending decisions come in the index's order, never sorted: with
# statistics that have not seen a backlog yet, the planner would read every pending row and sort them
# for each batch of a thousand, a backlog's seal growing with its square.
_LOCK_SQL = """
SELECT pg_try_advisory_xact_lock($1),
       set_config('plan_cache_mode', 'force_custom_plan', true), set_config('enable_sort', 'off', true)
"""
# Decisions waiting for the sealer between the bound and the horizon, in the chain's order (the
# index's).
_PENDING_SQL = f"""
SELECT d.xid, {_CHAINED_COLUMNS}
  FROM pbxguard.decisions d
 WHERE d.xid >= $1 AND d.xid < $2
   AND NOT EXISTS (SELECT 1 FROM pbxguard.journal_chain c WHERE c.consumer = d.consumer AND c.id = d.id)
 ORDER BY d.xid
 LIMIT $3
"""
# A visible row at or above the snapshot's xmax that is not this transaction's own was written under
# another cluster's counter (pg_dump restored into a younger cluster): its transaction ended there,
# and waiting for this counter to reach it could leave it unsealed for millions of transactions.
# Below the restored bound, such rows are all linked already: not read again at every seal.
_RESTORED_SQL = f"""
SELECT d.xid, {_CHAINED_COLUMNS}
  FROM pbxguard.decisions d
 WHERE d.xid >= greatest(pg_snapshot_xmax(pg_current_snapshot()), $1)
   AND d.xid IS DISTINCT FROM pg_current_xact_id_if_assigned()
   AND NOT EXISTS (SELECT 1 FROM pbxguard.journal_chain c WHERE c.consumer = d.consumer AND c.id = d.id)
 ORDER BY d.xid
 LIMIT $2
"""
_NEWEST_RESTORED_SQL = """
SELECT max(xid) FROM pbxguard.decisions WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
"""
_LINK_SQL = """
INSERT INTO pbxguard.journal_chain (seq, consumer, id, prev_hash, entry_hash)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::uuid[], $4::bytea[], $5::bytea[])
"""
# With no link added, only the bounds change (a read from the start, or past restored rows): they
# are recorded against the head, or every seal would read the same rows again.
_CHECKPOINT_SQL = """
INSERT INTO pbxguard.journal_checkpoints (seq, entry_hash, rows, sealed_below, restored_below)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (seq) DO UPDATE SET sealed_below = excluded.sealed_below, restored_below = excluded.restored_below
"""
_SINCE_SQL = f"""
SELECT coalesce((SELECT {_SINCE} FROM pbxguard.journal_checkpoints ORDER BY seq DESC LIMIT 1), '0')
"""
_UNSEALED_SQL = """
SELECT count(*) FROM pbxguard.decisions d
 WHERE d.xid >= $1
   AND NOT EXISTS (SELECT 1 FROM pbxguard.journal_chain c WHERE c.consumer = d.consumer AND c.id = d.id)
"""
# Both counts from one snapshot: decisions outside the chain, and those of them the sealer will see.
_OUTSIDE_SQL = f"""
SELECT count(*) AS outside, count(*) FILTER (WHERE d.xid >= ({_SINCE_SQL})) AS unsealed
  FROM pbxguard.decisions d
 WHERE NOT EXISTS (SELECT 1 FROM pbxguard.journal_chain c WHERE c.consumer = d.consumer AND c.id = d.id)
"""


async def seal(conn: asyncpg.Connection, key: bytes | None = None, batch: int = SEAL_BATCH) -> int:
    """Seals committed, unsealed decisions into the chain; returns how many it sealed."""
    async with conn.transaction():
        if not (await conn.fetchrow(_LOCK_SQL, _SEAL_LOCK))[0]:
            return 0
        head = await conn.fetchrow(_HEAD_SQL)
        seq, previous = 0, GENESIS
        if head["link_seq"] is not None:
            seq, previous = head["link_seq"], bytes(head["link_hash"])
        if head["checkpoint_seq"] is not None and head["checkpoint_seq"] > seq:
            # The chain's tail was cut: carry on after it, leaving the gap for verify to report.
            seq, previous = head["checkpoint_seq"], bytes(head["checkpoint_hash"])
        rows = await conn.fetch(_PENDING_SQL, head["since"], head["horizon"], batch)
        restored_below = head["restored_below"]
        if len(rows) == batch:
            # Some may be left of the last row's transaction, or between it and the horizon.
            sealed_below = rows[-1]["xid"]
        else:
            sealed_below = head["horizon"]
            restored = await conn.fetch(_RESTORED_SQL, restored_below, batch - len(rows))
            if len(restored) == batch - len(rows):
                restored_below = restored[-1]["xid"]
            elif (newest := await conn.fetchval(_NEWEST_RESTORED_SQL)) is not None:
                restored_below = newest + 1
            rows += restored
        if not rows:
            if seq and (head["foreign_horizon"] or restored_below != head["restored_below"]):
                await conn.execute(_CHECKPOINT_SQL, seq, previous, 0, sealed_below, restored_below)
            return 0
        seqs, consumers, ids, prevs, hashes = [], [], [], [], []
        for done, row in enumerate(rows, 1):
            if done % _HASHES_PER_TURN == 0:
                await asyncio.sleep(0)
            seq += 1
            digest = entry_hash(previous, row, key)
            seqs.append(seq)
            consumers.append(row["consumer"])
            ids.append(row["id"])
            prevs.append(previous)
            hashes.append(digest)
            previous = digest
        await conn.execute(_LINK_SQL, seqs, consumers, ids, prevs, hashes)
        await conn.execute(_CHECKPOINT_SQL, seq, previous, len(rows), sealed_below, restored_below)
    return len(rows)


async def unsealed(conn: asyncpg.Connection) -> int:
    """Decisions waiting for the sealer (cheap: only those above the last seal's horizon are read)."""
    return int(await conn.fetchval(_UNSEALED_SQL, await conn.fetchval(_SINCE_SQL)))


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
                """
                SELECT coalesce(min(c.seq), 0) - 1
                  FROM pbxguard.journal_chain c
                  JOIN pbxguard.decisions d ON d.consumer = c.consumer AND d.id = c.id
                 WHERE d.recorded_at >= $1
                """,
                since,
            )
        )
        low = max(low, 0)
    if low == 0:
        previous = GENESIS
    else:
        anchor = await conn.fetchval("SELECT entry_hash FROM pbxguard.journal_chain WHERE seq = $1", low)
        if anchor is None:
            result.problems.append(f"seq {low}: missing (the entry before the range was deleted)")
            return result
        previous = bytes(anchor)
    expected = low + 1
    upper = None
    if until is not None:
        # Links follow transaction ids, which need not follow the clock: the last one in the range,
        # not the first one past it, ends the walk.
        upper = await conn.fetchval(
            """
            SELECT coalesce(max(c.seq), 0)
              FROM pbxguard.journal_chain c
              JOIN pbxguard.decisions d ON d.consumer = c.consumer AND d.id = c.id
             WHERE d.recorded_at <= $1
            """,
            until,
        )
    checkpoints = {
        r["seq"]: bytes(r["entry_hash"])
        for r in await conn.fetch(
            "SELECT seq, entry_hash FROM pbxguard.journal_checkpoints WHERE seq > $1", low
        )
    }
    last_hash: dict[int, bytes] = {}
    cursor = low
    while True:
        rows = await conn.fetch(_VERIFY_PAGE_SQL, cursor, page)
        if not rows:
            break
        for row in rows:
            seq = row["seq"]
            if upper is not None and seq > upper:
                rows = []
                break
            if row["id"] is None:
                result.problems.append(
                    f"seq {seq}: decision {row['chained_id']} missing (deleted, or its number or id edited)"
                )
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
    if since is None and until is None and not result.problems:
        links, newest_checkpoint = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM pbxguard.journal_chain), (SELECT max(seq) FROM pbxguard.journal_checkpoints)"
        )
        if links != result.checked:
            result.problems.append(
                f"{links - result.checked} link(s) outside the chain's numbering (seq below 1)"
            )
        elif result.last_seq is not None and (newest_checkpoint or 0) < result.last_seq:
            # Each seal writes its links and its checkpoint together.
            result.problems.append(
                f"seq {(newest_checkpoint or 0) + 1}: after the last checkpoint (links added outside the"
                " sealer, or a checkpoint deleted)"
            )
    counts = await conn.fetchrow(_OUTSIDE_SQL)
    result.unsealed = counts["unsealed"]
    if behind := counts["outside"] - counts["unsealed"]:
        # The sealer has passed them and never will link them: written behind its back, with an old
        # transaction id.
        result.problems.append(
            f"{behind} decision(s) below the sealed horizon are not in the chain (inserted)"
        )
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
            SELECT * FROM pbxguard.decisions d LEFT JOIN pbxguard.journal_chain c USING (consumer, id)
             WHERE d.decided_at >= $1 AND d.decided_at < $2 AND ($3::text IS NULL OR d.order_giver = $3)
             ORDER BY d.decided_at, id
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
