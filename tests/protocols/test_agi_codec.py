"""Tests for the sans-IO FastAGI server codec (pbxguard.protocols.agi)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxguard.protocols.agi import (
    MAX_COMMAND_BYTES,
    AgiEvent,
    AgiProtocolError,
    AgiServerConnection,
    Environment,
    Hangup,
    Response,
    agi_args,
    parse_network_script,
    quote_argument,
)

# What Asterisk 22 sends for AGI(agi://127.0.0.1:4573/check?campaign=ABC,0612345678) from a Local
# channel: agi_network first (FastAGI only), then the 21 standard variables, then the arguments.
ENV_VARS: list[tuple[str, str]] = [
    ("agi_network", "yes"),
    ("agi_network_script", "check?campaign=ABC&campaign=DEF&mode=strict"),
    ("agi_request", "agi://127.0.0.1:4573/check?campaign=ABC&campaign=DEF&mode=strict"),
    ("agi_channel", "Local/0612345678@pbxguard-out-00000001;2"),
    ("agi_language", "fr"),
    ("agi_type", "Local"),
    ("agi_uniqueid", "1700000000.18"),
    ("agi_version", "22.10.1"),
    ("agi_callerid", "0144556677"),
    ("agi_calleridname", "Société Générale ☎"),
    ("agi_callingpres", "0"),
    ("agi_callingani2", "0"),
    ("agi_callington", "0"),
    ("agi_callingtns", "0"),
    ("agi_dnid", "unknown"),
    ("agi_rdnis", "unknown"),
    ("agi_context", "pbxguard-out"),
    ("agi_extension", "0612345678"),
    ("agi_priority", "2"),
    ("agi_enhanced", "0.0"),
    ("agi_accountcode", ""),
    ("agi_threadid", "140241876317888"),
    ("agi_arg_1", "0612345678"),
    ("agi_arg_2", "a b, (c)"),
]
ENV_BYTES = "".join(f"{k}: {v}\n" for k, v in ENV_VARS).encode() + b"\n"


def feed_all(conn: AgiServerConnection, chunks: list[bytes]) -> list[AgiEvent]:
    out: list[AgiEvent] = []
    for chunk in chunks:
        out.extend(conn.receive(chunk))
    return out


def state(conn: AgiServerConnection) -> dict[str, bool]:
    # (a function, so that mypy does not narrow the properties between two asserts)
    return {"env": conn.environment_received, "pending": conn.pending, "hung_up": conn.hung_up}


def ready() -> AgiServerConnection:
    conn = AgiServerConnection()
    [env] = conn.receive(ENV_BYTES)
    assert isinstance(env, Environment)
    return conn


def reply(line: bytes) -> Response:
    conn = ready()
    conn.send_command("NOOP")
    [event] = conn.receive(line)
    assert isinstance(event, Response)
    assert not conn.pending
    return event


# -- environment ----------------------------------------------------------------------------------------


def test_environment_block() -> None:
    conn = AgiServerConnection()
    assert state(conn) == {"env": False, "pending": False, "hung_up": False}
    events = conn.receive(ENV_BYTES)
    assert len(events) == 1
    env = events[0]
    assert isinstance(env, Environment)
    assert dict(env.variables) == dict(ENV_VARS)
    assert len(env.variables) == 24
    assert env.variables["agi_accountcode"] == ""
    assert env.variables["agi_calleridname"] == "Société Générale ☎"
    assert state(conn) == {"env": True, "pending": False, "hung_up": False}
    with pytest.raises(TypeError):
        env.variables["agi_channel"] = "x"  # type: ignore[index]
    assert hash(env) == hash(Environment({}))  # hashable despite the mapping field


def test_environment_helpers() -> None:
    conn = AgiServerConnection()
    [env] = conn.receive(ENV_BYTES)
    assert isinstance(env, Environment)
    assert parse_network_script(env) == ("check", {"campaign": ["ABC", "DEF"], "mode": ["strict"]})
    assert parse_network_script({"agi_network_script": "check"}) == ("check", {})
    assert parse_network_script({"agi_network_script": "check?x=&y=%20z"}) == (
        "check",
        {"x": [""], "y": [" z"]},
    )
    assert parse_network_script({}) == ("", {})
    with pytest.raises(AgiProtocolError):
        parse_network_script({"agi_network_script": "c?" + "&".join(f"k{i}=v" for i in range(100))})
    assert agi_args(env) == ["0612345678", "a b, (c)"]
    assert agi_args({"agi_arg_1": "x", "agi_arg_3": "z"}) == ["x"]
    assert agi_args({}) == []


def test_environment_crlf_and_split_utf8() -> None:
    data = ENV_BYTES.replace(b"\n", b"\r\n")
    start = data.index("é".encode())
    for i in range(start, start + 3):
        conn = AgiServerConnection()
        [env] = feed_all(conn, [data[:i], data[i:]])
        assert isinstance(env, Environment)
        assert env.variables["agi_calleridname"] == "Société Générale ☎"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a health check or port scan
        b"Host: x\n\n",  # not an agi_ variable
        b"agi_network: yes\nagi_network: yes\n\n",  # duplicate
        b"\n",  # empty environment
        b"agi_network: yes\n200 result=1\n",  # reply before the environment is complete
        b"agi_network: yes\nHANGUP\n",
    ],
)
def test_bad_environment(data: bytes) -> None:
    conn = AgiServerConnection()
    with pytest.raises(AgiProtocolError):
        conn.receive(data)
    assert conn.failed
    with pytest.raises(AgiProtocolError):
        conn.receive(b"agi_network: yes\n\n")


def test_env_value_without_space_and_limits() -> None:
    [env] = AgiServerConnection().receive(b"agi_a:x\nagi_b:  y\nagi_c:\n\n")
    assert isinstance(env, Environment)
    assert dict(env.variables) == {"agi_a": "x", "agi_b": " y", "agi_c": ""}
    for kw in ({"max_line": 0}, {"max_env_vars": 0}, {"max_usage_bytes": 0}):
        with pytest.raises(ValueError, match="positive"):
            AgiServerConnection(**kw)


def test_too_many_env_vars() -> None:
    data = b"".join(f"agi_v{i}: x\n".encode() for i in range(5)) + b"\n"
    assert len(AgiServerConnection(max_env_vars=5).receive(data)) == 1
    with pytest.raises(AgiProtocolError, match="more than 4"):
        AgiServerConnection(max_env_vars=4).receive(data)


def test_early_close_leaves_no_event() -> None:
    # a client that closes before the end of the headers: the codec just waits for more bytes
    conn = AgiServerConnection()
    assert conn.receive(ENV_BYTES[:100]) == []
    assert conn.receive(b"") == []


# -- replies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"200 result=1\n", Response(200, "1", None, "result=1")),
        (b"200 result=0\n", Response(200, "0", None, "result=0")),
        (b"200 result=-1\n", Response(200, "-1", None, "result=-1")),
        (b"200 result=1 (ALLOW)\n", Response(200, "1", "ALLOW", "result=1 (ALLOW)")),
        (
            b"200 result=1 (some (nested) data)\n",
            Response(200, "1", "some (nested) data", "result=1 (some (nested) data)"),
        ),
        (b"200 result=1 ()\n", Response(200, "1", "", "result=1 ()")),
        (b"200 result=1 (a) b)\r\n", Response(200, "1", "a) b", "result=1 (a) b)")),
        (b"200 result=0 (timeout)\n", Response(200, "0", "timeout", "result=0 (timeout)")),
        (b"200 result= (timeout)\n", Response(200, "", "timeout", "result= (timeout)")),
        (
            b"200 result=49 (dtmf) endpos=12345\n",
            Response(200, "49", "dtmf", "result=49 (dtmf) endpos=12345"),
        ),
        (b"200 result=0 endpos=960\n", Response(200, "0", None, "result=0 endpos=960")),
        (b"200 result=1 (caf\xc3\xa9 \xe2\x98\x8e)\n", Response(200, "1", "café ☎", "result=1 (café ☎)")),
        (b"510 Invalid or unknown command\n", Response(510, None, None, "Invalid or unknown command")),
        (
            b"511 Command Not Permitted on a dead channel or intercept routine\n",
            Response(511, None, None, "Command Not Permitted on a dead channel or intercept routine"),
        ),
        (
            b"520 Invalid command syntax.  Proper usage not available.\n",
            Response(520, None, None, "Invalid command syntax.  Proper usage not available."),
        ),
        (b"200\n", Response(200, None, None, "")),
        (b"200 result=1 (unclosed\n", Response(200, "1", None, "result=1 (unclosed")),
    ],
)
def test_reply_forms(line: bytes, expected: Response) -> None:
    assert reply(line) == expected


USAGE_BLOCK = (
    b"520-Invalid command syntax.  Proper usage follows:\n"
    b" Usage: SET VARIABLE <variablename> <value>\n"
    b"\n"
    b"Sets a variable to the current channel. (See also: GET VARIABLE)\n"
    b"200 result=1 is not a reply here\n"
    b"520 End of proper usage.\n"
)


def test_520_usage_block_is_one_response() -> None:
    conn = ready()
    conn.send_command("SET VARIABLE", "x")
    events = conn.receive(USAGE_BLOCK)
    assert events == [
        Response(
            520,
            None,
            " Usage: SET VARIABLE <variablename> <value>\n\n"
            "Sets a variable to the current channel. (See also: GET VARIABLE)\n"
            "200 result=1 is not a reply here",
            "Invalid command syntax.  Proper usage follows:",
        )
    ]
    assert not conn.pending


def test_520_usage_block_with_space_form() -> None:
    conn = ready()
    conn.send_command("EXEC")
    events = conn.receive(
        b"520 Invalid command syntax.  Proper usage follows:\nUsage: EXEC <app> <options>\n520 End of proper usage.\n"
    )
    assert events == [
        Response(520, None, "Usage: EXEC <app> <options>", "Invalid command syntax.  Proper usage follows:")
    ]


def test_generic_multiline_reply_ends_on_its_own_code() -> None:
    conn = ready()
    conn.send_command("NOOP")
    assert conn.receive(b"200-first\n520 not the end\n200 last\n") == [
        Response(200, None, "520 not the end", "first")
    ]
    assert not conn.pending


def test_usage_block_is_bounded() -> None:
    conn = AgiServerConnection(max_usage_bytes=100)
    conn.receive(ENV_BYTES)
    conn.send_command("EXEC")
    conn.receive(b"520-Invalid command syntax.  Proper usage follows:\n")
    with pytest.raises(AgiProtocolError, match="usage"):
        conn.receive(b"x" * 60 + b"\n" + b"y" * 60 + b"\n")


SEGMENTS: list[tuple[bytes, list[AgiEvent]]] = [
    (
        b"200 result=1 (some (nested) data)\r\n",
        [Response(200, "1", "some (nested) data", "result=1 (some (nested) data)")],
    ),
    (b"HANGUP\n200 result=0\n", [Hangup(), Response(200, "0", None, "result=0")]),
    (
        USAGE_BLOCK,
        [
            Response(
                520,
                None,
                " Usage: SET VARIABLE <variablename> <value>\n\n"
                "Sets a variable to the current channel. (See also: GET VARIABLE)\n"
                "200 result=1 is not a reply here",
                "Invalid command syntax.  Proper usage follows:",
            )
        ],
    ),
]


def test_environment_split_at_every_position() -> None:
    for i in range(len(ENV_BYTES) + 1):
        conn = AgiServerConnection()
        [env] = feed_all(conn, [ENV_BYTES[:i], ENV_BYTES[i:]])
        assert isinstance(env, Environment)
        assert dict(env.variables) == dict(ENV_VARS)
    conn = AgiServerConnection()
    [env] = feed_all(conn, [ENV_BYTES[i : i + 1] for i in range(len(ENV_BYTES))])
    assert isinstance(env, Environment)
    assert dict(env.variables) == dict(ENV_VARS)


@pytest.mark.parametrize(("segment", "expected"), SEGMENTS)
def test_reply_split_at_every_position(segment: bytes, expected: list[AgiEvent]) -> None:
    # Asterisk answers only after it has read the command, so the command is always sent first.
    for i in range(len(segment) + 1):
        conn = ready()
        conn.send_command("GET VARIABLE", "V")
        assert feed_all(conn, [segment[:i], segment[i:]]) == expected, i
        assert not conn.pending
    conn = ready()
    conn.send_command("GET VARIABLE", "V")
    assert feed_all(conn, [segment[i : i + 1] for i in range(len(segment))]) == expected


def test_full_session_in_realistic_reads() -> None:
    conn = AgiServerConnection()
    [env] = conn.receive(ENV_BYTES)
    assert isinstance(env, Environment)
    for segment, expected in SEGMENTS:
        conn.send_command("SET VARIABLE", "PBXGUARD_VERDICT", "ALLOW")
        assert conn.receive(segment) == expected
    assert conn.hung_up


# -- HANGUP ---------------------------------------------------------------------------------------------


def test_hangup_before_reply_keeps_command_pending() -> None:
    conn = ready()
    conn.send_command("SET VARIABLE", "PBXGUARD_VERDICT", "ALLOW")
    assert conn.receive(b"HANGUP\n") == [Hangup()]
    assert state(conn) == {"env": True, "pending": True, "hung_up": True}  # HANGUP is not the reply
    with pytest.raises(AgiProtocolError, match="pending"):
        conn.send_command("NOOP")
    assert conn.receive(b"200 result=1\n") == [Response(200, "1", None, "result=1")]
    assert state(conn) == {"env": True, "pending": False, "hung_up": True}
    # commands on a dead channel are still allowed (Asterisk answers 511 to most of them)
    conn.send_command("GET VARIABLE", "X")
    assert conn.receive(b"511 Command Not Permitted on a dead channel or intercept routine\n")[0] == Response(
        511, None, None, "Command Not Permitted on a dead channel or intercept routine"
    )


def test_hangup_split_and_together_with_reply() -> None:
    conn = ready()
    conn.send_command("NOOP")
    assert conn.receive(b"HAN") == []
    assert conn.receive(b"GUP\r\n200 result=0\n") == [Hangup(), Response(200, "0", None, "result=0")]


def test_hangup_with_no_pending_command() -> None:
    conn = ready()
    assert conn.receive(b"HANGUP\n") == [Hangup()]
    assert conn.hung_up
    assert not conn.pending


def test_hangup_right_after_environment_in_same_read() -> None:
    conn = AgiServerConnection()
    events = conn.receive(ENV_BYTES + b"HANGUP\n")
    assert isinstance(events[0], Environment)
    assert events[1:] == [Hangup()]


def test_reply_without_pending_command() -> None:
    conn = ready()
    with pytest.raises(AgiProtocolError, match="no command pending"):
        conn.receive(b"200 result=1\n")
    assert conn.failed
    with pytest.raises(AgiProtocolError):
        conn.send_command("NOOP")


@pytest.mark.parametrize("line", [b"2000 result=1\n", b"OK\n", b"20x result=1\n", b"\n", b"200result=1\n"])
def test_malformed_reply(line: bytes) -> None:
    conn = ready()
    conn.send_command("NOOP")
    with pytest.raises(AgiProtocolError, match="malformed"):
        conn.receive(line)


# -- commands -------------------------------------------------------------------------------------------


def test_send_command_quotes_and_escapes() -> None:
    conn = ready()
    assert conn.send_command("SET VARIABLE", "PBXGUARD_VERDICT", "ALLOW") == (
        b'SET VARIABLE "PBXGUARD_VERDICT" "ALLOW"\n'
    )
    assert conn.pending
    conn.receive(b"200 result=1\n")
    line = conn.send_command("SET VARIABLE", "REASON", 'say "hi" \\ bye', "")
    assert line == b'SET VARIABLE "REASON" "say \\"hi\\" \\\\ bye" ""\n'
    conn.receive(b"200 result=1\n")
    assert conn.send_command("NOOP") == b"NOOP\n"
    conn.receive(b"200 result=0\n")
    assert conn.send_command("VERBOSE", "café ☎", "1") == 'VERBOSE "café ☎" "1"\n'.encode()
    assert quote_argument("a\tb") == '"a\tb"'


def test_second_command_while_pending_refused() -> None:
    conn = ready()
    conn.send_command("NOOP")
    with pytest.raises(AgiProtocolError, match="pending"):
        conn.send_command("NOOP")
    assert conn.pending
    conn.receive(b"200 result=0\n")
    conn.send_command("NOOP")


def test_command_before_environment_refused() -> None:
    conn = AgiServerConnection()
    with pytest.raises(AgiProtocolError, match="environment"):
        conn.send_command("NOOP")


@pytest.mark.parametrize("arg", ["a\nb", "a\rb", "ALLOW\r\nEXEC System rm", "x\x00y", "\ud800"])
def test_bad_arguments_refused(arg: str) -> None:
    conn = ready()
    with pytest.raises(AgiProtocolError):
        conn.send_command("SET VARIABLE", "X", arg)
    assert not conn.pending  # nothing was sent


@pytest.mark.parametrize(
    "command", ["", "SET  VARIABLE", "NOOP\n", 'EXEC "x"', " NOOP", "NOOP ", "NO_OP", "NOOP\tX"]
)
def test_bad_command_refused(command: str) -> None:
    conn = ready()
    with pytest.raises(AgiProtocolError, match="invalid AGI command"):
        conn.send_command(command)


def test_command_line_length_bounded_like_asterisk() -> None:
    conn = ready()
    room = MAX_COMMAND_BYTES - len(b'VERBOSE ""\n')
    assert len(conn.send_command("VERBOSE", "x" * room)) == MAX_COMMAND_BYTES
    conn.receive(b"200 result=1\n")
    with pytest.raises(AgiProtocolError, match="longer than"):
        conn.send_command("VERBOSE", "x" * (room + 1))
    with pytest.raises(AgiProtocolError, match="words"):
        conn.send_command("EXEC", *(["x"] * 127))


# -- limits ---------------------------------------------------------------------------------------------


def test_oversized_line() -> None:
    ok = b"agi_network: " + b"y" * 87 + b"\r\n\n"  # 100 bytes of content
    assert len(AgiServerConnection(max_line=100).receive(ok)) == 1
    with pytest.raises(AgiProtocolError, match="longer than 99"):
        AgiServerConnection(max_line=99).receive(ok)
    conn = AgiServerConnection(max_line=100)
    conn.receive(b"agi_network: " + b"y" * 88)
    with pytest.raises(AgiProtocolError, match="longer than"):
        conn.receive(b"yy")


# -- Hypothesis -----------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_arbitrary_bytes_only_raise_protocol_error(data: st.DataObject) -> None:
    pieces = [
        b"\n",
        b"\r\n",
        b"agi_network: yes\n",
        b"agi_x: \xe2\x98\n",
        b"\n",
        b"HANGUP\n",
        b"200 result=1 (x)\n",
    ]
    pieces += [b"520-usage\n", b"520 End\n", b"510 bad\n", b"\xff", b":", b" ", b"("]
    blob = data.draw(
        st.one_of(st.binary(max_size=500), st.lists(st.sampled_from(pieces), max_size=40).map(b"".join))
    )
    conn = AgiServerConnection(
        max_line=data.draw(st.integers(1, 64)),
        max_env_vars=data.draw(st.integers(1, 6)),
        max_usage_bytes=data.draw(st.integers(1, 100)),
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=10)))
    bounds = [0, *cuts, len(blob)]
    for a, b in itertools.pairwise(bounds):
        try:
            events = conn.receive(blob[a:b])
        except AgiProtocolError:
            assert conn.failed
            return
        for event in events:
            assert isinstance(event, Environment | Response | Hangup)
        if conn.environment_received and not conn.pending and data.draw(st.booleans()):
            conn.send_command("NOOP")
