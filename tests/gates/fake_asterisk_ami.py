"""A scripted fake of Asterisk's AMI server, and a small AMI test client.

The fake speaks what ../shared/ASTERISK-NOTES.md and main/manager.c describe: the banner, Challenge
(MD5) and Login, "Permission denied" before login, Ping, Events, Logoff, an async Originate answered
"Originate successfully queued" and followed by the call's events and an OriginateResponse (sent to
every session reading "call"), list responses (CoreShowChannels: Response with EventList: start,
events with the ActionID, a ...Complete event with EventList: Complete), UserEvent (echoing the
action's headers, ActionID included), "Invalid/unknown command" for the rest. It can be killed
(connections cut, port closed) and started again on the same port, and it counts every Originate it
ever received.

The call script of an Originate depends on its Channel: "fail" in it gives an OriginateResponse
Failure with Reason 0 and Uniqueid <unknown> (no channel created); "busy" a channel hung up with
cause 17 then a Failure with Reason 5; anything else a channel that answers (Newstate Up, Success)
and hangs up with cause 16 after ``talk_time`` seconds. ``auto_calls = False`` keeps it silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pbxguard.protocols.ami import (
    BANNER,
    EVENTS_ALL,
    AmiParser,
    Banner,
    EventMask,
    Message,
    encode,
    event_classes,
    md5_challenge_key,
    parse_event_mask,
)


@dataclass(eq=False)
class FakeSession:
    writer: asyncio.StreamWriter
    authenticated: bool = False
    mask: EventMask = EVENTS_ALL
    challenge: str = ""
    username: str = ""

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


def _resp(value: str, action_id: str | None, *headers: tuple[str, str]) -> Message:
    items = [("Response", value)]
    if action_id:
        items.append(("ActionID", action_id))
    items.extend(headers)
    return Message(tuple(items))


@dataclass
class FakeAsterisk:
    username: str = "pbxguard"
    secret: str = "upstream-secret"
    host: str = "127.0.0.1"
    port: int = 0
    auto_calls: bool = True
    talk_time: float = 0.05
    # With timestamps (manager.conf timestampevents = yes) the call's events carry Asterisk's clock:
    # answered 2 s after the Originate, hung up talk_seconds later, without waiting that long.
    timestamps: bool = False
    talk_seconds: float = 42.0
    send_fully_booted: bool = True
    held_actions: set[str] = field(default_factory=set)  # lower-case names answered only on release()
    sessions: set[FakeSession] = field(default_factory=set)
    actions: list[Message] = field(default_factory=list)  # every action received, all connections
    originates: list[Message] = field(default_factory=list)
    logins: int = 0
    _server: asyncio.Server | None = None
    _held: list[tuple[FakeSession, Message]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _uniqueids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def kill(self) -> None:
        """Asterisk dies: the port closes and every connection is cut."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for session in list(self.sessions):
            session.writer.transport.abort()
        self.sessions.clear()
        for task in list(self._tasks) + list(self._handlers):
            task.cancel()
        for task in list(self._tasks) + list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    stop = kill

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    # -- waiting --------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def release(self) -> None:
        """Answers the held actions, in the order they came (an Asterisk that was slow)."""
        held, self._held = self._held, []
        for session, message in held:
            self._answer(session, message)

    def actions_named(self, name: str) -> list[Message]:
        return [a for a in self.actions if a.kind[1].lower() == name.lower()]

    # -- events ---------------------------------------------------------------------------------

    def emit(self, event: Message) -> None:
        classes = event_classes(event)
        for session in list(self.sessions):
            if session.authenticated and session.mask.allows_any(classes):
                session.send(event)

    # -- the protocol ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # type: ignore[arg-type]
        session = FakeSession(writer)
        self.sessions.add(session)
        parser = AmiParser()
        writer.write(BANNER)
        try:
            while data := await reader.read(65536):
                for item in parser.feed(data):
                    if isinstance(item, Banner):
                        continue
                    if not self._action(session, item):
                        writer.close()
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            self.sessions.discard(session)
            self._handlers.discard(task)  # type: ignore[arg-type]
            writer.close()

    def _action(self, s: FakeSession, m: Message) -> bool:
        kind, name = m.kind
        action = name.lower()
        aid = m.action_id
        if kind != "action" or not action:
            s.send(_resp("Error", aid, ("Message", "Missing action in request")))
            return True
        self.actions.append(m)
        self._notify()
        if action in self.held_actions and s.authenticated:
            self._held.append((s, m))
            return True
        return self._answer(s, m)

    def _answer(self, s: FakeSession, m: Message) -> bool:
        _, name = m.kind
        action = name.lower()
        aid = m.action_id
        if not s.authenticated and action not in ("login", "challenge", "logoff"):
            s.send(_resp("Error", aid, ("Message", "Permission denied")))
            return True
        if action == "challenge":
            if (m.effective("AuthType") or "").lower() != "md5":
                s.send(_resp("Error", aid, ("Message", "Must specify AuthType")))
                return True
            s.challenge = s.challenge or "1234567890"
            s.send(_resp("Success", aid, ("Challenge", s.challenge)))
            return True
        if action == "login":
            return self._login(s, m)
        if action == "logoff":
            s.send(_resp("Goodbye", aid, ("Message", "Thanks for all the fish.")))
            return False
        if action == "ping":
            s.send(_resp("Success", aid, ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}")))
            return True
        if action == "events":
            s.mask = parse_event_mask(m.effective("EventMask") or "off")
            s.send(_resp("Success", aid, ("Events", "On" if s.mask.all or s.mask.classes else "Off")))
            return True
        if action == "originate":
            self.originates.append(m)
            self._notify()
            self._originate(s, m)
            return True
        if action == "coreshowchannels":
            s.send(_resp("Success", aid, ("EventList", "start"), ("Message", "Channels will follow")))
            for n in range(3):
                s.send(
                    Message.event(
                        "CoreShowChannel", [("ActionID", aid or ""), ("Channel", f"Local/{n}@x-1;1")]
                    )
                )
            s.send(
                Message.event(
                    "CoreShowChannelsComplete",
                    [("ActionID", aid or ""), ("EventList", "Complete"), ("ListItems", "3")],
                )
            )
            return True
        if action == "userevent":
            s.send(_resp("Success", aid, ("Message", "Event Sent")))
            body = [(k, v) for k, v in m.headers if k.lower() not in ("action", "userevent")]
            self.emit(
                Message.event(
                    "UserEvent",
                    [("Privilege", "user,all"), ("UserEvent", m.effective("UserEvent") or ""), *body],
                )
            )
            return True
        if action == "command":
            s.send(_resp("Success", aid, ("Output", "the fake ran a CLI command")))
            return True
        s.send(
            _resp(
                "Error",
                aid,
                (
                    "Message",
                    f"Invalid/unknown command: {name}. Use Action: ListCommands to show available commands.",
                ),
            )
        )
        return True

    def _login(self, s: FakeSession, m: Message) -> bool:
        aid = m.action_id
        if (m.effective("AuthType") or "").lower() == "md5":
            good = bool(s.challenge) and m.effective("Key") == md5_challenge_key(s.challenge, self.secret)
        else:
            good = m.effective("Secret") == self.secret
        if m.effective("Username") != self.username or not good:
            s.send(_resp("Error", aid, ("Message", "Authentication failed")))
            return False
        s.authenticated = True
        s.username = self.username
        s.mask = parse_event_mask(m.effective("Events") or "")
        self.logins += 1
        self._notify()
        s.send(_resp("Success", aid, ("Message", "Authentication accepted")))
        if self.send_fully_booted and s.mask.allows("system"):
            s.send(
                Message.event(
                    "FullyBooted", Privilege="system,all", Uptime="12", LastReload="12", Status="Fully Booted"
                )
            )
        return True

    def _originate(self, s: FakeSession, m: Message) -> None:
        aid = m.action_id
        is_async = (m.effective("Async") or "").lower() in ("true", "yes", "1", "on", "y", "t")
        if is_async:
            s.send(_resp("Success", aid, ("Message", "Originate successfully queued")))
        if not self.auto_calls:
            return
        task = asyncio.create_task(self._call(s, m, is_async))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, s: FakeSession, m: Message, is_async: bool) -> None:
        aid = m.action_id
        channel = m.effective("Channel") or ""
        uniqueid = f"1700000000.{next(self._uniqueids)}"
        idh = [("ActionID", aid)] if aid else []
        tail = [("Context", m.effective("Context") or ""), ("Exten", m.effective("Exten") or "")]
        cid = [("CallerIDNum", "<unknown>"), ("CallerIDName", "<unknown>")]
        t0 = time.time()

        def at(offset: float) -> list[tuple[str, str]]:
            return [("Timestamp", f"{t0 + offset:.6f}")] if self.timestamps else []

        await asyncio.sleep(0)
        if "fail" in channel:
            result = [
                ("Response", "Failure"),
                ("Channel", channel),
                *tail,
                ("Reason", "0"),
                ("Uniqueid", "<unknown>"),
                *cid,
            ]
            if is_async:
                self.emit(Message.event("OriginateResponse", [("Privilege", "call,all"), *idh, *result]))
            else:
                s.send(_resp("Error", aid, ("Message", "Originate failed")))
            return
        name = f"{channel}-00000001"
        chan = [("Channel", name), ("Uniqueid", uniqueid), ("Linkedid", uniqueid)]
        self.emit(
            Message.event("Newchannel", [("Privilege", "call,all"), *chan, ("CallerIDNum", "<unknown>")])
        )
        for value in m.get_all("Variable"):
            var, _, val = value.partition("=")
            self.emit(
                Message.event(
                    "VarSet", [("Privilege", "dialplan,all"), *chan, ("Variable", var), ("Value", val)]
                )
            )
        if "busy" in channel:
            self.emit(
                Message.event(
                    "Hangup", [("Privilege", "call,all"), *chan, ("Cause", "17"), ("Cause-txt", "User busy")]
                )
            )
            result = [
                ("Response", "Failure"),
                ("Channel", channel),
                *tail,
                ("Reason", "5"),
                ("Uniqueid", "<unknown>"),
                *cid,
            ]
            if is_async:
                self.emit(Message.event("OriginateResponse", [("Privilege", "call,all"), *idh, *result]))
            else:
                s.send(_resp("Error", aid, ("Message", "Originate failed")))
            return
        up = [("ChannelState", "6"), ("ChannelStateDesc", "Up"), *at(2)]
        self.emit(Message.event("Newstate", [("Privilege", "call,all"), *chan, *up]))
        if is_async:
            result = [
                ("Response", "Success"),
                ("Channel", name),
                *tail,
                ("Reason", "4"),
                ("Uniqueid", uniqueid),
                *cid,
            ]
            self.emit(Message.event("OriginateResponse", [("Privilege", "call,all"), *at(2), *idh, *result]))
        else:
            s.send(_resp("Success", aid, ("Message", "Originate successfully queued")))
        await asyncio.sleep(self.talk_time)
        cause = [("Cause", "16"), ("Cause-txt", "Normal Clearing"), *at(2 + self.talk_seconds)]
        self.emit(Message.event("Hangup", [("Privilege", "call,all"), *chan, *cause]))


