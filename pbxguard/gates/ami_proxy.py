"""The AMI gate: pbxguard as an Asterisk Manager Interface server between dialers and Asterisk.

Dialers connect here (``[gates.ami] listen``) instead of to Asterisk and see a normal AMI server: the
banner, ``Login`` (plain or with the MD5 ``Challenge``), their responses with their own ``ActionID``,
and the events their ``Events`` mask asks for. pbxguard keeps one connection of its own to Asterisk
(``[asterisk.ami]``, logged in with every event its account may read) and multiplexes every client
over it:

* each forwarded action gets a proxy-unique ``ActionID`` (``pbxg-<session>-<n>``); the client's own
  is put back into the response, into the events of a list response (``EventList: start`` ...
  ``EventList: Complete``), which go to that client only, and into ``OriginateResponse``;
* every other event is fanned out to the clients whose mask (and ``Filter``) allows it, as Asterisk
  would: ``OriginateResponse`` is in the ``call`` class and, as in Asterisk, reaches every client
  reading ``call``, with the originating client's ``ActionID``;
* ``Login``, ``Challenge``, ``Logoff``, ``Events``, ``Filter`` and ``WaitEvent`` are answered here: they
  describe the client's own session and must not change pbxguard's shared one;
* a synchronous Originate (no ``Async: true``) is sent to Asterisk as an asynchronous one and answered
  when its ``OriginateResponse`` arrives (``Success`` / "Originate successfully queued" or ``Error`` /
  "Originate failed", as Asterisk answers it): Asterisk runs a synchronous Originate in the session's
  thread, which would stall every other client for the whole ringing time.

Every ``Originate`` is checked before it reaches Asterisk (destination, caller ID and campaign read by
:mod:`pbxguard.gates.dialstring`; the decision by :meth:`Guard.decide`). Allowed: forwarded with
``Variable: __PBXGUARD_TOKEN=<decision id>`` and ``__PBXGUARD_CAMPAIGN``. Blocked: nothing reaches
Asterisk; the client gets ``Response: Error`` / ``Message: Originate blocked by pbxguard: REASON,...
(next allowed <ISO time>)`` and, for an ``Async: true`` Originate, the ``OriginateResponse`` with
``Response: Failure`` / ``Reason: 0`` that Asterisk sends for a call that could not be placed (only if
the client's mask allows ``call`` events, as Asterisk would). Shadow mode forwards what it would have
blocked (the journal says so).

What a client sees besides Asterisk's own answers:

* ``Permission denied`` for anything but Login/Challenge/Logoff before login (as Asterisk), and
  ``Permission denied: pbxguard does not allow <Action> for this user`` for an action outside the
  user's ``allowed_actions`` (``Command``, ``Reload``, ``UpdateConfig``, ``GetConfig``...);
* ``Originate refused by pbxguard: <what> is not allowed for this user`` (``System``, ``Exec``,
  ``SHELL()``, AGI to another host... unless the user has ``allow_dangerous``), refused also in
  shadow mode: it is a security control, not a compliance rule;
* ``pbxguard: Asterisk is not connected`` while the upstream link is down or Asterisk has not booted:
  never queued, never sent later. An action already sent when the link drops gets
  ``pbxguard: connection to Asterisk lost, outcome unknown``; nothing is ever sent twice.

Bounded: at most ``max_clients`` connections, ``login_timeout_ms`` to log in, ``client_buffer_bytes``
of unread output per client (a slow reader is disconnected rather than slowing the others or
pbxguard's own link, which Asterisk drops if it stops reading), ``max_pending_actions`` per client.
When the gate is full, a new connection displaces the oldest one that has not logged in for
``DISPLACE_AFTER`` seconds (idle connections cannot lock dialers out), else it is refused.

Hardened: secrets are compared in constant time; after ``max_login_failures`` failed logins within
``login_failure_window_ms`` from one address or for one username, further logins are refused
unchecked with a doubling delay (:mod:`pbxguard.gates.login_throttle`); with ``tls_cert`` and
``tls_key`` dialers connect over TLS (1.2 or later).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias
from zoneinfo import ZoneInfo

from pbxguard.config import AmiUserConfig, Config, parse_listen
from pbxguard.gates.dialstring import (
    MAX_HEADERS,
    DialRules,
    OriginateRefusal,
    OriginateRequest,
    dangerous_content,
    escape_app_arg,
    inspect_originate,
    reserved_variable,
)
from pbxguard.gates.login_throttle import LoginThrottle, throttle_keys
from pbxguard.guard import Guard
from pbxguard.logs import mask_number
from pbxguard.monitor import Monitor
from pbxguard.policy.model import CallAttempt, Decision, Reason
from pbxguard.protocols.ami import (
    BANNER,
    EVENTS_NONE,
    AmiParser,
    AmiProtocolError,
    Banner,
    EventMask,
    Message,
    encode,
    event_classes,
    md5_challenge_key,
    parse_callerid,
    parse_event_mask,
)
from pbxguard.tls import server_context

__all__ = ["ActionRouter", "AmiGate", "ClientSession", "Pending", "Route", "UpstreamLink"]

log = logging.getLogger("pbxguard.gates.ami")

NOT_CONNECTED: Final = "pbxguard: Asterisk is not connected"
LINK_LOST: Final = "pbxguard: connection to Asterisk lost, outcome unknown"
NO_RESPONSE: Final = "pbxguard: no response from Asterisk, outcome unknown"
PREFIX: Final = "pbxg-"
# How long a link that has not answered its Ping is given for an answer already on its way.
_SILENCE_GRACE: Final = 0.05
LINK_PREFIX: Final = "pbxg-link-"  # pbxguard's own actions (login, keepalive) on the upstream link

# Answered here, never forwarded: they change the state of the session that sends them.
_LOCAL_ACTIONS: Final = frozenset({"login", "challenge", "logoff", "events", "filter", "waitevent"})
_PRE_LOGIN: Final = frozenset({"login", "challenge", "logoff"})
# A connection that has not logged in for this long may be displaced by a new one when the gate is full.
DISPLACE_AFTER: Final = 1.0


def _response(value: str, action_id: str | None, headers: list[tuple[str, str]] | None = None) -> Message:
    items = [("Response", value)]
    if action_id is not None:
        items.append(("ActionID", action_id))
    items.extend(headers or ())
    return Message(tuple(items))


def _error(action_id: str | None, text: str) -> Message:
    return _response("Error", action_id, [("Message", text)])


def _restore(message: Message, client_id: str | None) -> Message:
    return message.without("ActionID") if client_id is None else message.replace("ActionID", client_id)


def _is(message: Message, key: str, value: str) -> bool:
    return (message.get(key) or "").strip().lower() == value


# -- ActionID multiplexing (pure) -------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Pending:
    """An action forwarded to Asterisk whose answer has not fully arrived."""

    upstream_id: str
    owner: ClientSession | None  # None once the client has gone: its answers are dropped
    client_id: str | None
    action: str  # lower case
    deadline: float  # monotonic
    decision_id: str | None = None
    awaits_event: bool = False  # an Originate: its OriginateResponse is still to come
    sync_originate: bool = False  # the client asked for a synchronous Originate (sent as Async)
    state: str = "response"  # response -> (list | event) -> removed
    early_event: Message | None = None  # OriginateResponse that overtook the Originate's response
    # Asterisk has answered it (the whole list for a list response): replies pbxguard made to the
    # client's later actions, held in ``after`` meanwhile, may now go out in the client's order.
    answered: bool = False
    after: list[Message] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Route:
    pending: Pending | None
    to_owner: Message | None  # for the pending action's client only
    broadcast: Message | None  # for every client whose event mask allows it
    finished: bool = False  # the pending action is complete and no longer routed


def _sync_result(event: Message, client_id: str | None) -> Message:
    # What Asterisk answers a synchronous Originate (action_originate in main/manager.c).
    if _is(event, "Response", "success"):
        return _response("Success", client_id, [("Message", "Originate successfully queued")])
    return _error(client_id, "Originate failed")


class ActionRouter:
    """Maps proxy ActionIDs to (client, client ActionID) and decides where each upstream message goes.

    Pure: no I/O. Asterisk answers the actions of one session in order and sends the events of a
    list response after its ``Response``, but an ``OriginateResponse`` may in principle overtake the
    Originate's own response: both orders are handled.
    """

    def __init__(self, prefix: str = PREFIX, recent: int = 8192) -> None:
        self.prefix = prefix
        self._open: dict[str, Pending] = {}
        # Recently finished ids: broadcast events may still carry them (UserEvent echoes the action's
        # headers, ActionID included, after the action's response).
        self._recent: OrderedDict[str, str | None] = OrderedDict()
        self._recent_max = recent
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._open)

    def new_id(self, session_id: str) -> str:
        return f"{self.prefix}{session_id}-{next(self._ids)}"

    def add(self, pending: Pending) -> None:
        self._open[pending.upstream_id] = pending

    def discard(self, pending: Pending) -> None:
        self._open.pop(pending.upstream_id, None)

    def detach(self, owner: ClientSession) -> None:
        for pending in self._open.values():
            if pending.owner is owner:
                pending.owner = None

    def fail_all(self) -> list[Pending]:
        pending = list(self._open.values())
        self._open.clear()
        for p in pending:
            p.answered = True
        return pending

    def expire(self, now: float) -> list[Pending]:
        expired = [p for p in self._open.values() if p.deadline <= now]
        for pending in expired:
            self._close(pending)
        return expired

    def _close(self, pending: Pending) -> None:
        pending.answered = True
        self._open.pop(pending.upstream_id, None)
        self._recent[pending.upstream_id] = pending.client_id
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    def route(self, message: Message) -> Route | None:
        kind, name = message.server_kind
        action_id = message.action_id
        if kind == "response":
            pending = self._open.get(action_id) if action_id else None
            return None if pending is None else self._response(pending, message)
        if kind != "event":
            return None
        if action_id is None or not action_id.startswith(self.prefix):
            return Route(None, None, message)
        pending = self._open.get(action_id)
        if pending is None:
            return Route(None, None, _restore(message, self._recent.get(action_id)))
        restored = _restore(message, pending.client_id)
        if pending.awaits_event and name.lower() == "originateresponse":
            return self._originate_response(pending, restored)
        if pending.state in ("list", "response"):
            done = pending.state == "list" and (
                _is(message, "EventList", "complete")
                or _is(message, "EventList", "cancelled")
                or name.lower().endswith("complete")
            )
            if done:
                self._close(pending)
            return Route(pending, restored, None, done)
        return Route(None, None, restored)

    def _response(self, pending: Pending, message: Message) -> Route:
        restored = _restore(message, pending.client_id)
        if _is(message, "EventList", "start"):
            pending.state = "list"
            return Route(pending, restored, None)
        pending.answered = True
        if pending.awaits_event and _is(message, "Response", "success"):
            early = pending.early_event
            if early is not None:
                self._close(pending)
                reply = _sync_result(early, pending.client_id) if pending.sync_originate else restored
                return Route(pending, reply, None, True)
            pending.state = "event"
            return Route(pending, None if pending.sync_originate else restored, None)
        self._close(pending)
        return Route(pending, restored, None, True)

    def _originate_response(self, pending: Pending, event: Message) -> Route:
        # Asterisk emits no OriginateResponse for a synchronous Originate: one we converted stays ours.
        broadcast = None if pending.sync_originate else event
        if pending.state == "event":
            self._close(pending)
            reply = _sync_result(event, pending.client_id) if pending.sync_originate else None
            return Route(pending, reply, broadcast, True)
        pending.early_event = event
        return Route(pending, None, broadcast)


# -- the upstream link ------------------------------------------------------------------------------


class LoginError(Exception):
    pass


class UpstreamLink:
    """pbxguard's own AMI connection to Asterisk: log in, read, reconnect with capped backoff.

    Holds no queue: :meth:`send` writes now or refuses. ``ready`` once logged in and Asterisk has
    booted (``FullyBooted``; if the account cannot read ``system`` events, ``boot_grace`` seconds
    after login). Dead links are found by a Ping after ``keepalive`` seconds of silence.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        on_message: Callable[[Message], None],
        on_state: Callable[[bool], None],
        reconnect_min: float = 0.2,
        reconnect_max: float = 5.0,
        boot_grace: float = 2.0,
        keepalive: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self._username = username
        self._secret = secret
        self._on_message = on_message
        self._on_state = on_state
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._boot_grace = boot_grace
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._ready = False
        self._logged_in = False
        self._boot_timer: asyncio.TimerHandle | None = None
        self._booted: tuple[float, int, int] | None = None  # (loop time seen, Uptime, LastReload)
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.connections = 0  # successful logins so far

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="ami-upstream")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._down()

    def send_bytes(self, data: bytes) -> bool:
        writer = self._writer
        if not self._ready or writer is None or writer.is_closing():
            return False
        writer.write(data)
        return True

    async def drain(self) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    def fully_booted_event(self) -> Message:
        uptime, reload = "0", "0"
        if self._booted is not None:
            seen, up, last = self._booted
            elapsed = int(asyncio.get_running_loop().time() - seen)
            uptime, reload = str(up + elapsed), str(last + elapsed)
        return Message.event(
            "FullyBooted", Privilege="system,all", Uptime=uptime, LastReload=reload, Status="Fully Booted"
        )

    # -- internals --------------------------------------------------------------------------------

    def _set_ready(self) -> None:
        if self._ready or not self._logged_in:
            return
        self._ready = True
        log.info("Asterisk AMI ready", extra={"fields": {"host": self.host, "port": self.port}})
        self._on_state(True)

    def _boot_grace_over(self) -> None:
        self._boot_timer = None
        if self._logged_in and not self._ready:
            log.warning(
                "no FullyBooted event from Asterisk %.1f s after login (does the AMI account read "
                "'system' events?): taking Asterisk as booted",
                self._boot_grace,
            )
            self._set_ready()

    def _down(self) -> None:
        was_ready = self._ready
        self._ready = False
        self._logged_in = False
        if self._boot_timer is not None:
            self._boot_timer.cancel()
            self._boot_timer = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.transport.abort()
        if was_ready:
            self._on_state(False)

    async def _supervise(self) -> None:
        delay = self._reconnect_min
        while True:
            logged_in_before = self.connections
            try:
                await self._session()
                log.warning("Asterisk AMI connection closed")
            except asyncio.CancelledError:
                raise
            except LoginError as exc:
                log.error("Asterisk AMI login failed: %s", exc)
            except (OSError, TimeoutError, AmiProtocolError, ConnectionError) as exc:
                log.warning("Asterisk AMI unreachable: %s", exc or type(exc).__name__)
            finally:
                self._down()
            if self.connections != logged_in_before:
                delay = self._reconnect_min  # it worked for a while: start the backoff over
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max)

    def _internal_id(self) -> str:
        return f"{LINK_PREFIX}{next(self._ids)}"

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self._connect_timeout
        )
        self._writer = writer
        parser = AmiParser(expect_banner=True, max_line=65536, max_message_bytes=4 << 20, max_headers=16384)
        backlog: list[Message | Banner] = []

        async def next_item() -> Message | Banner:
            while not backlog:
                async with asyncio.timeout(self._connect_timeout):
                    data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed by Asterisk during login")
                backlog.extend(parser.feed(data))
            return backlog.pop(0)

        async def request(message: Message) -> Message:
            action_id = message.action_id
            writer.write(encode(message))
            while True:
                item = await next_item()
                if isinstance(item, Message) and item.server_kind[0] == "response" and item.action_id == action_id:
                    return item

        first = await next_item()
        if not isinstance(first, Banner) or first.version is None:
            raise ConnectionError(f"not an AMI server: {first!r:.80}")
        reply = await request(Message.action("Challenge", AuthType="MD5", ActionID=self._internal_id()))
        challenge = reply.get("Challenge")
        if challenge:
            login = Message.action(
                "Login",
                Username=self._username,
                AuthType="MD5",
                Key=md5_challenge_key(challenge, self._secret),
                Events="on",
                ActionID=self._internal_id(),
            )
        else:  # MD5 not offered: plain secret (loopback only, see asterisk-conf/manager.conf)
            login = Message.action(
                "Login",
                Username=self._username,
                Secret=self._secret,
                Events="on",
                ActionID=self._internal_id(),
            )
        reply = await request(login)
        if not _is(reply, "Response", "success"):
            raise LoginError(reply.get("Message") or "refused")
        self._logged_in = True
        self.connections += 1
        log.info("logged in to Asterisk AMI", extra={"fields": {"host": self.host, "port": self.port}})
        loop = asyncio.get_running_loop()
        self._boot_timer = loop.call_later(self._boot_grace, self._boot_grace_over)
        for item in backlog:
            if isinstance(item, Message):
                self._dispatch(item)
        backlog.clear()

        # One timer watches for silence, not a timeout scope around every read: Asterisk sends the
        # dozen events of an Originate in about as many reads.
        heard = loop.time()
        pinged = False
        silenced = False
        watchdog: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal pinged, watchdog
            now = loop.time()
            if now < heard + self._keepalive:
                watchdog = loop.call_at(heard + self._keepalive, watch)
            elif not pinged:
                pinged = True
                writer.write(encode(Message.action("Ping", ActionID=self._internal_id())))
                watchdog = loop.call_at(now + self._keepalive, watch)
            else:
                # Not at once: an answer that came in with this timer is read on a later turn.
                watchdog = loop.call_later(_SILENCE_GRACE, confirm)

        def confirm() -> None:
            nonlocal silenced
            if not pinged:  # heard from Asterisk meanwhile
                watch()
            else:
                silenced = True
                writer.transport.abort()  # ends the read below

        watchdog = loop.call_at(heard + self._keepalive, watch)
        try:
            while True:
                try:
                    data = await reader.read(262144)
                except OSError:
                    if not silenced:
                        raise
                    data = b""
                if silenced:
                    raise ConnectionError(f"no answer from Asterisk for {2 * self._keepalive:.0f} s")
                if not data:
                    return
                heard = loop.time()
                pinged = False
                for item in parser.feed(data):
                    if isinstance(item, Message):
                        self._dispatch(item)
        finally:
            watchdog.cancel()

    def _dispatch(self, message: Message) -> None:
        kind, name = message.server_kind
        if kind == "response" and (message.action_id or "").startswith(LINK_PREFIX):
            return
        if kind == "event":
            event = name.lower()
            if event == "fullybooted":
                self._booted = (
                    asyncio.get_running_loop().time(),
                    _leading_int(message.get("Uptime")),
                    _leading_int(message.get("LastReload")),
                )
                self._set_ready()
            elif event == "shutdown":
                # Asterisk is going away: refuse from now on rather than send into a closing socket,
                # and start over (a shutdown can be aborted; the reconnect then finds it alive).
                self._on_message(message)
                self._down()
                return
        self._on_message(message)


