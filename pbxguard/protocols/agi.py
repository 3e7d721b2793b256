"""Sans-IO codec for the server side of FastAGI (pbxguard is the server, Asterisk the client).

Wire format (``res/res_agi.c`` in Asterisk):

- on connect Asterisk sends ``agi_network: yes``, ``agi_network_script: <script?query>`` (only when the
  URL has a script part), then ``agi_request``, ``agi_channel``, ... ``agi_threadid`` and one
  ``agi_arg_N`` per argument, each as ``name: value\\n``, then an empty line;
- the server then writes one command line at a time and Asterisk answers each with one reply:
  ``200 result=<r>[ (<data>)][ endpos=<n>]``, ``510 Invalid or unknown command``,
  ``511 Command Not Permitted on a dead channel or intercept routine``, ``520 Invalid command syntax.
  Proper usage not available.`` or the block ``520-Invalid command syntax.  Proper usage follows:``
  / usage lines / ``520 End of proper usage.``;
- when the channel hangs up Asterisk writes a bare ``HANGUP`` line, once, whenever it notices: it is
  not a reply, a pending command is still answered afterwards (panoramisk took it as the reply and
  shifted every later reply by one).

EOF and timeouts belong to the asyncio adapter.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias
from urllib.parse import parse_qs

__all__ = [
    "MAX_COMMAND_BYTES",
    "AgiEvent",
    "AgiProtocolError",
    "AgiServerConnection",
    "Environment",
    "Hangup",
    "Response",
    "agi_args",
    "parse_network_script",
    "quote_argument",
]

# Asterisk reads a command with fgets() into an 8192-byte buffer (AGI_BUF_LEN): a longer line is
# cut after 8191 bytes and the rest is run as a second command. Never send more than that, "\n"
# included.
MAX_COMMAND_BYTES: Final = 8191
# parse_args() keeps at most MAX_ARGS - 1 = 127 words (command words included) and drops the rest.
_MAX_WORDS: Final = 127

_COMMAND_RE: Final = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


class AgiProtocolError(Exception):
    """Bad FastAGI input or misuse of the connection. The only exception of this codec."""


@dataclass(frozen=True, slots=True)
class Environment:
    """The ``agi_*`` variables Asterisk sends first (read-only mapping, names as sent)."""

    variables: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Response:
    """The reply to the pending command.

    ``text`` is everything after the code (``"result=1 (value)"``); ``result`` is the ``result=``
    token (``None`` when the line has none, as in 510/511/520); ``data`` is the text inside the
    parentheses that follow it (outermost pair, so nested parentheses and spaces are kept). For a
    multi-line 520, ``text`` is the first line's text and ``data`` the usage lines joined by ``\\n``.
    """

    code: int
    result: str | None
    data: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Hangup:
    """Asterisk's ``HANGUP`` notice: the channel is gone. Not a reply to anything."""


AgiEvent: TypeAlias = Environment | Response | Hangup

_HANGUP: Final = Hangup()


def _parse_reply(code: int, text: str) -> Response:
    if not text.startswith("result="):
        return Response(code, None, None, text)
    rest = text[7:]
    result, sp, after = rest.partition(" ")
    data: str | None = None
    if sp and after.startswith("("):
        close = after.rfind(")")
        if close > 0:
            data = after[1:close]
    return Response(code, result, data, text)


