"""Idle and slow clients against a real daemon (`pbxguard run` in a subprocess): 1,000 idle connections
on each port (HTTP API, AMI gate, FastAGI gate) and clients that send one byte a second.

What must hold: the connection limits cap what is held (the rest is refused at once), the timeouts close
what is held, the daemon's memory stays bounded, and a legitimate client is served while the idle
connections are open (a full gate displaces its oldest idle connection for a newcomer). The counts and
the daemon's resident memory are printed (visible with -s, and in the terminal summary below).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import aiohttp
import pytest
from fake_asterisk_ami import AmiTestClient, FakeAsterisk
from security_support import DaemonProcess, agi_call, agi_environment, free_port, raise_open_files, rss_kib

from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign

IDLE = 1000
TIMEOUT_S = 3.0  # http.idle_timeout_ms, gates.ami.login_timeout_ms, gates.agi.timeout_ms
BODY_TIMEOUT_S = 4.0
TOKEN = "slow-clients-token-0123456789abcdef"
USER, SECRET = "dialer", "dialer-secret-0123456789"
REPORT: list[str] = []


@dataclass
class Ports:
    http: int
    ami: int
    agi: int
    pid: int
    fake: FakeAsterisk
    daemon: DaemonProcess = field(repr=False)


@pytest.fixture
async def daemon(tmp_path: Path, database_url: str, ledger: Ledger) -> AsyncIterator[Ports]:
    raise_open_files(IDLE * 4 + 1024)
    await ledger.add_campaign(Campaign("c1", "ACME", automated=True))
    await ledger.authorize_caller_id("+33162123456", "ACME", date(2026, 1, 1), None, None)
    await ledger.add_consent("+33612345678", "ACME", datetime(2026, 1, 1, tzinfo=UTC))
    fake = FakeAsterisk()
    await fake.start()
    http, ami, agi = free_port(), free_port(), free_port()
    toml = f"""
[database]
url = "{database_url}"
[http]
listen = "127.0.0.1:{http}"
token = "{TOKEN}"
idle_timeout_ms = {int(TIMEOUT_S * 1000)}
body_timeout_ms = {int(BODY_TIMEOUT_S * 1000)}
[asterisk.ami]
port = {fake.port}
username = "{fake.username}"
secret = "{fake.secret}"
[gates.ami]
listen = "127.0.0.1:{ami}"
login_timeout_ms = {int(TIMEOUT_S * 1000)}
[[gates.ami.users]]
username = "{USER}"
secret = "{SECRET}"
campaign = "c1"
[gates.agi]
listen = "127.0.0.1:{agi}"
timeout_ms = {int(TIMEOUT_S * 1000)}
[log]
level = "warning"
"""
    process = DaemonProcess(tmp_path, toml)
    try:
        await process.wait_ready(f"http://127.0.0.1:{http}", ("ledger", "ami", "agi"))
        yield Ports(http, ami, agi, process.pid, fake, process)
        assert process.stop() == 0
    finally:
        process.kill()
        await fake.kill()


@dataclass
class Flood:
    opened: int = 0
    connect_failed: int = 0
    first_bytes: list[bytes] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)  # seconds after the flood started
    lifetimes: list[float] = field(default_factory=list)  # seconds from each one's connect to its close
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def open_now(self) -> int:
        return self.opened - len(self.closed_at)


async def flood(port: int, count: int = IDLE) -> Flood:
    """Opens `count` connections that never send a byte; each one's closing time is recorded."""
    result = Flood()
    started = time.monotonic()

    async def watch(reader: asyncio.StreamReader, connected: float) -> None:
        head = b""
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(4096):
                head = head or chunk[:80]
        result.first_bytes.append(head)
        result.closed_at.append(time.monotonic() - started)
        result.lifetimes.append(time.monotonic() - connected)

    for _ in range(count):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, TimeoutError):
            result.connect_failed += 1
            continue
        result.opened += 1
        result.writers.append(writer)
        result.tasks.append(asyncio.create_task(watch(reader, time.monotonic())))
    return result


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):  # the daemon died: the assertions after say so
            samples.append(rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def idle_phase(
    name: str, ports: Ports, port: int, cap: int, legit: Callable[[], Awaitable[str]]
) -> None:
    before = rss_kib(ports.pid)
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(ports.pid, stop, samples))
    try:
        await _idle_phase(name, ports, port, cap, legit, before, samples)
    finally:
        stop.set()
        await sampler


