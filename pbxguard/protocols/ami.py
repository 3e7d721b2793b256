"""Sans-IO codec for the Asterisk Manager Interface (AMI).

Bytes go in (:meth:`AmiParser.feed`), frozen :class:`Message` / :class:`Banner` objects come out;
:func:`encode` turns a :class:`Message` back into bytes. No asyncio, no sockets, no clock: the asyncio
adapters own the transport.

Wire format (``main/manager.c`` in Asterisk): ``Key: Value`` lines ended by ``\\r\\n`` (Asterisk also
accepts a bare ``\\n``), a message ends with an empty line, keys may repeat (``Variable:`` in
Originate, ``ChanVariable`` in events). The server greets a client with one banner line,
``Asterisk Call Manager/<AMI version>``.

How Asterisk itself reads a header matters to a gate that must see what Asterisk will execute, so
the lookups that decide (:attr:`Message.kind`, :attr:`Message.action_id`, :meth:`Message.effective`)
mirror ``__astman_get_header``: ASCII case-insensitive key, first match, leading bytes <= 0x20
skipped; the action name is the first *non-empty* ``Action`` header wherever it sits in the message.
The raw values (:attr:`Message.headers`, :meth:`Message.get`) are kept exactly as received, minus the
single space after the colon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, TypeAlias

__all__ = [
    "BANNER",
    "EVENTS_ALL",
    "EVENTS_NONE",
    "EVENT_CLASSES",
    "AmiParser",
    "AmiProtocolError",
    "Banner",
    "EventMask",
    "Message",
    "MessageKind",
    "encode",
    "event_class",
    "event_classes",
    "md5_challenge_key",
    "parse_callerid",
    "parse_event_mask",
]

BANNER: Final = b"Asterisk Call Manager/11.0.0\r\n"

MessageKind: TypeAlias = Literal["action", "response", "event", "unknown"]
HeaderPairs: TypeAlias = Iterable[tuple[str, str]] | Mapping[str, str]


class AmiProtocolError(Exception):
    """Bad AMI input (or a message that cannot be encoded safely). The only exception of this codec."""


def _fold(key: str) -> str:
    # Asterisk compares header names with strncasecmp: ASCII-only case folding. str.lower() on
    # non-ASCII text can produce ASCII letters (KELVIN SIGN -> "k"), which Asterisk would not match.
    return key.lower() if key.isascii() else key


_BLANKS: Final = "".join(map(chr, range(33)))


def _skip_blanks(value: str) -> str:
    # ast_skip_blanks(): skips every byte < 33 (space, tab, CR, other control characters).
    return value.lstrip(_BLANKS)


def _pairs(headers: HeaderPairs, kw: Mapping[str, str]) -> list[tuple[str, str]]:
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    items.extend(kw.items())
    return items


@dataclass(frozen=True, slots=True)
class Message:
    """One AMI message: its headers in wire order, repeated keys kept, keys exactly as received."""

    headers: tuple[tuple[str, str], ...]

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def action(cls, name: str, headers: HeaderPairs = (), /, **kw: str) -> Message:
        """``Message.action("Originate", [("Variable", "A=1"), ("Variable", "B=2")], Channel="...")``."""
        return cls((("Action", name), *_pairs(headers, kw)))

    @classmethod
    def response(cls, value: str, headers: HeaderPairs = (), /, **kw: str) -> Message:
        return cls((("Response", value), *_pairs(headers, kw)))

    @classmethod
    def event(cls, name: str, headers: HeaderPairs = (), /, **kw: str) -> Message:
        return cls((("Event", name), *_pairs(headers, kw)))

    # -- lookups ------------------------------------------------------------------------------------

    def get(self, key: str, default: str | None = None) -> str | None:
        """First value of ``key`` (ASCII case-insensitive), as received; ``default`` when absent."""
        k = _fold(key)
        size = len(k)
        for hk, hv in self.headers:
            # Folding keeps an ASCII key's length, and a non-ASCII key is compared as it is: only a
            # key of the same length can match, which spares folding nearly every other one.
            if len(hk) == size and (hk == key or _fold(hk) == k):
                return hv
        return default

    def get_all(self, key: str) -> list[str]:
        """Every value of ``key`` (ASCII case-insensitive), in wire order."""
        k = _fold(key)
        size = len(k)
        return [hv for hk, hv in self.headers if len(hk) == size and (hk == key or _fold(hk) == k)]

    def effective(self, key: str) -> str | None:
        """The value Asterisk's ``astman_get_header`` sees: first match, leading blanks skipped.

        Use this (not :meth:`get`) for any decision about what Asterisk will do with the message:
        ``Application:  System`` runs ``System`` even though the raw value is `` System``.
        """
        value = self.get(key)
        return None if value is None else _skip_blanks(value)

    @property
    def kind(self) -> tuple[MessageKind, str]:
        """``("action", name)``, ``("response", value)``, ``("event", name)`` or ``("unknown", "")``.

        An ``Action`` header wins wherever it sits: Asterisk executes ``Response: x`` /
        ``Action: Originate`` as an Originate, so a gate must classify it as one. As in Asterisk, empty
        ``Action`` values are skipped and leading blanks dropped; a message whose ``Action`` headers are
        all empty is ``("action", "")`` (Asterisk answers "Missing action in request"). Otherwise the
        first ``Response`` or ``Event`` header decides.

        This is the right reading of what a client sends. For what Asterisk sends use
        :attr:`server_kind`: a dialplan ``UserEvent(name,Action: x)`` (possibly fed with caller-supplied
        text) produces an event that carries an ``Action`` header.
        """
        saw_action = False
        first: tuple[MessageKind, str] | None = None
        for hk, hv in self.headers:
            k = _fold(hk)
            if k == "action":
                name = _skip_blanks(hv)
                if name:
                    return ("action", name)
                saw_action = True
            elif first is None:
                if k == "response":
                    first = ("response", _skip_blanks(hv))
                elif k == "event":
                    first = ("event", _skip_blanks(hv))
        if saw_action:
            return ("action", "")
        return first if first is not None else ("unknown", "")

    @property
    def server_kind(self) -> tuple[MessageKind, str]:
        """``("response", value)`` or ``("event", name)`` from the first header, which is where Asterisk
        always puts them; ``("unknown", "")`` otherwise. Never ``"action"``."""
        if self.headers:
            hk, hv = self.headers[0]
            k = _fold(hk)
            if k == "response":
                return ("response", _skip_blanks(hv))
            if k == "event":
                return ("event", _skip_blanks(hv))
        return ("unknown", "")

    @property
    def action_id(self) -> str | None:
        """The ``ActionID`` as Asterisk reads and echoes it; ``None`` when absent or blank."""
        value = self.effective("ActionID")
        return value or None

    # -- functional updates -------------------------------------------------------------------------

    def with_header(self, key: str, value: str) -> Message:
        """A copy with ``key: value`` appended."""
        return Message((*self.headers, (key, value)))

    def replace(self, key: str, value: str) -> Message:
        """A copy where every ``key`` header is replaced by one ``key: value`` at the place of the first
        (keeping the original spelling of the key); appended when ``key`` is absent."""
        k = _fold(key)
        size = len(k)
        out: list[tuple[str, str]] = []
        done = False
        for hk, hv in self.headers:
            if len(hk) == size and (hk == key or _fold(hk) == k):
                if not done:
                    out.append((hk, value))
                    done = True
            else:
                out.append((hk, hv))
        if not done:
            out.append((key, value))
        return Message(tuple(out))

    def without(self, key: str) -> Message:
        """A copy without any ``key`` header."""
        k = _fold(key)
        size = len(k)
        return Message(
            tuple((hk, hv) for hk, hv in self.headers if len(hk) != size or (hk != key and _fold(hk) != k))
        )


@dataclass(frozen=True, slots=True)
class Banner:
    """The greeting line a server sends first, e.g. ``Asterisk Call Manager/11.0.0``."""

    text: str

    @property
    def version(self) -> str | None:
        """``"11.0.0"`` for ``Asterisk Call Manager/11.0.0``; ``None`` when it is not an AMI banner."""
        prefix, sep, version = self.text.rpartition("/")
        if not sep or not prefix.startswith("Asterisk Call Manager"):
            return None
        return version


# -- encoding ---------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """``Key: Value\\r\\n`` lines, then ``\\r\\n``.

    Refuses (AmiProtocolError) CR, LF or NUL in keys or values, ``:`` in keys, an empty message and
    text that is not encodable as UTF-8 (lone surrogates): a value such as ``"x\\r\\nAction: Command"``
    must never reach the wire as a second header, and Asterisk cuts a line at NUL.
    """
    headers = message.headers
    if not headers:
        raise AmiProtocolError("cannot encode an empty message")
    text = "".join([f"{k}: {v}\r\n" for k, v in headers]) + "\r\n"
    n = len(headers) + 1
    # Fast path: exactly one CR and one LF per line, no NUL, no colon in any key.
    if text.count("\n") != n or text.count("\r") != n or "\x00" in text:
        _raise_bad_header(headers)
    for k, _ in headers:
        if ":" in k:
            raise AmiProtocolError(f"header key contains ':': {k!r}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AmiProtocolError(f"message is not encodable as UTF-8: {exc.reason}") from None


def _raise_bad_header(headers: tuple[tuple[str, str], ...]) -> NoReturn:
    for k, v in headers:
        for what, s in (("key", k), ("value", v)):
            if "\r" in s or "\n" in s or "\x00" in s:
                raise AmiProtocolError(f"header {what} contains CR, LF or NUL: {k!r}: {v!r}")
    raise AmiProtocolError("message contains CR, LF or NUL")  # pragma: no cover - unreachable


# -- parsing ----------------------------------------------------------------------------------------


class AmiParser:
    """Incremental AMI parser: ``feed(bytes) -> [Message | Banner]``.

    A message or a UTF-8 character may be split anywhere across feeds: only complete lines are
    decoded (a ``\\n`` byte never occurs inside a UTF-8 sequence), invalid UTF-8 becomes U+FFFD.
    ``\\r\\n`` and bare ``\\n`` both end a line; a lone CR elsewhere stays in the value (as in Asterisk).
    Empty lines between messages are ignored. Exceeding a limit (``max_line`` bytes per line without
    its terminator; ``max_message_bytes`` per message, counting each header line plus one byte for its
    ending; ``max_headers`` per message), a line without ``:`` or a NUL byte raise
    :class:`AmiProtocolError`; the parser then stays failed and every later ``feed`` raises the same
    error. Limits bind what accumulates across feeds: one ``feed`` is processed as a whole, so an
    over-limit message is reported when it ends or when the feed ends, whichever comes first.
    """

    __slots__ = (
        "_banner_pending",
        "_buf",
        "_error",
        "_headers",
        "_max_headers",
        "_max_line",
        "_max_message_bytes",
        "_msg_bytes",
    )

    def __init__(
        self,
        *,
        max_line: int = 8192,
        max_message_bytes: int = 65536,
        max_headers: int = 256,
        expect_banner: bool = False,
    ) -> None:
        if max_line < 1 or max_message_bytes < 1 or max_headers < 1:
            raise ValueError("limits must be positive")
        self._max_line = max_line
        self._max_message_bytes = max_message_bytes
        self._max_headers = max_headers
        self._banner_pending = expect_banner
        self._buf = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._msg_bytes = 0
        self._error: str | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def partial(self) -> bool:
        """True when bytes of an unfinished line or message are buffered (useful at EOF)."""
        return bool(self._buf) or bool(self._headers)

    def _fail(self, reason: str) -> AmiProtocolError:
        self._error = reason
        self._buf.clear()
        self._headers = []
        return AmiProtocolError(reason)

    def feed(self, data: bytes) -> list[Message | Banner]:
        if self._error is not None:
            raise AmiProtocolError(self._error)
        buf = self._buf
        if buf:
            buf += data
            last = buf.rfind(b"\n")
            if last < 0:
                self._check_tail(len(buf))
                return []
            chunk = bytes(buf[:last])
            del buf[: last + 1]
        else:  # common case: nothing buffered, no copy of the whole read
            last = data.rfind(b"\n")
            if last < 0:
                buf += data
                self._check_tail(len(buf))
                return []
            chunk = data[:last]
            if last + 1 < len(data):
                buf += data[last + 1 :]
        self._check_tail(len(buf))
        # Every complete line at once: C-level find/replace/decode/split, one Python step per line.
        if b"\x00" in chunk:
            raise self._fail("NUL byte in AMI stream")
        if chunk.endswith(b"\r"):  # the CR of the last line's terminator
            chunk = chunk[:-1]
        if b"\r\n" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        # A b"\n" never occurs inside a UTF-8 sequence and "replace" never yields "\n": the decoded
        # lines match the byte lines one for one.
        text = chunk.decode("utf-8", "replace")
        lines = text.split("\n")
        # One character per byte (ASCII): the character counts are the byte counts.
        sizes = list(map(len, lines if len(text) == len(chunk) else chunk.split(b"\n")))
        if max(sizes) > self._max_line:
            raise self._fail(f"AMI line longer than {self._max_line} bytes")

        out: list[Message | Banner] = []
        first = 0
        if self._banner_pending:
            self._banner_pending = False
            out.append(Banner(lines[0]))
            first = 1
        headers = self._headers
        carry = self._msg_bytes  # bytes of the message begun in earlier feeds
        start = first  # index of the first line of the current message
        # Limits are checked once per message (and for the unfinished one at the end of the feed):
        # what this feed holds is in memory already, the checks bound what accumulates across feeds.
        for i in range(first, len(lines)):
            line = lines[i]
            if line:
                key, sep, value = line.partition(":")
                if not sep:
                    raise self._fail(f"malformed header line (no ':'): {line[:80]!r}")
                if value and value[0] == " ":
                    value = value[1:]
                headers.append((key, value))
            else:
                if headers:
                    self._check_message(headers, carry + sum(sizes[start:i]) + i - start)
                    out.append(Message(tuple(headers)))
                    headers = self._headers = []
                    carry = 0
                start = i + 1
        if headers:
            carry += sum(sizes[start:]) + len(lines) - start
            self._check_message(headers, carry)
        self._msg_bytes = carry
        return out

    def _check_message(self, headers: list[tuple[str, str]], size: int) -> None:
        if len(headers) > self._max_headers:
            raise self._fail(f"AMI message has more than {self._max_headers} headers")
        if size > self._max_message_bytes:
            raise self._fail(f"AMI message larger than {self._max_message_bytes} bytes")

    def _check_tail(self, pending: int) -> None:
        # An unfinished line may hold max_line bytes plus the CR of its terminator.
        if pending > self._max_line + 1:
            raise self._fail(f"AMI line longer than {self._max_line} bytes")


# -- authentication ---------------------------------------------------------------------------------


def md5_challenge_key(challenge: str, secret: str) -> str:
    """The ``Key`` of an ``AuthType: MD5`` Login: lowercase hex MD5 of challenge + secret.

    Same computation as ``authenticate()`` in Asterisk's ``main/manager.c`` (compared there with
    ``strcmp``, so the case of the hex digits matters).
    """
    digest = hashlib.md5((challenge + secret).encode("utf-8"), usedforsecurity=False)
    return digest.hexdigest()


# -- event classes and masks ------------------------------------------------------------------------

# Class of each event, from the <managerEvent>/<managerEventInstance class="EVENT_FLAG_*"> documentation
# in Asterisk's source (github.com/asterisk/asterisk, master of 2026-08, commit f0c1c1a7), checked
# against the EVENT_FLAG_* passed to manager_event()/ast_manager_publish_event() for the call-path
# events. Notes: CEL is published with EVENT_FLAG_CALL (cel/cel_manager.c), there is no "cel" class;
# the Newexten event is emitted as "Newexten" but documented as "NewExten" (lookup ignores case);
# ChannelTalkingStart/Stop are documented with a typo (EVENT_FLAG_CLASS) and published as call.
_EVENT_NAMES_BY_CLASS: Final[dict[str, str]] = {
    "agent": (
        "AgentCalled AgentComplete AgentConnect AgentDump AgentLogin AgentLogoff AgentRingNoAnswer Agents "
        "AgentsComplete QueueCallerAbandon QueueCallerJoin QueueCallerLeave QueueEntry QueueMemberAdded "
        "QueueMemberPause QueueMemberPenalty QueueMemberRemoved QueueMemberRinginuse QueueMemberStatus "
        "QueueParams"
    ),
    "agi": "AGIExecEnd AGIExecStart AsyncAGIEnd AsyncAGIExec AsyncAGIStart",
    "aoc": "AOC-D AOC-E AOC-S",
    "call": (
        "AttendedTransfer BlindTransfer BridgeCreate BridgeDestroy BridgeEnter BridgeLeave BridgeMerge "
        "BridgeVideoSourceUpdate CEL ChannelTalkingStart ChannelTalkingStop ChanSpyStart ChanSpyStop "
        "ConfbridgeEnd ConfbridgeJoin ConfbridgeLeave ConfbridgeMute ConfbridgeRecord ConfbridgeStart "
        "ConfbridgeStopRecord ConfbridgeTalking ConfbridgeUnmute CoreShowChannel "
        "CoreShowChannelMapComplete CoreShowChannelsComplete DAHDIChannel DeviceStateChange DialBegin "
        "DialEnd DialState ExtensionStatus FAXSessionsComplete FAXStatus Flash Hangup HangupRequest Hold "
        "LocalBridge LocalOptimizationBegin LocalOptimizationEnd MCID MeetmeEnd MeetmeJoin MeetmeLeave "
        "MeetmeList MeetmeListRooms MeetmeMute MeetmeTalking MeetmeTalkRequest MessageWaiting "
        "MiniVoiceMail MixMonitorMute MixMonitorStart MixMonitorStop MusicOnHoldStart MusicOnHoldStop "
        "NewAccountCode NewCallerid Newchannel NewConnectedLine Newstate OriginateResponse ParkedCall "
        "ParkedCallGiveUp ParkedCallSwap ParkedCallTimeOut Pickup PresenceStateChange PresenceStatus "
        "ReceiveFAX Rename SendFAX SoftHangupRequest Status StatusComplete Unhold UnParkedCall Wink"
    ),
    "cdr": "Cdr",
    "command": (
        "AorDetail AorList AorListComplete AuthDetail AuthList AuthListComplete BridgeInfoChannel "
        "BridgeInfoComplete ContactList ContactListComplete ContactStatusDetail DeviceStateListComplete "
        "EndpointDetail EndpointDetailComplete EndpointList EndpointListComplete "
        "ExtensionStateListComplete IdentifyDetail InboundRegistrationDetail InboundSubscriptionDetail "
        "OutboundRegistrationDetail OutboundSubscriptionDetail PresenceStateListComplete "
        "ResourceListDetail TransportDetail"
    ),
    "dialplan": "HangupHandlerPop HangupHandlerPush HangupHandlerRun NewExten VarSet",
    "dtmf": "DTMFBegin DTMFEnd",
    "reporting": (
        "ConfbridgeList ConfbridgeListRooms FAXSession FAXSessionsEntry FAXStats MWIGet MWIGetComplete "
        "RTCPReceived RTCPSent"
    ),
    "security": (
        "AuthMethodNotAllowed ChallengeResponseFailed ChallengeSent FailedACL InvalidAccountID "
        "InvalidPassword InvalidTransport LoadAverageLimit MemoryLimit RequestBadFormat RequestNotAllowed "
        "RequestNotSupported SessionLimit SuccessfulAuth UnexpectedAddress"
    ),
    "system": (
        "Alarm AlarmClear ContactStatus DeadlockStart DNDState FullyBooted Load LogChannel PeerStatus "
        "PJSIPMaintenanceStatus Registry Reload Shutdown SpanAlarm SpanAlarmClear Unload"
    ),
    "user": "UserEvent VoicemailPasswordChange",
}

EVENT_CLASSES: Final[Mapping[str, tuple[str, ...]]] = {
    cls: tuple(names.split()) for cls, names in _EVENT_NAMES_BY_CLASS.items()
}
_CLASS_OF: Final[dict[str, str]] = {
    name.lower(): cls for cls, names in EVENT_CLASSES.items() for name in names
}

# The perms[] table of main/manager.c: label -> EVENT_FLAG_* bit.
_PERM_BITS: Final[dict[str, int]] = {
    "system": 1 << 0,
    "call": 1 << 1,
    "log": 1 << 2,
    "verbose": 1 << 3,
    "command": 1 << 4,
    "agent": 1 << 5,
    "user": 1 << 6,
    "config": 1 << 7,
    "dtmf": 1 << 8,
    "reporting": 1 << 9,
    "cdr": 1 << 10,
    "dialplan": 1 << 11,
    "originate": 1 << 12,
    "agi": 1 << 13,
    "cc": 1 << 15,
    "aoc": 1 << 16,
    "test": 1 << 17,
    "security": 1 << 18,
    "message": 1 << 30,
}
_ALL_BITS: Final = sum(_PERM_BITS.values())


def event_class(event_name: str) -> str:
    """The AMI class (``call``, ``system``, ``dialplan``, ...) of an event name; ``"call"`` if unknown."""
    return _CLASS_OF.get(event_name.lower(), "call")


def event_classes(message: Message) -> frozenset[str]:
    """The classes of an event as Asterisk announces them in its ``Privilege`` header
    (``Privilege: call,all`` -> ``{"call"}``), falling back to :func:`event_class` of its name."""
    privilege = message.get("Privilege")
    if privilege:
        classes = frozenset(p for p in (x.strip().lower() for x in privilege.split(",")) if p in _PERM_BITS)
        if classes:
            return classes
    _, name = message.kind
    return frozenset((event_class(name),))


@dataclass(frozen=True, slots=True)
class EventMask:
    """Which event classes a session receives (``Events:`` of Login, ``EventMask:`` of Events)."""

    all: bool
    classes: frozenset[str]

    def allows(self, event_class: str) -> bool:
        return self.all or event_class.lower() in self.classes

    def allows_any(self, classes: Iterable[str]) -> bool:
        return self.all or any(c.lower() in self.classes for c in classes)


EVENTS_ALL: Final = EventMask(True, frozenset(_PERM_BITS))
EVENTS_NONE: Final = EventMask(False, frozenset())

_TRUE: Final = frozenset({"yes", "true", "y", "t", "on"})  # ast_true() ("1" is taken as a number first)
_FALSE: Final = frozenset({"no", "false", "n", "f", "off"})  # ast_false() ("0" likewise)


def parse_event_mask(value: str) -> EventMask:
    """Parse an event mask the way ``strings_to_mask()`` in ``main/manager.c`` does.

    - empty: all events (a Login without ``Events`` keeps the default: everything readable);
    - only digits: an EVENT_FLAG_* bit mask (so ``"1"`` is ``system`` only, ``"0"`` is off);
    - ``yes/true/y/t/on``: all; ``no/false/n/f/off``: none;
    - otherwise a comma list of class names (``"call,system"``); ``all`` means all, ``none`` and
      unknown names add nothing.

    Deviations from Asterisk, all on the lenient side: surrounding blanks are stripped and names are
    compared case-insensitively (Asterisk matches them case-sensitively).
    """
    text = value.strip()
    if not text:
        return EVENTS_ALL
    if text.isascii() and text.isdigit():
        bits = int(text)
        if bits & _ALL_BITS == _ALL_BITS:
            return EVENTS_ALL
        return EventMask(False, frozenset(name for name, bit in _PERM_BITS.items() if bits & bit))
    low = text.lower()
    if low in _TRUE:
        return EVENTS_ALL
    if low in _FALSE:
        return EVENTS_NONE
    names = {t.strip() for t in low.split(",")}
    if "all" in names:
        return EVENTS_ALL
    return EventMask(False, frozenset(names & _PERM_BITS.keys()))


# -- caller ID --------------------------------------------------------------------------------------

_PHONE_CHARS: Final = frozenset("0123456789*#+")


def _strip_quoted(s: str) -> tuple[str, bool]:
    # ast_strip_quoted(s, "\"", "\""): strip blanks, then one pair of surrounding double quotes.
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1], True
    return s, False


def _unescape_quoted(s: str) -> str:
    # ast_unescape_quoted(): a backslash makes the next character literal.
    if "\\" not in s:
        return s
    out: list[str] = []
    it = iter(s)
    for ch in it:
        out.append(next(it, "") if ch == "\\" else ch)
    return "".join(out)


def _shrink_phone_number(n: str) -> str:
    # ast_shrink_phone_number(): drop "( )" and blanks, '-' outside [...], '.' except a final one.
    out: list[str] = []
    bracketed = 0
    last = len(n) - 1
    for i, ch in enumerate(n):
        if ch == "[":
            bracketed += 1
        elif ch == "]":
            bracketed -= 1
        elif ch == "-":
            if not bracketed:
                continue
        elif ch == ".":
            if i != last:
                continue
        elif ch in "( )":
            continue
        out.append(ch)
    return "".join(out)


def _is_phone_number(n: str) -> bool:
    return bool(n) and all(c in _PHONE_CHARS for c in n)


def parse_callerid(value: str) -> tuple[str | None, str]:
    """Split a caller ID into ``(name or None, number)`` like ``ast_callerid_parse()``.

    Accepts ``"name" <number>``, ``name <number>``, ``<number>`` and a bare ``number`` (spaces,
    dashes, dots and parentheses removed as Asterisk does). The number is returned only when it is
    made of ``0-9 * # +`` after that clean-up; anything else (``<unknown>``, ``<anonymous>``, a SIP URI,
    an empty ``<>``) gives ``""``. A bare word that is not a number is a name.
    """
    instr, quotes_stripped = _strip_quoted(value)
    ls = instr.rfind("<")
    if ls >= 0:
        le = instr.rfind(">", ls)
        location = instr[ls + 1 : le] if le >= 0 else instr[ls + 1 :]
        name, _ = _strip_quoted(instr[:ls])
        number = _shrink_phone_number(location.strip())
        return (_unescape_quoted(name) or None, number if _is_phone_number(number) else "")
    shrunk = _shrink_phone_number(instr)
    if not quotes_stripped and _is_phone_number(shrunk):
        return (None, shrunk)
    name, _ = _strip_quoted(instr)
    return (_unescape_quoted(name) or None, "")
