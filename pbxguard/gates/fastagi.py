"""The FastAGI gate: a dialplan hook that asks pbxguard before a call is dialled.

Asterisk connects for ``AGI(agi://HOST[:PORT]/SCRIPT[?campaign=ID],ARG1,ARG2)``; the scripts are

- ``check``: decide the call. Number: ``ARG1``, else ``agi_extension``. Campaign: ``ARG2``, else the
  ``campaign`` query parameter, else the ``PBXGUARD_CAMPAIGN`` channel variable. Caller ID: what
  ``${CALLERID(num)}`` says now (``agi_callerid`` prints ``unknown`` for an empty number, so it is only
  the fallback). ``PBXGUARD_TOKEN``, put on the channel by the AMI gate that already allowed and
  counted this call, is handed to the guard, which then allows the same number without counting it
  again. Call key: ``agi_uniqueid``, so a dialplan that runs the check twice on one channel gets the
  same decision and one count. Sets ``PBXGUARD_REASONS``, ``PBXGUARD_NEXT``, ``PBXGUARD_DECISION`` and,
  last, ``PBXGUARD_VERDICT`` (``ALLOW`` only when the decision permits the call). Two commands in all:
  one ``GET FULL VARIABLE`` reads caller ID, token and campaign variable together, one ``EXEC MSet``
  sets the four variables; each falls back to one command per variable when Asterisk cannot do it.
- ``refusal`` / ``opposition``: record the consumer's refusal (60-day quiet period) or opposition.
  Number: ``ARG1``, else ``PBXGUARD_NUMBER`` (set by the shipped ``pbxguard-check`` routine and
  inherited by the dialled channel), else ``agi_extension``. Sets ``PBXGUARD_RECORDED`` to 1 or 0.

Asterisk waits for a FastAGI server without any timeout once connected, so a stuck server stalls the
call: every connection is bounded by ``gates.agi.timeout_ms`` on the monotonic clock. The decision
must be done by the deadline minus a reserve kept for writing the answer; a decision (or a ledger)
that is late becomes ``BLOCK`` / ``STORE_UNAVAILABLE``. A client that closes early, sends garbage,
hangs up mid-exchange or is too slow costs one log line and its connection, nothing more. When the
gate cannot answer at all, the shipped dialplan blocks anyway: it cleared ``PBXGUARD_VERDICT`` before
asking and dials only when it reads ``ALLOW``. At ``gates.agi.max_connections``, a new connection
displaces the oldest one that has not sent its environment for ``DISPLACE_AFTER`` seconds (Asterisk
sends it at once), else it is refused.

FastAGI has no authentication: whoever reaches the port can ask for decisions and record refusals.
The configuration refuses a non-loopback ``gates.agi.listen`` unless ``gates.agi.allow_remote``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, cast

from pbxguard.config import Config
from pbxguard.guard import Guard
from pbxguard.logs import mask_number
from pbxguard.policy.model import CallAttempt, Decision, Reason, Verdict
from pbxguard.protocols.agi import (
    AgiEvent,
    AgiProtocolError,
    AgiServerConnection,
    Environment,
    Hangup,
    Response,
    agi_args,
    parse_network_script,
)

__all__ = [
    "ARGUMENT_FACTS",
    "CHANNEL_FACTS",
    "SCRIPTS",
    "AgiRequest",
    "FastAgiGate",
    "caller_id_from_env",
    "mset_data",
    "parse_request",
    "split_argument_facts",
    "split_channel_facts",
    "unavailable_decision",
    "verdict_variables",
]

log = logging.getLogger("pbxguard.gates.agi")

SCRIPTS: Final = frozenset({"check", "refusal", "opposition"})
# Never spend less than this on writing the answer, nor more than half the budget waiting for it.
_MIN_REPLY_RESERVE: Final = 0.05
_MAX_REPLY_RESERVE: Final = 0.5
# At most one "connection refused: too many" line per this many seconds (a flood must not flood logs).
_OVERFLOW_LOG_INTERVAL: Final = 5.0
# A connection without its environment after this long (at most half the timeout) may be displaced.
DISPLACE_AFTER: Final = 1.0
# What `check` reads from the channel, in one GET FULL VARIABLE instead of three: each round trip is a
# wake-up of Asterisk's AGI thread and of this process. LEN counts bytes, so the values are cut by
# length and never by a separator. Asterisk parses LEN's argument after expanding it, so a parenthesis
# in a value can end it early (`${LEN(06):0)}` is the substring syntax): see split_channel_facts.
CHANNEL_FACTS: Final = (
    "${LEN(${CALLERID(num)})}:${LEN(${PBXGUARD_TOKEN})}:${CALLERID(num)}${PBXGUARD_TOKEN}${PBXGUARD_CAMPAIGN}"
)
# The same facts, given by the dialplan as the check's third argument: Asterisk expands them when it
# starts the AGI, so the check needs no command before its answer. Asterisk then splits the
# application's arguments, which cuts at commas and drops double quotes and escaping backslashes: a
# value holding one comes out shorter than its LEN, so all three lengths are sent and their sum must
# be exactly what arrived (split_argument_facts), else the gate reads the channel as above.
ARGUMENT_FACTS: Final = (
    "${LEN(${CALLERID(num)})}:${LEN(${PBXGUARD_TOKEN})}:${LEN(${PBXGUARD_CAMPAIGN})}:"
    "${CALLERID(num)}${PBXGUARD_TOKEN}${PBXGUARD_CAMPAIGN}"
)
# Characters a verdict variable may hold to be set through MSet: none of them means anything to
# Asterisk's argument splitter (which also trims blanks) or to AGIEXECFULL's substitution, except the
# comma, which is escaped. Reason codes, ISO 8601 instants and decision ids need nothing else.
_MSET_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+:.,")


# -- pure part --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgiRequest:
    """What the environment alone says about a request; the channel variables are read afterwards."""

    script: str
    number: str | None  # from ARG1 (or agi_extension for check); None: ask the channel
    campaign: str | None  # from ARG2 or ?campaign=; None: ask the channel
    call_key: str | None
    env_caller_id: str  # agi_callerid with Asterisk's "unknown" placeholder removed
    channel: str
    facts: str | None = None  # ARG3 of check: what Asterisk made of ARGUMENT_FACTS, if given


def caller_id_from_env(env: Environment) -> str:
    value = env.variables.get("agi_callerid", "")
    # res_agi prints "unknown" when the caller number is empty.
    return "" if value == "unknown" else value


def parse_request(env: Environment) -> AgiRequest:
    """Script name, number and campaign as the environment gives them; AgiProtocolError if unusable."""
    script, query = parse_network_script(env)
    script = script.strip("/")
    if script not in SCRIPTS:
        raise AgiProtocolError(f"unknown AGI script {script!r}")
    args = agi_args(env)
    variables = env.variables
    number = args[0].strip() if args and args[0].strip() else None
    if number is None and script == "check":
        # The extension being dialled: the usual case for `AGI(agi://.../check)` in an outbound route.
        number = variables.get("agi_extension") or None
    campaign: str | None = args[1].strip() if len(args) > 1 and args[1].strip() else None
    if campaign is None:
        values = [v.strip() for v in query.get("campaign", []) if v.strip()]
        campaign = values[0] if values else None
    return AgiRequest(
        script=script,
        number=number,
        campaign=campaign,
        call_key=variables.get("agi_uniqueid") or None,
        env_caller_id=caller_id_from_env(env),
        channel=variables.get("agi_channel", ""),
        facts=args[2] if script == "check" and len(args) > 2 else None,
    )


def verdict_variables(decision: Decision) -> list[tuple[str, str]]:
    """The channel variables a decision becomes, ``PBXGUARD_VERDICT`` last.

    Last, so that a connection lost half-way never leaves ``ALLOW`` next to stale reasons; and the
    dialplan cleared the verdict before asking, so a missing one blocks. ``ALLOW`` whenever the
    decision permits the call (an allowed call, or a blocked one that shadow mode lets through: its
    reasons are still listed).
    """
    return [
        ("PBXGUARD_REASONS", ",".join(reason.value for reason in decision.reasons)),
        ("PBXGUARD_NEXT", decision.next_allowed_at.isoformat() if decision.next_allowed_at else ""),
        ("PBXGUARD_DECISION", decision.id),
        ("PBXGUARD_VERDICT", "ALLOW" if decision.permits_call else "BLOCK"),
    ]


def _lengths_spoiled(value: str) -> bool:
    """A parenthesis may have ended ``LEN(...)`` early; U+FFFD stands for a byte that was not UTF-8,
    three bytes here for Asterisk's one: either way the lengths no longer describe the values."""
    return "(" in value or ")" in value or "\ufffd" in value


