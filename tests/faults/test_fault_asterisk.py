"""Asterisk killed and started again under load, behind the AMI gate and the Stasis (ARI) gate.

The promises: no Originate replayed after the reconnection, none forwarded unchecked (every Originate
Asterisk received carries a PBXGUARD_TOKEN that is an ALLOW decision of the journal, for that very
request), and no channel continued out of Stasis without its ALLOW decision. Counted on the fake's
side (the fake AMI counts every Originate it receives, the fake ARI every continue), and, when a real
Asterisk is available (PBXGUARD_ASTERISK_BIN), on Asterisk's side: its CDRs, written by Asterisk
itself, carry the token and the decision the channel had when it reached the dial context.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import asyncpg
import pytest
from asterisk_harness import (
    DIAL_CONTEXT,
    AmiClient,
    AsteriskInstance,
    find_asterisk,
    skip_reason,
)
from faultkit import (
    AMI_SECRET,
    AMI_USER,
    ARI_PASSWORD,
    ARI_USER,
    CAMPAIGN,
    LONG,
    LONG_REASON,
    NPV,
    UPSTREAM_SECRET,
    UPSTREAM_USER,
    FakeAri,
    check_ledger,
    consumer,
    legal_setup,
    load_phase,
    national,
    poll,
)
from gates.fake_asterisk_ami import AmiTestClient, FakeAsterisk

from pbxguard.config import (
    AmiGateConfig,
    AmiUpstreamConfig,
    AmiUserConfig,
    AriUpstreamConfig,
    AsteriskConfig,
    Config,
    GatesConfig,
    Mode,
    Secret,
)
from pbxguard.gates.ami_proxy import LINK_LOST, NOT_CONNECTED, AmiGate
from pbxguard.gates.ari import AriGate
from pbxguard.guard import Guard
from pbxguard.ledger.store import Ledger
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message

LEGAL = [consumer(i) for i in range(100000, 120000)]  # consent on file
NO_CONSENT = [consumer(i) for i in range(200000, 200050)]  # always blocked: must never reach Asterisk
needs_asterisk = pytest.mark.skipif(find_asterisk() is None, reason=skip_reason())


def e164(national_number: str) -> str:
    return "+33" + national_number[1:]


@pytest.fixture
async def ledger_ready(ledger: Ledger) -> Ledger:
    await legal_setup(ledger, LEGAL)
    return ledger


# -- a real Asterisk whose CDRs carry pbxguard's variables -------------------------------------------------

CDR_COLUMNS = ("uniqueid", "channel", "dcontext", "lastapp", "disposition", "token", "decision")


class RecordingAsterisk(AsteriskInstance):
    """The harness's private Asterisk, plus two CDR columns: the PBXGUARD_TOKEN and PBXGUARD_DECISION a
    channel carries when it reaches the dial context (the "trunk"). Asterisk writes them itself."""

    def write_config(self) -> None:
        super().write_config()
        extensions = self.etc / "extensions.conf"
        text = extensions.read_text(encoding="utf-8")
        marker = "exten => _[+0-9].,1,Answer()"
        assert marker in text, "the harness's dial context changed"
        text = text.replace(
            marker,
            "exten => _[+0-9].,1,Set(CDR(pbxtoken)=${PBXGUARD_TOKEN})\n"
            " same => n,Set(CDR(pbxdecision)=${PBXGUARD_DECISION})\n"
            " same => n,Answer()",
        )
        extensions.write_text(text, encoding="utf-8")
        fields = ("uniqueid", "channel", "dcontext", "lastapp", "disposition", "pbxtoken", "pbxdecision")
        (self.etc / "cdr_custom.conf").write_text(
            "[mappings]\nfaults.csv => " + ",".join(f"${{CSV_QUOTE(${{CDR({f})}})}}" for f in fields) + "\n",
            encoding="utf-8",
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye on the AMI or ARI links."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)

    def records(self, prefix: str = "") -> list[dict[str, str]]:
        """The CDRs written so far whose uniqueid starts with ``prefix``."""
        path = self.root / "log" / "cdr-custom" / "faults.csv"
        if not path.exists():
            return []
        with path.open(encoding="utf-8", newline="") as handle:
            rows = [dict(zip(CDR_COLUMNS, row, strict=False)) for row in csv.reader(handle) if len(row) >= 7]
        return [row for row in rows if row["uniqueid"].startswith(prefix)]


@pytest.fixture
def real_asterisk() -> Iterator[RecordingAsterisk]:
    binary = find_asterisk()
    if binary is None:
        pytest.skip(skip_reason())
    instance = RecordingAsterisk(binary)
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


# -- dialers behind the AMI gate ------------------------------------------------------------------------


@dataclass
class Sent:
    request: str
    number: str  # national
    legal: bool
    sent_at: float
    answer: str = ""  # "Success", or the error message
    answered_at: float = 0.0


@dataclass
class AmiDialers:
    """Dialers logged in to the AMI gate, each with a few Originates outstanding, until stopped."""

    address: tuple[str, int]
    dialers: int = 3
    outstanding: int = 3
    pace: float = 0.0
    sent: dict[str, Sent] = field(default_factory=dict)
    _clients: list[AmiTestClient] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    async def start(self) -> None:
        for _ in range(self.dialers):
            self._clients.append(await AmiTestClient.login(*self.address, AMI_USER, AMI_SECRET, events="off"))
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker(c) for c in self._clients for _ in range(self.outstanding)))

    async def _worker(self, client: AmiTestClient) -> None:
        while not self._stop.is_set():
            serial = next(self._serial)
            legal = serial % 5 != 4
            number = national(LEGAL[serial % len(LEGAL)] if legal else NO_CONSENT[serial % len(NO_CONSENT)])
            request = f"q{serial}-{uuid.uuid4().hex[:6]}"
            entry = Sent(request, number, legal, time.monotonic())
            self.sent[request] = entry
            client.send(
                Message.action(
                    "Originate",
                    [
                        ("ActionID", request),
                        ("Channel", f"Local/{number}@{DIAL_CONTEXT}"),
                        ("Context", "pbxguard-test-park"),
                        ("Exten", "s"),
                        ("Priority", "1"),
                        ("CallerID", f'"ACME" <{NPV}>'),
                        ("Async", "true"),
                        ("Timeout", "10000"),
                        ("ChannelId", f"{request}-1"),
                        ("OtherChannelId", f"{request}-2"),
                        ("Variable", f"FAULT_REQUEST={request}"),
                    ],
                )
            )
            response = await client.response(request, within=15)
            entry.answer = (
                response.get("Response")
                if response.get("Response") == "Success"
                else (response.get("Message") or "?")
            )
            entry.answered_at = time.monotonic()
            if self.pace:
                await asyncio.sleep(self.pace)

    def answered(self, predicate: Callable[[Sent], bool]) -> list[Sent]:
        return [s for s in self.sent.values() if s.answered_at and predicate(s)]


def refused_since(dialers: AmiDialers, instant: float, count: int) -> bool:
    """At least ``count`` Originates sent after ``instant`` were refused: Asterisk is not connected."""
    return len(dialers.answered(lambda s: s.sent_at > instant and s.answer == NOT_CONNECTED)) >= count


def ami_gate(
    ledger: Ledger, host_port: tuple[str, int], username: str, secret: str, boot_grace: float
) -> AmiGate:
    config = Config(
        asterisk=AsteriskConfig(ami=AmiUpstreamConfig(host_port[0], host_port[1], username, Secret(secret))),
        gates=GatesConfig(
            ami=AmiGateConfig(
                listen="127.0.0.1:5039",
                users=(AmiUserConfig(AMI_USER, Secret(AMI_SECRET), campaign=CAMPAIGN),),
            )
        ),
    )
    return AmiGate(
        config,
        Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5),
        listen=("127.0.0.1", 0),
        reconnect_min=0.05,
        reconnect_max=0.3,
        boot_grace=boot_grace,
    )


async def verify_received(
    conn: asyncpg.Connection, sent: dict[str, Sent], received: list[tuple[str, str]], gate: str
) -> None:
    """``received``: (request, token) for every Originate Asterisk ran. Each request at most once, each
    token an ALLOW decision of this gate for that request's number and call key."""
    replayed = {r: n for r, n in Counter(r for r, _ in received).items() if n > 1}
    assert not replayed, f"Originates that reached Asterisk more than once: {replayed}"
    assert all(token for _, token in received), "an Originate reached Asterisk without PBXGUARD_TOKEN"
    rows = {
        str(r["id"]): r
        for r in await conn.fetch(
            "SELECT id, consumer, call_key, verdict, gate FROM pbxguard.decisions WHERE id = ANY($1::uuid[])",
            [token for _, token in received],
        )
    }
    for request, token in received:
        entry = sent.get(request)
        assert entry is not None, f"Asterisk ran an Originate nobody sent: {request}"
        assert entry.legal, f"{request} to {entry.number} (no consent) reached Asterisk"
        assert entry.answer in ("Success", LINK_LOST, ""), (
            f"{request} reached Asterisk but was answered {entry.answer}"
        )
        row = rows.get(token)
        assert row is not None, f"{request} carried token {token}, which is no decision of the journal"
        assert (row["verdict"], row["gate"], row["consumer"]) == ("allow", gate, e164(entry.number)), dict(
            row
        )
        assert str(row["call_key"]).endswith(f":{request}"), (request, row["call_key"])


