"""The PostgreSQL connection cut, stalled and refused by a TCP proxy in the middle of transactions.

Reservations carry call keys and the client retries a STORE_UNAVAILABLE answer with the same key, as
a dialer does. The promises: no attempt counted twice (one call key, one attempt, whatever committed
before the cut), none lost (every ALLOW answered has its attempt, every attempt was answered ALLOW
to its call key), and the cap holds: with 6 keys per consumer, exactly 4 attempts each.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest
from faultkit import (
    LONG,
    LONG_REASON,
    NPV,
    PgProxy,
    agi_check,
    check_ledger,
    consumer,
    legal_setup,
    national,
    poll,
)

from pbxguard.config import AgiGateConfig, Config, GatesConfig, Mode
from pbxguard.gates.fastagi import FastAgiGate
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Decision, Reason
from pbxguard.policy.settings import PolicySettings

GUARD_TIMEOUT = 1.0
AGI_TIMEOUT_MS = 2000
SLACK = 0.5


def through(proxy: PgProxy, database_url: str) -> str:
    database = urlparse(database_url).path.lstrip("/")
    return f"postgresql://pbxguard@{proxy.dsn_host}/{database}"


def unix_socket(database_url: str) -> str:
    query = parse_qs(urlparse(database_url).query)
    return f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}"


def unavailable(decision: Decision) -> bool:
    return Reason.STORE_UNAVAILABLE in decision.reasons


class Client:
    """A dialer: reserves each call key until it gets a real answer (retrying with the same key)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.tries = 0
        self.unavailable = 0
        self.slowest_unavailable = 0.0
        self.answers: dict[tuple[str, str], Decision] = {}

    async def reserve(self, number: str, key: str, within: float = 60.0) -> Decision:
        deadline = time.monotonic() + within
        while True:
            self.tries += 1
            started = time.monotonic()
            decision = await self.guard.decide(
                CallAttempt(number, "c1", NPV, gate="http", call_key=key), datetime.now(UTC)
            )
            if not unavailable(decision):
                self.answers[(number, key)] = decision
                return decision
            self.unavailable += 1
            self.slowest_unavailable = max(self.slowest_unavailable, time.monotonic() - started)
            if time.monotonic() > deadline:
                raise AssertionError(f"{key}: still STORE_UNAVAILABLE after {within} s of retries")
            await asyncio.sleep(0.01 + random.random() * 0.04)