class AmiTestClient:
    """An AMI client for tests: raw access to everything the server sends, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = AmiParser(expect_banner=True)
        self.banner: Banner | None = None
        self.messages: list[Message] = []
        self.closed = False
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int) -> AmiTestClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        return cls(reader, writer)

    @classmethod
    async def login(
        cls, host: str, port: int, username: str, secret: str, events: str = "on"
    ) -> AmiTestClient:
        client = await cls.connect(host, port)
        response = await client.action("Login", Username=username, Secret=secret, Events=events)
        assert response.get("Response") == "Success", response
        return client

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for item in self.parser.feed(data):
                    if isinstance(item, Banner):
                        self.banner = item
                    else:
                        self.messages.append(item)
                    self._changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._changed.set()

    def send(self, message: Message) -> None:
        self.writer.write(encode(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def new_id(self) -> str:
        return f"t{next(self._ids)}"

    async def wait_for(
        self, predicate: Callable[[list[Message]], bool], within: float = 5.0
    ) -> list[Message]:
        async with asyncio.timeout(within):
            while not predicate(self.messages):
                if self.closed:
                    raise ConnectionError("connection closed")
                self._changed.clear()
                await self._changed.wait()
        return self.messages

    async def wait_closed(self, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not self.closed:
                self._changed.clear()
                await self._changed.wait()

    def responses(self, action_id: str | None) -> list[Message]:
        return [m for m in self.messages if m.kind[0] == "response" and m.action_id == action_id]

    def events(self, name: str) -> list[Message]:
        return [m for m in self.messages if m.kind == ("event", name)]

    async def response(self, action_id: str, within: float = 5.0) -> Message:
        await self.wait_for(lambda _: bool(self.responses(action_id)), within)
        return self.responses(action_id)[0]

    async def action(
        self, name: str, headers: list[tuple[str, str]] | None = None, /, within: float = 5.0, **kw: str
    ) -> Message:
        action_id = kw.pop("ActionID", None) or self.new_id()
        self.send(Message.action(name, [("ActionID", action_id), *(headers or [])], **kw))
        return await self.response(action_id, within)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