class AgiServerConnection:
    """One FastAGI session seen from the server. ``receive(bytes) -> [AgiEvent]``, ``send_command``.

    Lines end with ``\\n`` (a ``\\r`` before it is dropped); only complete lines are decoded, invalid
    UTF-8 becomes U+FFFD. Errors raise :class:`AgiProtocolError` and leave the connection failed.
    """

    __slots__ = (
        "_buf",
        "_env",
        "_env_done",
        "_error",
        "_hung_up",
        "_max_env_vars",
        "_max_line",
        "_max_usage_bytes",
        "_pending",
        "_usage",
        "_usage_bytes",
        "_usage_code",
        "_usage_head",
    )

    def __init__(
        self, *, max_line: int = 8192, max_env_vars: int = 128, max_usage_bytes: int = 65536
    ) -> None:
        if max_line < 1 or max_env_vars < 1 or max_usage_bytes < 1:
            raise ValueError("limits must be positive")
        self._max_line = max_line
        self._max_env_vars = max_env_vars
        self._max_usage_bytes = max_usage_bytes
        self._buf = bytearray()
        self._env: dict[str, str] = {}
        self._env_done = False
        self._pending = False
        self._hung_up = False
        self._usage: list[str] | None = None  # inside a "520-" block
        self._usage_code = 0
        self._usage_head = ""
        self._usage_bytes = 0
        self._error: str | None = None

    # -- state ----------------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """A command was sent and its reply has not arrived yet."""
        return self._pending

    @property
    def hung_up(self) -> bool:
        """Asterisk said ``HANGUP``."""
        return self._hung_up

    @property
    def environment_received(self) -> bool:
        return self._env_done

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _fail(self, reason: str) -> AgiProtocolError:
        self._error = reason
        self._buf.clear()
        return AgiProtocolError(reason)

    # -- input ----------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[AgiEvent]:
        if self._error is not None:
            raise AgiProtocolError(self._error)
        buf = self._buf
        buf += data
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > self._max_line + 1:
                raise self._fail(f"AGI line longer than {self._max_line} bytes")
            return []
        chunk = bytes(buf[:last])
        del buf[: last + 1]
        if len(buf) > self._max_line + 1:
            raise self._fail(f"AGI line longer than {self._max_line} bytes")
        raw_lines = chunk.split(b"\n")
        max_line = self._max_line
        out: list[AgiEvent] = []
        for raw in raw_lines:
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > max_line:
                raise self._fail(f"AGI line longer than {max_line} bytes")
            line = raw.decode("utf-8", "replace")
            if not self._env_done:
                env = self._env_line(line)
                if env is not None:
                    out.append(env)
            else:
                event = self._reply_line(line, len(raw) + 1)
                if event is not None:
                    out.append(event)
        return out

    def _env_line(self, line: str) -> Environment | None:
        if not line:
            if not self._env:
                raise self._fail("empty AGI environment")
            self._env_done = True
            return Environment(types.MappingProxyType(self._env))
        name, sep, value = line.partition(":")
        if not sep or not name.startswith("agi_"):
            raise self._fail(f"malformed AGI environment line: {line[:80]!r}")
        if name in self._env:
            raise self._fail(f"duplicate AGI environment variable {name!r}")
        if len(self._env) >= self._max_env_vars:
            raise self._fail(f"more than {self._max_env_vars} AGI environment variables")
        if value[:1] == " ":
            value = value[1:]
        self._env[name] = value
        return None

    def _reply_line(self, line: str, size: int) -> AgiEvent | None:
        usage = self._usage
        if usage is not None:
            # Inside "520-...": usage text verbatim (blank lines, "HANGUP", digits included) until a
            # line "520 ..." (normally "520 End of proper usage.").
            code = self._usage_code
            if line[:3] == str(code) and line[3:4] in ("", " "):
                self._usage = None
                self._pending = False
                return Response(code, None, "\n".join(usage), self._usage_head)
            self._usage_bytes += size
            if self._usage_bytes > self._max_usage_bytes:
                raise self._fail(f"AGI usage text longer than {self._max_usage_bytes} bytes")
            usage.append(line)
            return None
        if line == "HANGUP":
            self._hung_up = True
            return _HANGUP
        if not self._pending:
            raise self._fail(f"AGI reply with no command pending: {line[:80]!r}")
        head = line[:3]
        sep = line[3:4]
        if len(head) != 3 or not (head.isascii() and head.isdigit()) or sep not in ("", " ", "-"):
            raise self._fail(f"malformed AGI reply: {line[:80]!r}")
        code = int(head)
        text = line[4:]
        if sep == "-" or (code == 520 and text.endswith("Proper usage follows:")):
            self._usage = []
            self._usage_code = code
            self._usage_head = text
            self._usage_bytes = 0
            return None
        self._pending = False
        return _parse_reply(code, text)

    # -- output ---------------------------------------------------------------------------------------

    def send_command(self, command: str, *args: str) -> bytes:
        """The line to write for ``command`` (``"SET VARIABLE"``) with quoted ``args``.

        ``send_command("SET VARIABLE", "PBXGUARD_VERDICT", "ALLOW")`` returns
        ``b'SET VARIABLE "PBXGUARD_VERDICT" "ALLOW"\\n'`` and marks the command pending. FastAGI runs one
        command at a time: sending while a command is pending, before the environment has arrived or
        after an error raises :class:`AgiProtocolError`, as do a command that is not letters and
        single spaces, an argument with CR, LF or NUL, and a line over :data:`MAX_COMMAND_BYTES`.
        """
        if self._error is not None:
            raise AgiProtocolError(self._error)
        if not self._env_done:
            raise AgiProtocolError("AGI environment not received yet")
        if self._pending:
            raise AgiProtocolError("an AGI command is already pending (FastAGI is one command at a time)")
        if not _COMMAND_RE.fullmatch(command):
            raise AgiProtocolError(f"invalid AGI command {command!r}")
        if command.count(" ") + 1 + len(args) > _MAX_WORDS:
            raise AgiProtocolError(f"more than {_MAX_WORDS} words in an AGI command")
        line = " ".join([command, *map(quote_argument, args)]) + "\n"
        try:
            encoded = line.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise AgiProtocolError(f"AGI argument is not encodable as UTF-8: {exc.reason}") from None
        if len(encoded) > MAX_COMMAND_BYTES:
            raise AgiProtocolError(f"AGI command line longer than {MAX_COMMAND_BYTES} bytes")
        self._pending = True
        return encoded


