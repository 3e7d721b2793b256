"""growth_ratio: decision p50 with a large ledger ÷ with a small one.

Both ledgers hold the same shape of history: every consumer has a few attempts and their journal
rows spread over the last 90 days.  The decisions measured are reservations for consumers that
have history, so every index on the path is exercised at its full size.
"""

from __future__ import annotations

import time

import asyncpg

from bench.common import (
    CALLER_ID,
    LEGAL_NOW,
    Figure,
    legal_campaign,
    median,
    throwaway_cluster,
)
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt

PER_CONSUMER = 3
FILL_CHUNK = 100_000


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    """`rows` attempts and as many journal rows, PER_CONSUMER per consumer, in bulk."""
    consumers = rows // PER_CONSUMER
    # In chunks, as a ledger fills: one transaction of millions of rows would also outlast the
    # pool's 30-second statement limit.
    for start in range(0, rows, FILL_CHUNK):
        await conn.execute(
            """
            WITH d AS (
                INSERT INTO pbxguard.decisions (consumer, id, call_key, decided_at, gate, campaign,
                                                order_giver, caller_id, verdict, reasons, counted)
                SELECT '+3365' || lpad((g / $2)::text, 7, '0'), gen_random_uuid(), 'fill-' || g,
                       $3::timestamptz - (g % 90) * interval '1 day', 'ami', 'bench', 'BENCH',
                       '+33162123456', 'allow', '{}', true
                  FROM generate_series($4::bigint, $1 - 1) AS g
                RETURNING consumer, order_giver, campaign, id, decided_at
            )
            INSERT INTO pbxguard.attempts (consumer, order_giver, campaign, decision_id, attempted_at)
            SELECT consumer, order_giver, campaign, id, decided_at FROM d
            """,
            min(rows, start + FILL_CHUNK),
            PER_CONSUMER,
            LEGAL_NOW,
            start,
        )
    for start in range(0, consumers, FILL_CHUNK):
        await conn.execute(
            """
            INSERT INTO pbxguard.consents (consumer, order_giver, given_at)
            SELECT '+3365' || lpad(g::text, 7, '0'), 'BENCH', '2026-01-01'
              FROM generate_series($2::bigint, $1 - 1) AS g
            """,
            min(consumers, start + FILL_CHUNK),
            start,
        )
    await conn.execute("ANALYZE")


async def timings(guard: Guard, rows: int, i: int, samples: int) -> float:
    consumers = rows // PER_CONSUMER
    step = max(1, consumers // samples)
    number = f"+3365{(i * step) % consumers:07d}"
    attempt = CallAttempt(number, "bench", CALLER_ID, gate="bench", call_key=f"g{rows}-{i}")
    started = time.perf_counter()
    decision = await guard.decide(attempt, LEGAL_NOW)
    elapsed = time.perf_counter() - started
    assert not decision.reasons or decision.reasons[0].value == "FREQUENCY_CAP", decision.reasons
    return elapsed


async def run(large: int, samples: int = 2000) -> Figure:
    """Both ledgers live at once and are sampled alternately, so that whatever else the machine
    does weighs on both alike."""
    small = 10_000
    async with throwaway_cluster() as small_cluster, throwaway_cluster() as large_cluster:
        guards = []
        for cluster, rows in ((small_cluster, small), (large_cluster, large)):
            ledger = await Ledger.connect(cluster.dsn(), min_size=1, max_size=2)
            await legal_campaign(ledger)
            async with ledger.pool.acquire() as conn:
                started = time.perf_counter()
                await fill(conn, rows)
                print(
                    f"    filled {rows:,} attempts + journal rows in {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
            guards.append((Guard(ledger), rows))
        measured: dict[int, list[float]] = {small: [], large: []}
        try:
            for i in range(samples):
                for guard, rows in guards:
                    measured[rows].append(await timings(guard, rows, i, samples))
        finally:
            for guard, _ in guards:
                assert guard.ledger is not None
                await guard.ledger.close()
    small_p50 = median(measured[small][samples // 10 :])
    large_p50 = median(measured[large][samples // 10 :])
    ratio = large_p50 / small_p50
    return Figure(
        "growth_ratio", ratio, "", baseline=f"p50 {small_p50 * 1000:.2f} ms with {small:,} rows",
        target="<= 1.5", met=ratio <= 1.5,
        note=f"(p50 {large_p50 * 1000:.2f} ms with {large:,} rows)",
    )  # fmt: skip
