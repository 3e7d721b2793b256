"""The AMI gate's security promises: constant-time secrets, backoff after failed logins, the per-user
action allowlist, and nothing reaching Asterisk before a successful login.

Against the gate tests' scripted fake Asterisk (tests/gates/fake_asterisk_ami.py), which records every
action it receives: "nothing reached Asterisk" is checked there, not inferred from the answers.
"""

from __future__ import annotations

import ast
import asyncio
import hmac
import inspect
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fake_asterisk_ami import AmiTestClient, FakeAsterisk

from pbxguard.api import context as api_context
from pbxguard.config import (
    AmiGateConfig,
    AmiUpstreamConfig,
    AmiUserConfig,
    AsteriskConfig,
    Config,
    GatesConfig,
    Mode,
    Secret,
)
from pbxguard.gates import ami_proxy
from pbxguard.gates.ami_proxy import AmiGate, ClientSession
from pbxguard.gates.login_throttle import LoginThrottle, throttle_keys
from pbxguard.guard import Guard
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message, encode, md5_challenge_key

pytestmark = pytest.mark.timeout(60)

USER, SECRET = "dialer", "dialer-secret-0123456789"
ADMIN, ADMIN_SECRET = "admin", "admin-secret-0123456789"
BASE = 0.01  # auth_failure_delay: the first answer to a failed login, and the backoff's unit


def forwarded(fake: FakeAsterisk, since: int = 0) -> list[Message]:
    """Actions that reached Asterisk for clients (pbxguard's own link actions excluded)."""
    return [a for a in fake.actions[since:] if not (a.action_id or "").startswith("pbxg-link-")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    server = FakeAsterisk()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


GateFactory = Callable[..., Awaitable[AmiGate]]


@pytest.fixture
async def make_gate(fake: FakeAsterisk) -> AsyncIterator[GateFactory]:
    started: list[AmiGate] = []

    async def factory(**settings: Any) -> AmiGate:
        users = (
            AmiUserConfig(USER, Secret(SECRET), campaign="c1"),
            AmiUserConfig(ADMIN, Secret(ADMIN_SECRET), campaign="c1", allow_dangerous=True),
        )
        config = Config(
            asterisk=AsteriskConfig(
                ami=AmiUpstreamConfig("127.0.0.1", fake.port, fake.username, Secret(fake.secret))
            ),
            gates=GatesConfig(ami=AmiGateConfig(listen="127.0.0.1:5039", users=users, **settings)),
        )
        gate = AmiGate(
            config, Guard(None, PolicySettings(), Mode.ENFORCE, timeout=0.5), listen=("127.0.0.1", 0),
            auth_failure_delay=BASE, reconnect_min=0.02, reconnect_max=0.1, boot_grace=0.1,
        )  # fmt: skip
        await gate.start()
        started.append(gate)
        deadline = time.monotonic() + 5
        while not gate.ready():
            assert time.monotonic() < deadline, "the gate never logged in to the fake Asterisk"
            await asyncio.sleep(0.01)
        return gate

    try:
        yield factory
    finally:
        for gate in started:
            await gate.stop()


async def connect(gate: AmiGate, source: str = "127.0.0.1") -> AmiTestClient:
    """A client from a chosen loopback source address (127.0.0.0/8 is all loopback on Linux)."""
    reader, writer = await asyncio.open_connection(*gate.address, local_addr=(source, 0))
    client = AmiTestClient(reader, writer)
    await client.wait_for(lambda _: client.banner is not None)
    return client


async def login(
    gate: AmiGate, username: str, secret: str, source: str = "127.0.0.1"
) -> tuple[Message, float]:
    """One Login on a new connection: the answer and how long it took."""
    client = await connect(gate, source)
    started = time.monotonic()
    try:
        response = await client.action("Login", Username=username, Secret=secret, within=10)
    finally:
        await client.close()
    return response, time.monotonic() - started


# -- constant-time comparisons -------------------------------------------------------------------------


def _function(obj: Any) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    return node


def _names(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id.lower())
        elif isinstance(child, ast.Attribute):
            found.add(child.attr.lower())
    return found


SECRET_WORDS = ("secret", "key", "expected", "token", "password", "value", "presented", "session_value")


@pytest.mark.parametrize(
    "function",
    [ClientSession._login, api_context.ApiContext.token_matches, api_context.ApiContext.cookie_ok],
    ids=["ami-login", "http-bearer", "dashboard-cookie"],
)
def test_secrets_are_compared_with_compare_digest_only(function: Any) -> None:
    """AST inspection: no ==, != or `in` on anything secret-like; hmac.compare_digest is called."""
    node = _function(function)
    calls = [
        c for c in ast.walk(node)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "compare_digest"
    ]  # fmt: skip
    assert calls, f"{function.__qualname__} does not use compare_digest"
    for call in calls:
        assert isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
        assert call.func.value.id in ("hmac", "secrets")
    for compare in (c for c in ast.walk(node) if isinstance(c, ast.Compare)):
        if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in compare.ops):
            continue
        names = _names(compare)
        # Comparing the AuthType or a user lookup is fine; secret material never is.
        assert not names & set(SECRET_WORDS), f"{function.__qualname__}: {ast.unparse(compare)}"


