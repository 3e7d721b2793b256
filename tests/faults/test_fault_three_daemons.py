"""Three daemons on one PostgreSQL, hundreds of requests at once over a few consumers, through every
gate: FastAGI, the AMI gate (in front of a fake Asterisk) and HTTP ``POST /v1/check`` with
``reserve=true``. The promise: the cap is kept across daemons, exactly: every consumer ends with
min(requests for it, 4) attempts, and every ALLOW answered is one counted attempt (and every counted
attempt was answered ALLOW to someone)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest
from faultkit import (
    AMI_SECRET,
    AMI_USER,
    LONG,
    LONG_REASON,
    NPV,
    UPSTREAM_SECRET,
    UPSTREAM_USER,
    DaemonProcess,
    agi_check,
    check_ledger,
    consumer,
    http_check,
    legal_setup,
    national,
)
from gates.fake_asterisk_ami import AmiTestClient, FakeAsterisk

from pbxguard.ledger.store import Ledger
from pbxguard.protocols.ami import Message

CAP = 4
GATES = ("agi", "ami", "http")


def originate(number: str, request_id: str) -> Message:
    return Message.action(
        "Originate",
        [
            ("ActionID", request_id),
            ("Channel", f"Local/{number}@pbxguard-outbound"),
            ("Context", "park"),
            ("Exten", "s"),
            ("Priority", "1"),
            ("CallerID", f'"ACME" <{NPV}>'),
            ("Async", "true"),
            ("Variable", f"FAULT_REQUEST={request_id}"),
        ],
    )


async def run_three_daemons(
    database_url: str,
    make_daemon: Callable[..., DaemonProcess],
    report: Callable[[str], None],
    *,
    requests: int,
    consumers: int,
    rounds: int,
) -> None:
    numbers = [consumer(i) for i in range(rounds * consumers)]
    ledger = await Ledger.connect(database_url, min_size=1, max_size=2)
    try:
        await legal_setup(ledger, numbers)
    finally:
        await ledger.close()
    fake = FakeAsterisk(username=UPSTREAM_USER, secret=UPSTREAM_SECRET, talk_time=0.01)
    await fake.start()
    fleet = [
        make_daemon(database_url, ami_upstream_port=fake.port, agi_timeout_ms=30000, db_timeout_ms=20000)
        for _ in range(3)
    ]
    dialers: list[AmiTestClient] = []
    answers: dict[str, tuple[str, str, str]] = {}  # request -> (number, gate, verdict)
    allowed_ids: dict[str, str] = {}  # request -> decision id (AMI: the token Asterisk received)
    spent: list[float] = []
    try:
        await asyncio.gather(*(d.start() for d in fleet))
        serial = itertools.count()
        jitter = random.Random(5)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            for round_ in range(rounds):
                offset = round_ * consumers
                # One dialer per daemon and round, events off: the test client rescans what it has
                # received for every response it waits for, and must not become the bottleneck.
                for dialer in dialers:
                    await dialer.close()
                dialers.clear()
                for daemon in fleet:
                    assert daemon.ami_port is not None
                    dialers.append(
                        await AmiTestClient.login(
                            "127.0.0.1", daemon.ami_port, AMI_USER, AMI_SECRET, events="off"
                        )
                    )

                async def one(i: int, offset: int = offset) -> None:
                    # A jitter, so that no gate gets in first (AMI connections are already open).
                    await asyncio.sleep(jitter.random() * 0.3)
                    number = numbers[offset + i % consumers]
                    daemon = fleet[i % len(fleet)]
                    gate = GATES[(i // len(fleet)) % len(GATES)]
                    request = f"r{next(serial)}"
                    if gate == "agi":
                        assert daemon.agi_port is not None
                        answer = await agi_check(daemon.agi_port, national(number), request, limit=60)
                        assert answer.verdict, f"no verdict: {answer}"
                        verdict = answer.verdict.lower()
                        if verdict == "allow":
                            allowed_ids[request] = answer.decision
                        detail = ",".join(answer.reasons)
                    elif gate == "http":
                        body = await http_check(session, daemon.http_port, number, request)
                        assert "error" not in body, body
                        verdict = str(body["verdict"])
                        if verdict == "allow":
                            allowed_ids[request] = str(body["decision"])
                        detail = ",".join(str(r) for r in body["reasons"])
                    else:
                        dialer = dialers[i % len(fleet)]
                        dialer.send(originate(national(number), request))
                        response = await dialer.response(request, within=60)
                        verdict = "allow" if response.get("Response") == "Success" else "block"
                        detail = response.get("Message") or ""
                    assert verdict == "allow" or "FREQUENCY_CAP" in detail, f"{gate} {request}: {detail}"
                    answers[request] = (number, gate, verdict)

                started = time.monotonic()
                await asyncio.gather(*(one(i) for i in range(requests)))
                spent.append(time.monotonic() - started)
        # The AMI gate's ALLOWs: the token on the Originate the fake Asterisk received.
        for message in fake.originates:
            variables = dict(v.partition("=")[::2] for v in message.get_all("Variable"))
            request = variables.get("FAULT_REQUEST", "")
            assert request not in allowed_ids, f"{request} reached Asterisk twice"
            allowed_ids[request] = variables["__PBXGUARD_TOKEN"]
    finally:
        for dialer in dialers:
            with contextlib.suppress(Exception):
                await dialer.close()
        codes = [d.stop() for d in fleet]
        await fake.kill()
    assert codes == [0, 0, 0], [d.log_tail() for d in fleet]
    ami_allowed = sum(1 for _, gate, verdict in answers.values() if gate == "ami" and verdict == "allow")
    assert len(fake.originates) == ami_allowed

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT consumer, decision_id::text AS id FROM pbxguard.attempts")
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    asked = Counter(number for number, _, _ in answers.values())
    counted = Counter(row["consumer"] for row in rows)
    wrong = {n: (counted[n], asked[n]) for n in asked if counted[n] != min(asked[n], CAP)}
    assert not wrong, f"consumers whose attempts != min(requests, {CAP}): {wrong}"
    assert sorted(allowed_ids.values()) == sorted(row["id"] for row in rows), "ALLOW answers != attempts"
    by_gate = Counter(gate for _, gate, verdict in answers.values() if verdict == "allow")
    report(
        f"3 daemons: {rounds} x {requests} concurrent requests over {consumers} consumers "
        f"({requests // consumers} each) in {', '.join(f'{s:.2f} s' for s in spent)}; "
        f"{len(allowed_ids)} allowed (AGI {by_gate['agi']}, AMI {by_gate['ami']}, HTTP {by_gate['http']}), "
        f"{len(answers) - len(allowed_ids)} FREQUENCY_CAP; every consumer at exactly "
        f"{min(requests // consumers, CAP)} attempts, each ALLOW one counted attempt; "
        f"{len(fake.originates)} Originates reached Asterisk, chain of {result.verified} verified"
    )


@pytest.mark.timeout(150)
async def test_three_daemons_keep_the_cap(
    database_url: str, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_three_daemons(database_url, daemons, fault_report, requests=500, consumers=50, rounds=1)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(1200)
async def test_three_daemons_keep_the_cap_long(
    database_url: str, daemons: Callable[..., DaemonProcess], fault_report: Callable[[str], None]
) -> None:
    await run_three_daemons(database_url, daemons, fault_report, requests=500, consumers=50, rounds=30)
