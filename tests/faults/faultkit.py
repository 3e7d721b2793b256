"""What the fault tests share: the daemon as a subprocess, scripted FastAGI and HTTP clients, a TCP
proxy in front of PostgreSQL, a fake ARI server that can die, and the ledger consistency checks.

Nothing here mocks PostgreSQL: every check reads a real cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from agi_channel import Channel
from aiohttp import web

from pbxguard.ledger import journal
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign

LONG = os.environ.get("PBXGUARD_LONG_FAULTS", "") not in ("", "0")
LONG_REASON = "long fault run: set PBXGUARD_LONG_FAULTS=1"

CAMPAIGN = "c1"
ORDER_GIVER = "ACME"
NPV = "0162123456"
NPV_E164 = "+33162123456"
HTTP_TOKEN = "fault-token-0123456789"
AMI_USER, AMI_SECRET = "dialer", "dialer-secret"
UPSTREAM_USER, UPSTREAM_SECRET = "pbxguard", "upstream-secret"


def consumer(i: int) -> str:
    """A distinct French mobile number, E.164."""
    return f"+336{i:08d}"


def national(e164: str) -> str:
    return "0" + e164[3:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def legal_setup(ledger: Ledger, numbers: Iterable[str], *, given_at: datetime | None = None) -> None:
    """Campaign c1 of ACME (automated, NPV caller ID authorised) and an off-hours consent for each number:
    the wall clock (night, weekend, holiday) then changes nothing, only the cap can block."""
    await ledger.add_campaign(Campaign(CAMPAIGN, ORDER_GIVER, automated=True))
    await ledger.authorize_caller_id(NPV_E164, ORDER_GIVER, date(2000, 1, 1), None, "faults")
    at = given_at or datetime.now(UTC) - timedelta(days=1)
    rows = [(n, at, "faults", None, True) for n in numbers]
    if rows:
        await ledger.import_consents(ORDER_GIVER, [rows])


async def poll(predicate: Callable[[], Any], within: float, every: float = 0.02) -> Any:
    """Waits until predicate() is truthy (a deadline, never a bare sleep); returns its value."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(every)


# -- the daemon as its own process ------------------------------------------------------------------


