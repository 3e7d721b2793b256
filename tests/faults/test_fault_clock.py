"""Timers use the monotonic clock: a wall-clock jump does not break timeouts.

The system clock cannot be changed from a test, so the jump is made where pbxguard reads wall time:
``time.time`` is patched to leap a day ahead or an hour back in the middle of a decision, and the
gate's injectable clock (the wall time the rules use) leaps with it. The decision is held in
PostgreSQL by the consumer's own advisory lock (taken by the test, as a concurrent decision would), so
that only a timer can end it. The timers must fire at the right monotonic moment; the rules must use
the injected wall time. Then an AST scan shows that no code of pbxguard reads the wall clock for a
timer at all.
"""

from __future__ import annotations

import ast
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from faultkit import ORDER_GIVER, agi_check, consumer, legal_setup, national

import pbxguard
from pbxguard.config import AgiGateConfig, Config, GatesConfig, Mode
from pbxguard.gates.fastagi import FastAgiGate
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import CallAttempt, Reason
from pbxguard.policy.settings import PolicySettings

PARIS = ZoneInfo("Europe/Paris")
TUESDAY = datetime(2026, 12, 1, 10, 30, tzinfo=PARIS)  # a legal instant
SATURDAY = datetime(2026, 12, 5, 11, 0, tzinfo=PARIS)  # WEEKEND for a consumer without off-hours consent
OFF_HOURS = consumer(300001)  # off-hours consent: only the timers can block it
DAYTIME = consumer(300002)  # ordinary consent: the wall time decides
AGI_TIMEOUT_MS = 1000
JUMPS = {"+1 day": timedelta(days=1), "-1 hour": timedelta(hours=-1)}


