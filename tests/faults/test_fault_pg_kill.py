"""PostgreSQL SIGKILLed under a steady stream of FastAGI checks, then started again.

The promises: every check answered while the ledger is gone blocks with STORE_UNAVAILABLE within
``gates.agi.timeout_ms``; the daemon stays up; it serves again within 5 s of PostgreSQL accepting
connections, by itself; and every check it answered ALLOW has its attempt and its journal row on disk
(the cluster is durable: fsync and synchronous commit on), with a journal that verifies.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import asyncpg
import pytest
from faultkit import (
    LONG,
    LONG_REASON,
    AgiAnswer,
    AgiLoad,
    DaemonProcess,
    check_ledger,
    consumer,
    legal_setup,
    load_phase,
    missing_allowed,
    national,
    poll,
)

from pbxguard.ledger.pgcluster import LocalCluster
from pbxguard.ledger.store import Ledger

AGI_TIMEOUT_MS = 1000
DB_TIMEOUT_MS = 600
SLACK = 0.3  # scheduling on a loaded 2-core machine, the client's own connect and reads
RECOVERY_LIMIT = 5.0


@dataclass
class Cycle:
    killed_at: float
    dead_at: float
    restart_at: float
    accepting_at: float
    recovered_at: float
    ready_at: float  # /readyz 200 again
    unready: bool  # /readyz said 503 during the outage


async def _accepting(cluster: LocalCluster) -> bool:
    try:
        conn = await asyncpg.connect(cluster.dsn(), timeout=1)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def answered_after(instant: float, answer: AgiAnswer) -> bool:
    return answer.started >= instant and answer.elapsed is not None


async def _not_ready(daemon: DaemonProcess) -> bool:
    return not await asyncio.to_thread(daemon.ready)


async def run_pg_kill(
    cluster: LocalCluster,
    make_daemon: Callable[..., DaemonProcess],
    report: Callable[[str], None],
    *,
    cycles: int,
    steady: float,
    outage: float,
    consumers: int,
) -> None:
    numbers = [consumer(i) for i in range(consumers)]
    ledger = await Ledger.connect(cluster.dsn(), min_size=1, max_size=2)
    try:
        await legal_setup(ledger, numbers)
    finally:
        await ledger.close()
    daemon = make_daemon(cluster.dsn(), agi_timeout_ms=AGI_TIMEOUT_MS, db_timeout_ms=DB_TIMEOUT_MS)
    await daemon.start()
    assert daemon.agi_port is not None
    load = AgiLoad(daemon.agi_port, [national(n) for n in numbers], clients=8)
    load.start()
    history: list[Cycle] = []
    try:
        await poll(lambda: load.count(lambda a: a.verdict == "ALLOW") >= 50, within=20)
        for _ in range(cycles):
            await load_phase(steady)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill)
            dead_at = time.monotonic()
            # The outage: checks keep coming, and all of them must be answered, blocked.
            await load_phase(outage)
            await poll(lambda: load.count(partial(answered_after, dead_at)) >= 20, within=20)  # noqa: B023
            assert daemon.alive, f"pbxguard died with its database: {daemon.log_tail()}"
            unready = await poll(lambda: _not_ready(daemon), within=5)  # the readiness watcher saw it
            restart_at = time.monotonic()
            starting = asyncio.create_task(asyncio.to_thread(cluster.start))
            await poll(lambda: _accepting(cluster), within=60, every=0.01)
            accepting_at = time.monotonic()
            await starting

            def allowed_since(a_time: float = accepting_at) -> float | None:
                ends = [
                    a.started + a.elapsed
                    for a in load.answers
                    if a.verdict == "ALLOW" and a.elapsed is not None and a.started + a.elapsed >= a_time
                ]
                return min(ends) if ends else None

            recovered_at = await poll(allowed_since, within=RECOVERY_LIMIT + 10)
            await poll(lambda: asyncio.to_thread(daemon.ready), within=RECOVERY_LIMIT + 10, every=0.05)
            ready_at = time.monotonic()
            history.append(
                Cycle(killed_at, dead_at, restart_at, accepting_at, recovered_at, ready_at, unready)
            )
        await load_phase(steady)
    finally:
        answers = await load.stop()
    assert daemon.alive, f"pbxguard died: {daemon.log_tail()}"
    assert daemon.stop() == 0

    # Every check got a verdict, and in time.
    unanswered = [a for a in answers if a.elapsed is None]
    assert not unanswered, f"{len(unanswered)} checks never got a verdict, e.g. {unanswered[:3]}"
    bound = AGI_TIMEOUT_MS / 1000 + SLACK
    late = [a for a in answers if a.elapsed is not None and a.elapsed > bound]
    assert not late, (
        f"{len(late)} answers after {bound:.2f} s, worst {max(a.elapsed or 0 for a in late):.3f} s"
    )
    in_flight = blocked = 0
    for cycle in history:
        # Asked while PostgreSQL was dead and answered before it was started again: all blocked.
        during = [
            a
            for a in answers
            if a.started >= cycle.dead_at and a.started + (a.elapsed or 0) < cycle.restart_at
        ]
        wrong = [a for a in during if not a.store_unavailable]
        assert not wrong, f"{len(wrong)} checks not blocked STORE_UNAVAILABLE during the outage: {wrong[:3]}"
        blocked += len(during)
        # In flight when the kill began: answered (ALLOW if it committed first, else blocked), in time.
        in_flight += sum(1 for a in answers if a.started < cycle.killed_at < a.started + (a.elapsed or 0))
        recovery = cycle.recovered_at - cycle.accepting_at
        assert recovery <= RECOVERY_LIMIT, (
            f"service back {recovery:.2f} s after PostgreSQL accepted connections"
        )
        ready = cycle.ready_at - cycle.accepting_at
        assert ready <= RECOVERY_LIMIT, (
            f"/readyz 200 again {ready:.2f} s after PostgreSQL accepted connections"
        )
    allowed = [a.decision for a in answers if a.verdict == "ALLOW"]
    assert all(allowed), "an ALLOW without its PBXGUARD_DECISION"

    conn = await asyncpg.connect(cluster.dsn())
    try:
        missing = await missing_allowed(conn, allowed)
        assert not missing, f"{len(missing)} allowed calls lost by the crash: {missing[:5]}"
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    unavailable = sum(1 for a in answers if a.store_unavailable)
    worst_block = max((a.elapsed or 0 for a in answers if a.store_unavailable), default=0.0)
    recoveries = ", ".join(f"{c.recovered_at - c.accepting_at:.2f} s" for c in history)
    readiness = ", ".join(f"{c.ready_at - c.accepting_at:.2f} s" for c in history)
    report(
        f"PG kill x{len(history)}: {len(answers)} checks, {len(allowed)} allowed, {unavailable} blocked "
        f"STORE_UNAVAILABLE ({blocked} asked during outages, {in_flight} in flight at a kill), slowest block "
        f"{worst_block * 1000:.0f} ms (bound {AGI_TIMEOUT_MS} ms), first ALLOW again {recoveries} after PostgreSQL "
        f"accepted connections (/readyz 503 during the outage, 200 again after {readiness}); ledger: {result.attempts} attempts ({result.attempts - len(allowed)} committed "
        f"while their answer was lost to the kill: counted, never dialled), {result.decisions} journal rows, "
        f"{result.verified} verified in the chain, every ALLOW found by decision id"
    )


@pytest.mark.timeout(150)
async def test_postgresql_sigkill_under_load(
    durable_cluster: LocalCluster, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_pg_kill(
        durable_cluster, daemons, fault_report, cycles=1, steady=1.5, outage=1.5, consumers=20000
    )


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(1200)
async def test_postgresql_sigkill_under_load_long(
    durable_cluster: LocalCluster, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_pg_kill(
        durable_cluster, daemons, fault_report, cycles=8, steady=15.0, outage=5.0, consumers=400000
    )


@pytest.mark.timeout(120)
async def test_ledger_ping_survives_postgresql_kills(
    durable_cluster: LocalCluster, fault_report: Callable[[str], None]
) -> None:
    """The readiness watcher's probe, hammered through SIGKILLs and restarts: it answers True or False,
    never raises (an exception would end the watcher and freeze /readyz), and True again once
    PostgreSQL is back. Found by the long PG kill run: asyncpg raised InternalClientError ("cannot
    switch to state 12; another operation (2) is in progress") on a connection caught mid-error."""
    ledger = await Ledger.connect(durable_cluster.dsn(), min_size=2, max_size=10)
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def prober() -> None:
        while not stop.is_set():
            try:
                outcomes[str(await ledger.ping())] += 1
            except Exception as exc:  # what must never happen
                outcomes[f"raised {type(exc).__name__}: {exc}"] += 1
            await asyncio.sleep(0.002)

    probers = [asyncio.create_task(prober()) for _ in range(6)]
    back: list[float] = []
    try:
        for _ in range(5):
            await load_phase(0.5)
            await asyncio.to_thread(durable_cluster.kill)
            await load_phase(0.3)
            await asyncio.to_thread(durable_cluster.start)
            started = time.monotonic()
            await poll(ledger.ping, within=RECOVERY_LIMIT)
            back.append(time.monotonic() - started)
    finally:
        stop.set()
        await asyncio.gather(*probers)
        await ledger.close()
    raised = {k: v for k, v in outcomes.items() if k.startswith("raised")}
    assert not raised, raised
    fault_report(
        f"ledger ping through {len(back)} PostgreSQL SIGKILLs: {outcomes['True']} True, {outcomes['False']} False, "
        f"none raised; True again {', '.join(f'{b:.2f} s' for b in back)} after each restart"
    )