# -- AMI: the fake ----------------------------------------------------------------------------------------


async def run_fake_ami(
    ledger: Ledger, database_url: str, report: Callable[[str], None], *, cycles: int, steady: float
) -> None:
    fake = FakeAsterisk(username=UPSTREAM_USER, secret=UPSTREAM_SECRET, talk_time=0.01)
    await fake.start()
    gate = ami_gate(ledger, (fake.host, fake.port), UPSTREAM_USER, UPSTREAM_SECRET, boot_grace=0.3)
    await gate.start()
    dialers = AmiDialers(gate.address)
    lives: list[int] = []  # len(fake.originates) when each life ended
    try:
        await poll(gate.ready, within=10)
        await dialers.start()
        for _ in range(cycles):
            await load_phase(steady)
            await fake.kill()
            killed_at = time.monotonic()
            lives.append(len(fake.originates))
            await poll(partial(refused_since, dialers, killed_at, 5), within=10)
            await fake.start()
            await poll(gate.ready, within=10)
        await load_phase(steady)
    finally:
        await dialers.stop()
        await gate.stop()
        await fake.kill()
    unanswered = [s for s in dialers.sent.values() if not s.answered_at]
    assert not unanswered, f"Originates never answered: {unanswered[:3]}"
    received = []
    for message in fake.originates:
        variables = dict(v.partition("=")[::2] for v in message.get_all("Variable"))
        received.append((variables.get("FAULT_REQUEST", ""), variables.get("__PBXGUARD_TOKEN", "")))
    succeeded = {s.request for s in dialers.answered(lambda s: s.answer == "Success")}
    assert succeeded <= {r for r, _ in received}, "an Originate answered Success never reached Asterisk"
    # After a restart, nothing from before: what was refused or lost then is never sent later.
    for boundary in lives:
        before = {r for r, _ in received[:boundary]}
        for request, _ in received[boundary:]:
            assert request not in before
            assert dialers.sent[request].answer not in (NOT_CONNECTED,), request
    conn = await asyncpg.connect(database_url)
    try:
        await verify_received(conn, dialers.sent, received, "ami")
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    answers = Counter(
        "Success"
        if s.answer == "Success"
        else "NOT_CONNECTED"
        if s.answer == NOT_CONNECTED
        else "LINK_LOST"
        if s.answer == LINK_LOST
        else "blocked"
        if "blocked by pbxguard" in s.answer
        else s.answer
        for s in dialers.sent.values()
    )
    report(
        f"fake AMI killed x{cycles}: {len(dialers.sent)} Originates sent through the gate, answers {dict(answers)}; "
        f"{len(received)} reached the fake Asterisk over {cycles + 1} lives, none twice, each with its ALLOW "
        f"token for that request; {gate.link.connections} upstream logins"
    )


