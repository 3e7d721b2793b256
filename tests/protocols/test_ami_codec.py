"""Tests for the sans-IO AMI codec (pbxguard.protocols.ami)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxguard.protocols.ami import (
    BANNER,
    EVENTS_ALL,
    EVENTS_NONE,
    AmiParser,
    AmiProtocolError,
    Banner,
    EventMask,
    Message,
    encode,
    event_class,
    event_classes,
    md5_challenge_key,
    parse_callerid,
    parse_event_mask,
)

ORIGINATE = Message.action(
    "Originate",
    [
        ("ActionID", "pbx-42"),
        ("Channel", "Local/0612345678@vicidial-out"),
        ("Context", "default"),
        ("Exten", "8600051"),
        ("Priority", "1"),
        ("Callerid", '"CAMPAIGN" <0144556677>'),
        ("Timeout", "30000"),
        ("Async", "true"),
        ("Variable", "__PBXGUARD_TOKEN=abc123"),
        ("Variable", "CAMPAIGN=ABC"),
        ("Account", "ABC"),
    ],
)

HANGUP_EVENT = Message.event(
    "Hangup",
    [
        ("Privilege", "call,all"),
        ("Channel", "Local/0612345678@vicidial-out-00000001;2"),
        ("ChannelState", "6"),
        ("ChannelStateDesc", "Up"),
        ("CallerIDNum", "0612345678"),
        ("CallerIDName", "<unknown>"),
        ("ConnectedLineNum", "0144556677"),
        ("ConnectedLineName", "CAMPAIGN"),
        ("Language", "fr"),
        ("AccountCode", "ABC"),
        ("Context", "vicidial-out"),
        ("Exten", "0612345678"),
        ("Priority", "1"),
        ("Uniqueid", "1700000000.17"),
        ("Linkedid", "1700000000.16"),
        ("Cause", "16"),
        ("Cause-txt", "Normal Clearing"),
    ],
)

RESPONSE = Message.response("Success", ActionID="pbx-42", Message="Originate successfully queued")

STREAM = encode(ORIGINATE) + encode(HANGUP_EVENT) + encode(RESPONSE)
EXPECTED = [ORIGINATE, HANGUP_EVENT, RESPONSE]


def parse_all(chunks: list[bytes], **kw: int | bool) -> list[Message | Banner]:
    parser = AmiParser(**kw)  # type: ignore[arg-type]
    out: list[Message | Banner] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


# -- Message helpers ------------------------------------------------------------------------------------


def test_message_lookups_are_case_insensitive_and_keep_order() -> None:
    assert ORIGINATE.get("channel") == "Local/0612345678@vicidial-out"
    assert ORIGINATE.get("CHANNEL") == "Local/0612345678@vicidial-out"
    assert ORIGINATE.get("Missing") is None
    assert ORIGINATE.get("Missing", "x") == "x"
    assert ORIGINATE.get_all("variable") == ["__PBXGUARD_TOKEN=abc123", "CAMPAIGN=ABC"]
    assert ORIGINATE.get_all("nope") == []
    assert ORIGINATE.headers[0] == ("Action", "Originate")


# Keys that fold into one another, or look as if they should: Asterisk folds ASCII only, so the
# KELVIN SIGN (U+212A) is not a "k", the dotted capital I (U+0130) not an "i", ß not "ss".
_KEYS = st.sampled_from(
    [
        "ActionID",
        "actionid",
        "ACTIONID",
        "ActionI",
        "Link",
        "LINK",
        "Lin\u212a",
        "\u0130D",
        "id",
        "ß",
        "SS",
        "",
    ]
)


@given(headers=st.lists(st.tuples(_KEYS, st.sampled_from(["a", "b", ""])), max_size=8), key=_KEYS)
def test_lookups_match_folding_every_key(headers: list[tuple[str, str]], key: str) -> None:
    """The lookups skip keys of another length; they must find exactly what folding every key finds."""

    def fold(text: str) -> str:
        return text.lower() if text.isascii() else text

    message = Message(tuple(headers))
    same = [value for name, value in headers if fold(name) == fold(key)]
    assert message.get(key, "absent") == (same[0] if same else "absent")
    assert message.get_all(key) == same
    assert message.without(key).headers == tuple((n, v) for n, v in headers if fold(n) != fold(key))
    replaced = message.replace(key, "new").headers
    assert [v for n, v in replaced if fold(n) == fold(key)] == ["new"]
    assert [(n, v) for n, v in replaced if fold(n) != fold(key)] == [
        (n, v) for n, v in headers if fold(n) != fold(key)
    ]


def test_message_kind_and_action_id() -> None:
    assert ORIGINATE.kind == ("action", "Originate")
    assert HANGUP_EVENT.kind == ("event", "Hangup")
    assert RESPONSE.kind == ("response", "Success")
    assert Message((("Foo", "bar"),)).kind == ("unknown", "")
    assert ORIGINATE.action_id == "pbx-42"
    assert HANGUP_EVENT.action_id is None
    assert Message((("action", "ping"), ("actionid", "  7"))).action_id == "7"
    assert Message((("Action", "Ping"), ("ActionID", ""))).action_id is None


def test_kind_follows_asterisk_not_header_order() -> None:
    # Asterisk runs this as an Originate: a gate must not take it for a response.
    sneaky = Message((("Response", "Success"), ("Action", "Originate"), ("Application", "System")))
    assert sneaky.kind == ("action", "Originate")
    # Empty Action headers are skipped, leading blanks dropped (__astman_get_header).
    assert Message((("Action", ""), ("ACTION", "\t Originate"))).kind == ("action", "Originate")
    assert Message((("Action", "  "),)).kind == ("action", "")
    # Keys are matched exactly (no trimming), ASCII case-insensitively.
    assert Message((("Action ", "Originate"), ("Event", "X"))).kind == ("event", "X")
    assert Message((("\u212aey", "v"),)).get("key") is None  # KELVIN SIGN is not "K"


def test_server_kind_uses_the_first_header() -> None:
    # a dialplan UserEvent(x,Action: Originate) reaches the client with an Action header
    user_event = Message.event(
        "UserEvent", [("Privilege", "user,all"), ("UserEvent", "x"), ("Action", "Originate")]
    )
    assert user_event.server_kind == ("event", "UserEvent")
    assert user_event.kind == ("action", "Originate")
    assert RESPONSE.server_kind == ("response", "Success")
    assert ORIGINATE.server_kind == ("unknown", "")
    assert Message(()).server_kind == ("unknown", "")


def test_effective_skips_leading_blanks() -> None:
    msg = Message.action("Originate", Application="  System")
    assert msg.get("Application") == "  System"
    assert msg.effective("application") == "System"
    assert msg.effective("Data") is None


def test_functional_updates() -> None:
    msg = Message.action("Originate", [("Variable", "A=1"), ("Channel", "x"), ("variable", "B=2")])
    assert msg.with_header("Async", "true").headers[-1] == ("Async", "true")
    replaced = msg.replace("VARIABLE", "C=3")
    assert replaced.headers == (("Action", "Originate"), ("Variable", "C=3"), ("Channel", "x"))
    assert msg.replace("ActionID", "9").headers[-1] == ("ActionID", "9")
    assert msg.without("variable").headers == (("Action", "Originate"), ("Channel", "x"))
    assert msg.headers[1] == ("Variable", "A=1")  # original untouched
    with pytest.raises(AttributeError):
        msg.headers = ()  # type: ignore[misc]


def test_constructors() -> None:
    assert Message.action("Ping").headers == (("Action", "Ping"),)
    assert Message.action("Login", {"Username": "u", "Secret": "s"}).headers == (
        ("Action", "Login"),
        ("Username", "u"),
        ("Secret", "s"),
    )
    assert Message.event("UserEvent", UserEvent="x").kind == ("event", "UserEvent")
    # positional-only name: "name" can still be a header
    assert Message.action("X", name="y").get("name") == "y"


# -- encode ---------------------------------------------------------------------------------------------


def test_encode_format() -> None:
    assert encode(Message.action("Ping", ActionID="1")) == b"Action: Ping\r\nActionID: 1\r\n\r\n"
    assert encode(Message((("Key", ""),))) == b"Key: \r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        (("Action", "Ping"), ("ActionID", "1\r\nAction: Command")),
        (("Action", "Ping"), ("ActionID", "1\nAction: Command")),
        (("Action", "Ping"), ("ActionID", "1\rX")),
        (("Action", "Ping\r\n\r\nAction: Originate"),),
        (("Action\r\nAction", "Ping"),),
        (("Act:ion", "Ping"),),
        (("Action", "Ping\x00"),),
        (("Action", "\ud800"),),
        (),
    ],
)
def test_encode_refuses_injection(headers: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(AmiProtocolError):
        encode(Message(headers))


def test_round_trip_keeps_repeated_keys() -> None:
    assert parse_all([STREAM]) == EXPECTED
    odd = Message((("Key", "  two leading spaces"), ("Empty", ""), ("Colon", "a: b :c"), ("Key", "again")))
    assert parse_all([encode(odd)]) == [odd]


# -- parser ---------------------------------------------------------------------------------------------


def test_every_split_position() -> None:
    for i in range(len(STREAM) + 1):
        assert parse_all([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_byte_by_byte() -> None:
    assert parse_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_three_way_splits() -> None:
    n = len(STREAM)
    for i in range(0, n, 7):
        for j in range(i, n, 11):
            assert parse_all([STREAM[:i], STREAM[i:j], STREAM[j:]]) == EXPECTED


def test_utf8_split_inside_multibyte_char() -> None:
    data = "Event: UserEvent\r\nMessage: café ☎\r\n\r\n".encode()
    expected = [Message((("Event", "UserEvent"), ("Message", "café ☎")))]
    start = data.index("é".encode())
    for i in range(start, len(data)):
        assert parse_all([data[:i], data[i:]]) == expected
    assert parse_all([data[i : i + 1] for i in range(len(data))]) == expected


def test_invalid_utf8_is_replaced_not_raised() -> None:
    out = parse_all([b"Event: X\r\nName: a\xff\xfeb\xe2\x98\r\n\r\n"])
    assert out == [Message((("Event", "X"), ("Name", "a\ufffd\ufffdb\ufffd")))]


def test_bare_lf_and_mixed_line_endings() -> None:
    out = parse_all([b"Action: Ping\nActionID: 1\r\n\n", b"Event: X\r\nA: b\n\r\n"])
    assert out == [Message.action("Ping", ActionID="1"), Message((("Event", "X"), ("A", "b")))]


def test_value_parsing_rules() -> None:
    out = parse_all([b"A: v\r\nB:v\r\nC:  v \r\nD:\r\nE: x:y\r\nF: a\rb\r\n\r\n"])
    assert out == [Message((("A", "v"), ("B", "v"), ("C", " v "), ("D", ""), ("E", "x:y"), ("F", "a\rb")))]


def test_leading_empty_lines_between_messages_are_ignored() -> None:
    out = parse_all([b"\r\n\r\n\nAction: Ping\r\n\r\n\r\n\r\nAction: Ping\r\n\r\n"])
    assert out == [Message.action("Ping"), Message.action("Ping")]


def test_partial_state() -> None:
    parser = AmiParser()
    seen = [parser.partial]
    parser.feed(b"Action: Pi")
    seen.append(parser.partial)
    parser.feed(b"ng\r\n")
    seen.append(parser.partial)
    assert parser.feed(b"\r\n") == [Message.action("Ping")]
    seen.append(parser.partial)
    assert seen == [False, True, True, False]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        AmiParser(max_line=0)
    with pytest.raises(ValueError, match="positive"):
        AmiParser(max_message_bytes=0)
    with pytest.raises(ValueError, match="positive"):
        AmiParser(max_headers=0)


def test_malformed_line_fails_and_parser_stays_failed() -> None:
    parser = AmiParser()
    with pytest.raises(AmiProtocolError, match="malformed header line"):
        parser.feed(b"Action: Ping\r\nthis has no colon\r\n\r\n")
    assert parser.failed
    with pytest.raises(AmiProtocolError, match="malformed header line"):
        parser.feed(b"Action: Ping\r\n\r\n")


def test_nul_byte_refused() -> None:
    # Asterisk cuts a line at NUL: "Originate\0x" would be an Originate to Asterisk.
    with pytest.raises(AmiProtocolError, match="NUL"):
        parse_all([b"Action: Originate\x00x\r\n\r\n"])


def test_oversized_line() -> None:
    line = b"Key: " + b"x" * 95 + b"\r\n"  # 100 bytes of content
    assert parse_all([line + b"\r\n"], max_line=100) == [Message((("Key", "x" * 95),))]
    assert parse_all([line.replace(b"\r\n", b"\n") + b"\n"], max_line=100) == [Message((("Key", "x" * 95),))]
    with pytest.raises(AmiProtocolError, match="line longer than 99"):
        parse_all([line + b"\r\n"], max_line=99)
    # an endless line without a newline is refused before it is complete
    parser = AmiParser(max_line=100)
    parser.feed(b"Key: " + b"x" * 96)
    with pytest.raises(AmiProtocolError, match="line longer"):
        parser.feed(b"yy")
    with pytest.raises(AmiProtocolError):
        parser.feed(b"\r\n\r\n")


def test_oversized_message() -> None:
    # the size of a message counts its header lines, each with one byte for its line ending
    msg = Message(tuple((f"H{i}", "v" * 20) for i in range(10)))
    size = len(encode(msg).replace(b"\r\n", b"\n")) - 1
    for data in (encode(msg), encode(msg).replace(b"\r\n", b"\n")):
        assert parse_all([data], max_message_bytes=size) == [msg]
        with pytest.raises(AmiProtocolError, match="message larger than"):
            parse_all([data], max_message_bytes=size - 1)
        # split: the unfinished message is checked at the end of every feed
        with pytest.raises(AmiProtocolError, match="message larger than"):
            parse_all([data[i : i + 5] for i in range(0, len(data), 5)], max_message_bytes=100)
        parser = AmiParser(max_message_bytes=100)
        parser.feed(data[:99])
        with pytest.raises(AmiProtocolError, match="message larger than"):
            parser.feed(data[99:140])
    # a message that ends in a later feed counts the bytes of the earlier ones
    parser = AmiParser(max_message_bytes=size)
    assert parser.feed(encode(msg)[:50]) == []
    assert parser.feed(encode(msg)[50:]) == [msg]
    parser = AmiParser(max_message_bytes=size - 1)
    parser.feed(encode(msg)[:50])
    with pytest.raises(AmiProtocolError, match="message larger than"):
        parser.feed(encode(msg)[50:])


def test_too_many_headers() -> None:
    msg = Message(tuple((f"H{i}", "v") for i in range(11)))
    assert parse_all([encode(msg)], max_headers=11) == [msg]
    with pytest.raises(AmiProtocolError, match="more than 10 headers"):
        parse_all([encode(msg)], max_headers=10)


def test_default_limits_accept_a_big_realistic_message() -> None:
    msg = Message.action("Originate", [("Variable", f"V{i}={'x' * 100}") for i in range(200)])
    assert parse_all([encode(msg)]) == [msg]


def test_banner() -> None:
    data = BANNER + b"Response: Success\r\nMessage: Authentication accepted\r\n\r\n"
    for i in range(len(data) + 1):
        out = parse_all([data[:i], data[i:]], expect_banner=True)
        assert out == [
            Banner("Asterisk Call Manager/11.0.0"),
            Message.response("Success", Message="Authentication accepted"),
        ]
    banner = out[0]
    assert isinstance(banner, Banner)
    assert banner.version == "11.0.0"
    assert Banner("SSH-2.0-OpenSSH_9.6").version is None
    # without expect_banner the same line is a malformed header
    with pytest.raises(AmiProtocolError):
        parse_all([data])


# -- helpers --------------------------------------------------------------------------------------------


def test_md5_challenge_key() -> None:
    challenge, secret = "840254113", "s3cr3t"
    expected = hashlib.md5(b"840254113s3cr3t").hexdigest()
    assert md5_challenge_key(challenge, secret) == expected
    assert md5_challenge_key("", "") == "d41d8cd98f00b204e9800998ecf8427e"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", EVENTS_ALL),
        ("On", EVENTS_ALL),
        ("yes", EVENTS_ALL),
        ("true", EVENTS_ALL),
        ("all", EVENTS_ALL),
        ("call,all", EVENTS_ALL),
        ("", EVENTS_ALL),
        ("off", EVENTS_NONE),
        ("no", EVENTS_NONE),
        ("false", EVENTS_NONE),
        ("none", EVENTS_NONE),
        ("0", EVENTS_NONE),
        ("call,user", EventMask(False, frozenset({"call", "user"}))),
        ("Call, USER ", EventMask(False, frozenset({"call", "user"}))),
        ("system", EventMask(False, frozenset({"system"}))),
        ("system,bogus", EventMask(False, frozenset({"system"}))),
        ("1", EventMask(False, frozenset({"system"}))),  # a number is a bit mask, as in Asterisk
        ("6", EventMask(False, frozenset({"call", "log"}))),
        ("2147483647", EVENTS_ALL),
    ],
)
def test_parse_event_mask(value: str, expected: EventMask) -> None:
    assert parse_event_mask(value) == expected


def test_event_mask_allows() -> None:
    mask = parse_event_mask("call,user")
    assert mask.allows("call")
    assert mask.allows("USER")
    assert not mask.allows("system")
    assert mask.allows_any(["system", "call"])
    assert not parse_event_mask("off").allows("call")
    assert parse_event_mask("on").allows("anything")
    # OriginateResponse is a call event: "originate" alone never receives it
    assert not parse_event_mask("originate").allows(event_class("OriginateResponse"))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("Newchannel", "call"),
        ("Newstate", "call"),
        ("Hangup", "call"),
        ("HangupRequest", "call"),
        ("SoftHangupRequest", "call"),
        ("DialBegin", "call"),
        ("DialEnd", "call"),
        ("DialState", "call"),
        ("NewCallerid", "call"),
        ("NewConnectedLine", "call"),
        ("OriginateResponse", "call"),
        ("BridgeEnter", "call"),
        ("BridgeLeave", "call"),
        ("BridgeCreate", "call"),
        ("BridgeDestroy", "call"),
        ("LocalBridge", "call"),
        ("LocalOptimizationBegin", "call"),
        ("LocalOptimizationEnd", "call"),
        ("Rename", "call"),
        ("Newexten", "dialplan"),
        ("NewExten", "dialplan"),
        ("VarSet", "dialplan"),
        ("Cdr", "cdr"),
        ("CEL", "call"),
        ("FullyBooted", "system"),
        ("Shutdown", "system"),
        ("Reload", "system"),
        ("UserEvent", "user"),
        ("AgentCalled", "agent"),
        ("QueueCallerJoin", "agent"),
        ("DTMFEnd", "dtmf"),
        ("InvalidPassword", "security"),
        ("SomethingNew", "call"),
    ],
)
def test_event_class(name: str, cls: str) -> None:
    assert event_class(name) == cls


def test_event_classes_prefers_privilege_header() -> None:
    assert event_classes(HANGUP_EVENT) == frozenset({"call"})
    assert event_classes(Message.event("VarSet", Privilege="dialplan,all")) == frozenset({"dialplan"})
    assert event_classes(Message.event("VarSet")) == frozenset({"dialplan"})
    assert event_classes(Message.event("Custom", Privilege="user,call,all")) == frozenset({"user", "call"})
    assert event_classes(Message.event("Hangup", Privilege="bogus")) == frozenset({"call"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"Jean Dupont" <0612345678>', ("Jean Dupont", "0612345678")),
        ("Jean Dupont <+33612345678>", ("Jean Dupont", "+33612345678")),
        ("<0612345678>", (None, "0612345678")),
        ("0612345678", (None, "0612345678")),
        ("+33 6 12-34.56 78", (None, "+33612345678")),
        ("06 12 34 56 78", (None, "0612345678")),
        ('"" <0144556677>', (None, "0144556677")),
        ('"Say \\"hi\\"" <123>', ('Say "hi"', "123")),
        ("<unknown>", (None, "")),
        ('"Anonymous" <anonymous>', ("Anonymous", "")),
        ("Jean <>", ("Jean", "")),
        ("Jean <0612", ("Jean", "0612")),
        ("Jean Dupont", ("Jean Dupont", "")),
        ('"0612345678"', ("0612345678", "")),
        ("", (None, "")),
        ("   ", (None, "")),
        ("[1-3]2.", ("[1-3]2.", "")),  # the shrink keeps "-" inside brackets: not a number, so a name
        ("01.23.45", (None, "012345")),
    ],
)
def test_parse_callerid(value: str, expected: tuple[str | None, str]) -> None:
    assert parse_callerid(value) == expected


# -- Hypothesis -----------------------------------------------------------------------------------------


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_arbitrary_bytes_only_raise_protocol_error(data: st.DataObject) -> None:
    blob = data.draw(
        st.one_of(
            st.binary(max_size=600),
            st.lists(
                st.sampled_from(
                    [b"\r\n", b"\n", b"\r", b":", b" ", b"Action", b"Event: X", b"\xe2\x98", b"\x8e", b"\x00"]
                ),
                max_size=60,
            ).map(b"".join),
        )
    )
    kw = data.draw(st.fixed_dictionaries({"max_line": st.integers(1, 64), "max_headers": st.integers(1, 8)}))
    banner = data.draw(st.booleans())
    parser = AmiParser(max_message_bytes=200, expect_banner=banner, **kw)
    for chunk in data.draw(chunkings(blob)):
        try:
            out = parser.feed(chunk)
        except AmiProtocolError:
            assert parser.failed
            break
        for item in out:
            assert isinstance(item, Message | Banner)


_key_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00:"), min_size=1, max_size=20
)
_value_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.tuples(_key_text, _value_text), min_size=1, max_size=8), min_size=1, max_size=4),
    st.data(),
)
def test_round_trip_arbitrary_headers(messages: list[list[tuple[str, str]]], data: st.DataObject) -> None:
    msgs = [Message(tuple(h)) for h in messages]
    stream = b"".join(encode(m) for m in msgs)
    parser = AmiParser()
    out: list[Message | Banner] = []
    for chunk in data.draw(chunkings(stream)):
        out.extend(parser.feed(chunk))
    assert out == msgs


def _outcome(blob: bytes, cuts: list[int], banner: bool) -> tuple[list[Message | Banner], bool]:
    parser = AmiParser(max_line=30, max_headers=4, max_message_bytes=60, expect_banner=banner)
    out: list[Message | Banner] = []
    bounds = [0, *cuts, len(blob)]
    try:
        for a, b in itertools.pairwise(bounds):
            out.extend(parser.feed(blob[a:b]))
    except AmiProtocolError:
        return out, True
    return out, False


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"\r\n", b"\n", b"\r", b":", b" ", b"Key: v\r\n", b"\r\n\r\n", b"\xe2\x98", b"\x8e"]
        ),
        max_size=40,
    ).map(b"".join),
    st.data(),
)
def test_chunking_never_changes_the_outcome(blob: bytes, data: st.DataObject) -> None:
    banner = data.draw(st.booleans())
    whole, whole_failed = _outcome(blob, [], banner)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    split, split_failed = _outcome(blob, cuts, banner)
    assert whole_failed == split_failed
    if whole_failed:  # what came out before the error is a prefix of the same sequence
        n = min(len(whole), len(split))
        assert whole[:n] == split[:n]
    else:
        assert whole == split