def split_channel_facts(value: str) -> tuple[str, str, str] | None:
    """(caller ID, token, campaign) from what Asterisk made of :data:`CHANNEL_FACTS`.

    None, and the gate then reads the three values one at a time, when the lengths cannot be trusted:
    an Asterisk without ``LEN`` (func_strings not loaded) expands it to nothing; a parenthesis in a
    value may have ended ``LEN(...)`` early and turned the rest into an offset; a byte that was not
    valid UTF-8 reached us as U+FFFD, three bytes for Asterisk's one.
    """
    if _lengths_spoiled(value):
        return None
    caller_len, sep1, rest = value.partition(":")
    token_len, sep2, rest = rest.partition(":")
    if not (sep1 and sep2 and _is_length(caller_len) and _is_length(token_len)):
        return None
    raw = rest.encode("utf-8")
    caller_end = int(caller_len)
    token_end = caller_end + int(token_len)
    if token_end > len(raw):
        return None
    return _cut_facts(raw, caller_end, token_end)


def _is_length(text: str) -> bool:
    # ASCII only: str.isdigit() also takes "²", which int() then refuses.
    return text.isascii() and text.isdigit()


def _cut_facts(raw: bytes, caller_end: int, token_end: int) -> tuple[str, str, str] | None:
    """(caller ID, token, campaign) cut from their bytes; None where a cut splits a character."""
    try:
        return (
            raw[:caller_end].decode("utf-8"),
            raw[caller_end:token_end].decode("utf-8"),
            raw[token_end:].decode("utf-8"),
        )
    except UnicodeDecodeError:
        return None