@pytest.mark.timeout(90)
async def test_fake_ami_killed_under_load(
    ledger_ready: Ledger, database_url: str, fault_report: Callable[[str], None]
) -> None:
    await run_fake_ami(ledger_ready, database_url, fault_report, cycles=2, steady=1.0)


# -- AMI: a real Asterisk ---------------------------------------------------------------------------------


async def run_real_ami(
    ledger: Ledger,
    database_url: str,
    asterisk: RecordingAsterisk,
    report: Callable[[str], None],
    *,
    cycles: int,
    steady: float,
) -> None:
    gate = ami_gate(ledger, ("127.0.0.1", asterisk.ami_port), asterisk.ami_username, asterisk.ami_secret, 0.3)
    await gate.start()
    dialers = AmiDialers(gate.address, dialers=2, outstanding=2, pace=0.03)
    ready_again = 0.0
    try:
        await poll(gate.ready, within=10)
        await dialers.start()
        for _ in range(cycles):
            await load_phase(steady)
            await asyncio.to_thread(asterisk.kill)
            killed_at = time.monotonic()
            await poll(partial(refused_since, dialers, killed_at, 3), within=10)
            await asyncio.to_thread(asterisk.start)
            await poll(gate.ready, within=15)
            ready_again = time.monotonic()
        await load_phase(steady)
    finally:
        await dialers.stop()
        await gate.stop()
    # Calls last about a second: wait for the CDRs of every call answered Success since the last restart.
    expected = {
        s.request for s in dialers.answered(lambda s: s.answer == "Success" and s.sent_at > ready_again)
    }

    def complete() -> bool:
        seen = {r["uniqueid"][:-2] for r in asterisk.records("q")}
        return expected <= seen

    await poll(complete, within=15, every=0.1)
    records = asterisk.records("q")  # this run's calls (its requests are q<n>-<hex>)
    trunk = [r for r in records if r["dcontext"] == DIAL_CONTEXT and r["uniqueid"].endswith("-2")]
    received = [(r["uniqueid"][:-2], r["token"]) for r in trunk]
    twice = [u for u, n in Counter(r["uniqueid"] for r in records).items() if n > 1]
    assert not twice, f"channels Asterisk created twice (a replayed Originate): {twice[:5]}"
    conn = await asyncpg.connect(database_url)
    try:
        await verify_received(conn, dialers.sent, received, "ami")
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    answers = Counter(
        "Success"
        if s.answer == "Success"
        else "NOT_CONNECTED"
        if s.answer == NOT_CONNECTED
        else "LINK_LOST"
        if s.answer == LINK_LOST
        else "blocked"
        if "blocked by pbxguard" in s.answer
        else s.answer
        for s in dialers.sent.values()
    )
    report(
        f"real Asterisk (AMI) SIGKILLed x{cycles}: {len(dialers.sent)} Originates through the gate, answers "
        f"{dict(answers)}; Asterisk's CDRs show {len(received)} calls reaching the trunk, none twice, each "
        f"carrying the ALLOW token of its own request (all {len(expected)} answered Success after the last "
        f"restart found; calls up when Asterisk died left no CDR)"
    )


