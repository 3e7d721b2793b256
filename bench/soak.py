"""`make soak`: mixed traffic through every gate for a long time, with a fault injected on a rota, then
every answer the clients got checked against the ledger and the journal.

    python -m bench.soak --minutes 30 [--rate 200] [--fault-every 60] [--consumers N] [--window W]
                         [--warm-up S] [--seed N] [--answers FILE] [--keep]

It starts a durable throwaway PostgreSQL, a fake Asterisk AMI (bench/fake_ami.py) and the pbxguard
daemon (FastAGI gate, AMI gate, HTTP API with a token), seeds one campaign and an off-hours consent
for each consumer of a pool (so the wall clock never matters), and offers `--rate` decisions per
second, open loop. Consumers are drawn from a window of `--window` consumers (2,000) that slides over
the pool as the run goes, as a dialer's hopper moves on: each consumer is called about ten times
(the default pool is a tenth of the requests plus the window), so the frequency cap of 4 is hit all
the time, and yet the share of allowed calls stays steady from the first minute to the last rather
than dying out once every consumer is capped. Gates: FastAGI checks ~60 %, AMI Originates ~30 %,
HTTP `POST /v1/check` with `reserve` ~10 %, each with a fresh call key, plus ~2 % replays of an
earlier FastAGI or HTTP call key (half of them of a very recent key, often still in flight). The AMI
gate makes its own call keys (session and sequence) and reads a reused ActionID as a new call, so AMI
requests are never replayed; each has a unique ActionID, which the journal's call key ends with.

Every `--fault-every` seconds one fault, in turn: PostgreSQL SIGKILLed and restarted ~3 s later;
the daemon SIGKILLed and restarted; the fake AMI SIGKILLed and restarted ~2 s later; every daemon
connection to PostgreSQL terminated (pg_terminate_backend). After each, the time until /readyz says
200 again and until the first allowed answer is recorded.

At the end the daemon is stopped, the journal sealed to the last row and verified, and:

    lost        allowed answers whose journal row (verdict allow) or counted attempt is missing
    duplicated  call keys with more than one journaled decision, more than one attempt, or answers
                naming more than one decision (a STORE_UNAVAILABLE answer that was never journaled
                does not count: a replay may then decide afresh)
    over_cap    (consumer, order giver) with more than 4 attempts in the ledger, or more than 4
                distinct allowed answers (the soak's time is compressed: every attempt is "today")

plus the journal verification and the daemon's memory (RSS every 10 s, per daemon lifetime; the slope
is fitted within lifetimes, leaving out the first `--warm-up` seconds after each start, 60 by default.
RSS climbs for about two minutes after a start: the AMI gate holds each forwarded Originate ~90 s for
the OriginateResponse that the fake upstream never sends, then it stays flat). The last line is one JSON
object. Exit status 1 if lost, duplicated or over_cap is not 0, the journal does not verify or the
service did not come back after a fault; 2 if the soak could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.agi import ENV_TEMPLATE, answer
from bench.common import (
    CALLER_ID,
    consumer,
    free_port,
    grant_consents,
    legal_campaign,
    percentile,
    rss_mb,
    throwaway_cluster,
)
from bench.daemon import DaemonProcess, helper_process, stop_process, wait_port
from pbxguard.ledger import journal
from pbxguard.ledger.pgcluster import LocalCluster
from pbxguard.ledger.store import Ledger

CAP = 4  # [policy] frequency_cap, the default
CAMPAIGN = "bench"  # bench.common.legal_campaign
ORDER_GIVER = "BENCH"
CONSUMER_BASE = 10_000_000  # consumers +33610000000 upwards
SHARES = (("agi", 0.6), ("ami", 0.3), ("http", 0.1))
REPLAY_SHARE = 0.02
REQUEST_TIMEOUT = 10.0  # every request, whatever the gate
MAX_IN_FLIGHT = 1000  # beyond this the driver records the request as not sent
AMI_LINKS = 8  # dialer connections (a forwarded Originate waits ~90 s for an OriginateResponse the
#               fake never sends: spread them under gates.ami.max_pending_actions per connection)
FAULTS = ("pg-kill", "daemon-kill", "ami-kill", "pg-drop")
READY_WITHIN = 60.0  # a fault the service has not recovered from by then counts as not recovered
SAMPLE_EVERY = 10.0
BLOCKED_PREFIX = "Originate blocked by pbxguard: "
UNAVAILABLE = "STORE_UNAVAILABLE"


@dataclass(slots=True)
class Answer:
    gate: str  # agi | ami | http
    key: str  # the client's call key: agi_uniqueid, HTTP call_key, AMI ActionID
    consumer: str
    replay: bool
    sent: float  # seconds since the traffic started
    latency: float = 0.0
    outcome: str = "error"  # allow | block | error | unsent
    reasons: tuple[str, ...] = ()
    decision: str = ""
    error: str = ""


@dataclass
class Fault:
    kind: str
    at: float  # seconds since the traffic started
    restored: float | None = None  # when the faulty part was back (restarted, connections cut)
    ready_s: float | None = None  # restored -> /readyz 200
    first_allow_s: float | None = None  # restored -> first allowed answer to a request sent after it
    failed_in_window: int = 0  # answers not allowed for STORE_UNAVAILABLE or an error, fault to ready
    detail: str = ""


@dataclass
class Lifetime:
    number: int
    started: float  # seconds since the traffic started (ready)
    pid: int
    ended: float | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)


# -- clients ----------------------------------------------------------------------------------------


async def agi_check(port: int, number: str, key: str) -> tuple[str, tuple[str, ...], str, str]:
    """One FastAGI `check` as Asterisk runs it; (outcome, reasons, decision, error)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    variables: dict[str, str] = {}
    try:
        # ENV_TEMPLATE sets agi_uniqueid to "bench.{serial}": the gate's call key.
        writer.write(ENV_TEMPLATE.format(number=number, serial=key).encode())
        while line := await reader.readline():
            writer.write(answer(line, variables))
    finally:
        writer.close()
    verdict = variables.get("PBXGUARD_VERDICT")
    reasons = tuple(r for r in variables.get("PBXGUARD_REASONS", "").split(",") if r)
    decision = variables.get("PBXGUARD_DECISION", "")
    if verdict == "ALLOW":
        return "allow", reasons, decision, ""
    if verdict == "BLOCK":
        return "block", reasons, decision, ""
    return "error", reasons, decision, "agi: no verdict"


