"""ledger_ratio: reserve-attempt round trips per second ÷ `SELECT 1` round trips per second, on the
same pool, one at a time and 32 at once.  A reservation is the whole ledger side of a decision: the
campaign and facts read, the rules, the attempt and the journal row written, committed durably.

One at a time, the same pool also times the cheapest durable write there is, a prepared one-row
INSERT into a one-column table with no key, committed with fsync: the floor that no reservation (which reads and writes more)
can beat, whatever its SQL.  Its time is kept for the gate sections' ceilings."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Awaitable, Callable

from bench.common import CALLER_ID, LEGAL_NOW, Figure, consumer, grant_consents, rate
from pbxguard.guard import Guard
from pbxguard.ledger import journal
from pbxguard.ledger.store import DecideRequest, Ledger
from pbxguard.policy.model import CallAttempt


async def template_request(ledger: Ledger) -> DecideRequest:
    """The request the guard sends for a legal call, captured once and varied per reservation."""
    captured: list[DecideRequest] = []
    original = ledger.decide

    async def capture(request: DecideRequest, patience: float | None = None):  # type: ignore[no-untyped-def]
        captured.append(request)
        return await original(request, patience)

    ledger.decide = capture  # type: ignore[method-assign]
    try:
        decision = await Guard(ledger).decide(
            CallAttempt(consumer(999_999), "bench", CALLER_ID, gate="bench", call_key="template"), LEGAL_NOW
        )
    finally:
        ledger.decide = original  # type: ignore[method-assign]
    assert decision.allowed, decision.reasons
    return captured[0]


FLOOR_TABLE = "bench_durable_floor"


async def run(url: str, per_worker_1: int) -> tuple[list[Figure], float | None, float | None]:
    """The ledger_ratio figure, and the seconds of one durable commit and of one reservation, one at
    a time."""
    ledger = await Ledger.connect(url, min_size=32, max_size=32)
    figures = []
    floor_s: float | None = None
    reservation_s: float | None = None
    floor_note = ""
    try:
        # Consumers who consented, so that every reservation takes the allowed path and writes both
        # the attempt and the journal row.
        await grant_consents(
            ledger, [consumer(999_999)] + [f"+3365{n:07d}" for n in range(2_000_000, 2_020_000)]
        )
        template = await template_request(ledger)
        serial = iter(range(2_000_000, 2_020_000))

        async def select_one(_: int) -> None:
            async with ledger.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")

        async def durable_insert(_: int) -> None:
            async with ledger.pool.acquire() as conn:
                # With an argument, a prepared statement, as for SELECT 1 and the reservation.
                await conn.execute(f"INSERT INTO {FLOOR_TABLE} (v) VALUES ($1)", 1)

        async with ledger.pool.acquire() as conn:
            # No key and no sequence: nothing but the row and its commit.
            await conn.execute(f"CREATE TABLE {FLOOR_TABLE} (v integer)")

        async def reserve(_: int) -> None:
            n = next(serial)
            row = await ledger.decide(
                dataclasses.replace(
                    template, decision_id=uuid.uuid4(), call_key=f"l{n}", consumer=f"+3365{n:07d}"
                )
            )
            assert row["status"] == "decided"

        def repeated(
            operation: Callable[[int], Awaitable[None]], times: int
        ) -> Callable[[int], Awaitable[None]]:
            async def worker(_: int) -> None:
                for i in range(times):
                    await operation(i)

            return worker

        ratios = {}
        for concurrency in (1, 32):
            per_worker = per_worker_1 if concurrency == 1 else max(20, per_worker_1 // 16)
            warm = max(5, per_worker // 10)
            await rate(repeated(select_one, warm), concurrency, warm)  # warm the pool
            await rate(repeated(reserve, warm), concurrency, warm)
            baseline = await rate(repeated(select_one, per_worker), concurrency, per_worker)
            if concurrency == 1:
                # Right after the baseline, before the reservations have filled the tables (and
                # brought on autovacuum or a checkpoint).
                await rate(repeated(durable_insert, warm), 1, warm)
                floor = await rate(repeated(durable_insert, per_worker), 1, per_worker)
                floor_s = 1 / floor
                floor_note = f"; durable floor at c=1: {floor / baseline:.2f}"
                print(
                    f"    concurrency 1: SELECT 1 {baseline:,.0f}/s, durable floor (one-row INSERT, "
                    f"committed) {floor:,.0f}/s, ratio {floor / baseline:.2f}: a reservation, which "
                    "writes more, stays below it",
                    flush=True,
                )
            measured = await rate(repeated(reserve, per_worker), concurrency, per_worker)
            if concurrency == 1:
                reservation_s = 1 / measured
            ratios[concurrency] = (measured / baseline, measured, baseline)
            print(
                f"    concurrency {concurrency}: SELECT 1 {baseline:,.0f}/s, reserve {measured:,.0f}/s, "
                f"ratio {measured / baseline:.2f}",
                flush=True,
            )
        worst = min(r[0] for r in ratios.values())
        figures.append(Figure(
            "ledger_ratio", worst, "", baseline="SELECT 1 on the same pool",
            target=">= 0.5", met=worst >= 0.5,
            note="(" + ", ".join(f"c={c}: {r[0]:.2f}" for c, r in ratios.items()) + floor_note
            + "; the lower is reported)",
        ))  # fmt: skip
        # A daemon running all along would have sealed these: the gate figures must not pay for
        # chaining this section's journal rows.
        async with ledger.pool.acquire() as conn:
            while await journal.seal(conn) > 0:
                pass
            await conn.execute("VACUUM ANALYZE pbxguard.decisions, pbxguard.attempts")
    finally:
        with contextlib.suppress(Exception):
            async with ledger.pool.acquire() as conn:
                await conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
        await ledger.close()
    return figures, floor_s, reservation_s