@needs_asterisk
@pytest.mark.asterisk
@pytest.mark.timeout(120)
async def test_real_asterisk_ami_killed_under_load(
    ledger_ready: Ledger,
    database_url: str,
    real_asterisk: RecordingAsterisk,
    fault_report: Callable[[str], None],
) -> None:
    await run_real_ami(ledger_ready, database_url, real_asterisk, fault_report, cycles=1, steady=1.5)


# -- ARI: the fake ----------------------------------------------------------------------------------------


def ari_gate(ledger: Ledger, url: str, username: str, password: str) -> AriGate:
    config = Config(
        asterisk=AsteriskConfig(
            ari=AriUpstreamConfig(url=url, username=username, password=Secret(password), timeout_ms=2000)
        )
    )
    return AriGate(
        config,
        Guard(ledger, PolicySettings(), Mode.ENFORCE, timeout=1.5),
        backoff_initial=0.02,
        backoff_max=0.2,
    )


async def run_fake_ari(
    ledger: Ledger, database_url: str, report: Callable[[str], None], *, cycles: int, steady: float
) -> None:
    fake = FakeAri()
    await fake.start()
    gate = ari_gate(ledger, f"http://127.0.0.1:{fake.port}", ARI_USER, ARI_PASSWORD)
    await gate.start()
    entered: dict[str, tuple[str, bool, int]] = {}  # channel -> (number, legal, life)
    refused = 0
    stop = asyncio.Event()
    serial = itertools.count()

    async def channels() -> None:
        nonlocal refused
        while not stop.is_set():
            n = next(serial)
            legal = n % 5 != 4
            number = national(LEGAL[n % len(LEGAL)] if legal else NO_CONSENT[n % len(NO_CONSENT)])
            channel = f"1795897683.{n}"
            if await fake.enter_stasis(channel, number):
                entered[channel] = (number, legal, fake.life)
            else:
                refused += 1  # no application registered: Stasis() fails, the dialplan blocks
            await asyncio.sleep(0.004)
            # Closed loop: at most 32 channels waiting in Stasis, as a dialplan with a bounded trunk.
            await poll(lambda: gate.pending < 32 or stop.is_set(), within=30, every=0.002)

    try:
        await poll(lambda: fake.connected, within=10)
        load = asyncio.create_task(channels())
        try:
            for _ in range(cycles):
                await load_phase(steady)
                await fake.kill()
                await poll(lambda: refused >= 10 and not gate.ready(), within=10)
                await fake.start()
                await poll(lambda: fake.connected, within=10)
            await load_phase(steady)
        finally:
            stop.set()
            await load
        await poll(lambda: gate.pending == 0, within=10)
    finally:
        await gate.stop()
        await fake.kill()
    assert not fake.violations, fake.violations[:5]
    continued = fake.continued
    assert len({c for c, _ in continued}) == len(continued), "a channel continued twice"
    conn = await asyncpg.connect(database_url)
    try:
        rows = {
            str(r["id"]): r
            for r in await conn.fetch(
                "SELECT id, consumer, call_key, verdict, gate FROM pbxguard.decisions WHERE id = ANY($1::uuid[])",
                [v.get("PBXGUARD_DECISION") or str(uuid.UUID(int=0)) for _, v in continued],
            )
        }
        for channel, variables in continued:
            number, legal, _ = entered[channel]
            assert legal, f"{channel} ({number}, no consent) continued"
            assert variables.get("PBXGUARD_VERDICT") == "ALLOW", (channel, variables)
            row = rows.get(variables.get("PBXGUARD_DECISION", ""))
            assert row is not None, f"{channel} continued without a decision of the journal: {variables}"
            assert (row["verdict"], row["gate"], row["call_key"], row["consumer"]) == (
                "allow",
                "ari",
                channel,
                e164(number),
            )
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    # A channel of a life that ended normally is answered: continued or hung up.
    answered = {c for c, _ in continued} | set(fake.hung_up)
    last_life = fake.life
    unanswered = [c for c, (_, _, life) in entered.items() if life == last_life and c not in answered]
    assert not unanswered, f"channels left waiting in Stasis: {unanswered[:5]}"
    lost = sum(1 for c, (_, _, life) in entered.items() if life < last_life and c not in answered)
    report(
        f"fake ARI killed x{cycles}: {len(entered)} channels entered Stasis ({refused} refused while pbxguard "
        f"was not registered), {len(continued)} continued each with its ALLOW decision, {len(fake.hung_up)} hung "
        f"up, {lost} died with a killed Asterisk before their answer ({len(fake.late)} late answers got 404); "
        f"{gate.connections} event connections"
    )