async def _idle_phase(
    name: str,
    ports: Ports,
    port: int,
    cap: int,
    legit: Callable[[], Awaitable[str]],
    before: int,
    samples: list[int],
) -> None:
    started = time.monotonic()
    idle = await flood(port)
    await asyncio.sleep(1.2)  # every held one older than DISPLACE_AFTER: a newcomer may displace one
    while True:  # until every refusal has been seen by its watcher
        held_before_legit = idle.open_now
        await asyncio.sleep(0.2)
        if idle.open_now == held_before_legit:
            break
    legit_started = time.monotonic()
    outcome = await legit()
    legit_ms = (time.monotonic() - legit_started) * 1000
    # Everything left is closed by the gate's own timeout, none by us.
    async with asyncio.timeout(TIMEOUT_S + 8):
        await asyncio.gather(*idle.tasks)
    all_closed_s = time.monotonic() - started
    await asyncio.sleep(0.3)
    after = rss_kib(ports.pid)
    for writer in idle.writers:
        writer.close()
    refused_at_once = sum(1 for life in idle.lifetimes if life < 0.5)
    displaced = sum(1 for life in idle.lifetimes if 0.5 <= life < TIMEOUT_S - 0.6)
    line = (
        f"{name}: {IDLE} idle connections: {idle.opened} opened ({idle.connect_failed} connect failures), "
        f"{refused_at_once} refused at once, {held_before_legit} held open (cap {cap}), {displaced} displaced "
        f"for newer ones; a legitimate client "
        f"was served in {legit_ms:.0f} ms while they were open ({outcome}); every idle one closed by the "
        f"server after {all_closed_s:.1f} s; daemon RSS {before / 1024:.1f} MiB before, "
        f"{max(samples) / 1024:.1f} MiB peak, {after / 1024:.1f} MiB after"
    )
    REPORT.append(line)
    assert idle.opened == IDLE
    assert held_before_legit <= cap  # the limit holds: the rest was refused
    assert held_before_legit >= cap - 10  # ... and is not lower than configured
    assert all_closed_s < TIMEOUT_S + 6  # the timeouts closed them (none was closed by this test)
    assert max(samples) - before < 64 * 1024, "memory grew by more than 64 MiB for 1,000 idle connections"
    assert ports.daemon.proc.poll() is None


@pytest.mark.timeout(120)
async def test_idle_connections_are_bounded_and_legitimate_clients_served(
    daemon: Ports, capsys: pytest.CaptureFixture[str]
) -> None:
    async def http_client() -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(
                f"http://127.0.0.1:{daemon.http}/v1/campaigns", headers=headers
            ) as response:
                assert response.status == 200
                assert [c["id"] for c in await response.json()] == ["c1"]
                return f"GET /v1/campaigns {response.status}"

    async def ami_client() -> str:
        client = await AmiTestClient.login("127.0.0.1", daemon.ami, USER, SECRET)
        try:
            assert (await client.action("Ping")).get("Ping") == "Pong"
        finally:
            await client.close()
        return "Login + Ping answered"

    async def agi_client() -> str:
        variables = await agi_call(daemon.agi, "0612345678", "c1", f"legit-{uuid.uuid4()}")
        assert variables.get("PBXGUARD_VERDICT") in ("ALLOW", "BLOCK")
        assert variables.get("PBXGUARD_DECISION"), variables  # decided by the ledger, not a fallback
        return f"verdict {variables['PBXGUARD_VERDICT']}"

    await idle_phase("HTTP API", daemon, daemon.http, 512, http_client)
    await idle_phase("AMI gate", daemon, daemon.ami, 256, ami_client)
    await idle_phase("FastAGI gate", daemon, daemon.agi, 512, agi_client)
    with capsys.disabled():
        print("\n" + "\n".join(REPORT))


