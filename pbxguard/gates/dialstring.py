"""What an AMI ``Originate`` dials, presents and runs: pure inspection for the AMI gate.

No I/O, no clock. The AMI gate asks :func:`inspect_originate` for the destination number, presented
caller ID and campaign of an Originate, and :func:`dangerous_content` whether any action would make
Asterisk run a program or a dangerous function.

Everything here reads headers the way Asterisk does (``main/manager.c``): first header wins, leading
blanks skipped (:meth:`Message.effective`), ``Variable:`` values split like ``AST_STANDARD_APP_ARGS``
(commas outside quotes, parentheses and brackets; backslash escapes; quotes removed). Where Asterisk's
reading and ours could differ, the Originate is refused rather than guessed (fail closed).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pbxguard.protocols.ami import Message, parse_callerid

__all__ = [
    "DEFAULT_DIAL_PATTERNS",
    "DialRules",
    "OriginateRefusal",
    "OriginateRequest",
    "dangerous_content",
    "escape_app_arg",
    "extract_number",
    "inspect_originate",
    "parse_variables",
    "reserved_variable",
    "split_app_args",
]

# Each pattern must match the whole dial string (case-insensitively) and capture the consumer's
# number as the group ``number``. Custom patterns from the configuration are tried first.
DEFAULT_DIAL_PATTERNS: Final[tuple[str, ...]] = (
    # PJSIP/NUMBER@endpoint
    r"PJSIP/(?P<number>\+?[0-9]+)@[^/@]+",
    # PJSIP/endpoint/sip:NUMBER@host[:port][;params] and PJSIP/endpoint/NUMBER
    r"PJSIP/[^/@]+/(?:sips?:)?(?P<number>\+?[0-9]+)(?:@[^/]*)?",
    # SIP/trunk/NUMBER
    r"SIP/[^/@]+/(?P<number>\+?[0-9]+)",
    # SIP/NUMBER@peer
    r"SIP/(?P<number>\+?[0-9]+)@[^/@]+",
    # IAX2/[user[:secret]@]peer[:port]/NUMBER[@context][/options]
    r"IAX2/(?:[^@/]+@)?[^/@]+/(?P<number>\+?[0-9]+)(?:@[^/@]*)?(?:/[a-z]*)?",
    # DAHDI/g1/NUMBER, DAHDI/r2/NUMBER, DAHDI/1/NUMBER
    r"DAHDI/[^/]+/(?P<number>\+?[0-9]+)",
    # Local/NUMBER@context[/options]: the context's dialplan dials NUMBER (how VICIdial places calls)
    r"Local/(?P<number>\+?[0-9]+)@[^/@]+(?:/[nmjb]+)?",
)

# Asterisk copies Channel into a 256-byte buffer: a longer value would dial something we did not read.
MAX_CHANNEL: Final = 255
# AST_MAX_MANHEADERS: Asterisk refuses a message with more header lines.
MAX_HEADERS: Final = 128

# Applications that run programs or reconfigure Asterisk (Asterisk itself puts most of them behind
# the "system" permission, see is_originate_app_permitted() in main/manager.c).
_DANGEROUS_APPS: Final = frozenset(
    {
        "system",
        "trysystem",
        "shell",
        "exec",
        "execif",
        "tryexec",
        "externalivr",
        "reload",
        "dbdeltree",
        "originate",  # a nested Originate would dial a number this gate never saw
    }
)
_AGI_APPS: Final = frozenset({"agi", "eagi", "deadagi"})
# Applications whose Data holds dial strings: the numbers they dial are destinations too.
_DIALLING_APPS: Final = frozenset({"dial", "retrydial", "page"})

# Dialplan functions that run programs, touch files, evaluate strings as dialplan or reach other
# systems. Matched case-insensitively anywhere in any header value, as "NAME(".
_DANGEROUS_FUNCTIONS: Final = re.compile(
    r"(?<![A-Za-z0-9_])(SHELL|SYSTEM|FILE\w*|EVAL\w*|CURL\w*|ODBC\w*|REALTIME\w*|DB(?:_\w+)?|AST_CONFIG"
    r"|ENV|STAT|SQL\w*|SPEECH\w*)\s*\(",
    re.IGNORECASE,
)
# "${" followed by something other than a plain name: a function or variable name built at run time
# (${SH${X}ELL(...)}) defeats any check of the literal text.
_DYNAMIC_NAME: Final = re.compile(r"\$\{\s*[A-Za-z0-9_]*[^A-Za-z0-9_}:(\s]")

_RESERVED_VARIABLE: Final = re.compile(r"PBXGUARD_TOKEN", re.IGNORECASE)
_TRUE: Final = frozenset({"yes", "true", "y", "t", "1", "on"})  # ast_true()
_LEADING_INT: Final = re.compile(r"\s*([-+]?[0-9]+)")


# -- Asterisk argument parsing ----------------------------------------------------------------------


def split_app_args(text: str, delim: str = ",", max_args: int = 64) -> list[str]:
    """``AST_STANDARD_APP_ARGS``: split on ``delim`` outside quotes, ``( )`` and ``[ ]``; quotes and
    escaping backslashes are removed (``__ast_app_separate_args`` with remove_chars)."""
    args: list[str] = []
    i = 0
    n = len(text)
    paren = bracket = 0
    quote = False
    current: list[str] = []
    ended_on_delim = False
    while i < n and len(args) < max_args - 1:
        current = []
        ended_on_delim = False
        while i < n:
            ch = text[i]
            if ch == "(":
                paren += 1
            elif ch == ")":
                paren = max(0, paren - 1)
            elif ch == "[":
                bracket += 1
            elif ch == "]":
                bracket = max(0, bracket - 1)
            elif ch == '"' and delim != '"':
                quote = not quote
                i += 1
                continue
            elif ch == "\\":
                i += 1
                if i < n:
                    current.append(text[i])
                    i += 1
                continue
            elif ch == delim and not paren and not quote and not bracket:
                i += 1
                ended_on_delim = True
                break
            current.append(ch)
            i += 1
        args.append("".join(current))
    if i < n:
        # Past max_args - 1 arguments Asterisk leaves the rest unsplit in the last one (and still
        # strips quotes and backslashes from it only as far as it scanned: we keep it raw).
        args.append(text[i:])
    elif ended_on_delim:
        args.append("")
    return args


def escape_app_arg(value: str) -> str:
    """Escapes a value so that :func:`split_app_args` (and Asterisk) read it back as one literal."""
    return re.sub(r'([\\,"()\[\]|])', r"\\\1", value)


def parse_variables(values: Iterable[str]) -> list[tuple[str, str]]:
    """The ``name=value`` pairs of ``Variable:`` header values, in wire order (``man_do_variable_value``).

    Asterisk applies them last to first, so for a repeated name the *first* one in wire order is the
    one the channel keeps; callers that care refuse conflicting repeats instead.
    """
    out: list[tuple[str, str]] = []
    for raw in values:
        for item in split_app_args(raw.lstrip(" \t")):
            name, sep, value = item.partition("=")
            if sep and name:
                out.append((name, value))
    return out


def _var_name(name: str) -> str:
    # Leading underscores only mark inheritance: _X and __X are the variable X.
    return name.lstrip("_").replace(" ", "").upper()


# -- dial strings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialRules:
    """How to find the consumer's number in a dial string."""

    patterns: tuple[re.Pattern[str], ...]
    strip_prefixes: tuple[str, ...] = ()
    international_prefix: str = "00"
    internal: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def build(
        cls,
        dial_patterns: Sequence[str] = (),
        *,
        builtin_patterns: bool = True,
        strip_prefixes: Sequence[str] = (),
        international_prefix: str = "00",
        internal_channels: Sequence[str] = (),
    ) -> DialRules:
        """Compiles the patterns; raises ValueError naming the bad one."""
        compiled: list[re.Pattern[str]] = []
        for text in (*dial_patterns, *(DEFAULT_DIAL_PATTERNS if builtin_patterns else ())):
            try:
                pattern = re.compile(text, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"dial pattern {text!r} does not compile: {exc}") from None
            if "number" not in pattern.groupindex:
                raise ValueError(f"dial pattern {text!r} has no (?P<number>...) group")
            compiled.append(pattern)
        internal: list[re.Pattern[str]] = []
        for text in internal_channels:
            try:
                internal.append(re.compile(text, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"internal channel pattern {text!r} does not compile: {exc}") from None
        return cls(tuple(compiled), tuple(strip_prefixes), international_prefix, tuple(internal))

    def is_internal(self, dial_string: str) -> bool:
        return any(p.fullmatch(dial_string) for p in self.internal)


DEFAULT_RULES: Final = DialRules.build()


def extract_number(dial_string: str, rules: DialRules = DEFAULT_RULES) -> str | None:
    """The consumer's number in a dial string, prefixes stripped; ``None`` when no pattern matches."""
    text = dial_string.strip()
    for pattern in rules.patterns:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        number = match.group("number")
        if not number:
            continue
        for prefix in rules.strip_prefixes:
            if prefix and number.startswith(prefix) and len(number) > len(prefix):
                number = number[len(prefix) :]
        if rules.international_prefix and number.startswith(rules.international_prefix):
            number = "+" + number[len(rules.international_prefix) :]
        return number
    return None


# -- dangerous content ------------------------------------------------------------------------------


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _agi_problem(script: str) -> str | None:
    script = script.strip()
    low = script.lower()
    if low.startswith(("agi://", "hagi://")):
        rest = script.split("://", 1)[1]
        hostport = re.split(r"[/?]", rest, maxsplit=1)[0]
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
        if hostport.startswith("["):
            host = hostport.split("]", 1)[0] + "]"
        if low.startswith("hagi://") or not _is_loopback_host(host):
            return f"AGI to another host ({hostport or '?'})"
        return None
    if low == "agi:async":
        return None
    if script.startswith("/") or ".." in script:
        return f"AGI of a program outside agi-bin ({script})"
    return None


def _application_problem(app: str, data: str) -> str | None:
    name = app.strip().lower()
    args = split_app_args(data)
    if name in _DANGEROUS_APPS:
        return f"application {app.strip()}"
    if name in _AGI_APPS:
        return _agi_problem(args[0] if args else "")
    if name == "queue" and len(args) > 5 and args[5].strip():
        # Queue(name,options,URL,announce,timeout,AGI,...): runs an AGI on the member's channel.
        problem = _agi_problem(args[5])
        return f"Queue with {problem}" if problem else None
    if name == "mixmonitor" and len(args) > 2 and args[2].strip():
        return "MixMonitor with a post-recording command"
    return None


def dangerous_content(message: Message) -> str | None:
    """Why this action could run a program or a dangerous function, or ``None``.

    Looks at every header value (functions such as ``SHELL(``/``FILE(``/``EVAL(``, run-time built
    names) and, for Originate, at the application (``System``, ``Exec``, ``ExternalIVR``, AGI to
    another host or outside agi-bin, ...).
    """
    for key, value in message.headers:
        found = _DANGEROUS_FUNCTIONS.search(value)
        if found:
            return f"function {found.group(1).upper()}() in {key}"
        if _DYNAMIC_NAME.search(value):
            return f"a run-time built ${{...}} name in {key}"
    kind, name = message.kind
    action = name.lower() if kind == "action" else ""
    if action == "originate":
        app = message.effective("Application") or ""
        if app:
            return _application_problem(app, message.effective("Data") or "")
    elif action == "mixmonitor" and (message.effective("Command") or "").strip():
        # The MixMonitor action runs its Command through the shell once the recording ends.
        return "MixMonitor with a post-recording command"
    return None


def reserved_variable(message: Message) -> bool:
    """True when the action sets (or could set) PBXGUARD_TOKEN, which only pbxguard may set: a
    forged token would make the dialplan hook let a call through uncounted."""
    return any(k.lower() == "variable" and _RESERVED_VARIABLE.search(v) for k, v in message.headers)


# -- Originate --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginateRefusal:
    """An Originate refused before any decision: nothing is dialled, nothing is counted."""

    message: str
    dangerous: bool = False  # refused for what it runs (an allow_dangerous user may send it)


@dataclass(frozen=True, slots=True)
class OriginateRequest:
    channel: str
    # The number the guard decides on; "" with ``needs_decision`` means the destination could not be
    # read from the dial string (the guard then blocks with INVALID_DESTINATION).
    number: str
    dial_string: str
    needs_decision: bool  # False only for an internal channel that dials no one outside
    caller_id: str  # the number the consumer would see; "" when missing or withheld
    campaign: str
    is_async: bool
    timeout_ms: int


_PRES_HIDDEN: Final = re.compile(r"\s*(prohib|unavailable)", re.IGNORECASE)


def _presentation_hidden(value: str) -> bool:
    value = value.strip()
    if value.isdigit():
        return int(value) & 0x60 != 0  # AST_PRES_RESTRICTED (0x20) or AST_PRES_UNAVAILABLE (0x40)
    return bool(_PRES_HIDDEN.match(value))


def _caller_id(message: Message, variables: list[tuple[str, str]]) -> str | OriginateRefusal:
    """The number the consumer is shown. Asterisk sets the Originate's variables first, then the
    ``CallerID`` header's number if it has one (``__ast_request_and_dial``): the header wins, a
    ``CALLERID(num)`` variable counts only when the header gives no number (verified on Asterisk 22).
    A restricted presentation (``CALLERID(pres)``, ``CALLERID(num-pres)``) withholds the number."""
    number = parse_callerid(message.effective("CallerID") or "")[1]
    overrides: set[str] = set()
    hidden = False
    for name, value in variables:
        key = _var_name(name)
        if key in ("CALLERID(NUM)", "CALLERID(NUMBER)"):
            overrides.add(value.strip())
        elif key == "CALLERID(ALL)":
            overrides.add(parse_callerid(value)[1])
        elif key in ("CALLERID(PRES)", "CALLERID(NUM-PRES)") or key.startswith("CALLERPRES("):
            hidden = hidden or _presentation_hidden(value)
    if not number:
        if len(overrides) > 1:
            return OriginateRefusal("conflicting CALLERID variables: the presented number is ambiguous")
        if overrides:
            number = overrides.pop()
    return "" if hidden else number


def _campaign(message: Message, variables: list[tuple[str, str]], default: str) -> str | OriginateRefusal:
    values = {value.strip() for name, value in variables if _var_name(name) == "PBXGUARD_CAMPAIGN"}
    if len(values) > 1:
        return OriginateRefusal("conflicting PBXGUARD_CAMPAIGN variables")
    if values:
        return values.pop()
    return (message.effective("Account") or "").strip() or default


def _leading_int(value: str | None, default: int) -> int:
    if not value:
        return default
    match = _LEADING_INT.match(value)
    return int(match.group(1)) if match else default


def _dialled_by_application(app: str, data: str) -> list[str]:
    name = app.strip().lower()
    args = split_app_args(data)
    if name not in _DIALLING_APPS:
        return []
    if name in ("dial", "page"):
        first = args[0] if args else ""
    elif name == "retrydial":
        # RetryDial(announce,sleep,retries,dialargs): dialargs are Dial's own arguments.
        first = args[3] if len(args) > 3 else ""
    return [s.strip() for s in first.split("&") if s.strip()]


def inspect_originate(
    message: Message,
    rules: DialRules = DEFAULT_RULES,
    *,
    default_campaign: str = "",
) -> OriginateRequest | OriginateRefusal:
    """Reads an Originate as Asterisk will execute it.

    The destination comes from ``Channel``, unless the channel matches an internal pattern (an
    agent's phone): then the numbers a dialling application (``Dial``, ``RetryDial``, ``Page``) would
    call are the destinations. More than one outside destination is refused: one decision, one call.
    Dangerous content is not checked here (see :func:`dangerous_content`).
    """
    channel = message.effective("Channel") or ""
    if not channel:
        return OriginateRefusal("Channel not specified")
    if "/" not in channel:
        return OriginateRefusal("Invalid channel")
    if len(channel.encode("utf-8")) > MAX_CHANNEL:
        return OriginateRefusal(f"Channel longer than {MAX_CHANNEL} bytes")
    app = message.effective("Application") or ""
    if not app and _leading_int(message.effective("Priority"), 0) == 0:
        priority = message.effective("Priority") or ""
        if not priority or priority.strip().lstrip("+-").isdigit():
            return OriginateRefusal("Originate with 'Exten' requires 'Context' and 'Priority'")
    variables = parse_variables(message.get_all("Variable"))
    caller = _caller_id(message, variables)
    if isinstance(caller, OriginateRefusal):
        return caller
    campaign = _campaign(message, variables, default_campaign)
    if isinstance(campaign, OriginateRefusal):
        return campaign

    candidates: list[str] = []
    if not rules.is_internal(channel):
        candidates.append(channel)
    if app:
        dialled = _dialled_by_application(app, message.effective("Data") or "")
        candidates.extend(d for d in dialled if not rules.is_internal(d))
    if len(candidates) > 1:
        return OriginateRefusal(
            "Originate dials more than one outside destination (Channel and the application's Data)"
        )
    dial_string = candidates[0] if candidates else channel
    number = extract_number(dial_string, rules) if candidates else None
    return OriginateRequest(
        channel=channel,
        number=number or "",
        dial_string=dial_string,
        needs_decision=bool(candidates),
        caller_id=caller,
        campaign=campaign,
        is_async=(message.effective("Async") or "").strip().lower() in _TRUE,
        timeout_ms=_leading_int(message.effective("Timeout"), 30000),
    )