class DaemonProcess:
    """``pbxguard run`` with a generated configuration; SIGKILL-able and restartable on the same ports."""

    def __init__(
        self,
        folder: Path,
        database_url: str,
        *,
        agi: bool = True,
        agi_timeout_ms: int = 2000,
        db_timeout_ms: int = 1500,
        ami_upstream_port: int | None = None,
        pool_max: int = 10,
        log_level: str = "warning",
        extra_toml: str = "",
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.agi_port = free_port() if agi else None
        self.ami_port = free_port() if ami_upstream_port is not None else None
        text = (
            'mode = "enforce"\n'
            f'[database]\nurl = "{database_url}"\npool_min = 2\npool_max = {pool_max}\n'
            f"timeout_ms = {db_timeout_ms}\n"
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\ntoken = "{HTTP_TOKEN}"\n'
            f'[log]\nlevel = "{log_level}"\nformat = "json"\n'
            "[journal]\nseal_interval_ms = 100\n"
        )
        if self.agi_port is not None:
            text += f'[gates.agi]\nlisten = "127.0.0.1:{self.agi_port}"\ntimeout_ms = {agi_timeout_ms}\n'
        if ami_upstream_port is not None:
            text += (
                f'[asterisk.ami]\nhost = "127.0.0.1"\nport = {ami_upstream_port}\n'
                f'username = "{UPSTREAM_USER}"\nsecret = "{UPSTREAM_SECRET}"\n'
                f'[gates.ami]\nlisten = "127.0.0.1:{self.ami_port}"\n'
                f'[[gates.ami.users]]\nusername = "{AMI_USER}"\nsecret = "{AMI_SECRET}"\ncampaign = "{CAMPAIGN}"\n'
            )
        self.config = folder / "pbxguard.toml"
        self.config.write_text(text + extra_toml, encoding="utf-8")
        self.log_path = folder / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
        env["PBXGUARD_HOME"] = str(self.folder / "home")  # never an embedded cluster of the machine
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pbxguard.cli", "--config", str(self.config), "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.folder,
            )
        self.starts += 1

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    async def start(self, within: float = 30.0) -> None:
        self.spawn()
        deadline = time.monotonic() + within
        while not await asyncio.to_thread(self.ready):
            if not self.alive:
                raise RuntimeError(f"pbxguard exited at start-up: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pbxguard not ready within {within} s: {self.log_tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs, as in a crash or an OOM kill."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_tail(10_000_000).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


# -- a FastAGI client that behaves like Asterisk ------------------------------------------------------

_serials = itertools.count(1)


@dataclass
class AgiAnswer:
    number: str
    uniqueid: str
    variables: dict[str, str] = field(default_factory=dict)
    started: float = 0.0  # monotonic
    elapsed: float | None = None  # until PBXGUARD_VERDICT was set; None: never set
    error: str | None = None

    @property
    def verdict(self) -> str:
        return self.variables.get("PBXGUARD_VERDICT", "")

    @property
    def reasons(self) -> list[str]:
        value = self.variables.get("PBXGUARD_REASONS", "")
        return value.split(",") if value else []

    @property
    def decision(self) -> str:
        return self.variables.get("PBXGUARD_DECISION", "")

    @property
    def store_unavailable(self) -> bool:
        return self.verdict == "BLOCK" and "STORE_UNAVAILABLE" in self.reasons


def agi_environment(number: str, uniqueid: str, campaign: str = CAMPAIGN, caller_id: str = NPV) -> bytes:
    return (
        f"agi_network: yes\nagi_network_script: check?campaign={campaign}\n"
        "agi_request: agi://127.0.0.1/check\n"
        f"agi_channel: Local/{number}@pbxguard-outbound-00000001;2\nagi_language: en\nagi_type: Local\n"
        f"agi_uniqueid: {uniqueid}\nagi_version: 22.10.1\nagi_callerid: {caller_id}\n"
        "agi_calleridname: faults\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
        "agi_callingtns: 0\nagi_dnid: unknown\nagi_rdnis: unknown\nagi_context: pbxguard-outbound\n"
        f"agi_extension: {number}\nagi_priority: 2\nagi_enhanced: 0.0\nagi_accountcode: \n"
        f"agi_threadid: 140000000000000\nagi_arg_1: {number}\n\n"
    ).encode()


async def agi_check(
    port: int,
    number: str,
    uniqueid: str | None = None,
    *,
    caller_id: str = NPV,
    token: str | None = None,
    limit: float = 15.0,
) -> AgiAnswer:
    """One ``AGI(agi://.../check?campaign=c1,NUMBER)`` as Asterisk runs it: the environment, then one
    reply per command until the server hangs up."""
    answer = AgiAnswer(number, uniqueid or f"fault.{next(_serials)}", started=time.monotonic())
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(agi_environment(number, answer.uniqueid, caller_id=caller_id))
            channel = Channel(variables={"PBXGUARD_TOKEN": token} if token else {}, caller_id=caller_id)
            answer.variables = channel.variables
            while line := (await reader.readline()).decode("utf-8", "replace").rstrip("\n"):
                writer.write((channel.reply(line) + "\n").encode())
                if answer.elapsed is None and "PBXGUARD_VERDICT" in channel.variables:
                    answer.elapsed = time.monotonic() - answer.started
                await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return answer


# -- the HTTP API ---------------------------------------------------------------------------------------


async def http_check(
    session: aiohttp.ClientSession, port: int, number: str, call_key: str, *, reserve: bool = True
) -> dict[str, Any]:
    """POST /v1/check with the bearer token; the decision document, or {"error": ...}."""
    try:
        async with session.post(
            f"http://127.0.0.1:{port}/v1/check",
            json={
                "number": number,
                "campaign": CAMPAIGN,
                "caller_id": NPV,
                "reserve": reserve,
                "call_key": call_key,
            },
            headers={"Authorization": f"Bearer {HTTP_TOKEN}"},
        ) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                return {"error": f"HTTP {response.status}", "body": body}
            assert isinstance(body, dict)
            return body
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- a TCP proxy in front of PostgreSQL ----------------------------------------------------------------


class PgProxy:
    """127.0.0.1:port -> PostgreSQL (a Unix socket or host:port), with the network's failures on demand:

    * ``cut()`` resets every open connection, on both sides;
    * ``stall(to_server=..., to_client=...)`` holds the bytes going one or both ways (a partition:
      TCP delays, it never drops bytes from the middle of a live connection), ``heal()`` lets them go;
      stalling the replies only, then cutting, is a transaction that commits while its answer is lost;
    * ``refusing = True`` resets new connections as soon as they are accepted.
    """

    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self.cut_connections = 0
        self._to_server = asyncio.Event()
        self._to_client = asyncio.Event()
        self._to_server.set()
        self._to_client.set()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def dsn_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.upstream, str):
            return await asyncio.open_unix_connection(self.upstream)
        return await asyncio.open_connection(*self.upstream)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        link = (writer, up_writer)
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, self._to_server),
                self._pipe(up_reader, writer, self._to_client),
                return_exceptions=True,
            )
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            for w in link:
                w.transport.abort()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        try:
            while data := await source.read(65536):
                await flowing.wait()
                if sink.transport.is_closing():
                    return
                sink.write(data)
                await sink.drain()
        finally:
            sink.transport.abort()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def cut(self) -> int:
        """Resets every open connection, both sides (the client and PostgreSQL see the link die)."""
        links = list(self._links)
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        self.cut_connections += len(links)
        return len(links)

    def stall(self, *, to_server: bool = True, to_client: bool = True) -> None:
        if to_server:
            self._to_server.clear()
        if to_client:
            self._to_client.clear()

    def heal(self) -> None:
        self._to_server.set()
        self._to_client.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.heal()
        self.cut()
        # Not cancelled (asyncio would log the cancelled connection callbacks): they end with their sockets.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