async def run_proxy_faults(
    database_url: str,
    report: Callable[[str], None],
    *,
    consumers: int,
    keys: int,
    concurrency: int,
    rounds: int,
    min_faults: int,
    rng: random.Random,
) -> None:
    numbers = [consumer(i) for i in range(consumers * rounds + 1)]
    proxy = PgProxy(unix_socket(database_url))
    await proxy.start()
    direct = await asyncpg.connect(database_url)
    ledger = await Ledger.connect(through(proxy, database_url), min_size=2, max_size=10)
    try:
        await legal_setup(ledger, numbers)
        guard = Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=GUARD_TIMEOUT)
        client = Client(guard)

        # Every pooled connection opened and the decision statement prepared on it: asyncpg prepares
        # (and waits for the answer) before it executes, and the first fault needs the execute to go.
        await asyncio.gather(
            *(
                guard.decide(
                    CallAttempt(numbers[0], "c1", NPV, gate="http"), datetime.now(UTC), reserve=False
                )
                for _ in range(10)
            )
        )

        # 1. The answer lost after the commit: the retry finds the first decision, counted once.
        lost = numbers[-1]
        proxy.stall(to_server=False, to_client=True)
        first = asyncio.create_task(
            guard.decide(CallAttempt(lost, "c1", NPV, gate="http", call_key="lost-1"), datetime.now(UTC))
        )
        committed = await poll(
            lambda: direct.fetchval("SELECT id FROM pbxguard.decisions WHERE call_key = 'lost-1'"), within=10
        )
        proxy.cut()
        proxy.heal()
        assert unavailable(await first), "the client was answered although its reply was cut"
        retry = await client.reserve(lost, "lost-1")
        assert retry.replayed and retry.allowed and uuid.UUID(retry.id) == committed
        assert await direct.fetchval("SELECT count(*) FROM pbxguard.attempts WHERE consumer = $1", lost) == 1

        # 2. A partition longer than the guard's timeout, then healed: blocked in time, by the guard and
        # at the FastAGI gate in front of it (Asterisk waits for the answer), then served again.
        gate = FastAgiGate(
            Config(gates=GatesConfig(agi=AgiGateConfig(listen="127.0.0.1:0", timeout_ms=AGI_TIMEOUT_MS))),
            guard,
        )
        await gate.start()
        try:
            proxy.stall()
            started = time.monotonic()
            during, answer = await asyncio.gather(
                asyncio.gather(
                    *(
                        guard.decide(
                            CallAttempt(numbers[0], "c1", NPV, gate="http"), datetime.now(UTC), reserve=False
                        )
                        for _ in range(5)
                    )
                ),
                agi_check(gate.port, national(numbers[1])),
            )
            blocked_in = time.monotonic() - started
        finally:
            await gate.stop()
        assert all(unavailable(d) for d in during)
        assert blocked_in <= GUARD_TIMEOUT + SLACK, f"blocked after {blocked_in:.2f} s"
        assert answer.store_unavailable and answer.elapsed is not None, answer
        assert answer.elapsed <= AGI_TIMEOUT_MS / 1000 + SLACK, (
            f"FastAGI answered after {answer.elapsed:.2f} s"
        )
        proxy.heal()
        healed = time.monotonic()
        await poll(lambda: _serves(guard, numbers[0]), within=10, every=0.05)
        heal_recovery = time.monotonic() - healed

        # 3. Storm: every consumer's keys at once, while the proxy cuts, stalls and refuses; rounds of
        # fresh consumers until enough faults were injected.
        limiter = asyncio.Semaphore(concurrency)

        async def one(number: str, key: str) -> None:
            async with limiter:
                await client.reserve(number, key)

        actions: Counter[str] = Counter()
        done = asyncio.Event()

        async def chaos() -> None:
            while not done.is_set():
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                roll = rng.random()
                if roll < 0.4:
                    actions["cut"] += 1
                    proxy.cut()
                elif roll < 0.7:  # answers lost after the commit
                    actions["cut after commit"] += 1
                    proxy.stall(to_server=False, to_client=True)
                    await asyncio.sleep(rng.uniform(0.01, 0.05))
                    proxy.cut()
                    proxy.heal()
                elif roll < 0.85:
                    actions["refuse"] += 1
                    proxy.refusing = True
                    proxy.cut()
                    await asyncio.sleep(rng.uniform(0.05, 0.2))
                    proxy.refusing = False
                else:
                    actions["stall"] += 1
                    proxy.stall()
                    await asyncio.sleep(rng.uniform(0.05, GUARD_TIMEOUT * 1.5))
                    proxy.heal()

        work: list[tuple[str, str]] = []
        chaos_task = asyncio.create_task(chaos())
        try:
            for round_ in range(rounds):
                if round_ and sum(actions.values()) >= min_faults:
                    break
                batch = [
                    (numbers[round_ * consumers + i], f"k{round_}.{i}-{j}")
                    for i in range(consumers)
                    for j in range(keys)
                ]
                rng.shuffle(batch)
                work += batch
                await asyncio.gather(*(one(n, k) for n, k in batch))
        finally:
            done.set()
            await chaos_task
            proxy.heal()
            proxy.refusing = False
    finally:
        await ledger.close()
        await proxy.stop()

    try:
        # Per consumer, from the database: exactly the cap, and exactly the keys answered ALLOW.
        rows = await direct.fetch(
            """SELECT a.consumer, d.call_key, a.decision_id::text AS id FROM pbxguard.attempts a
                 JOIN pbxguard.decisions d ON d.consumer = a.consumer AND d.id = a.decision_id"""
        )
        by_consumer: dict[str, set[tuple[str, str]]] = {}
        for row in rows:
            by_consumer.setdefault(row["consumer"], set()).add((row["call_key"], row["id"]))
        answered: dict[str, set[tuple[str, str]]] = {}
        for (number, key), decision in client.answers.items():
            if decision.allowed:
                answered.setdefault(number, set()).add((key, decision.id))
        expected = min(keys, 4)
        asked = sorted({n for n, _ in work})
        wrong = {n: len(by_consumer.get(n, ())) for n in asked if len(by_consumer.get(n, ())) != expected}
        assert not wrong, f"consumers whose attempt count is not {expected}: {wrong}"
        for number in asked:
            assert by_consumer.get(number, set()) == answered.get(number, set()), number
        replayed = sum(1 for d in client.answers.values() if d.replayed)
        result = await check_ledger(direct)
        assert not result.problems, result.problems
    finally:
        await direct.close()
    report(
        f"PG proxy: {len(work)} reservations ({len(asked)} consumers x {keys} keys) in {client.tries} tries, "
        f"{client.unavailable} STORE_UNAVAILABLE (slowest {client.slowest_unavailable * 1000:.0f} ms), "
        f"{replayed} answered from the journal after a lost reply; {proxy.cut_connections} connections cut, "
        f"{proxy.refused} refused, faults {dict(actions)}; a {GUARD_TIMEOUT:.0f} s+ partition blocked in "
        f"{blocked_in:.2f} s (FastAGI answered BLOCK in {(answer.elapsed or 0):.2f} s) and served again {heal_recovery:.2f} s after healing; "
        f"{result.attempts} attempts = {len(asked)} x {expected} + 1, none twice, none lost, chain verified"
    )


async def _serves(guard: Guard, number: str) -> bool:
    decision = await guard.decide(
        CallAttempt(number, "c1", NPV, gate="http"), datetime.now(UTC), reserve=False
    )
    return not unavailable(decision)


@pytest.mark.timeout(120)
async def test_connection_cut_mid_transaction(database_url: str, fault_report: Callable[[str], None]) -> None:
    await run_proxy_faults(
        database_url,
        fault_report,
        consumers=40,
        keys=6,
        concurrency=24,
        rounds=20,
        min_faults=15,
        rng=random.Random(7),
    )


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(1200)
async def test_connection_cut_mid_transaction_long(
    database_url: str, fault_report: Callable[[str], None]
) -> None:
    await run_proxy_faults(
        database_url,
        fault_report,
        consumers=200,
        keys=7,
        concurrency=48,
        rounds=200,
        min_faults=1000,
        rng=random.Random(),
    )