@pytest.mark.timeout(90)
async def test_fake_ari_killed_under_load(
    ledger_ready: Ledger, database_url: str, fault_report: Callable[[str], None]
) -> None:
    await run_fake_ari(ledger_ready, database_url, fault_report, cycles=2, steady=1.0)


# -- ARI: a real Asterisk ---------------------------------------------------------------------------------


async def run_real_ari(
    ledger: Ledger,
    database_url: str,
    asterisk: RecordingAsterisk,
    report: Callable[[str], None],
    *,
    cycles: int,
    steady: float,
) -> None:
    gate = ari_gate(ledger, asterisk.ari_url, asterisk.ari_username, asterisk.ari_password)
    await gate.start()
    placed: dict[str, tuple[str, bool, float]] = {}  # request -> (number, legal, placed at)
    failed = 0
    stop = asyncio.Event()
    serial = itertools.count()

    async def originate() -> None:
        nonlocal failed
        ami: AmiClient | None = None
        while not stop.is_set():
            if ami is None or ami.closed:
                if ami is not None:
                    await ami.close()  # collects its reader, which died with Asterisk
                try:
                    ami = await AmiClient.connect(
                        "127.0.0.1",
                        asterisk.ami_port,
                        asterisk.harness_username,
                        asterisk.harness_secret,
                        events="off",
                    )
                except (OSError, RuntimeError, TimeoutError, ConnectionError):
                    failed += 1
                    await asyncio.sleep(0.05)
                    continue
            n = next(serial)
            legal = n % 5 != 4
            number = national(LEGAL[n % len(LEGAL)] if legal else NO_CONSENT[n % len(NO_CONSENT)])
            request = f"s{n}-{uuid.uuid4().hex[:6]}"
            try:
                response = await ami.action(
                    "Originate",
                    [("Variable", f"__PBXGUARD_CAMPAIGN={CAMPAIGN}")],
                    Channel=f"Local/{number}@pbxguard-outbound-ari",
                    Context="pbxguard-test-park",
                    Exten="s",
                    Priority="1",
                    CallerID=f'"ACME" <{NPV}>',
                    Async="true",
                    Timeout="10000",
                    ChannelId=f"{request}-1",
                    OtherChannelId=f"{request}-2",
                )
            except (OSError, ConnectionError, TimeoutError):
                failed += 1
                continue
            if response.get("Response") == "Success":
                placed[request] = (number, legal, time.monotonic())
            await asyncio.sleep(0.03)
        if ami is not None:
            await ami.close()

    ready_again = 0.0
    try:
        await poll(gate.ready, within=10)
        load = asyncio.create_task(originate())
        try:
            for _ in range(cycles):
                await load_phase(steady)
                await asyncio.to_thread(asterisk.kill)
                await poll(lambda: not gate.ready(), within=10)
                await asyncio.to_thread(asterisk.start)
                await poll(gate.ready, within=15)
                ready_again = time.monotonic()
            await load_phase(steady)
        finally:
            stop.set()
            await load
        await poll(lambda: gate.pending == 0, within=10)
        # Every call placed since the last restart ends (allowed: a second of talk; blocked: at once)
        # and leaves its CDR.
        expected = {r for r, (_, _, at) in placed.items() if at > ready_again}

        def settled() -> bool:
            seen = {r["uniqueid"][:-2] for r in asterisk.records("s") if r["uniqueid"].endswith("-2")}
            return bool(expected) and expected <= seen

        await poll(settled, within=15, every=0.1)
    finally:
        await gate.stop()
    records = [r for r in asterisk.records("s") if r["uniqueid"].endswith("-2")]  # this run's (s<n>-<hex>)
    seen = Counter(r["uniqueid"] for r in records)
    assert all(n == 1 for n in seen.values()), "a channel recorded twice"
    trunk = [r for r in records if r["dcontext"] == DIAL_CONTEXT]
    conn = await asyncpg.connect(database_url)
    try:
        rows = {
            str(r["id"]): r
            for r in await conn.fetch(
                "SELECT id, consumer, call_key, verdict, gate FROM pbxguard.decisions WHERE id = ANY($1::uuid[])",
                [r["decision"] or str(uuid.UUID(int=0)) for r in trunk],
            )
        }
        for record in trunk:
            request = record["uniqueid"][:-2]
            number, legal, _ = placed.get(request, ("?", False, 0.0))
            assert legal, f"{record['channel']} ({number}, no consent) reached the trunk"
            row = rows.get(record["decision"])
            assert row is not None, (
                f"{record['channel']} reached the trunk without a journaled decision: {record}"
            )
            assert (row["verdict"], row["gate"], row["call_key"], row["consumer"]) == (
                "allow",
                "ari",
                record["uniqueid"],
                e164(number),
            )
        result = await check_ledger(conn)
    finally:
        await conn.close()
    assert not result.problems, result.problems
    blocked = sum(1 for r in records if r["dcontext"] != DIAL_CONTEXT)
    report(
        f"real Asterisk (ARI) SIGKILLed x{cycles}: {len(placed)} calls placed into Stasis ({failed} Originates "
        f"failed while Asterisk was down); Asterisk's CDRs: {len(trunk)} reached the trunk, each with its "
        f"ALLOW decision for that channel, {blocked} blocked in the dialplan (all {len(expected)} placed after the "
        f"last restart found); {gate.connections} event connections"
    )