def _leading_int(value: str | None) -> int:
    match = re.match(r"\s*([0-9]+)", value or "")
    return int(match.group(1)) if match else 0


# -- client sessions --------------------------------------------------------------------------------

Effect: TypeAlias = Callable[[], Awaitable[None]]
Step: TypeAlias = "Effect | asyncio.Task[Effect] | None"

_MAX_FILTER: Final = 256
_QUANTIFIERS: Final = re.compile(r"(?<!\\)[*+?{]")


def _compile_filter(text: str) -> re.Pattern[str] | str:
    """A client's Filter regex, or why it is refused. Python's regex engine has no time limit and runs
    on pbxguard's event loop: quantified groups, back references and more than 4 quantifiers (which
    can backtrack for minutes on one event) are refused."""
    if len(text) > _MAX_FILTER:
        return f"Filter longer than {_MAX_FILTER} characters"
    if re.search(r"\)\s*[*+?{]", text) or re.search(r"\\[1-9]", text) or len(_QUANTIFIERS.findall(text)) > 4:
        return "Filter too complex for pbxguard (quantified groups, back references, > 4 quantifiers)"
    try:
        return re.compile(text)
    except re.error as exc:
        return f"Filter did not compile.  Check the syntax of the filter given. ({exc})"


class ClientSession:
    """One dialer connection. Messages are prepared in arrival order (decisions run concurrently) and
    committed in arrival order, so responses and upstream writes keep the client's order."""

    def __init__(
        self, gate: AmiGate, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session_id: str
    ) -> None:
        self.gate = gate
        self.id = session_id
        self.reader = reader
        self.writer = writer
        peername = writer.get_extra_info("peername")
        self.peer = str(peername)
        self.peer_host: str | None = str(peername[0]) if isinstance(peername, tuple) and peername else None
        self.opened = asyncio.get_running_loop().time()
        self.user: AmiUserConfig | None = None
        self.allowed: frozenset[str] = frozenset()
        self.mask: EventMask = EVENTS_NONE
        self.include: list[re.Pattern[str]] = []
        self.exclude: list[re.Pattern[str]] = []
        self.challenge: str | None = None
        self.pending = 0
        self.closed = False
        self._stop_reading = False
        self._originates = 0
        self._steps: asyncio.Queue[Step] = asyncio.Queue(64)
        self._activity = 0  # input or event count, for WaitEvent
        self._activity_event = asyncio.Event()
        self._waiters: set[asyncio.Task[None]] = set()
        self._last_forward: Pending | None = None

    # -- output -----------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        try:
            data = encode(message)
        except AmiProtocolError as exc:
            log.warning("cannot send a message to an AMI client: %s", exc)
            return
        self.send_bytes(data)

    def send_bytes(self, data: bytes) -> None:
        transport = self.writer.transport
        if self.closed or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.gate.client_buffer_bytes:
            log.warning(
                "AMI client does not read its output: disconnected",
                extra={"fields": {"session": self.id, "peer": self.peer, "user": self.username}},
            )
            self.abort()

    def reply(self, message: Message) -> None:
        """A reply pbxguard makes itself: sent after the answers to the client's earlier actions."""
        last = self._last_forward
        if last is not None and not last.answered and last.owner is self:
            last.after.append(message)
        else:
            self.send(message)

    def flush_after(self, pending: Pending) -> None:
        held, pending.after = pending.after, []
        for message in held:
            self.send(message)

    def deliver_event(self, data: bytes) -> None:
        self._activity += 1
        self._activity_event.set()
        self.send_bytes(data)

    def passes_filters(self, text: str) -> bool:
        if self.include and not any(p.search(text) for p in self.include):
            return False
        return not any(p.search(text) for p in self.exclude)

    @property
    def has_filters(self) -> bool:
        return bool(self.include or self.exclude)

    @property
    def username(self) -> str:
        return self.user.username if self.user else ""

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_reading = True
            self.writer.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_reading = True
            self.writer.close()

    # -- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        self.send_bytes(BANNER)
        committer = asyncio.create_task(self._commit_loop(), name=f"ami-client-{self.id}")
        try:
            with contextlib.suppress(ConnectionError, OSError):
                await self._read_loop()
            # Actions already received are carried out, as Asterisk does for a client that hangs up.
            await self._steps.put(None)
            await committer
        except asyncio.CancelledError:
            committer.cancel()
            while not self._steps.empty():
                step = self._steps.get_nowait()
                if isinstance(step, asyncio.Task):
                    step.cancel()
            raise
        finally:
            for waiter in list(self._waiters):
                waiter.cancel()
            self.close()

    async def _read_loop(self) -> None:
        parser = AmiParser()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gate.login_timeout
        while not self._stop_reading:
            if self.user is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self.reader.read(65536)
                except TimeoutError:
                    log.info("AMI client did not log in in time", extra={"fields": {"peer": self.peer}})
                    return
            else:
                data = await self.reader.read(65536)
            if not data:
                return
            try:
                items = parser.feed(data)
            except AmiProtocolError as exc:
                await self._steps.put(self._reply(_error(None, f"pbxguard: {exc}")))
                return
            for item in items:
                if not isinstance(item, Message):
                    continue
                self._activity += 1
                self._activity_event.set()
                await self._steps.put(self._prepare(item))
                if self._stop_reading:
                    return

    async def _commit_loop(self) -> None:
        while True:
            step = await self._steps.get()
            if step is None:
                return
            await self._commit(step)

    async def _commit(self, step: Effect | asyncio.Task[Effect]) -> None:
        try:
            effect = await step if isinstance(step, asyncio.Task) else step
            await effect()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("AMI client action failed", extra={"fields": {"session": self.id}})
            self.abort()

    # -- preparing actions (synchronous: runs in arrival order) -----------------------------------

    def _reply(self, *messages: Message, close: bool = False, delay: float = 0.0) -> Effect:
        async def effect() -> None:
            if delay:
                await asyncio.sleep(delay)
            for message in messages:
                self.reply(message)
            if close:
                self.close()

        return effect

    def _prepare(self, message: Message) -> Step:
        kind, name = message.kind
        action = name.lower()
        action_id = message.action_id
        if kind != "action" or not action:
            return self._reply(_error(action_id, "Missing action in request"))
        if self.user is None and action not in _PRE_LOGIN:
            return self._reply(_error(action_id, "Permission denied"))
        if action in _PRE_LOGIN:
            return self._local(action, message)
        if action not in self.allowed:
            log.warning(
                "AMI action not allowed",
                extra={"fields": {"session": self.id, "user": self.username, "action": name[:40]}},
            )
            return self._reply(
                _error(action_id, f"Permission denied: pbxguard does not allow {name} for this user")
            )
        if action in _LOCAL_ACTIONS:
            return self._local(action, message)
        is_originate = action == "originate"
        if reserved_variable(message):
            return self._refuse(message, is_originate, "PBXGUARD_TOKEN is reserved to pbxguard")
        assert self.user is not None
        if not self.user.allow_dangerous:
            problem = dangerous_content(message)
            if problem is not None:
                log.warning(
                    "dangerous AMI action refused",
                    extra={
                        "fields": {"session": self.id, "user": self.username, "action": name, "why": problem}
                    },
                )
                return self._refuse(message, is_originate, f"{problem} is not allowed for this user")
        if is_originate:
            return self._originate(message)
        return self._forward(message)

    def _refuse(self, message: Message, is_originate: bool, why: str) -> Effect:
        action_id = message.action_id
        if not is_originate:
            return self._reply(_error(action_id, f"Action refused by pbxguard: {why}"))
        return self._reply(*self._originate_failure(message, f"Originate refused by pbxguard: {why}"))

    def _originate_failure(self, message: Message, text: str) -> list[Message]:
        """The error response, and for an async Originate the OriginateResponse Failure Asterisk sends
        for a call it could not place, so that a dialer waiting for that event does not wait forever."""
        action_id = message.action_id
        out = [_error(action_id, text)]
        if (message.effective("Async") or "").strip().lower() in ("yes", "true", "y", "t", "1", "on") and (
            self.mask.allows("call")
        ):
            name, number = parse_callerid(message.effective("CallerID") or "")
            headers: list[tuple[str, str]] = [("Privilege", "call,all")]
            if action_id is not None:
                headers.append(("ActionID", action_id))
            headers += [("Response", "Failure"), ("Channel", message.effective("Channel") or "")]
            app = message.effective("Application")
            if app:
                headers += [("Application", app), ("Data", message.effective("Data") or "")]
            else:
                headers += [
                    ("Context", message.effective("Context") or ""),
                    ("Exten", message.effective("Exten") or ""),
                ]
            headers += [
                ("Reason", "0"),
                ("Uniqueid", message.effective("ChannelId") or "<unknown>"),
                ("CallerIDNum", number or "<unknown>"),
                ("CallerIDName", name or "<unknown>"),
            ]
            out.append(Message.event("OriginateResponse", headers))
        return out

    # -- actions answered here ----------------------------------------------------------------------

    def _local(self, action: str, message: Message) -> Effect:
        action_id = message.action_id
        if action == "login":
            return self._login(message)
        if action == "challenge":
            if (message.effective("AuthType") or "").lower() != "md5":
                return self._reply(_error(action_id, "Must specify AuthType"))
            if self.challenge is None:
                self.challenge = str(secrets.randbelow(2**31))
            return self._reply(_response("Success", action_id, [("Challenge", self.challenge)]))
        if action == "logoff":
            self._stop_reading = True
            return self._reply(
                _response("Goodbye", action_id, [("Message", "Thanks for all the fish.")]), close=True
            )
        if action == "events":
            text = message.effective("EventMask") or ""
            if not text.strip():
                return self._reply(_error(action_id, "Invalid event mask"))
            self.mask = parse_event_mask(text)
            on = self.mask.all or bool(self.mask.classes)
            return self._reply(_response("Success", action_id, [("Events", "On" if on else "Off")]))
        if action == "filter":
            return self._filter(message)
        return self._wait_event(message)

    def _login(self, message: Message) -> Effect:
        action_id = message.action_id
        if self.user is not None:
            return self._reply(_response("Success", action_id, [("Message", "Already authenticated")]))
        username = message.effective("Username") or ""
        now = asyncio.get_running_loop().time()
        keys = throttle_keys(self.peer_host, username)
        throttle = self.gate.throttle
        wait = throttle.delay(keys, now)
        if wait is not None:
            # Too many failures: refused without looking at the secret, so that guesses are worthless.
            throttle.failure(keys, now)
            log.warning(
                "AMI login refused unchecked: too many failed logins",
                extra={"fields": {"peer": self.peer, "username": username[:64], "delay_s": wait}},
            )
            self._stop_reading = True
            return self._reply(_error(action_id, "Authentication failed"), close=True, delay=wait)
        user = self.gate.user(username)
        # Compare even for an unknown user, so that timing does not tell which names exist.
        secret = user.secret if user is not None else "\x00" * 24
        if (message.effective("AuthType") or "").lower() == "md5":
            key = message.effective("Key") or ""
            expected = md5_challenge_key(self.challenge or "", secret)
            good = bool(self.challenge) and hmac.compare_digest(expected.encode(), key.encode())
        else:
            good = hmac.compare_digest(secret.encode(), (message.effective("Secret") or "").encode())
        if user is None or not good:
            throttle.failure(keys, now)
            log.warning("AMI login failed", extra={"fields": {"peer": self.peer, "username": username[:64]}})
            self._stop_reading = True
            # Asterisk waits a second before answering a failed login, then hangs up.
            return self._reply(
                _error(action_id, "Authentication failed"), close=True, delay=self.gate.auth_failure_delay
            )
        throttle.success(username)
        self.user = user
        self.allowed = frozenset(a.lower() for a in user.allowed_actions) | _PRE_LOGIN
        self.mask = parse_event_mask(message.effective("Events") or "")
        log.info(
            "AMI client logged in",
            extra={"fields": {"session": self.id, "user": user.username, "peer": self.peer}},
        )

        async def accepted() -> None:
            self.reply(_response("Success", action_id, [("Message", "Authentication accepted")]))
            if self.mask.allows("system") and self.gate.link.ready:
                self.reply(self.gate.link.fully_booted_event())
            self.gate.listen(self)

        return accepted

    def _filter(self, message: Message) -> Effect:
        action_id = message.action_id
        if (message.effective("Operation") or "").lower() != "add":
            return self._reply(_error(action_id, "Unknown operation"))
        if message.effective("MatchCriteria"):
            return self._reply(_error(action_id, "pbxguard: Filter with MatchCriteria is not supported"))
        text = message.effective("Filter") or ""
        exclude = text.startswith("!")
        compiled = _compile_filter(text[1:] if exclude else text)
        if isinstance(compiled, str):
            return self._reply(_error(action_id, compiled))
        (self.exclude if exclude else self.include).append(compiled)
        return self._reply(_response("Success", action_id, [("Message", "Success")]))

    def _wait_event(self, message: Message) -> Effect:
        # Answered here: on pbxguard's shared connection Asterisk's WaitEvent would hold every other
        # client's actions. Events are pushed to TCP clients anyway; this only waits for the next one.
        action_id = message.action_id
        timeout_s = _leading_int(message.effective("Timeout")) if message.effective("Timeout") else -1
        start = self._activity

        async def wait() -> None:
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s < 0 else loop.time() + timeout_s
            while self._activity == start and not self.closed:
                self._activity_event.clear()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._activity_event.wait(), remaining)
            self.send(_response("Success", action_id, [("Message", "Waiting for Event completed.")]))
            self.send(Message.event("WaitEventComplete", [("ActionID", action_id)] if action_id else []))

        async def effect() -> None:
            task = asyncio.create_task(wait())
            self._waiters.add(task)
            task.add_done_callback(self._waiters.discard)

        return effect

    # -- forwarding -------------------------------------------------------------------------------

    def _forward(
        self,
        message: Message,
        *,
        decision: Decision | None = None,
        sync_originate: bool = False,
        timeout_s: float = 60.0,
        on_fail: Callable[[], None] | None = None,
        failure: Callable[[str], list[Message]] | None = None,
    ) -> Effect:
        gate = self.gate
        action_id = message.action_id
        _, name = message.kind

        def fail(text: str) -> None:
            if on_fail is not None:
                on_fail()
            for reply in failure(text) if failure is not None else [_error(action_id, text)]:
                self.reply(reply)

        async def effect() -> None:
            if not gate.link.ready:
                fail(NOT_CONNECTED)
                return
            if self.pending >= gate.max_pending:
                fail("pbxguard: too many actions waiting for Asterisk")
                return
            upstream_id = gate.router.new_id(self.id)
            out = message.replace("ActionID", upstream_id)
            if len(out.headers) > MAX_HEADERS:
                fail("Too many lines in message or allocation failure")
                return
            try:
                data = encode(out)
            except AmiProtocolError as exc:
                fail(f"pbxguard: {exc}")
                return
            loop = asyncio.get_running_loop()
            pending = Pending(
                upstream_id=upstream_id,
                owner=self,
                client_id=action_id,
                action=name.lower(),
                deadline=loop.time() + timeout_s,
                decision_id=decision.id if decision else None,
                awaits_event=decision is not None or name.lower() == "originate",
                sync_originate=sync_originate,
            )
            gate.router.add(pending)
            if decision is not None:
                gate.monitor.expect(upstream_id, decision.id)
            if not gate.link.send_bytes(data):
                gate.router.discard(pending)
                gate.monitor.cancel(upstream_id)
                fail(NOT_CONNECTED)
                return
            # Only once written: replies pbxguard makes wait behind it, and a pending that was never
            # sent is never answered (tests/faults/test_fault_asterisk.py).
            self._last_forward = pending
            self.pending += 1
            await gate.link.drain()

        return effect

    def _originate(self, message: Message) -> Step:
        assert self.user is not None
        action_id = message.action_id
        request = inspect_originate(message, self.gate.rules, default_campaign=self.user.campaign)
        if isinstance(request, OriginateRefusal):
            return self._reply(*self._originate_failure(message, request.message))
        sync = request.is_async is False
        timeout_s = request.timeout_ms / 1000 + 60
        if not request.needs_decision:
            # An internal phone that dials no one outside: nothing for the guard to decide.
            return self._forward(
                message.replace("Async", "true") if sync else message,
                sync_originate=sync,
                timeout_s=timeout_s,
                failure=lambda text: self._originate_failure(message, text),
            )
        if not self.gate.link.ready:
            return self._reply(*self._originate_failure(message, NOT_CONNECTED))
        self._originates += 1
        # A reused ActionID is a new call (Asterisk would dial it again), hence the sequence number.
        call_key = f"{self.id}/{self._originates}:{action_id or '-'}"
        return asyncio.create_task(self._decide(message, request, call_key))

    async def _decide(self, message: Message, request: OriginateRequest, call_key: str) -> Effect:
        gate = self.gate
        attempt = CallAttempt(
            number=request.number or f"unparsed:{request.dial_string}",
            campaign_id=request.campaign,
            caller_id=request.caller_id,
            gate="ami",
            call_key=call_key,
        )
        try:
            # A timeout scope, not wait_for, which on Python 3.11 wraps the decision in a task of its own.
            async with asyncio.timeout(gate.guard.timeout + 2):
                decision = await gate.guard.decide(attempt, gate.clock())
        except Exception:
            log.exception("decision failed: blocking the Originate")
            text = f"Originate blocked by pbxguard: {Reason.STORE_UNAVAILABLE}"
            return self._reply(*self._originate_failure(message, text))
        fields = {
            "session": self.id,
            "user": self.username,
            "decision": decision.id,
            "number": mask_number(request.number or request.dial_string),
            "campaign": request.campaign,
            "verdict": decision.verdict.value,
            "reasons": ",".join(decision.reasons),
        }
        if not decision.permits_call:
            log.info("Originate blocked", extra={"fields": fields})
            return self._reply(*self._originate_failure(message, blocked_message(decision)))
        if not decision.allowed:
            log.warning(
                "shadow mode: Originate forwarded that enforce mode would block", extra={"fields": fields}
            )
        else:
            log.info("Originate allowed", extra={"fields": fields})
        out = with_token(message, decision.id, request.campaign)
        sync = not request.is_async
        if sync:
            out = out.replace("Async", "true")
        return self._forward(
            out,
            decision=decision,
            sync_originate=sync,
            timeout_s=request.timeout_ms / 1000 + 60,
            on_fail=lambda: gate.monitor.not_sent(decision.id),
            failure=lambda text: self._originate_failure(message, text),
        )