async def http_check(
    session: aiohttp.ClientSession, url: str, token: str, number: str, key: str
) -> tuple[str, tuple[str, ...], str, str]:
    body = {"number": number, "campaign": CAMPAIGN, "caller_id": CALLER_ID, "reserve": True, "call_key": key}
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        if response.status != 200:
            text = (await response.text())[:80]
            return "error", (), "", f"http {response.status} {text}"
        doc = await response.json()
    outcome = "allow" if doc.get("verdict") == "allow" else "block"
    return outcome, tuple(doc.get("reasons") or ()), str(doc.get("decision") or ""), ""


def _parse_ami(raw: bytes) -> dict[str, str]:
    message: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            message.setdefault(key.strip().lower(), value.strip())
    return message


class _AmiConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.waiting: dict[str, asyncio.Future[dict[str, str]]] = {}
        self.closed = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = _parse_ami(await self.reader.readuntil(b"\r\n\r\n"))
                future = self.waiting.pop(message.get("actionid", ""), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        self.writer.close()
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("AMI connection lost"))


class AmiDialer:
    """A dialer's manager connection to the AMI gate, many Originates outstanding, reconnecting."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: _AmiConnection | None = None
        self.lock = asyncio.Lock()
        self.failed_at = -math.inf
        self.logins = 0

    async def _connection(self) -> _AmiConnection:
        current = self.connection
        if current is not None and not current.closed:
            return current
        async with self.lock:
            current = self.connection
            if current is not None and not current.closed:
                return current
            if time.monotonic() - self.failed_at < 0.5:
                raise ConnectionError("AMI gate unreachable (retrying shortly)")
            try:
                async with asyncio.timeout(3):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    await reader.readline()  # banner
                    writer.write(
                        b"Action: Login\r\nUsername: dialer\r\nSecret: dialer-secret\r\nEvents: off\r\n"
                        b"ActionID: login\r\n\r\n"
                    )
                    while True:
                        reply = _parse_ami(await reader.readuntil(b"\r\n\r\n"))
                        if reply.get("actionid") == "login":
                            break
                    if reply.get("response", "").lower() != "success":
                        writer.close()
                        raise ConnectionError(f"AMI login refused: {reply.get('message')}")
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.failed_at = time.monotonic()
                raise ConnectionError(f"AMI gate unreachable: {type(exc).__name__}") from None
            self.logins += 1
            self.connection = _AmiConnection(reader, writer)
            return self.connection

    async def originate(self, number: str, action_id: str) -> tuple[str, tuple[str, ...], str, str]:
        connection = await self._connection()
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        connection.waiting[action_id] = future
        national = "0" + number[3:]
        connection.writer.write(
            (
                f"Action: Originate\r\nActionID: {action_id}\r\nChannel: PJSIP/{national}@trunk\r\n"
                f'Application: Wait\r\nData: 1\r\nCallerID: "soak" <{CALLER_ID}>\r\nAsync: true\r\n'
                f"Variable: PBXGUARD_CAMPAIGN={CAMPAIGN}\r\n\r\n"
            ).encode()
        )
        try:
            reply = await future
        finally:
            connection.waiting.pop(action_id, None)
        text = reply.get("message", "")
        if reply.get("response", "").lower() == "success":
            return "allow", (), "", ""
        if text.startswith(BLOCKED_PREFIX):
            reasons = text[len(BLOCKED_PREFIX) :].split(" (", 1)[0]
            return "block", tuple(r.strip() for r in reasons.split(",") if r.strip()), "", ""
        return "error", (), "", f"ami: {text[:60]}"

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


# -- the soak -----------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, cluster: LocalCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.url = cluster.dsn()
        self.rng = random.Random(args.seed)
        self.token = "soak-" + secrets.token_hex(12)
        self.agi_port, self.ami_port, self.upstream_port = free_port(), free_port(), free_port()
        self.daemon = DaemonProcess(
            self.url,
            f'[gates.agi]\nlisten = "127.0.0.1:{self.agi_port}"\n'
            f'[gates.ami]\nlisten = "127.0.0.1:{self.ami_port}"\n'
            '[[gates.ami.users]]\nusername = "dialer"\nsecret = "dialer-secret"\ncampaign = "bench"\n'
            f'[asterisk.ami]\nhost = "127.0.0.1"\nport = {self.upstream_port}\nusername = "pbxguard"\n'
            'secret = "x"\n',
            http_token=self.token,
        )
        self.upstream: subprocess.Popen[bytes] | None = None
        self.dialers = [AmiDialer(self.ami_port) for _ in range(AMI_LINKS)]
        self.http: aiohttp.ClientSession | None = None
        self.answers: list[Answer] = []
        self.faults: list[Fault] = []
        self.lifetimes: list[Lifetime] = []
        self.replayable: list[tuple[str, str, str]] = []  # (gate, key, number)
        self.in_flight = 0
        self.planned = max(1, int(args.minutes * 60 * args.rate))
        self.t0 = 0.0
        self.end = 0.0
        self.logs: list[Path] = []
        self.threads: set[asyncio.Future[Any]] = set()
        self.stopped_cleanly: bool | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def blocking(self, fn: Any, *args: Any) -> Any:
        """A blocking call in a thread, which the clean-up waits for even after a Ctrl-C."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self.threads.add(future)
        future.add_done_callback(self.threads.discard)
        return await asyncio.shield(future)

    # -- set-up and tear-down ---------------------------------------------------------------------

    async def seed(self, pool: int) -> None:
        ledger = await Ledger.connect(self.url, min_size=1, max_size=2)
        try:
            await legal_campaign(ledger)
            await grant_consents(ledger, [consumer(CONSUMER_BASE + i) for i in range(pool)], off_hours=True)
        finally:
            await ledger.close()

    async def start(self) -> None:
        self.upstream = helper_process("bench.fake_ami", str(self.upstream_port))
        await wait_port(self.upstream_port)
        self.t0 = time.monotonic()
        await self.start_daemon()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def start_daemon(self) -> None:
        log = self.daemon.folder / "daemon.log"
        for attempt in range(3):
            if log.exists():  # DaemonProcess.start truncates it: keep each lifetime's log
                kept = log.with_name(f"daemon.{len(self.logs)}.log")
                log.rename(kept)
                self.logs.append(kept)
            try:
                await self.blocking(self.daemon.start)
                break
            except RuntimeError as exc:
                print(f"  daemon start {attempt + 1} failed: {str(exc)[-300:]}", flush=True)
                if self.daemon.process is not None and self.daemon.process.poll() is None:
                    break  # up but not ready: the ready wait that follows decides
        else:
            raise RuntimeError("the daemon does not start")
        self.lifetimes.append(Lifetime(len(self.lifetimes) + 1, self.now(), self.daemon.pid))

    async def close(self) -> None:
        if self.threads:
            await asyncio.wait(list(self.threads), timeout=60)
        for dialer in self.dialers:
            dialer.close()
        if self.http is not None:
            await self.http.close()
        with contextlib.suppress(Exception):
            self.daemon.stop()
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                stop_process(self.upstream)
        if not self.args.keep:
            shutil.rmtree(self.daemon.folder, ignore_errors=True)

    # -- traffic ------------------------------------------------------------------------------------

    async def drive(self) -> None:
        """Open loop: request i is sent at t0 + i / rate, whatever the earlier ones are doing."""
        interval = 1 / self.args.rate
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            at = self.t0 + i * interval
            if at >= self.end:
                break
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(list(tasks), timeout=REQUEST_TIMEOUT + 5)

    def _pick(self, i: int) -> tuple[str, str, str, bool]:
        if self.replayable and self.rng.random() < REPLAY_SHARE:
            if self.rng.random() < 0.5:  # a recent key: its first request may still be in flight
                gate, key, number = self.rng.choice(self.replayable[-20:])
            else:
                gate, key, number = self.rng.choice(self.replayable)
            return gate, key, number, True
        slide = (self.args.consumers - self.args.window) * min(1.0, i / self.planned)
        number = consumer(CONSUMER_BASE + int(slide) + self.rng.randrange(self.args.window))
        draw, gate = self.rng.random(), SHARES[-1][0]
        for name, share in SHARES:
            if draw < share:
                gate = name
                break
            draw -= share
        key = f"soak-{gate}-{i}"
        if gate == "agi":
            key = f"bench.{key}"  # agi_uniqueid as ENV_TEMPLATE writes it
        if gate != "ami":
            self.replayable.append((gate, key, number))
        return gate, key, number, False

    async def one(self, i: int) -> None:
        gate, key, number, replay = self._pick(i)
        answer = Answer(gate, key, number, replay, self.now())
        self.answers.append(answer)
        if self.in_flight >= MAX_IN_FLIGHT:
            answer.outcome, answer.error = "unsent", "client: too many requests in flight"
            return
        self.in_flight += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if gate == "agi":
                    result = await agi_check(self.agi_port, number, key.removeprefix("bench."))
                elif gate == "ami":
                    result = await self.dialers[i % AMI_LINKS].originate(number, key)
                else:
                    assert self.http is not None
                    url = f"http://127.0.0.1:{self.daemon.http_port}/v1/check"
                    result = await http_check(self.http, url, self.token, number, key)
            answer.outcome, answer.reasons, answer.decision, answer.error = result
        except TimeoutError:
            answer.error = f"{gate}: no answer within {REQUEST_TIMEOUT:.0f} s"
        except (OSError, aiohttp.ClientError, asyncio.IncompleteReadError, ValueError) as exc:
            answer.error = f"{gate}: {type(exc).__name__}"
        finally:
            answer.latency = time.monotonic() - started
            self.in_flight -= 1

    # -- faults -------------------------------------------------------------------------------------

    async def ready(self, within: float = READY_WITHIN) -> bool:
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.daemon.http_port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return True
                await asyncio.sleep(0.1)
        return False

    async def inject(self, kind: str) -> Fault:
        fault = Fault(kind, self.now())
        if kind == "pg-kill":
            await self.blocking(self.cluster.kill)
            await asyncio.sleep(3)
            await self.blocking(self.cluster.start)
        elif kind == "daemon-kill":
            process = self.daemon.process
            assert process is not None
            process.kill()
            await self.blocking(process.wait, 10)
            self.lifetimes[-1].ended = self.now()
            fault.detail = f"pid {process.pid}"
            fault.restored = self.now()  # restarted at once: the start-up counts in ready_s
            await self.start_daemon()
        elif kind == "ami-kill":
            assert self.upstream is not None
            self.upstream.kill()
            await self.blocking(self.upstream.wait, 10)
            await asyncio.sleep(2)
            self.upstream = helper_process("bench.fake_ami", str(self.upstream_port))
            await wait_port(self.upstream_port)
        elif kind == "pg-drop":
            conn = await asyncpg.connect(
                self.url, timeout=5, server_settings={"application_name": "pbxguard-soak"}
            )
            try:
                cut = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'pbxguard' AND pid <> pg_backend_pid()",
                    timeout=5,
                )
            finally:
                await conn.close(timeout=5)
            fault.detail = f"{cut} connections cut"
        if fault.restored is None:
            fault.restored = self.now()
        if await self.ready():
            fault.ready_s = self.now() - fault.restored
        return fault

    async def faults_loop(self) -> None:
        every = self.args.fault_every
        if every <= 0:
            return
        number = 0
        while True:
            at = self.t0 + (number + 1) * every
            # Leave the last fault time to recover while traffic still runs.
            if at + 15 > self.end:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            kind = FAULTS[number % len(FAULTS)]
            number += 1
            try:
                fault = await self.inject(kind)
            except Exception as exc:  # a fault that could not be carried out is reported, not fatal
                fault = Fault(kind, self.now(), detail=f"injection failed: {type(exc).__name__}: {exc}"[:200])
                if not await self.ready():
                    fault.detail += "; not ready afterwards"
                else:
                    fault.ready_s = 0.0
            self.faults.append(fault)
            ready = "not ready" if fault.ready_s is None else f"ready {fault.ready_s:.2f} s after"
            print(f"  [{fault.at:6.1f} s] fault {kind}: {ready} {fault.detail}", flush=True)

    # -- memory and progress ------------------------------------------------------------------------

    def sample(self) -> None:
        if not self.lifetimes:
            return
        life = self.lifetimes[-1]
        process = self.daemon.process
        if life.ended is not None or process is None or process.pid != life.pid or process.poll() is not None:
            return
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            life.samples.append((self.now() - life.started, rss_mb(life.pid)))

    async def sampler(self) -> None:
        next_at = time.monotonic()
        last_print = 0.0
        while time.monotonic() < self.end:
            self.sample()
            if self.now() - last_print >= 30:
                last_print = self.now()
                counts = Counter(a.outcome for a in self.answers)
                rss = (
                    self.lifetimes[-1].samples[-1][1] if self.lifetimes and self.lifetimes[-1].samples else 0
                )
                print(
                    f"  [{self.now():6.1f} s] sent {len(self.answers):,}  allow {counts['allow']:,}  "
                    f"block {counts['block']:,}  error {counts['error'] + counts['unsent']:,}  "
                    f"in flight {self.in_flight}  daemon RSS {rss:.1f} MB",
                    flush=True,
                )
            next_at += SAMPLE_EVERY
            await asyncio.sleep(max(0.0, min(next_at, self.end) - time.monotonic()))

    # -- the run ------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        # The traffic's clock starts now, not when the daemon was started.
        shift = time.monotonic() - self.t0
        self.t0 += shift
        for life in self.lifetimes:
            life.started -= shift
        self.end = self.t0 + self.args.minutes * 60
        tasks = [asyncio.create_task(self.faults_loop()), asyncio.create_task(self.sampler())]
        try:
            await self.drive()
            # A fault in progress is carried through (never leave PostgreSQL or the daemon down).
            await asyncio.wait([tasks[0]], timeout=READY_WITHIN + 60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        traffic_s = self.now()
        print(f"  traffic done after {traffic_s:.1f} s; sealing and checking", flush=True)
        if not await self.ready(30):
            print("  the daemon is not ready at the end of the run", flush=True)
        self.sample()
        if self.lifetimes:
            self.lifetimes[-1].ended = self.now()
        process = self.daemon.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await self.blocking(process.wait, 15)
                self.stopped_cleanly = process.returncode == 0
            except subprocess.TimeoutExpired:
                self.stopped_cleanly = False
                process.kill()
                await self.blocking(process.wait, 5)
        if not await self.blocking(lambda: self.cluster.running):
            await self.blocking(self.cluster.start)
        return await self.check(traffic_s)

    # -- the checks ---------------------------------------------------------------------------------

    async def check(self, traffic_s: float) -> dict[str, Any]:
        conn = await asyncpg.connect(
            self.url, timeout=10, server_settings={"application_name": "pbxguard-soak"}
        )
        try:
            sealed, deadline = 0, time.monotonic() + 120
            while await journal.unsealed(conn) and time.monotonic() < deadline:
                done = await journal.seal(conn)
                sealed += done
                if not done:
                    await asyncio.sleep(0.2)
            verification = await journal.verify(conn)
            decisions = await conn.fetch(
                "SELECT id::text AS id, consumer, call_key, gate, verdict, counted FROM pbxguard.decisions"
            )
            attempts = await conn.fetch(
                "SELECT decision_id::text AS id, count(*) AS n FROM pbxguard.attempts GROUP BY 1"
            )
            ledger_over = await conn.fetch(
                "SELECT consumer, order_giver, count(*) AS n FROM pbxguard.attempts GROUP BY 1, 2"
                " HAVING count(*) > $1",
                CAP,
            )
            key_dups = await conn.fetch(
                "SELECT consumer, call_key, count(*) AS n FROM pbxguard.decisions"
                " WHERE call_key IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1"
            )
            total_attempts = int(await conn.fetchval("SELECT count(*) FROM pbxguard.attempts"))
        finally:
            await conn.close(timeout=5)

        journal_rows = {r["id"]: r for r in decisions}
        attempt_count = {r["id"]: int(r["n"]) for r in attempts}
        ami_rows: dict[str, list[str]] = defaultdict(list)
        for row in decisions:
            if row["gate"] == "ami" and row["call_key"]:
                ami_rows[row["call_key"].rsplit(":", 1)[-1]].append(row["id"])

        lost: list[str] = []
        dup_keys: dict[tuple[str, str], str] = {}
        allowed_ids: dict[str, set[str]] = defaultdict(set)  # consumer -> decisions answered allow
        answered_allow: set[str] = set()
        unjournaled_blocks = 0
        by_key: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for a in self.answers:
            if a.outcome not in ("allow", "block"):
                continue
            ids = ami_rows.get(a.key, []) if a.gate == "ami" else ([a.decision] if a.decision else [])
            journaled = [d for d in ids if d in journal_rows]
            if a.gate != "ami":
                named = (
                    a.decision
                    if a.decision and (a.decision in journal_rows or UNAVAILABLE not in a.reasons)
                    else ""
                )
                if named:
                    by_key[(a.gate, a.consumer, a.key)].add(named)
            if a.outcome == "allow":
                problem = ""
                if not journaled:
                    problem = "no journal row"
                elif len(journaled) == 1 and journal_rows[journaled[0]]["verdict"] != "allow":
                    problem = "journal row says block"
                elif not any(attempt_count.get(d, 0) for d in journaled):
                    problem = "no attempt"
                if problem:
                    lost.append(f"{a.gate} {a.key} {a.consumer} decision {a.decision or ids}: {problem}")
                for d in journaled or ids:
                    allowed_ids[a.consumer].add(d)
                    answered_allow.add(d)
            elif UNAVAILABLE not in a.reasons and not journaled:
                unjournaled_blocks += 1
        for (gate, number, key), ids in by_key.items():
            if len(ids) > 1:
                dup_keys[(number, key)] = f"{gate} answers name {len(ids)} decisions"
        for aid, ids in ami_rows.items():
            if len(ids) > 1:
                dup_keys[("ami", aid)] = f"{len(ids)} journaled decisions"
        for row in key_dups:
            dup_keys[(row["consumer"], row["call_key"])] = f"{row['n']} journaled decisions"
        for decision_id, n in attempt_count.items():
            if n > 1:
                row = journal_rows.get(decision_id)
                where = (row["consumer"], row["call_key"] or decision_id) if row else ("?", decision_id)
                dup_keys[where] = f"{n} attempts for decision {decision_id}"
        over = {(r["consumer"], r["order_giver"]): f"{r['n']} attempts in the ledger" for r in ledger_over}
        for number, ids in allowed_ids.items():
            if len(ids) > CAP:
                over.setdefault((number, ORDER_GIVER), f"{len(ids)} distinct allowed answers")
        phantom = sum(1 for d in attempt_count if d not in answered_allow)
        orphans = sum(1 for d in attempt_count if d not in journal_rows)
        counted_blocks = sum(1 for r in decisions if r["counted"] and r["verdict"] != "allow")

        self.report_traffic(traffic_s)
        self.report_faults()
        memory = self.report_memory()
        self.report_logs()

        recovered = all(f.ready_s is not None for f in self.faults)
        summary = {
            "lost": len(lost),
            "duplicated": len(dup_keys),
            "over_cap": len(over),
            "journal_ok": verification.ok and verification.unsealed == 0,
            "requests": len(self.answers),
            "rss_start_mb": memory["start"],
            "rss_end_mb": memory["end"],
            "rss_slope_mb_per_min": memory["slope"],
            "allowed": sum(a.outcome == "allow" for a in self.answers),
            "blocked": sum(a.outcome == "block" for a in self.answers),
            "errors": sum(a.outcome in ("error", "unsent") for a in self.answers),
            "faults": len(self.faults),
            "recovered": recovered,
            "max_ready_s": max((f.ready_s or 0.0 for f in self.faults), default=None),
            "journal_rows": verification.checked,
            "attempts": total_attempts,
            "phantom_attempts": phantom,
        }
        print("\nchecks")
        rows = [
            ("lost (allowed, no journal row or attempt)", len(lost)),
            ("duplicated (call keys)", len(dup_keys)),
            (f"over cap (> {CAP} attempts or allowed answers)", len(over)),
            (
                "journal verifies",
                f"{verification.ok} ({verification.checked:,} rows, {sealed:,} sealed at the end, "
                f"{verification.unsealed} unsealed) {'; '.join(verification.problems)}",
            ),
            ("attempts in the ledger", f"{total_attempts:,}"),
            ("attempts never answered 'allow' (safe side)", phantom),
            ("attempts without a journal row", orphans),
            ("blocked journal rows counted as attempts", counted_blocks),
            ("blocked answers (not STORE_UNAVAILABLE) without a journal row", unjournaled_blocks),
            ("every fault recovered", recovered),
            ("daemon stopped cleanly by SIGTERM at the end", self.stopped_cleanly),
        ]
        for label, value in rows:
            print(f"  {label:<62} {value}")
        for title, items in (
            ("lost", lost),
            ("duplicated", [f"{k}: {v}" for k, v in dup_keys.items()]),
            ("over cap", [f"{k}: {v}" for k, v in over.items()]),
        ):
            for item in items[:10]:
                print(f"    {title}: {item}")
        if self.args.answers:
            write_answers(Path(self.args.answers), self.answers)
            print(f"  answers written to {self.args.answers}")
        return summary

    def report_traffic(self, traffic_s: float) -> None:
        print(
            f"\ntraffic: {len(self.answers):,} requests in {traffic_s:.0f} s "
            f"({len(self.answers) / max(traffic_s, 1):.0f}/s offered), {self.args.consumers:,} consumers "
            f"({self.args.window:,} at a time), "
            f"{len(self.faults)} faults"
        )
        print(f"  {'gate':<6} {'sent':>8} {'replays':>8} {'allow':>8} {'block':>8} {'error':>7} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")  # fmt: skip
        for gate in ("agi", "ami", "http", "all"):
            mine = [a for a in self.answers if gate in ("all", a.gate)]
            counts = Counter(a.outcome for a in mine)
            latencies = [a.latency for a in mine if a.outcome in ("allow", "block")]
            print(
                f"  {gate:<6} {len(mine):>8,} {sum(a.replay for a in mine):>8,} {counts['allow']:>8,} "
                f"{counts['block']:>8,} {counts['error'] + counts['unsent']:>7,} "
                f"{percentile(latencies, 50) * 1000:>8.1f} {percentile(latencies, 99) * 1000:>8.1f} "
                f"{max(latencies, default=math.nan) * 1000:>8.1f}"
            )
        reasons = Counter(r for a in self.answers if a.outcome == "block" for r in a.reasons)
        print("  block reasons: " + ", ".join(f"{r} {n:,}" for r, n in reasons.most_common()))
        errors = Counter(a.error for a in self.answers if a.outcome in ("error", "unsent"))
        if errors:
            print("  errors: " + "; ".join(f"{e} {n:,}" for e, n in errors.most_common(8)))
        replays = [a for a in self.answers if a.replay]
        if replays:
            print(f"  replays: {len(replays):,} ({sum(a.outcome == 'allow' for a in replays):,} allowed)")

    def report_faults(self) -> None:
        def show(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f}"

        if not self.faults:
            return
        print("\nfaults")
        print(f"  {'at s':>7} {'fault':<12} {'ready s':>8} {'1st allow s':>12} {'failed':>7}  detail")
        for fault in self.faults:
            if fault.restored is not None:
                after = [
                    a.sent + a.latency - fault.restored
                    for a in self.answers
                    if a.outcome == "allow" and a.sent >= fault.restored
                ]
                fault.first_allow_s = min(after, default=None)
                until = fault.restored + (fault.ready_s if fault.ready_s is not None else READY_WITHIN)
                fault.failed_in_window = sum(
                    1
                    for a in self.answers
                    if fault.at <= a.sent <= until
                    and (a.outcome in ("error", "unsent") or UNAVAILABLE in a.reasons)
                )

            print(
                f"  {fault.at:>7.1f} {fault.kind:<12} {show(fault.ready_s):>8} "
                f"{show(fault.first_allow_s):>12} {fault.failed_in_window:>7,}  {fault.detail}"
            )

    def report_memory(self) -> dict[str, float | None]:
        print("\ndaemon memory (RSS, sampled every 10 s)")
        print(f"  {'life':>4} {'pid':>8} {'from s':>7} {'to s':>7} {'samples':>7} {'first MB':>9} "
              f"{'last MB':>8} {'max MB':>7} {'MB/min':>7}")  # fmt: skip
        num = den = 0.0
        for life in self.lifetimes:
            values = [mb for _, mb in life.samples]
            settled = [(t, mb) for t, mb in life.samples if t >= self.args.warm_up]
            slope = None
            if len(settled) >= 2:
                mean_t = sum(t for t, _ in settled) / len(settled)
                mean_mb = sum(mb for _, mb in settled) / len(settled)
                sxy = sum((t - mean_t) * (mb - mean_mb) for t, mb in settled)
                sxx = sum((t - mean_t) ** 2 for t, _ in settled)
                num, den = num + sxy, den + sxx
                slope = sxy / sxx * 60 if sxx else None
            print(
                f"  {life.number:>4} {life.pid:>8} {max(life.started, 0.0):>7.0f} {life.ended or 0:>7.0f} "
                f"{len(values):>7} "
                f"{values[0] if values else math.nan:>9.1f} {values[-1] if values else math.nan:>8.1f} "
                f"{max(values, default=math.nan):>7.1f} "
                f"{'n/a' if slope is None else f'{slope:+.3f}':>7}"
            )
        pooled = num / den * 60 if den else None
        settled_all = [mb for life in self.lifetimes for t, mb in life.samples if t >= self.args.warm_up]
        every = [mb for life in self.lifetimes for _, mb in life.samples]
        start = settled_all[0] if settled_all else (every[0] if every else None)
        end = every[-1] if every else None
        print(
            f"  slope within lifetimes, first {self.args.warm_up:.0f} s after each start left out: "
            f"{'n/a' if pooled is None else f'{pooled:+.3f} MB/min'}"
        )
        return {
            "start": None if start is None else round(start, 1),
            "end": None if end is None else round(end, 1),
            "slope": None if pooled is None else round(pooled, 4),
        }

    def report_logs(self) -> None:
        log = self.daemon.folder / "daemon.log"
        files = [*self.logs, *([log] if log.exists() else [])]
        levels: Counter[str] = Counter()
        messages: Counter[tuple[str, str]] = Counter()
        for path in files:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    level, text = str(entry.get("level", "?")), str(entry.get("msg", ""))
                    if entry.get("error"):
                        text += f" [{entry['error']}]"
                except (ValueError, AttributeError):
                    level, text = "raw", line
                levels[level] += 1
                if level in ("error", "critical", "raw"):
                    messages[(level, re.sub(r"\d+", "#", text)[:150])] += 1
        print(
            f"\ndaemon logs ({len(files)} lifetimes): "
            + ", ".join(f"{k} {n:,}" for k, n in levels.most_common())
        )
        for (level, text), n in messages.most_common(10):
            print(f"  {level} x{n}: {text}")


def write_answers(path: Path, answers: list[Answer]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for answer in answers:
            out.write(json.dumps(asdict(answer)) + "\n")


async def main(args: argparse.Namespace) -> int:
    total = int(args.minutes * 60 * args.rate)
    if args.consumers is None:
        args.consumers = total // 10 + args.window
    args.window = max(1, min(args.window, args.consumers))
    print(
        f"soak: {args.minutes:g} min at {args.rate:g} decisions/s, a fault every {args.fault_every:g} s, "
        f"{args.consumers:,} consumers ({args.window:,} at a time, cap {CAP}), seed {args.seed}",
        flush=True,
    )
    summary: dict[str, Any] | None = None
    async with throwaway_cluster(durable=True) as cluster:
        soak = Soak(args, cluster)
        try:
            try:
                await soak.seed(args.consumers)
                await soak.start()
            except Exception:
                traceback.print_exc()
                print("soak: could not be set up", file=sys.stderr)
                return 2
            summary = await soak.run()
        finally:
            await soak.close()
    print(json.dumps(summary))
    failed = (
        summary["lost"] or summary["duplicated"] or summary["over_cap"] or not summary["journal_ok"]
        or not summary["recovered"]
    )  # fmt: skip
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="traffic duration (default 30)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="decisions offered per second (default 200)"
    )
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults; 0: none")
    parser.add_argument(
        "--consumers",
        type=int,
        default=None,
        help="consumer pool (default: a tenth of the requests plus the window)",
    )
    parser.add_argument(
        "--window", type=int, default=2000, help="consumers in play at any time (default 2,000)"
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=60.0,
        help="seconds after each daemon start left out of the RSS slope (default 60)",
    )
    parser.add_argument("--seed", type=int, default=1, help="traffic random seed")
    parser.add_argument("--answers", help="write every answer to this JSON-lines file")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's folder (config, logs)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be positive")
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # a kill runs the clean-up too
        return await main(args)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted; processes stopped and folders removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