@needs_asterisk
@pytest.mark.asterisk
@pytest.mark.timeout(120)
async def test_real_asterisk_ari_killed_under_load(
    ledger_ready: Ledger,
    database_url: str,
    real_asterisk: RecordingAsterisk,
    fault_report: Callable[[str], None],
) -> None:
    await run_real_ari(ledger_ready, database_url, real_asterisk, fault_report, cycles=1, steady=1.5)


# -- the long versions ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(900)
async def test_fake_gates_killed_under_load_long(
    ledger_ready: Ledger, database_url: str, fault_report: Callable[[str], None]
) -> None:
    await run_fake_ami(ledger_ready, database_url, fault_report, cycles=20, steady=5.0)
    await run_fake_ari(ledger_ready, database_url, fault_report, cycles=20, steady=5.0)


@pytest.mark.slow
@needs_asterisk
@pytest.mark.asterisk
@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(900)
async def test_real_asterisk_killed_under_load_long(
    ledger_ready: Ledger,
    database_url: str,
    real_asterisk: RecordingAsterisk,
    fault_report: Callable[[str], None],
) -> None:
    await run_real_ami(ledger_ready, database_url, real_asterisk, fault_report, cycles=10, steady=5.0)
    await run_real_ari(ledger_ready, database_url, real_asterisk, fault_report, cycles=10, steady=5.0)