async def trickle(port: int, head: bytes, payload: bytes, limit: float = 15.0) -> tuple[float, bytes, int]:
    """Sends `head` at once, then `payload` one byte a second; returns when the server closed (seconds
    after the trickle started), what it answered, and how many bytes were trickled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    started = time.monotonic()
    received = b""
    sent = 0
    try:
        while time.monotonic() - started < limit:
            if sent < len(payload):
                writer.write(payload[sent : sent + 1])
                sent += 1
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return time.monotonic() - started, received, sent


@pytest.mark.timeout(60)
async def test_one_byte_a_second_is_cut_off_by_the_timeouts(
    daemon: Ports, capsys: pytest.CaptureFixture[str]
) -> None:
    pad = b"X-Pad: " + b"a" * 64 + b"\r\n"
    body_head = (
        f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    ).encode()
    cases = {
        "HTTP request head": trickle(daemon.http, b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + pad * 4),
        "HTTP request body": trickle(daemon.http, body_head, b'{"number": "0612345678", ' + b" " * 200),
        "AMI login": trickle(daemon.ami, b"", b"Action: Login\r\nUsername: dialer\r\nSecret: " + b"s" * 64),
        "FastAGI environment": trickle(daemon.agi, b"", agi_environment("0612345678", "c1", "slow-1")),
    }
    results = dict(zip(cases, await asyncio.gather(*cases.values()), strict=True))
    lines = []
    for name, (took, _, sent) in results.items():
        lines.append(f"{name} at 1 byte/s: cut off after {took:.1f} s and {sent} bytes")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    head_s, head_answer, _ = results["HTTP request head"]
    assert TIMEOUT_S - 0.5 <= head_s < TIMEOUT_S + 3 and head_answer == b""
    body_s, body_answer, _ = results["HTTP request body"]
    assert BODY_TIMEOUT_S - 0.5 <= body_s < BODY_TIMEOUT_S + 4
    assert body_answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in body_answer
    ami_s, ami_answer, _ = results["AMI login"]
    assert TIMEOUT_S - 0.5 <= ami_s < TIMEOUT_S + 3
    assert b"Authentication accepted" not in ami_answer
    agi_s, agi_answer, _ = results["FastAGI environment"]
    assert agi_s < TIMEOUT_S + 3 and b"SET VARIABLE" not in agi_answer
    assert daemon.daemon.proc.poll() is None


@pytest.mark.timeout(30)
async def test_a_full_http_port_displaces_idle_connections_never_busy_ones() -> None:
    """In process, http.max_connections = 3: a newcomer closes the oldest idle connection (no request in
    progress for a second), and gets a 503 when every connection is in the middle of a request."""
    from pbxguard.config import Config, DatabaseConfig, HttpConfig, Secret
    from pbxguard.daemon import Daemon

    port = free_port()
    config = Config(
        database=DatabaseConfig(url=Secret("postgresql://pbxguard@127.0.0.1:1/nothing")),
        http=HttpConfig(listen=f"127.0.0.1:{port}", token=Secret(TOKEN), max_connections=3,
                        idle_timeout_ms=20000, body_timeout_ms=20000),
    )  # fmt: skip
    daemon = Daemon(config)
    await daemon.start()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Three connections busy: each is sending a request body, slowly.
        head = (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()  # fmt: skip
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            opened.append((reader, writer))
        await asyncio.sleep(1.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
        for _, busy in opened:
            assert not busy.is_closing()
            busy.close()
        opened.clear()
        await asyncio.sleep(0.2)
        # Three idle connections (no request at all): the oldest makes room for a newcomer.
        for _ in range(3):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.1)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            assert response.status == 200
        oldest_reader = opened[0][0]
        assert await asyncio.wait_for(oldest_reader.read(), 5) == b""  # displaced
        assert not opened[1][0].at_eof() and not opened[2][0].at_eof()
    finally:
        for _, writer in opened:
            writer.close()
        await daemon.stop()