def split_argument_facts(value: str) -> tuple[str, str, str] | None:
    """(caller ID, token, campaign) from what reached the check of :data:`ARGUMENT_FACTS`.

    None, and the gate then reads the channel, unless the three lengths add up to exactly the bytes
    that arrived: Asterisk's argument splitter shortens a value holding a comma, a double quote or a
    backslash, and a parenthesis or a byte that was not UTF-8 spoil the lengths as they do for
    :func:`split_channel_facts`.
    """
    if _lengths_spoiled(value):
        return None
    parts = value.split(":", 3)
    if len(parts) != 4 or not all(_is_length(part) for part in parts[:3]):
        return None
    caller_len, token_len, campaign_len = (int(part) for part in parts[:3])
    raw = parts[3].encode("utf-8")
    if caller_len + token_len + campaign_len != len(raw):
        return None
    return _cut_facts(raw, caller_len, caller_len + token_len)


def mset_data(variables: list[tuple[str, str]]) -> str | None:
    """The argument of one ``EXEC MSet`` that sets ``variables`` in order (one round trip instead of
    one per variable), or None when a value holds a character MSet could misread.

    MSet splits its argument like any dialplan application (a backslash escapes the next character),
    then each pair at its first ``=``.
    """
    pairs = []
    for name, value in variables:
        if not _MSET_SAFE.issuperset(name) or not _MSET_SAFE.issuperset(value):
            return None
        pairs.append(f"{name}={value.replace(',', chr(92) + ',')}")
    return ",".join(pairs)


def unavailable_decision(attempt: CallAttempt, now: datetime, *, shadow: bool) -> Decision:
    """What a gate answers when the guard did not decide in time: blocked, STORE_UNAVAILABLE.

    It has no id (nothing was journaled) and, like the guard's own answer to a ledger failure, shadow
    mode lets it through.
    """
    return Decision(
        id="",
        verdict=Verdict.BLOCK,
        reasons=(Reason.STORE_UNAVAILABLE,),
        next_allowed_at=None,
        consumer=None,
        territories=(),
        zones=(),
        campaign_id=attempt.campaign_id,
        order_giver=None,
        caller_id=attempt.caller_id,
        gate=attempt.gate,
        decided_at=now,
        call_key=attempt.call_key,
        shadow=shadow,
    )


def split_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:4573`` too). Port 0 picks a free port (tests)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


# -- asyncio adapter --------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed, hung up, or broke the protocol: give up on this connection."""


# Events a connection may hold unread: the environment, a reply and a HANGUP are all a well-behaved
# client ever has in flight. More is a client talking out of turn, and would only cost memory.
_MAX_UNREAD_EVENTS: Final = 16