# -- a fake ARI that can be killed and started again ------------------------------------------------------


ARI_USER, ARI_PASSWORD = "pbxguard", "ari-secret"


@dataclass
class FakeAri:
    """Asterisk's ARI as far as the Stasis gate uses it, with a life: ``kill()`` cuts the event socket
    and closes the port, ``start()`` comes back on the same port with no channel of the previous life.

    ``continued`` records every ``POST /channels/{id}/continue`` with the variables the channel had
    then; ``violations`` what must never happen (a channel continued twice, or one that never entered
    Stasis); ``late`` the answers that reached a new life for a channel of the previous one (404)."""

    port: int = 0
    life: int = 0
    channels: dict[str, dict[str, str]] = field(default_factory=dict)  # live channels -> variables
    born: dict[str, int] = field(default_factory=dict)  # channel -> life it was created in
    continued: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    hung_up: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)  # requests for channels of a previous life (404)
    _continued_ids: set[str] = field(default_factory=set)
    connects: int = 0
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ari/events", self._events)
        app.router.add_get("/ari/channels/{id}/variable", self._get_var)
        app.router.add_post("/ari/channels/{id}/variable", self._set_var)
        app.router.add_post("/ari/channels/{id}/continue", self._continue)
        app.router.add_delete("/ari/channels/{id}", self._hangup)
        return app

    async def start(self) -> None:
        self.life += 1
        self.channels.clear()
        self.runner = web.AppRunner(self._app(), access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def kill(self) -> None:
        """Asterisk dies: sockets cut, port closed, every channel gone."""
        sockets, self.sockets = self.sockets, []
        for ws in sockets:
            with contextlib.suppress(Exception):
                transport = ws._req.transport if ws._req is not None else None
                if transport is not None:
                    transport.abort()
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()
        self.channels.clear()

    @property
    def connected(self) -> bool:
        return any(not ws.closed for ws in self.sockets)

    def _authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{ARI_USER}:{ARI_PASSWORD}".encode()).decode()
        return request.headers.get("Authorization") == expected

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"message": "Authentication required"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connects += 1
        self.sockets.append(ws)
        async for _ in ws:
            pass
        return ws

    def _channel(self, request: web.Request) -> str:
        if not self._authorized(request):
            raise web.HTTPUnauthorized()
        channel_id = request.match_info["id"]
        if channel_id not in self.channels:
            if channel_id not in self.born:
                self.violations.append(
                    f"{request.method} {request.path}: a channel that never entered Stasis"
                )
            elif self.born[channel_id] != self.life:
                # The answer to a channel of a previous life, decided while Asterisk died: it is gone,
                # and Asterisk says so (404), as it would for a channel that hung up meanwhile.
                self.late.append(f"{request.method} {request.path}")
            raise web.HTTPNotFound(text='{"message":"Channel not found"}', content_type="application/json")
        return channel_id

    async def _get_var(self, request: web.Request) -> web.Response:
        channel_id = self._channel(request)
        value = self.channels[channel_id].get(request.query["variable"])
        if value is None:
            return web.json_response({"message": "Provided variable was not found"}, status=404)
        return web.json_response({"value": value})

    async def _set_var(self, request: web.Request) -> web.Response:
        channel_id = self._channel(request)
        self.channels[channel_id][request.query["variable"]] = request.query.get("value", "")
        return web.Response(status=204)

    async def _continue(self, request: web.Request) -> web.Response:
        channel_id = self._channel(request)
        if channel_id in self._continued_ids:
            self.violations.append(f"channel {channel_id} continued twice")
        self._continued_ids.add(channel_id)
        self.continued.append((channel_id, dict(self.channels.pop(channel_id))))
        return web.Response(status=204)

    async def _hangup(self, request: web.Request) -> web.Response:
        channel_id = self._channel(request)
        self.channels.pop(channel_id, None)
        self.hung_up.append(channel_id)
        return web.Response(status=204)

    async def enter_stasis(self, channel_id: str, number: str) -> bool:
        """A channel runs ``Stasis(pbxguard,NUMBER,c1)``: False when no application is registered
        (Asterisk then fails the Stasis() at once and the dialplan blocks)."""
        live = [ws for ws in self.sockets if not ws.closed]
        if not live:
            return False
        self.channels[channel_id] = {}
        self.born[channel_id] = self.life
        event = {
            "type": "StasisStart",
            "timestamp": "2026-12-01T09:30:00.000+0000",
            "args": [number, CAMPAIGN],
            "channel": {
                "id": channel_id,
                "name": f"Local/{number}@pbxguard-outbound-ari-00000002;2",
                "state": "Ring",
                "caller": {"name": "ACME", "number": NPV},
                "connected": {"name": "", "number": ""},
                "accountcode": "",
                "dialplan": {
                    "context": "pbxguard-outbound-ari",
                    "exten": number,
                    "priority": 6,
                    "app_name": "Stasis",
                    "app_data": f"pbxguard,{number},{CAMPAIGN}",
                },
                "creationtime": "2026-12-01T09:30:00.000+0000",
                "language": "en",
            },
            "asterisk_id": "02:fc:00:00:00:01",
            "application": "pbxguard",
        }
        try:
            await live[-1].send_str(json.dumps(event))
        except (ConnectionError, RuntimeError):
            self.channels.pop(channel_id, None)
            return False
        return True


# -- the ledger after the storm ------------------------------------------------------------------------------


@dataclass
class Consistency:
    attempts: int
    decisions: int
    allowed: int
    problems: list[str]
    sealed: int
    verified: int


async def check_ledger(conn: asyncpg.Connection, key: bytes | None = None, cap: int = 4) -> Consistency:
    """Every invariant a crash must not break; then the journal sealed to the end and verified."""
    problems: list[str] = []

    async def none(sql: str, what: str) -> None:
        rows = await conn.fetch(sql)
        if rows:
            problems.append(f"{len(rows)} {what}, e.g. {dict(rows[0])}")

    await none(
        """SELECT a.consumer, a.decision_id FROM pbxguard.attempts a
            WHERE NOT EXISTS (SELECT 1 FROM pbxguard.decisions d
                               WHERE d.consumer = a.consumer AND d.id = a.decision_id)""",
        "attempts without their decision row",
    )
    await none(
        """SELECT a.consumer, a.decision_id FROM pbxguard.attempts a
             JOIN pbxguard.decisions d ON d.consumer = a.consumer AND d.id = a.decision_id
            WHERE NOT d.counted OR d.verdict <> 'allow'""",
        "attempts whose decision is not an allowed, counted one",
    )
    await none(
        """SELECT d.consumer, d.id FROM pbxguard.decisions d
            WHERE d.counted AND NOT EXISTS (SELECT 1 FROM pbxguard.attempts a
                                             WHERE a.consumer = d.consumer AND a.decision_id = d.id)""",
        "decisions counted without their attempt",
    )
    await none(
        "SELECT decision_id FROM pbxguard.attempts GROUP BY decision_id HAVING count(*) > 1",
        "decisions counted twice",
    )
    await none(
        """SELECT consumer, call_key FROM pbxguard.decisions WHERE call_key IS NOT NULL
            GROUP BY consumer, call_key HAVING count(*) > 1""",
        "call keys journaled twice",
    )
    await none(
        """SELECT d.consumer, d.call_key FROM pbxguard.attempts a
             JOIN pbxguard.decisions d ON d.consumer = a.consumer AND d.id = a.decision_id
            WHERE d.call_key IS NOT NULL GROUP BY d.consumer, d.call_key HAVING count(*) > 1""",
        "call keys counted twice",
    )
    await none(
        f"""SELECT consumer, order_giver, count(*) FROM pbxguard.attempts
             GROUP BY consumer, order_giver HAVING count(*) > {int(cap)}""",
        "consumers over the cap",
    )
    sealed = 0
    while (n := await journal.seal(conn, key)) > 0:
        sealed += n
    verification = await journal.verify(conn, key)
    if not verification.ok:
        problems.append(f"journal does not verify: {verification.problems}")
    if verification.unsealed:
        problems.append(f"{verification.unsealed} journal rows still unsealed")
    counts = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM pbxguard.attempts) AS attempts,
                  (SELECT count(*) FROM pbxguard.decisions) AS decisions,
                  (SELECT count(*) FROM pbxguard.decisions WHERE verdict = 'allow') AS allowed"""
    )
    assert counts is not None
    return Consistency(
        attempts=int(counts["attempts"]),
        decisions=int(counts["decisions"]),
        allowed=int(counts["allowed"]),
        problems=problems,
        sealed=sealed,
        verified=verification.checked,
    )


async def missing_allowed(conn: asyncpg.Connection, decision_ids: Iterable[str]) -> list[str]:
    """The ids of answered ALLOWs whose journal row or attempt row is missing (by decision id)."""
    ids = sorted(set(decision_ids))
    if not ids:
        return []
    rows = await conn.fetch(
        """SELECT u.id::text AS id,
                  EXISTS (SELECT 1 FROM pbxguard.decisions d WHERE d.id = u.id AND d.verdict = 'allow') AS journaled,
                  EXISTS (SELECT 1 FROM pbxguard.attempts a WHERE a.decision_id = u.id) AS counted
             FROM unnest($1::uuid[]) AS u(id)""",
        ids,
    )
    return [
        f"{r['id']} journaled={r['journaled']} counted={r['counted']}"
        for r in rows
        if not (r["journaled"] and r["counted"])
    ]


# -- a steady stream of FastAGI checks ---------------------------------------------------------------------


class AgiLoad:
    """``clients`` scripted Asterisk channels, each asking for the next consumer as soon as its previous
    check is answered, until stopped. Every answer is kept."""

    def __init__(self, port: int, numbers: list[str], clients: int = 8, prefix: str = "load") -> None:
        self.port = port
        self.numbers = numbers
        self.clients = clients
        self.prefix = prefix
        self.answers: list[AgiAnswer] = []
        self._serial = itertools.count()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[AgiAnswer]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.answers

    async def _run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    async def _client(self) -> None:
        while not self._stop.is_set():
            serial = next(self._serial)
            number = self.numbers[serial % len(self.numbers)]
            answer = await agi_check(self.port, number, f"{self.prefix}.{serial}")
            self.answers.append(answer)
            if answer.error is not None and answer.elapsed is None:
                await asyncio.sleep(0.01)  # nobody listening: do not spin

    def count(self, predicate: Callable[[AgiAnswer], bool]) -> int:
        return sum(1 for a in self.answers if predicate(a))


async def load_phase(seconds: float) -> None:
    """The load runs on for this long: a phase of the scenario, not a wait for something to happen
    (those are polled with a deadline)."""
    await asyncio.sleep(seconds)
