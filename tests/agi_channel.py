"""What Asterisk does with the commands pbxguard's FastAGI gate sends, for the fake channels of the tests.

Written from res_agi.c and pbx_variables.c of Asterisk 22 and checked against a real one (the
real-Asterisk tests run the same exchange): ``GET FULL VARIABLE`` expands ``${NAME}``,
``${CALLERID(num)}`` and ``${LEN(...)}`` (a length in bytes), innermost first, without expanding what a
value contains; ``EXEC MSet`` splits its argument at unescaped commas (a backslash escapes the next
character and is dropped, double quotes are dropped), then each pair at its first ``=``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

# The caller ID a fake channel presents unless told otherwise: an NPV number the tests authorise.
NPV = "0162123456"
# One argument of an AGI command line as res_agi's parse_args() reads it: quoted or bare.
_ARGUMENT = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def agi_arguments(line: str) -> list[str]:
    """The words of an AGI command line, quotes removed and backslash escapes undone."""
    return [
        re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        for quoted, bare in (m.groups() for m in _ARGUMENT.finditer(line))
    ]


def expand(expression: str, lookup: Callable[[str], str], *, has_len: bool = True) -> str:
    """``expression`` with every ``${...}`` replaced; ``lookup(name)`` gives a variable or
    ``CALLERID(num)``, ``LEN(text)`` is computed here (``has_len=False``: an Asterisk without
    func_strings, where it expands to nothing)."""
    out: list[str] = []
    i = 0
    while i < len(expression):
        if expression.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(expression) and depth:
                if expression.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if expression[j] == "}":
                    depth -= 1
                j += 1
            name = expand(expression[i + 2 : j - 1], lookup, has_len=has_len)
            if name.startswith("LEN(") and name.endswith(")"):
                out.append(str(len(name[4:-1].encode("utf-8"))) if has_len else "")
            else:
                out.append(lookup(name))
            i = j
        else:
            out.append(expression[i])
            i += 1
    return "".join(out)


def application_arguments(data: str) -> list[str]:
    """A dialplan application's arguments as Asterisk separates them (app.c,
    __ast_app_separate_args with remove_chars): commas split except inside parentheses, brackets or
    double quotes; double quotes are dropped; a backslash is dropped and the next character kept."""
    args: list[str] = []
    current: list[str] = []
    paren = bracket = 0
    quoted = escaped = False
    for char in data:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not (paren or bracket or quoted):
            args.append("".join(current))
            current = []
        else:
            if char == "(":
                paren += 1
            elif char == ")" and paren:
                paren -= 1
            elif char == "[":
                bracket += 1
            elif char == "]" and bracket:
                bracket -= 1
            current.append(char)
    args.append("".join(current))
    return args


def mset_pairs(data: str) -> list[tuple[str, str]]:
    """The (name, value) pairs ``MSet(data)`` sets, in order: its arguments as any application's
    (pbx_variables.c, AST_STANDARD_APP_ARGS), each cut at its first ``=``."""
    pairs: list[tuple[str, str]] = []
    for argument in application_arguments(data):
        name, sep, value = argument.partition("=")
        if sep:
            pairs.append((name, value))
    return pairs


@dataclasses.dataclass
class Channel:
    """The channel as Asterisk holds it: its variables and caller ID; what the gate asked and set."""

    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    caller_id: str = NPV
    commands: list[str] = dataclasses.field(default_factory=list)
    closed_by_server: bool = False

    # Asterisk without func_strings, or without MSet: the gate must fall back to one command per value.
    has_len: bool = True
    has_mset: bool = True

    def lookup(self, name: str) -> str:
        return self.caller_id if name == "CALLERID(num)" else self.variables.get(name, "")

    def expand(self, expression: str) -> str:
        return expand(expression, self.lookup, has_len=self.has_len)

    def reply(self, line: str) -> str:
        words = agi_arguments(line)
        self.commands.append(line)
        head = " ".join(w for w in words if w.isupper() and w.isalpha())
        if head.startswith("SET VARIABLE") and len(words) == 4:
            self.variables[words[2]] = words[3]
            return "200 result=1"
        if head.startswith("GET FULL VARIABLE") and len(words) == 4:
            return f"200 result=1 ({self.expand(words[3])})"
        if head.startswith("GET VARIABLE") and len(words) == 3:
            value = self.variables.get(words[2])
            return "200 result=0" if value is None else f"200 result=1 ({value})"
        if words[:1] == ["EXEC"] and len(words) == 3:
            if words[1] != "MSet" or not self.has_mset:
                return "200 result=-2"
            self.variables.update(mset_pairs(words[2]))
            return "200 result=0"
        return "510 Invalid or unknown command"