class _AgiConnection(asyncio.Protocol):
    """One FastAGI connection: the codec fed straight from the transport, one command at a time.

    A protocol rather than asyncio streams, and one timer per connection rather than a timeout scope
    per step: FastAGI is a short lock-step exchange, and the stream machinery and the timeout scopes
    were about a tenth of the daemon's CPU per check. Reads wait on one future; the timer (``expire_at``)
    fails that wait with TimeoutError, so no task is ever cancelled for being slow.
    """

    __slots__ = (
        "_gate",
        "_timer",
        "_waiter",
        "accepted_at",
        "codec",
        "env",
        "events",
        "expired",
        "gone",
        "task",
        "transport",
    )

    def __init__(self, gate: FastAgiGate) -> None:
        self._gate = gate
        self.codec = AgiServerConnection()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.env: Environment | None = None
        self.events: collections.deque[AgiEvent] = collections.deque()
        self.gone: str | None = None  # why no more events will come
        self.expired = False
        self.accepted_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, though they are one.
        self.transport = cast(asyncio.Transport, transport)
        self._gate._admit(self)

    def data_received(self, data: bytes) -> None:
        if self.gone is not None:
            return
        try:
            self.events.extend(self.codec.receive(data))
        except AgiProtocolError as exc:
            self._refuse(f"protocol error: {exc}")
            return
        if len(self.events) > _MAX_UNREAD_EVENTS:
            self._refuse(f"protocol error: more than {_MAX_UNREAD_EVENTS} lines sent out of turn")
            return
        self._wake()

    def eof_received(self) -> bool:
        self._end("closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("closed the connection" if exc is None else f"connection lost: {exc}")

    # -- deadline -----------------------------------------------------------------------------------

    def expire_at(self, when: float) -> None:
        """From now on, reads fail with TimeoutError once the monotonic clock passes ``when``."""
        if self._timer is not None:
            self._timer.cancel()
        self.expired = False
        assert self.task is not None
        self._timer = self.task.get_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._timer = None
        self._wake()

    def _refuse(self, why: str) -> None:
        """Nothing more this client says is worth reading, not even what is already queued."""
        self.events.clear()
        self._end(why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _end(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self) -> None:
        """After the exchange: no timer left behind, the socket closed (dropped if still unsent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if transport is None:
            return
        # Data still unsent after the exchange ended means a client that does not read: drop it.
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    # -- the exchange -------------------------------------------------------------------------------

    async def _next_event(self) -> AgiEvent:
        while not self.events:
            if self.gone is not None:
                raise _ClientGone(self.gone)
            if self.expired:
                raise TimeoutError
            assert self.task is not None
            self._waiter = self.task.get_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.events.popleft()

    async def environment(self) -> Environment:
        event = await self._next_event()
        if not isinstance(event, Environment):  # pragma: no cover - the codec sends it first
            raise _ClientGone("sent data before its environment")
        self.env = event
        return event

    async def command(self, name: str, *args: str, through_hangup: bool = False) -> Response:
        """Sends one command and returns its reply. A ``HANGUP`` ends the exchange, unless
        ``through_hangup``: Asterisk still answers GET/SET VARIABLE on a dead channel, and a
        consumer's refusal must be recorded even when they hang up right after saying it."""
        if self.codec.hung_up and not through_hangup:
            raise _ClientGone("hung up mid-exchange")
        if self.gone is not None:
            raise _ClientGone(self.gone)
        try:
            line = self.codec.send_command(name, *args)
        except AgiProtocolError as exc:
            raise _ClientGone(f"cannot send {name}: {exc}") from None
        assert self.transport is not None
        # No drain: one short line at a time, each waiting for its reply, never fills a buffer.
        self.transport.write(line)
        while True:
            event = await self._next_event()
            if isinstance(event, Response):
                break
            if isinstance(event, Hangup) and not through_hangup:
                raise _ClientGone("hung up mid-exchange")
        # A HANGUP read with or before the reply: the channel is gone, whatever we would still ask
        # or set is moot.
        if self.codec.hung_up and not through_hangup:
            raise _ClientGone("hung up mid-exchange")
        return event

    async def get_variable(self, name: str, *, through_hangup: bool = False) -> str | None:
        reply = await self.command("GET VARIABLE", name, through_hangup=through_hangup)
        if reply.code == 200 and reply.result == "1":
            return reply.data or ""
        return None

    async def get_expression(self, expression: str) -> str | None:
        reply = await self.command("GET FULL VARIABLE", expression)
        if reply.code == 200 and reply.result == "1":
            return reply.data or ""
        return None

    async def exec_application(self, application: str, data: str) -> bool:
        """Whether ``EXEC`` ran ``application`` (it answers -2 when there is no such application)."""
        reply = await self.command("EXEC", application, data)
        return reply.code == 200 and reply.result == "0"

    async def set_variable(self, name: str, value: str, *, through_hangup: bool = False) -> None:
        reply = await self.command("SET VARIABLE", name, value, through_hangup=through_hangup)
        if reply.code != 200:
            raise _ClientGone(f"SET VARIABLE {name} answered {reply.code} {reply.text}")


class FastAgiGate:
    """The FastAGI server. ``start()``, ``stop()``, ``ready()`` as the daemon expects of a gate."""

    def __init__(
        self,
        config: Config,
        guard: Guard,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        agi = config.gates.agi
        self._host, self._port = split_listen(agi.listen)
        self._timeout = agi.timeout_ms / 1000
        self._reserve = min(_MAX_REPLY_RESERVE, max(_MIN_REPLY_RESERVE, self._timeout / 4))
        self._max_connections = max(1, agi.max_connections)
        self._guard = guard
        self._clock = clock or (lambda: datetime.now(UTC))
        self._full_numbers = config.log.numbers == "full"
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections that have not sent their environment yet, oldest first.
        self._waiting: dict[_AgiConnection, None] = {}
        self._overflow = 0
        self._overflow_logged = 0.0

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _AgiConnection(self), self._host, self._port, backlog=512
        )
        log.info("FastAGI gate listening", extra={"fields": {"listen": f"{self._host}:{self.port}"}})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def ready(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen = "127.0.0.1:0"``)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    # -- one connection -----------------------------------------------------------------------------

    def _admit(self, conn: _AgiConnection) -> None:
        """A new connection: served by its own task, or refused when the gate is full."""
        assert conn.transport is not None
        if len(self._tasks) >= self._max_connections and not self._displace_one():
            # Refusing is safe: Asterisk then goes on with AGISTATUS=FAILURE and the dialplan blocks.
            self._log_overflow()
            conn.transport.abort()
            return
        loop = asyncio.get_running_loop()
        conn.accepted_at = loop.time()
        conn.task = task = loop.create_task(self._run(conn))
        self._tasks.add(task)
        self._waiting[conn] = None
        # A callback, not a `finally`: it also runs for a task that stop() cancels before its first
        # step, which would otherwise leave the socket open and Asterisk waiting on it.
        task.add_done_callback(lambda done: self._finished(conn, done))

    def _finished(self, conn: _AgiConnection, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._waiting.pop(conn, None)
        conn.finish()

    async def _run(self, conn: _AgiConnection) -> None:
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername")
        try:
            await self._serve(conn, peer)
        except Exception:  # never let one connection take the server down
            log.exception("FastAGI connection from %s failed", peer)

    def _displace_one(self) -> bool:
        """Closes the oldest connection still without its environment after DISPLACE_AFTER."""
        now = asyncio.get_running_loop().time()
        oldest = next(iter(self._waiting), None)
        if oldest is None or now - oldest.accepted_at < min(DISPLACE_AFTER, self._timeout / 2):
            return False
        del self._waiting[oldest]
        log.info(
            "FastAGI connection displaced: no environment after %.1f s and the gate is full",
            now - oldest.accepted_at,
        )
        assert oldest.transport is not None
        oldest.transport.abort()
        return True

    def _log_overflow(self) -> None:
        self._overflow += 1
        now = time.monotonic()
        if now - self._overflow_logged >= _OVERFLOW_LOG_INTERVAL:
            log.warning(
                "FastAGI connection refused: %d connections already open (gates.agi.max_connections); "
                "%d refused since the last report",
                self._max_connections,
                self._overflow,
            )
            self._overflow = 0
            self._overflow_logged = now

    async def _serve(self, conn: _AgiConnection, peer: object) -> None:
        deadline = conn.accepted_at + self._timeout
        answer_by = deadline - self._reserve
        conn.expire_at(answer_by)
        phase = "environment"
        try:
            env = await conn.environment()
            self._waiting.pop(conn, None)
            phase = "request"
            request = parse_request(env)
            if request.script == "check":
                phase = "check"
                await self._check(conn, request, answer_by, deadline)
            else:
                phase = request.script
                await self._feedback(conn, request, answer_by, deadline)
        except TimeoutError:
            log.info("FastAGI client %s too slow (%s): connection closed", peer, phase)
        except _ClientGone as exc:
            log.info("FastAGI client %s %s (%s)", peer, exc, phase)
        except AgiProtocolError as exc:
            log.info("FastAGI client %s: %s", peer, exc)
        except (ConnectionError, OSError) as exc:
            log.info("FastAGI client %s connection lost (%s): %s", peer, phase, exc)

    async def _check(
        self, conn: _AgiConnection, request: AgiRequest, answer_by: float, deadline: float
    ) -> None:
        given = split_argument_facts(request.facts) if request.facts is not None else None
        caller_id: str | None
        if given is not None:
            caller_id, token, channel_campaign = given
        else:
            caller_id, token, channel_campaign = await self._channel_facts(
                conn, need_campaign=request.campaign is None
            )
        campaign = request.campaign if request.campaign is not None else channel_campaign.strip()
        attempt = CallAttempt(
            number=request.number or "",
            campaign_id=campaign,
            caller_id=request.env_caller_id if caller_id is None else caller_id,
            gate="agi",
            call_key=request.call_key,
            token=token or None,
        )
        now = self._clock()
        try:
            async with asyncio.timeout_at(answer_by):
                decision = await self._guard.decide(attempt, now)
        except TimeoutError:
            log.warning(
                "no decision within gates.agi.timeout_ms for %s: blocked (STORE_UNAVAILABLE)",
                self._mask(attempt.number),
            )
            decision = unavailable_decision(attempt, now, shadow=self._guard.shadow)
        except Exception:
            # A defect, not a client's fault: still answer, and answer closed.
            log.exception("deciding %s failed: blocked (STORE_UNAVAILABLE)", self._mask(attempt.number))
            decision = unavailable_decision(attempt, now, shadow=self._guard.shadow)
        # Answering gets the rest of the connection's time, the reserve.
        conn.expire_at(deadline)
        variables = verdict_variables(decision)
        data = mset_data(variables)
        if data is None or not await conn.exec_application("MSet", data):
            for name, value in variables:
                await conn.set_variable(name, value)
        log.debug(
            "FastAGI check",
            extra={
                "fields": {
                    "number": self._mask(attempt.number),
                    "campaign": attempt.campaign_id,
                    "verdict": decision.verdict.value,
                    "reasons": [r.value for r in decision.reasons],
                    "decision": decision.id,
                    "channel": request.channel,
                }
            },
        )

    @staticmethod
    async def _channel_facts(conn: _AgiConnection, *, need_campaign: bool) -> tuple[str | None, str, str]:
        """(caller ID, token, campaign variable) as the channel holds them; caller ID None when Asterisk
        would not say. CALLERID(num) rather than agi_callerid: it is what Asterisk will present, and it
        tells an empty number from the literal "unknown"."""
        combined = await conn.get_expression(CHANNEL_FACTS)
        facts = split_channel_facts(combined) if combined is not None else None
        if facts is not None:
            return facts
        caller_id = await conn.get_expression("${CALLERID(num)}")
        token = await conn.get_variable("PBXGUARD_TOKEN") or ""
        campaign = (await conn.get_variable("PBXGUARD_CAMPAIGN") or "") if need_campaign else ""
        return caller_id, token, campaign

    async def _feedback(
        self, conn: _AgiConnection, request: AgiRequest, answer_by: float, deadline: float
    ) -> None:
        recorded = False
        number = request.number
        if number is None:
            number = (await conn.get_variable("PBXGUARD_NUMBER", through_hangup=True) or "").strip() or None
        if number is None:
            number = conn.env.variables.get("agi_extension") if conn.env else None
        campaign = request.campaign
        if campaign is None:
            campaign = (
                await conn.get_variable("PBXGUARD_CAMPAIGN", through_hangup=True) or ""
            ).strip() or None
        failure = "no valid number, or no known order giver for the campaign"
        try:
            async with asyncio.timeout_at(answer_by):
                recorded = await self._guard.record_feedback(
                    number or "",
                    kind=request.script,
                    now=self._clock(),
                    campaign_id=campaign,
                    source=f"agi:{request.call_key or request.channel}",
                )
        except Exception as exc:  # the store failed or was too slow
            failure = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
        if not recorded:
            # A consumer's refusal that is lost is a legal problem: say so where operators look.
            log.error(
                "%s NOT recorded for %s (campaign %s, channel %s): %s; enter it by hand",
                request.script,
                self._mask(number),
                campaign,
                request.channel,
                failure,
            )
        conn.expire_at(deadline)
        await conn.set_variable("PBXGUARD_RECORDED", "1" if recorded else "0", through_hangup=True)

    def _mask(self, number: str | None) -> str | None:
        return mask_number(number, full=self._full_numbers)
