"""What an Originate dials, presents and runs (pbxguard.gates.dialstring): table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbxguard.gates.dialstring import (
    DialRules,
    OriginateRefusal,
    OriginateRequest,
    dangerous_content,
    escape_app_arg,
    extract_number,
    inspect_originate,
    parse_variables,
    reserved_variable,
    split_app_args,
)
from pbxguard.policy.numbers import parse_destination
from pbxguard.protocols.ami import Message

DEFAULTS = DialRules.build()

EXTRACTION = [
    # PJSIP
    ("PJSIP/0612345678@trunk", "0612345678"),
    ("pjsip/0612345678@trunk", "0612345678"),
    ("PJSIP/+33612345678@trunk", "+33612345678"),
    ("PJSIP/trunk/sip:0612345678@carrier.example:5060", "0612345678"),
    ("PJSIP/trunk/sips:0612345678@carrier.example;transport=tls", "0612345678"),
    ("PJSIP/trunk/0612345678", "0612345678"),
    ("PJSIP/0033612345678@trunk", "+33612345678"),
    # chan_sip
    ("SIP/trunk/0612345678", "0612345678"),
    ("SIP/0612345678@peer", "0612345678"),
    # IAX2
    ("IAX2/peer/0612345678", "0612345678"),
    ("IAX2/user:secret@peer/0612345678", "0612345678"),
    ("IAX2/peer:4569/0612345678@default", "0612345678"),
    # DAHDI
    ("DAHDI/g1/0612345678", "0612345678"),
    ("DAHDI/r2/0612345678", "0612345678"),
    ("DAHDI/1/0612345678", "0612345678"),
    # Local
    ("Local/0612345678@from-dialer", "0612345678"),
    ("Local/0612345678@from-dialer/n", "0612345678"),
    ("Local/+33612345678@out/nj", "+33612345678"),
    # not a consumer number: the gate blocks INVALID_DESTINATION
    ("PJSIP/agent1001", None),
    ("PJSIP/trunk", None),
    ("SIP/peer", None),
    ("Local/s@agents", None),
    ("Local/${NUMBER}@out", None),
    ("DAHDI/g1/0612345678w123", None),
    ("PJSIP/06 12 34 56 78@trunk", None),
    ("Motif/account/0612345678", None),
    ("Local/0612345678@ctx/n/extra", None),
    ("", None),
]


@pytest.mark.parametrize(("dial_string", "number"), EXTRACTION)
def test_default_patterns(dial_string: str, number: str | None) -> None:
    assert extract_number(dial_string, DEFAULTS) == number


@pytest.mark.parametrize(
    ("rules", "dial_string", "number"),
    [
        (DialRules.build(strip_prefixes=["9"]), "Local/90612345678@out", "0612345678"),
        (DialRules.build(strip_prefixes=["9"]), "Local/9@out", "9"),  # never strip to nothing
        (DialRules.build(strip_prefixes=["9"]), "Local/900336123@out", "+336123"),
        (DialRules.build(strip_prefixes=["9", "0"]), "PJSIP/90612345678@t", "612345678"),
        (DialRules.build(international_prefix=""), "PJSIP/0033612345678@t", "0033612345678"),
        (DialRules.build(international_prefix="011"), "PJSIP/01133612345678@t", "+33612345678"),
        # Custom patterns come first, per technology as the administrator writes them.
        (DialRules.build([r"SIP/(?P<number>[0-9]+)-carrier"]), "SIP/0612345678-carrier", "0612345678"),
        (DialRules.build([r"Motif/[^/]+/(?P<number>[0-9]+)"]), "Motif/account/0612345678", "0612345678"),
        (DialRules.build([r"PJSIP/x(?P<number>[0-9]+)@t"]), "PJSIP/0612345678@t", "0612345678"),
        (DialRules.build(builtin_patterns=False), "PJSIP/0612345678@t", None),
    ],
)
def test_configured_rules(rules: DialRules, dial_string: str, number: str | None) -> None:
    assert extract_number(dial_string, rules) == number


def test_bad_patterns_are_reported() -> None:
    with pytest.raises(ValueError, match="group"):
        DialRules.build([r"PJSIP/([0-9]+)@t"])
    with pytest.raises(ValueError, match="compile"):
        DialRules.build([r"PJSIP/(?P<number>[0-9+@t"])
    with pytest.raises(ValueError, match="compile"):
        DialRules.build(internal_channels=["("])


def test_the_unparsed_marker_is_never_a_valid_destination() -> None:
    for dial_string, number in EXTRACTION:
        if number is None:
            assert not parse_destination(f"unparsed:{dial_string}").valid


@pytest.mark.parametrize(
    ("text", "args"),
    [
        ("a,b,c", ["a", "b", "c"]),
        ("a,", ["a", ""]),
        ("", []),
        ('"a,b",c', ["a,b", "c"]),
        ("f(a,b),c", ["f(a,b)", "c"]),
        ("x[1,2],y", ["x[1,2]", "y"]),
        ("a\\,b,c", ["a,b", "c"]),
        ("a\\\\,b", ["a\\", "b"]),
    ],
)
def test_split_app_args_like_asterisk(text: str, args: list[str]) -> None:
    assert split_app_args(text) == args


@given(st.text(max_size=40))
def test_escaped_values_read_back_as_one_argument(value: str) -> None:
    assert split_app_args(escape_app_arg(value)) == ([value] if value else [])


def test_variables_split_like_man_do_variable_value() -> None:
    assert parse_variables([" A=1,B=2", "C=x=y", "noequals", "=empty", 'D="1,2"']) == [
        ("A", "1"),
        ("B", "2"),
        ("C", "x=y"),
        ("D", "1,2"),
    ]


def _originate(**headers: str) -> Message:
    base = {"Channel": "PJSIP/0612345678@trunk", "Context": "agents", "Exten": "100", "Priority": "1"}
    base.update(headers)
    return Message.action("Originate", **base)


def _variables(*values: str) -> Message:
    headers = [("Channel", "PJSIP/0612345678@trunk"), ("Context", "a"), ("Exten", "1"), ("Priority", "1")]
    headers += [("Variable", v) for v in values]
    return Message.action("Originate", headers)


def test_inspect_a_plain_originate() -> None:
    request = inspect_originate(
        _originate(CallerID='"ACME" <01 62 12 34 56>', Async="yes", Timeout="25000"), default_campaign="c1"
    )
    assert request == OriginateRequest(
        channel="PJSIP/0612345678@trunk",
        number="0612345678",
        dial_string="PJSIP/0612345678@trunk",
        needs_decision=True,
        caller_id="0162123456",
        campaign="c1",
        is_async=True,
        timeout_ms=25000,
    )


@pytest.mark.parametrize(
    ("message", "campaign", "caller_id"),
    [
        (_originate(Account="acct"), "acct", ""),
        (_variables("PBXGUARD_CAMPAIGN=c2"), "c2", ""),
        (_variables("__PBXGUARD_CAMPAIGN=c3,X=1"), "c3", ""),
        (_variables("CALLERID(num)=0162123456"), "dflt", "0162123456"),
        (_variables('CALLERID(all)="A" <0162123456>'), "dflt", "0162123456"),
        (_variables("callerid( num )=0162123456"), "dflt", "0162123456"),
        (_variables("CALLERID(num)=0162123456", "CALLERID(num-pres)=prohib_not_screened"), "dflt", ""),
        (_variables("CALLERID(pres)=unavailable"), "dflt", ""),
        (_variables("CALLERID(pres)=allowed_not_screened", "CALLERID(num)=0162123456"), "dflt", "0162123456"),
        (_variables("CALLERPRES()=35"), "dflt", ""),
        (_variables("CALLERID(num)=0162123456", "CALLERID(num)=0162123456"), "dflt", "0162123456"),
        # The CallerID header's number is applied after the variables: it wins.
        (
            _variables("CALLERID(num)=0611111111").with_header("CallerID", "<0162123456>"),
            "dflt",
            "0162123456",
        ),
        (_variables("CALLERID(num)=0162123456").with_header("CallerID", '"Name only"'), "dflt", "0162123456"),
        (
            _variables("CALLERID(num)=1", "CALLERID(num)=2").with_header("CallerID", "0162123456"),
            "dflt",
            "0162123456",
        ),
        (_variables("CALLERID(num-pres)=prohib").with_header("CallerID", "0162123456"), "dflt", ""),
    ],
)
def test_campaign_and_caller_id(message: Message, campaign: str, caller_id: str) -> None:
    request = inspect_originate(message, default_campaign="dflt")
    assert isinstance(request, OriginateRequest)
    assert request.campaign == campaign
    assert request.caller_id == caller_id


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (Message.action("Originate", Exten="1"), "Channel not specified"),
        (_originate(Channel="  "), "Channel not specified"),
        (_originate(Channel="PJSIP"), "Invalid channel"),
        (_originate(Channel="Local/" + "1" * 300 + "@x"), "Channel longer than 255 bytes"),
        (
            Message.action("Originate", Channel="PJSIP/0612345678@t", Exten="1"),
            "requires 'Context' and 'Priority'",
        ),
        (_originate(Priority="0"), "requires 'Context' and 'Priority'"),
        (_variables("CALLERID(num)=0162123456", "CALLERID(num)=0162999999"), "conflicting CALLERID"),
        (_variables("PBXGUARD_CAMPAIGN=a", "_PBXGUARD_CAMPAIGN=b"), "conflicting PBXGUARD_CAMPAIGN"),
        (_originate(Application="Dial", Data="PJSIP/0698765432@trunk"), "more than one outside destination"),
    ],
)
def test_refused_before_any_decision(message: Message, text: str) -> None:
    refusal = inspect_originate(message)
    assert isinstance(refusal, OriginateRefusal)
    assert text in refusal.message


def test_priority_label_is_left_to_asterisk() -> None:
    assert isinstance(inspect_originate(_originate(Priority="start")), OriginateRequest)
    assert isinstance(
        inspect_originate(_originate(Priority="", Application="Playback", Data="x")), OriginateRequest
    )


def test_internal_channels_are_checked_on_what_they_dial() -> None:
    rules = DialRules.build(internal_channels=[r"PJSIP/[0-9]{3,4}"])
    # An agent's phone calling a consumer through Dial: the consumer's number is the destination.
    request = inspect_originate(
        _originate(Channel="PJSIP/1001", Application="Dial", Data="PJSIP/0612345678@trunk,30,tT"), rules
    )
    assert isinstance(request, OriginateRequest)
    assert (request.number, request.needs_decision) == ("0612345678", True)
    request = inspect_originate(
        _originate(Channel="PJSIP/1001", Application="RetryDial", Data="busy,5,3,PJSIP/0612345678@trunk,30"),
        rules,
    )
    assert isinstance(request, OriginateRequest) and request.number == "0612345678"
    # An agent's phone playing a message or joining a conference: nothing outside to decide on.
    request = inspect_originate(_originate(Channel="PJSIP/1001", Application="Playback", Data="hello"), rules)
    assert isinstance(request, OriginateRequest) and not request.needs_decision
    # Dialling two consumers at once is refused, internal legs aside.
    two = _originate(Channel="PJSIP/1001", Application="Dial", Data="PJSIP/0612345678@t&PJSIP/0698765432@t")
    assert isinstance(inspect_originate(two, rules), OriginateRefusal)
    agents = _originate(Channel="PJSIP/1001", Application="Dial", Data="PJSIP/1002&PJSIP/0612345678@t")
    request = inspect_originate(agents, rules)
    assert isinstance(request, OriginateRequest) and request.number == "0612345678"
    # Without internal patterns the Channel is always the consumer.
    request = inspect_originate(_originate(Channel="PJSIP/1001", Application="Playback", Data="x"))
    assert isinstance(request, OriginateRequest) and request.needs_decision and request.number == ""


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Application": "System", "Data": "id"}, "application System"),
        ({"Application": "  SYSTEM", "Data": "id"}, "application SYSTEM"),
        ({"Application": "TrySystem", "Data": "id"}, "application TrySystem"),
        ({"Application": "Shell", "Data": "id"}, "application Shell"),
        ({"Application": "ExecIf", "Data": "$[1]?Playback(x)"}, "application ExecIf"),
        ({"Application": "Originate", "Data": "PJSIP/0698765432@t,app,Playback"}, "application Originate"),
        ({"Application": "ExternalIVR", "Data": "ivr://10.0.0.1"}, "application ExternalIVR"),
        ({"Application": "AGI", "Data": "agi://192.0.2.1/x"}, "AGI to another host (192.0.2.1)"),
        ({"Application": "EAGI", "Data": "agi://evil.example:4573/x"}, "AGI to another host"),
        ({"Application": "DeadAGI", "Data": "hagi://cluster/x"}, "AGI to another host"),
        ({"Application": "AGI", "Data": "../../bin/sh"}, "outside agi-bin"),
        ({"Application": "AGI", "Data": "/usr/bin/python3,-c,x"}, "outside agi-bin"),
        ({"Application": "Queue", "Data": "q,t,,,,agi://10.0.0.9/x"}, "Queue with AGI to another host"),
        ({"Application": "MixMonitor", "Data": "f.wav,,rm -rf /"}, "post-recording command"),
        ({"Application": "Playback", "Data": "${SHELL(id)}"}, "function SHELL() in Data"),
        ({"Variable": "A=${sHeLl (id)}"}, "function SHELL() in Variable"),
        ({"Variable": "FILE(/tmp/x,,,a)=1"}, "function FILE()"),
        ({"Variable": "A=${EVAL(${B})}"}, "function EVAL()"),
        ({"Variable": "A=${CURL(http://x)}"}, "function CURL()"),
        ({"Variable": "A=${DB_DELETE(a/b)}"}, "function DB_DELETE()"),
        ({"Variable": "A=${ODBC_X(1)}"}, "function ODBC_X()"),
        ({"Variable": "A=${SH${E}ELL(id)}"}, "run-time built"),
        ({"Variable": "A=${${B}}"}, "run-time built"),
        ({"CallerID": "${SYSTEM(id)}"}, "function SYSTEM() in CallerID"),
    ],
)
def test_dangerous_originates(headers: dict[str, str], problem: str) -> None:
    found = dangerous_content(_originate(**headers))
    assert found is not None
    assert problem in found


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Application": "Playback", "Data": "hello-world"},
        {"Application": "AGI", "Data": "agi://127.0.0.1:4573/check,${EXTEN}"},
        {"Application": "AGI", "Data": "agi://localhost/check"},
        {"Application": "AGI", "Data": "agi://[::1]:4573/check"},
        {"Application": "AGI", "Data": "agi-vicidial.agi,foo"},
        {"Application": "AGI", "Data": "agi:async"},
        {"Application": "MixMonitor", "Data": "f.wav,b"},
        {"Application": "Queue", "Data": "sales,t"},
        {"Variable": "A=${CALLERID(num)},B=${EXTEN:1},C=${HASH(x,y)}"},
        {"Variable": "FILENAME=x", "Account": "DB-1"},
        {"Variable": "STATUS=1,ENVIRONMENT=prod"},
    ],
)
def test_harmless_originates(headers: dict[str, str]) -> None:
    assert dangerous_content(_originate(**headers)) is None


def test_other_actions() -> None:
    assert dangerous_content(Message.action("Setvar", Channel="x", Variable="FILE(/etc/passwd)", Value="1"))
    assert dangerous_content(Message.action("Getvar", Channel="x", Variable="SHELL(id)"))
    assert dangerous_content(Message.action("MixMonitor", Channel="x", File="a.wav", Command="rm -rf /"))
    assert dangerous_content(Message.action("MixMonitor", Channel="x", File="a.wav")) is None
    assert dangerous_content(Message.action("Ping")) is None
    assert reserved_variable(Message.action("Setvar", Channel="x", Variable="__PBXGUARD_TOKEN", Value="1"))
    assert reserved_variable(_variables("A=1,pbxguard_token=x"))
    assert not reserved_variable(_variables("PBXGUARD_CAMPAIGN=x"))


@given(st.text(max_size=300))
def test_inspection_never_raises(text: str) -> None:
    message = _originate(Channel=text, Variable=text, Application=text[:20], Data=text, CallerID=text)
    dangerous_content(message)
    inspect_originate(message)
    extract_number(text, DEFAULTS)
