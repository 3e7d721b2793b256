"""pbxguard itself SIGKILLed under load (FastAGI checks and HTTP reservations with call keys), then
started again on the same ports.

The promises: the ledger and the journal stay consistent (every attempt has its decision row, the
counted flags match the attempts, no call key counted twice, the cap holds), every ALLOW answered
before the crash has its rows, a dialer retrying its call keys after the crash gets the first
decision back, and the hash chain (rows the dead daemon left unsealed included) verifies.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from functools import partial

import aiohttp
import asyncpg
import pytest
from faultkit import (
    LONG,
    LONG_REASON,
    UPSTREAM_SECRET,
    UPSTREAM_USER,
    AgiAnswer,
    AgiLoad,
    DaemonProcess,
    check_ledger,
    consumer,
    http_check,
    legal_setup,
    load_phase,
    missing_allowed,
    national,
    poll,
)
from gates.fake_asterisk_ami import FakeAsterisk

from pbxguard.ledger.store import Ledger


def refused_after(instant: float, answer: AgiAnswer) -> bool:
    return answer.started > instant and answer.error is not None


class HttpReservations:
    """Dialers reserving call keys over HTTP; on no answer (daemon gone) they retry the same key."""

    def __init__(self, port: int, work: list[tuple[str, str]], clients: int = 4, pace: float = 0.0) -> None:
        self.port = port
        self.pace = pace  # seconds between two reservations of one dialer
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for item in work:
            self.queue.put_nowait(item)
        self.clients = clients
        self.answers: dict[str, dict[str, object]] = {}
        self.retries = 0
        self.replayed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        await self.finished()

    async def finished(self) -> None:
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set() and not self.queue.empty():
            number, key = self.queue.get_nowait()
            for attempt in itertools.count():
                body = await http_check(session, self.port, number, key)
                reasons = body.get("reasons")
                if attempt == 1000:  # not a crash any more: an error to report, not to retry
                    body = {"verdict": f"no answer: {body}", "decision": ""}
                elif "error" in body or (isinstance(reasons, list) and "STORE_UNAVAILABLE" in reasons):
                    self.retries += 1
                    if self._stop.is_set():
                        self.queue.put_nowait((number, key))  # not answered: left for the final pass
                        return
                    await asyncio.sleep(0.02)
                    continue
                self.answers[key] = body
                self.replayed += bool(body.get("replayed"))
                await asyncio.sleep(self.pace)
                break


async def run_daemon_kills(
    database_url: str,
    make_daemon: Callable[..., DaemonProcess],
    report: Callable[[str], None],
    *,
    kills: int,
    steady: float,
    consumers: int,
) -> None:
    numbers = [consumer(i) for i in range(consumers)]
    ledger = await Ledger.connect(database_url, min_size=1, max_size=2)
    try:
        await legal_setup(ledger, numbers)
    finally:
        await ledger.close()
    daemon = make_daemon(database_url, agi_timeout_ms=2000, db_timeout_ms=1500)
    await daemon.start()
    assert daemon.agi_port is not None
    # The same consumers through both gates: the cap is reached, FREQUENCY_CAP blocks come too.
    agi = AgiLoad(daemon.agi_port, [national(n) for n in numbers], clients=6)
    work = [(numbers[(i * 7) % consumers], f"http-{i}") for i in range(consumers * 5)]
    http = HttpReservations(daemon.http_port, work, pace=0.02)
    agi.start()
    http.start()
    restarts: list[float] = []
    try:
        for _ in range(kills):
            await load_phase(steady)
            await poll(lambda: http.answers, within=20)
            daemon.kill()
            killed_at = time.monotonic()
            await poll(lambda: agi.count(partial(refused_after, killed_at)) >= 3, within=10)  # noqa: B023
            await daemon.start()

            def served_after(k: float = killed_at) -> bool:  # decided (allowed or capped), not unavailable
                return agi.count(lambda a: a.started > k and a.verdict != "" and not a.store_unavailable) > 0

            await poll(served_after, within=10)
            restarts.append(time.monotonic() - killed_at)
        await load_phase(steady)
    finally:
        answers = await agi.stop()
        await http.stop()
    # Whatever the dialers had not reserved yet, they reserve now (same keys, same daemon).
    leftover = HttpReservations(daemon.http_port, [])
    while not http.queue.empty():
        leftover.queue.put_nowait(http.queue.get_nowait())
    leftover.start()
    await leftover.finished()
    http.answers.update(leftover.answers)
    http.replayed += leftover.replayed
    assert daemon.stop() == 0, daemon.log_tail()
    assert len(http.answers) == len(work), "every call key got its decision"

    agi_allowed = [a.decision for a in answers if a.verdict == "ALLOW"]
    http_allowed = {
        key: str(body["decision"]) for key, body in http.answers.items() if body["verdict"] == "allow"
    }
    lost_connections = sum(1 for a in answers if a.error is not None and a.elapsed is None)
    conn = await asyncpg.connect(database_url)
    try:
        missing = await missing_allowed(conn, [*agi_allowed, *http_allowed.values()])
        assert not missing, f"allowed calls without their rows: {missing[:5]}"
        # One decision per call key, and it is the one the dialer was finally given.
        rows = await conn.fetch(
            "SELECT call_key, id::text AS id, counted FROM pbxguard.decisions WHERE call_key LIKE 'http-%'"
        )
        journaled = {r["call_key"]: r["id"] for r in rows}
        assert journaled == {key: str(body["decision"]) for key, body in http.answers.items()}
        unsealed_before = await conn.fetchval("SELECT count(*) FROM pbxguard.decisions WHERE seq IS NULL")
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    disagreements = [r for r in daemon.log_records() if "disagree" in str(r.get("msg", ""))]
    assert not disagreements, disagreements[:3]
    report(
        f"pbxguard SIGKILL x{kills}: {len(answers)} FastAGI checks ({len(agi_allowed)} allowed, "
        f"{lost_connections} cut or refused while it was down) and {len(work)} HTTP reservations "
        f"({len(http_allowed)} allowed, {http.retries} retried after the crash, {http.replayed} answered "
        f"from the journal); back in {', '.join(f'{r:.2f} s' for r in restarts)} after each kill; "
        f"ledger: {result.attempts} attempts, {result.decisions} journal rows ({unsealed_before} still to "
        f"seal after the last stop), chain of {result.verified} verified, no call key twice, cap held"
    )


@pytest.mark.timeout(150)
async def test_pbxguard_sigkill_under_load(
    database_url: str, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_daemon_kills(database_url, daemons, fault_report, kills=2, steady=1.5, consumers=300)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(1200)
async def test_pbxguard_sigkill_under_load_long(
    database_url: str, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_daemon_kills(database_url, daemons, fault_report, kills=15, steady=10.0, consumers=5000)


@pytest.mark.timeout(90)
async def test_ready_means_every_gate_listens(
    database_url: str, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    """After a crash, a supervisor (or a load balancer) sends traffic as soon as /readyz says 200: by
    then the FastAGI and AMI ports must accept connections. Found by the long three-daemon run: /readyz
    answered 200 with only the ledger checked, before the gates had started."""
    fake = FakeAsterisk(username=UPSTREAM_USER, secret=UPSTREAM_SECRET)
    await fake.start()
    daemon = daemons(database_url, ami_upstream_port=fake.port)
    refused: list[str] = []
    try:
        for _ in range(3):
            daemon.spawn()
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(daemon.ready):
                assert daemon.alive, daemon.log_tail()
                assert time.monotonic() < deadline, "never ready"
            for name, port in (("agi", daemon.agi_port), ("ami", daemon.ami_port)):
                assert port is not None
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                except OSError as exc:
                    refused.append(f"{name}: {exc}")
            daemon.kill()
    finally:
        daemon.kill()
        await fake.kill()
    assert not refused, f"/readyz said 200 while a gate did not listen: {refused}"
    fault_report(
        "readiness after 3 starts (killed each time): every gate listened when /readyz first said 200"
    )