class WallClock:
    """The wall time pbxguard is given (the gate's injectable clock), and ``time.time`` with it."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.offset = 0.0
        self.reads: list[datetime] = []

    def __call__(self) -> datetime:
        self.reads.append(self.now)
        return self.now

    def jump(self, delta: timedelta, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now += delta
        self.offset += delta.total_seconds()
        monkeypatch.setattr(time, "time", _shifted(self.offset))


_REAL_TIME = time.time


def _shifted(offset: float) -> Callable[[], float]:
    return lambda: _REAL_TIME() + offset


@pytest.fixture
async def setup(ledger: Ledger) -> Ledger:
    await legal_setup(ledger, [OFF_HOURS], given_at=datetime(2026, 11, 1, tzinfo=UTC))
    await ledger.add_consent(DAYTIME, ORDER_GIVER, datetime(2026, 11, 1, tzinfo=UTC))
    return ledger


@asynccontextmanager
async def held(database_url: str, number: str) -> AsyncIterator[asyncpg.Connection]:
    """The consumer's decision lock, held by another transaction: pbxguard's decision waits in SQL."""
    conn = await asyncpg.connect(database_url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))", number, ORDER_GIVER
        )
        yield conn
    finally:
        await transaction.rollback()
        await conn.close()


async def waiting_on_lock(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
            )
        )
    finally:
        await conn.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jump", JUMPS)
async def test_fastagi_deadline_survives_a_wall_clock_jump(
    setup: Ledger,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    jump: str,
    fault_report: Callable[[str], None],
) -> None:
    clock = WallClock(TUESDAY)
    # The guard's own timeout is long: the gate's answer deadline (1 s minus its reply reserve) must fire.
    guard = Guard(setup, PolicySettings(), Mode.ENFORCE, timeout=30)
    gate = FastAgiGate(
        Config(gates=GatesConfig(agi=AgiGateConfig(listen="127.0.0.1:0", timeout_ms=AGI_TIMEOUT_MS))),
        guard,
        clock=clock,
    )
    await gate.start()
    try:
        async with held(database_url, OFF_HOURS):
            started = time.monotonic()
            check = asyncio.create_task(agi_check(gate.port, national(OFF_HOURS), "clock.1"))
            deadline = time.monotonic() + 5
            while not await waiting_on_lock(database_url):
                assert time.monotonic() < deadline, "the decision never reached PostgreSQL"
            clock.jump(JUMPS[jump], monkeypatch)  # mid-decision
            answer = await check
            elapsed = time.monotonic() - started
            monkeypatch.undo()
        assert answer.store_unavailable, answer
        # answer_by = timeout - reserve, reserve = timeout / 4 for a 1 s timeout (pbxguard.gates.fastagi).
        answer_by = AGI_TIMEOUT_MS / 1000 * 3 / 4
        assert answer_by - 0.05 <= elapsed <= answer_by + 0.35, f"answered after {elapsed:.3f} s"
        # The late decision was cancelled in PostgreSQL, not committed behind the gate's back.
        conn = await asyncpg.connect(database_url)
        try:
            assert (
                await conn.fetchval("SELECT count(*) FROM pbxguard.decisions WHERE call_key = 'clock.1'") == 0
            )
        finally:
            await conn.close()

        # The rules use the injected wall time (read once per decision), whatever it did before.
        clock.now = SATURDAY
        weekend = await agi_check(gate.port, national(DAYTIME), "clock.2")
        clock.now = TUESDAY
        weekday = await agi_check(gate.port, national(DAYTIME), "clock.3")
    finally:
        await gate.stop()
    assert weekend.verdict == "BLOCK" and weekend.reasons == [Reason.WEEKEND.value], weekend
    assert weekday.verdict == "ALLOW", weekday
    for answer_, when in ((weekend, SATURDAY), (weekday, TUESDAY)):
        row = await setup.decision(uuid.UUID(answer_.decision))
        assert row is not None and row["decided_at"] == when
    fault_report(
        f"FastAGI with time.time and the wall clock jumping {jump} mid-decision: blocked STORE_UNAVAILABLE "
        f"after {elapsed:.3f} s (deadline {answer_by:.2f} s on the monotonic clock); the rules used the "
        f"injected time (Saturday -> WEEKEND, Tuesday -> ALLOW, decided_at as injected)"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jump", JUMPS)
async def test_guard_timeout_survives_a_wall_clock_jump(
    setup: Ledger,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    jump: str,
    fault_report: Callable[[str], None],
) -> None:
    clock = WallClock(TUESDAY)
    guard = Guard(setup, PolicySettings(), Mode.ENFORCE, timeout=0.5)
    async with held(database_url, OFF_HOURS):
        started = time.monotonic()
        decision = asyncio.create_task(
            guard.decide(CallAttempt(national(OFF_HOURS), "c1", "0162123456", call_key="clock.g"), clock())
        )
        deadline = time.monotonic() + 5
        while not await waiting_on_lock(database_url):
            assert time.monotonic() < deadline, "the decision never reached PostgreSQL"
        clock.jump(JUMPS[jump], monkeypatch)
        result = await decision
        elapsed = time.monotonic() - started
        monkeypatch.undo()
    assert result.reasons == (Reason.STORE_UNAVAILABLE,), result
    assert result.decided_at == TUESDAY  # the instant it was asked for, not the jumped clock
    assert 0.45 <= elapsed <= 0.5 + 0.3, f"guard timeout fired after {elapsed:.3f} s"
    fault_report(
        f"Guard timeout 0.5 s with time.time jumping {jump} mid-decision: fired after {elapsed:.3f} s"
    )


# -- no wall clock in any timer ------------------------------------------------------------------------

PACKAGE = Path(pbxguard.__file__).resolve().parent
_WALL_CALLS = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow"),
               ("datetime", "today"), ("date", "today")}  # fmt: skip


def wall_clock_reads(source: str, filename: str) -> list[str]:
    """Every read of the wall clock that is not a clock provider (a function or lambda whose whole
    body returns it, the injectable ``clock`` of gates and API): ``time.time()`` anywhere, and
    ``datetime.now()`` / ``date.today()`` used in an expression, are reported as ``file:line``."""
    tree = ast.parse(source, filename)
    imported_time = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "time"
        for alias in node.names
        if alias.name in ("time", "time_ns")
    }
    providers: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda) and isinstance(node.body, ast.Call):
            providers.add(id(node.body))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = [
                s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            ]
            if len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call):
                providers.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name: tuple[str, str] | None = None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            name = (func.value.id, func.attr)
        elif isinstance(func, ast.Name) and func.id in imported_time:
            name = ("time", "time")
        if name is None or name not in _WALL_CALLS:
            continue
        if name[0] == "time" or id(node) not in providers:
            found.append(f"{filename}:{node.lineno}: {name[0]}.{name[1]}()")
    return found


def _sources() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent))


@pytest.mark.timeout(30)
def test_the_scan_finds_wall_clock_timers() -> None:
    """The scanner itself: it flags what it must, and lets clock providers through."""
    bad = (
        "import time\nfrom time import time as now\nfrom datetime import datetime\n"
        "def f(loop):\n    deadline = time.time() + 5\n    t = now()\n"
        "    late = datetime.now() > deadline\n"
        "clock = lambda: datetime.now()\n"
        "def utc():\n    return datetime.now()\n"
    )
    assert [line.split(": ")[1] for line in wall_clock_reads(bad, "x.py")] == [
        "time.time()", "time.time()", "datetime.now()",
    ]  # fmt: skip


@pytest.mark.timeout(30)
def test_no_wall_clock_in_timers(fault_report: Callable[[str], None]) -> None:
    found: list[str] = []
    files = 0
    for source, filename in _sources():
        files += 1
        found += wall_clock_reads(source, filename)
    assert not found, (
        "wall-clock reads outside clock providers (timers must use loop.time()/time.monotonic()):\n"
        + "\n".join(found)
    )
    fault_report(
        f"AST scan: {files} modules of pbxguard, no time.time() and no wall-clock read outside clock providers"
    )