def with_token(message: Message, decision_id: str, campaign: str) -> Message:
    """The Originate with pbxguard's variables right after its Action header (Asterisk applies the
    Variable headers last to first, so the first assignment of a name is the one that stays)."""
    ours = (
        ("Variable", f"__PBXGUARD_TOKEN={decision_id}"),
        ("Variable", f"__PBXGUARD_CAMPAIGN={escape_app_arg(campaign)}"),
    )
    headers = list(message.headers)
    at = next((i + 1 for i, (k, v) in enumerate(headers) if k.lower() == "action" and v.strip()), 0)
    headers[at:at] = ours
    return Message(tuple(headers))


def blocked_message(decision: Decision) -> str:
    text = "Originate blocked by pbxguard: " + ",".join(decision.reasons)
    when = decision.next_allowed_at
    if when is not None:
        if decision.zones:
            with contextlib.suppress(Exception):
                when = when.astimezone(ZoneInfo(decision.zones[0]))
        text += f" (next allowed {when.isoformat(timespec='seconds')})"
    return text


# -- the gate -----------------------------------------------------------------------------------------


class AmiGate:
    """The AMI proxy: ``start()``, ``stop()``, ``ready()`` (upstream logged in and booted)."""

    def __init__(
        self,
        config: Config,
        guard: Guard,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        listen: tuple[str, int] | None = None,
        auth_failure_delay: float = 1.0,
        reconnect_min: float = 0.2,
        reconnect_max: float = 5.0,
        boot_grace: float = 2.0,
        keepalive: float = 10.0,
    ) -> None:
        settings = config.gates.ami
        self.config = config
        self.guard = guard
        self.clock = clock
        self.listen_at = listen or parse_listen("gates.ami.listen", settings.listen)
        self.rules = DialRules.build(
            settings.dial_patterns,
            builtin_patterns=settings.builtin_dial_patterns,
            strip_prefixes=settings.strip_prefixes,
            international_prefix=settings.international_prefix,
            internal_channels=settings.internal_channels,
        )
        self.max_clients = settings.max_clients
        self.login_timeout = settings.login_timeout_ms / 1000
        self.client_buffer_bytes = settings.client_buffer_bytes
        self.max_pending = settings.max_pending_actions
        self.auth_failure_delay = auth_failure_delay
        self.throttle = LoginThrottle(
            threshold=settings.max_login_failures,
            window=settings.login_failure_window_ms / 1000,
            base=auth_failure_delay,
            cap=settings.login_backoff_max_ms / 1000,
        )
        self.ssl = server_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
        self._users = {u.username.lower(): u for u in settings.users}
        self.router = ActionRouter()
        self.monitor = Monitor(guard, clock=clock)
        upstream = config.asterisk.ami
        self.link = UpstreamLink(
            upstream.host,
            upstream.port,
            upstream.username,
            upstream.secret,
            on_message=self._upstream_message,
            on_state=self._upstream_state,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            boot_grace=boot_grace,
            keepalive=keepalive,
        )
        self.sessions: set[ClientSession] = set()
        self._listeners: set[ClientSession] = set()  # logged in: receive events
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._boot = secrets.token_hex(3)  # session ids (and call keys) never repeat across restarts
        self._session_ids = itertools.count(1)

    # -- daemon interface -------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.link.ready

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            return self.listen_at
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        host, port = self.listen_at
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            tls = {"ssl": self.ssl, "ssl_handshake_timeout": min(self.login_timeout, 60.0)}
        self._server = await asyncio.start_server(self._accept, host, port, backlog=512, **tls)
        await self.monitor.start()
        await self.link.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="ami-sweeper")
        log.info(
            "AMI gate listening",
            extra={"fields": {"listen": f"{host}:{self.address[1]}", "tls": self.ssl is not None}},
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for session in list(self.sessions):
            session.abort()
        # Cut connections end their sessions by themselves (a decision in progress finishes within
        # the guard's timeout); cancelling the server's connection tasks would make asyncio log them.
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.guard.timeout + 1)
            for task in late:
                task.cancel()
        await self.link.stop()
        await self.monitor.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    # -- helpers for sessions ---------------------------------------------------------------------

    def user(self, username: str) -> AmiUserConfig | None:
        # Asterisk looks manager users up case-insensitively.
        return self._users.get(username.lower()) if username else None

    def listen(self, session: ClientSession) -> None:
        if not session.closed:
            self._listeners.add(session)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self.sessions) >= self.max_clients and not self._displace_one():
            log.warning("AMI client refused: %d connections already", len(self.sessions))
            writer.write(encode(_error(None, "pbxguard: too many connections")))
            writer.close()
            return
        session = ClientSession(self, reader, writer, f"{self._boot}-{next(self._session_ids)}")
        self.sessions.add(session)
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self._listeners.discard(session)
            self.router.detach(session)
            if task is not None:
                self._tasks.discard(task)

    def _displace_one(self) -> bool:
        """Closes the oldest connection still not logged in after DISPLACE_AFTER; False if none."""
        now = asyncio.get_running_loop().time()
        idle = [s for s in self.sessions if s.user is None and now - s.opened >= DISPLACE_AFTER]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.opened)
        log.info(
            "AMI client displaced: not logged in and the gate is full",
            extra={"fields": {"peer": victim.peer, "idle_s": round(now - victim.opened, 1)}},
        )
        victim.abort()
        self.sessions.discard(victim)
        return True

    # -- upstream ---------------------------------------------------------------------------------

    def _upstream_message(self, message: Message) -> None:
        self.monitor.observe(message)
        route = self.router.route(message)
        if route is None:
            return
        pending = route.pending
        owner = pending.owner if pending is not None else None
        if route.to_owner is not None and owner is not None:
            owner.send(route.to_owner)
        if route.broadcast is not None:
            self._broadcast(route.broadcast)
        if owner is not None and pending is not None:
            if route.finished:
                owner.pending -= 1
            if pending.answered and pending.after:
                owner.flush_after(pending)

    def _broadcast(self, event: Message) -> None:
        classes: frozenset[str] | None = None  # worked out once some session wants events at all
        data: bytes | None = None
        text: str | None = None
        for session in self._listeners:
            mask = session.mask
            if not mask.all and not mask.classes:  # Events: off, the usual dialer
                continue
            if classes is None:
                classes = event_classes(event)
            if not mask.allows_any(classes):
                continue
            if data is None:
                try:
                    data = encode(event)
                except AmiProtocolError as exc:
                    log.warning("cannot relay an Asterisk event: %s", exc)
                    return
            if session.has_filters:
                if text is None:
                    text = data.decode("utf-8", "replace")
                if not session.passes_filters(text):
                    continue
            session.deliver_event(data)

    def _upstream_state(self, up: bool) -> None:
        if up:
            return
        for pending in self.router.fail_all():
            self._abandon(pending, LINK_LOST)
        self.monitor.link_lost()

    def _abandon(self, pending: Pending, text: str) -> None:
        owner = pending.owner
        if owner is None:
            return
        owner.pending -= 1
        # An async Originate already answered "queued" gets no invented OriginateResponse: the call
        # may well be up in Asterisk.
        if pending.state in ("response", "list") or pending.sync_originate:
            owner.send(_error(pending.client_id, text))
        owner.flush_after(pending)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            for pending in self.router.expire(loop.time()):
                if pending.decision_id is not None:
                    self.monitor.cancel(pending.upstream_id)
                self._abandon(pending, NO_RESPONSE)