# -- the upstream link dying between the readiness check and the write ---------------------------------------


@pytest.mark.timeout(30)
async def test_ami_link_dying_at_the_write_still_answers(
    ledger_ready: Ledger, fault_report: Callable[[str], None]
) -> None:
    """Found by the kill test above: Asterisk's socket is already closing (the kernel said so) while
    the link still reads as ready, because its reader has not run yet. The allowed Originate cannot be
    written; its dialer must still get an answer, and so must the actions it sends next."""
    fake = FakeAsterisk(username=UPSTREAM_USER, secret=UPSTREAM_SECRET, talk_time=0.01)
    await fake.start()
    gate = ami_gate(ledger_ready, (fake.host, fake.port), UPSTREAM_USER, UPSTREAM_SECRET, boot_grace=0.3)
    await gate.start()
    dialer: AmiTestClient | None = None
    try:
        await poll(gate.ready, within=10)
        dialer = await AmiTestClient.login(*gate.address, AMI_USER, AMI_SECRET, events="off")
        link = gate.link
        real_send = link.send_bytes
        failed: list[bytes] = []

        def dying(data: bytes) -> bool:  # what send_bytes answers once the transport is closing
            failed.append(data)
            return False

        link.send_bytes = dying  # type: ignore[method-assign]
        try:

            def originate(action_id: str, number: str) -> Message:
                return Message.action(
                    "Originate",
                    ActionID=action_id,
                    Channel=f"Local/{national(number)}@{DIAL_CONTEXT}",
                    Context="pbxguard-test-park",
                    Exten="s",
                    Priority="1",
                    CallerID=f'"ACME" <{NPV}>',
                    Async="true",
                )

            dialer.send(originate("dying", LEGAL[0]))
            response = await dialer.response("dying", within=5)
            assert failed, "the Originate was never written"
            # The next action, answered by pbxguard itself, is not held behind the lost one either.
            dialer.send(originate("blocked", NO_CONSENT[0]))
            blocked = await dialer.response("blocked", within=5)
        finally:
            link.send_bytes = real_send  # type: ignore[method-assign]
        assert response.get("Response") == "Error" and response.get("Message") == NOT_CONNECTED, response
        assert "blocked by pbxguard" in (blocked.get("Message") or ""), blocked
        assert fake.originates == []
    finally:
        if dialer is not None:
            await dialer.close()
        await gate.stop()
        await fake.kill()
    fault_report(
        "AMI link closing at the moment of the write: the dialer got NOT_CONNECTED, and its next answer"
    )