async def test_ami_login_goes_through_compare_digest(
    make_gate: GateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At run time too: plain and MD5 logins, right and wrong, all end in hmac.compare_digest."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    gate = await make_gate()
    monkeypatch.setattr(ami_proxy.hmac, "compare_digest", spy)
    assert (await login(gate, USER, SECRET))[0].get("Response") == "Success"
    assert (await login(gate, USER, SECRET + "x"))[0].get("Message") == "Authentication failed"
    assert (await login(gate, "nobody", SECRET))[0].get("Message") == "Authentication failed"
    client = await connect(gate)
    challenge = (await client.action("Challenge", AuthType="MD5")).get("Challenge") or ""
    key = md5_challenge_key(challenge, SECRET)
    response = await client.action("Login", Username=USER, AuthType="MD5", Key=key)
    assert response.get("Response") == "Success"
    await client.close()
    assert (SECRET.encode(), SECRET.encode()) in seen
    assert (SECRET.encode(), (SECRET + "x").encode()) in seen
    assert (key.encode(), key.encode()) in seen
    assert len(seen) == 4  # one comparison per login, the unknown user's included (no timing oracle)


# -- backoff after failed logins ---------------------------------------------------------------------------


def test_throttle_doubles_up_to_the_cap_and_forgets_after_the_window() -> None:
    throttle = LoginThrottle(threshold=5, window=60.0, base=1.0, cap=30.0)
    keys = throttle_keys("192.0.2.1", "Dialer")
    assert keys == ("user:dialer", "addr:192.0.2.1")
    delays = []
    for n in range(12):
        delays.append(throttle.delay(keys, now=float(n)))
        throttle.failure(keys, now=float(n))
    assert delays == [None] * 5 + [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert throttle.delay(keys, now=64.5) == 8.0  # the 7 failures at 5..11 s are still in the window
    assert throttle.delay(keys, now=67.5) is None  # 4 left in the window: below the threshold again
    throttle.failure(keys, 100.0)
    throttle.success("DIALER")  # a good login clears the username, not the address
    assert throttle.delay(("user:dialer",), 100.0) is None


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(threshold=5, max_keys=100)
    for n in range(10_000):
        throttle.failure(throttle_keys(f"198.51.100.{n % 250}", f"user{n}"), now=0.0)
    assert len(throttle) == 100
    for _ in range(10_000):
        throttle.failure(("user:x",), now=0.0)
    assert throttle.delay(("user:x",), 0.0) == 30.0  # the count saturates, the delay is capped


async def test_backoff_after_repeated_failed_logins(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    """5 failures, then each further attempt (even with the right secret) is refused unchecked after a
    doubling delay up to the cap, while a logged-in client keeps being served without delay."""
    gate = await make_gate(max_login_failures=5, login_failure_window_ms=60_000, login_backoff_max_ms=320)
    busy = await connect(gate, "127.0.0.9")
    assert (await busy.action("Login", Username=ADMIN, Secret=ADMIN_SECRET)).get("Response") == "Success"
    for _ in range(5):
        response, took = await login(gate, USER, "guess")
        assert response.get("Message") == "Authentication failed" and took < 1.0

    async def attempts() -> list[tuple[str | None, float]]:
        results = []
        for _ in range(7):
            response, took = await login(gate, USER, SECRET)  # the right secret, unchecked meanwhile
            results.append((response.get("Message"), took))
        return results

    async def pings() -> list[float]:
        latencies = []
        for _ in range(40):
            started = time.monotonic()
            assert (await busy.action("Ping")).get("Ping") == "Pong"
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        return latencies

    results, latencies = await asyncio.gather(attempts(), pings())
    expected = [0.02, 0.04, 0.08, 0.16, 0.32, 0.32, 0.32]  # BASE * 2**k, capped at 320 ms
    for (message, took), wait in zip(results, expected, strict=True):
        assert message == "Authentication failed"
        assert wait * 0.9 <= took < wait + 0.5, (took, wait)
    assert max(latencies) < 0.25, latencies  # the waits are timers, not a blocked event loop
    print(f"\nthrottled logins answered after {[round(t, 3) for _, t in results]} s; "
          f"a logged-in client's Ping meanwhile: max {max(latencies) * 1000:.1f} ms over {len(latencies)}")  # fmt: skip
    await busy.close()
    assert not [a for a in forwarded(fake) if a.kind[1].lower() == "login"]  # dialers' logins stay here


async def test_throttled_logins_are_not_checked(
    make_gate: GateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = await make_gate(max_login_failures=3, login_backoff_max_ms=50)
    for _ in range(3):
        await login(gate, USER, "guess")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(ami_proxy.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for secret in ("guess-2", SECRET):
        assert (await login(gate, USER, secret))[0].get("Message") == "Authentication failed"
    assert calls == []  # guesses made while throttled are worthless: none was compared


async def test_backoff_per_username_and_per_address(make_gate: GateFactory) -> None:
    gate = await make_gate(max_login_failures=5, login_backoff_max_ms=50)
    # One failure from each of five addresses for one username: that username is throttled everywhere.
    for n in range(2, 7):
        await login(gate, USER, "guess", source=f"127.0.0.{n}")
    assert (await login(gate, USER, SECRET, source="127.0.0.20"))[0].get("Message") == "Authentication failed"
    assert (await login(gate, ADMIN, ADMIN_SECRET, source="127.0.0.20"))[0].get("Response") == "Success"
    # Five usernames tried from one address: that address is throttled, for every username.
    for n in range(5):
        await login(gate, f"user{n}", "guess", source="127.0.0.30")
    response = (await login(gate, ADMIN, ADMIN_SECRET, source="127.0.0.30"))[0]
    assert response.get("Message") == "Authentication failed"
    assert (await login(gate, ADMIN, ADMIN_SECRET, source="127.0.0.31"))[0].get("Response") == "Success"


async def test_backoff_ends_with_the_window(make_gate: GateFactory) -> None:
    gate = await make_gate(max_login_failures=2, login_failure_window_ms=300, login_backoff_max_ms=50)
    for _ in range(2):
        await login(gate, USER, "guess")
    assert (await login(gate, USER, SECRET))[0].get("Message") == "Authentication failed"
    await asyncio.sleep(0.35)
    assert (await login(gate, USER, SECRET))[0].get("Response") == "Success"


# -- the action allowlist, and nothing before login -------------------------------------------------------

REFUSED_BY_DEFAULT = ["Command", "UpdateConfig", "Reload", "ModuleLoad", "GetConfig", "GetConfigJSON",
                      "CreateConfig", "ModuleUnload", "Agi", "ShowDialPlan", "DBPut", "DBDel"]  # fmt: skip


async def test_dangerous_actions_are_refused_by_default(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    gate = await make_gate()
    client = await connect(gate)
    assert (await client.action("Login", Username=USER, Secret=SECRET)).get("Response") == "Success"
    before = len(fake.actions)
    for action in REFUSED_BY_DEFAULT:
        response = await client.action(
            action, Command="core stop now", Filename="manager.conf", Module="res_pjsip.so",
            LoadType="load", Action000="NewCat", Cat000="x",
        )  # fmt: skip
        assert response.get("Response") == "Error"
        assert response.get("Message") == f"Permission denied: pbxguard does not allow {action} for this user"
    # The same for every other spelling of the action name (Asterisk matches case-insensitively).
    for spelling in ("command", "COMMAND", "CoMmAnD"):
        assert (await client.action(spelling, Command="core stop now")).get("Response") == "Error"
    # Dangerous Originates: refused before any decision, in any mode.
    for app, data in (("System", "rm -rf /"), ("TrySystem", "id"), ("Exec", "System(id)")):
        response = await client.action(
            "Originate", Channel="PJSIP/0612345678@trunk", Application=app, Data=data, CallerID="0162123456"
        )
        assert "is not allowed for this user" in (response.get("Message") or "")
    assert (await client.action("Ping")).get("Ping") == "Pong"  # an allowed action is forwarded
    assert [a.kind[1] for a in forwarded(fake, before)] == ["Ping"]
    await client.close()


async def test_nothing_reaches_asterisk_before_login(make_gate: GateFactory, fake: FakeAsterisk) -> None:
    gate = await make_gate()
    before = len(fake.actions)
    client = await connect(gate)
    actions = ["Originate", "Command", "Ping", "Status", "Redirect", "Hangup", "UserEvent", "Setvar",
               "Getvar", "CoreShowChannels", "Events", "Filter", "WaitEvent", "QueueAdd", "Bridge"]  # fmt: skip
    for action in actions:
        response = await client.action(
            action, Channel="PJSIP/0612345678@trunk", Command="core stop now", Exten="100", Context="x",
            Priority="1", UserEvent="PbxguardRefusal", Number="0612345678", Variable="PBXGUARD_TOKEN=x",
        )  # fmt: skip
        assert (response.get("Response"), response.get("Message")) == ("Error", "Permission denied")
    # A failed login followed, in the same packet, by actions: the connection is closed, nothing goes.
    client.send_raw(
        encode(Message.action("Login", Username=USER, Secret="wrong", ActionID="l1"))
        + b"".join(
            encode(Message.action(a, ActionID=a, Command="core stop now")) for a in ("Command", "Ping")
        )
    )
    await client.wait_closed(within=5)
    assert client.responses("l1")[0].get("Message") == "Authentication failed"
    assert not client.responses("Command") and not client.responses("Ping")
    # An MD5 login without its challenge, and one with a wrong key: no session either.
    other = await connect(gate)
    response = await other.action("Login", Username=USER, AuthType="MD5", Key="0" * 32)
    assert response.get("Message") == "Authentication failed"
    await other.close()
    await asyncio.sleep(0.05)
    assert forwarded(fake, before) == []
    await client.close()