def quote_argument(arg: str) -> str:
    """``arg`` in double quotes with ``\\`` and ``"`` escaped, as ``parse_args()`` in res_agi.c reads it.

    Refuses CR, LF (they would end the command line) and NUL (it would end the C string).
    """
    if "\n" in arg or "\r" in arg or "\x00" in arg:
        raise AgiProtocolError(f"AGI argument contains CR, LF or NUL: {arg!r}")
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- environment helpers ------------------------------------------------------------------------------


def _variables(env: Environment | Mapping[str, str]) -> Mapping[str, str]:
    return env.variables if isinstance(env, Environment) else env


def parse_network_script(
    env: Environment | Mapping[str, str], *, max_fields: int = 64
) -> tuple[str, dict[str, list[str]]]:
    """``agi_network_script`` split into script name and query: ``"check?campaign=ABC"`` ->
    ``("check", {"campaign": ["ABC"]})``; ``("", {})`` when Asterisk sent no script. Blank values are
    kept (``"x="`` -> ``{"x": [""]}``); more than ``max_fields`` fields raise AgiProtocolError."""
    script = _variables(env).get("agi_network_script", "")
    name, _, query = script.partition("?")
    if not query:
        return (name, {})
    try:
        return (name, parse_qs(query, keep_blank_values=True, max_num_fields=max_fields))
    except ValueError as exc:
        raise AgiProtocolError(f"bad agi_network_script query: {exc}") from None


def agi_args(env: Environment | Mapping[str, str]) -> list[str]:
    """``agi_arg_1``, ``agi_arg_2``, ... in order, up to the first missing one."""
    variables = _variables(env)
    out: list[str] = []
    i = 1
    while (value := variables.get(f"agi_arg_{i}")) is not None:
        out.append(value)
        i += 1
    return out
