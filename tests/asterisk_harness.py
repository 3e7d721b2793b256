"""A private, real Asterisk for the tests: started from the shipped ``asterisk-conf/`` files.

The binary comes from ``PBXGUARD_ASTERISK_BIN`` or ``asterisk`` on ``PATH``, nothing else (a test
run must never pick up some random install); without one the tests that need it are skipped with a
message naming the variable.

Everything lives in a short temporary directory under /tmp (the control socket path must stay under
~107 bytes): its own configuration, run, log, spool and database folders, and free TCP ports chosen
at start-up for AMI and HTTP/ARI. The shipped ``extensions_pbxguard.conf`` is copied verbatim and
``#include``-d from a generated ``extensions.conf`` whose ``[globals]`` points ``PBXGUARD_AGI`` at a
port the harness chose (``AsteriskInstance.agi_port``, or any other with :meth:`set_global`); the
shipped ``manager.conf``, ``http.conf`` and ``ari.conf`` are used with only ports and secrets
replaced, so Asterisk itself parses what we ship.

Use it from a test module (or add ``pytest_plugins = ["asterisk_harness"]`` to ``tests/conftest.py``)::

    pytestmark = pytest.mark.asterisk
    pytest_plugins = ["asterisk_harness"]

    async def test_x(asterisk: AsteriskInstance, ami: AmiClient) -> None:
        await ami.action("Originate", Channel="Local/0612345678@pbxguard-outbound", ...)

Fixtures: ``asterisk`` (session scope: one boot per run, about a second) and ``ami`` (the harness's
own AMI account, every right and every event, per test). Tests that change globals put them back
(:meth:`AsteriskInstance.set_global`). The AMI gate connects upstream with ``ami_username`` /
``ami_secret`` (the shipped ``[pbxguard]`` account of ``manager.conf``) on ``ami_port``; the Stasis
gate with ``ari_url``, ``ari_username``, ``ari_password``.

Test contexts added to the shipped dialplan: ``pbxguard-test-dial`` (PBXGUARD_DIAL_CONTEXT: stands for
the trunk; the callee answers, waits one second and hangs up with cause 16), ``pbxguard-test-park``
(where the ``;1`` leg of an originated Local call waits) and ``pbxguard-test-ivr`` (``9NUMBER`` runs
the refusal hook, ``8NUMBER`` the opposition hook). :func:`originate_local` places a call with known
uniqueids; :func:`hangup_event`, :func:`reached_context`, :func:`variable_value` read its fate from
Asterisk's events, :meth:`AsteriskInstance.cdr_rows` from its CDRs.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pbxguard.protocols.ami import AmiParser, Banner, Message, encode

ASTERISK_BIN_ENV = "PBXGUARD_ASTERISK_BIN"
SKIP_MESSAGE = "no Asterisk binary: set PBXGUARD_ASTERISK_BIN or put asterisk on PATH"
CONF_DIR = Path(__file__).resolve().parent.parent / "asterisk-conf"

# Modules that would not load without their own configuration, or that slow the boot and are not
# needed here (Local channels, dialplan, AGI, ARI, AMI and CDRs are all we use).
_NOLOAD = (
    *("res_config_pgsql", "cdr_pgsql", "cel_pgsql", "res_stun_monitor", "res_phoneprov", "chan_iax2"),
    *("chan_unistim", "res_hep", "res_hep_rtcp", "res_parking", "app_agent_pool", "res_calendar"),
    *("app_confbridge", "app_page", "cel_manager", "cdr_manager", "cel_sqlite3_custom", "cel_custom"),
    *("cdr_sqlite3_custom", "app_alarmreceiver", "app_festival", "pbx_dundi", "res_prometheus", "pbx_ael"),
    *("app_amd", "app_followme", "app_queue"),
)

# Columns of the CDR file the harness asks cdr_custom to write (Master.csv in log/cdr-custom).
CDR_FIELDS = (
    "uniqueid",
    "linkedid",
    "channel",
    "dstchannel",
    "src",
    "dst",
    "dcontext",
    "lastapp",
    "lastdata",
    "disposition",
    "billsec",
)

# What an allowed call reaches in the test dialplan: the "callee" answers, waits, hangs up.
DIAL_CONTEXT = "pbxguard-test-dial"


def find_asterisk(env: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if env is None else env
    explicit = environ.get(ASTERISK_BIN_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return shutil.which("asterisk", path=environ.get("PATH"))


def skip_reason(env: Mapping[str, str] | None = None) -> str:
    """Why the real-Asterisk tests are skipped (a variable set to a wrong path says so)."""
    environ = os.environ if env is None else env
    explicit = environ.get(ASTERISK_BIN_ENV)
    if explicit:
        return f"{ASTERISK_BIN_ENV}={explicit} is not an executable file"
    return SKIP_MESSAGE


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_option(text: str, key: str, value: str) -> str:
    """Replaces ``key = ...`` lines of a shipped .conf file (every occurrence), loudly if absent."""
    pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=>?\s*).*$", re.MULTILINE)
    new, count = pattern.subn(lambda m: m.group(1) + value, text)
    if not count:
        raise RuntimeError(f"shipped configuration has no {key!r} line")
    return new


@dataclass
class AsteriskInstance:
    binary: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pbxa-", dir="/tmp")))
    ami_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    agi_port: int = field(default_factory=free_port)
    ami_username: str = "pbxguard"  # the shipped account (the AMI gate's upstream)
    ami_secret: str = field(default_factory=lambda: secrets.token_hex(12))
    harness_username: str = "harness"  # a test-only account with every right, to drive and watch calls
    harness_secret: str = field(default_factory=lambda: secrets.token_hex(12))
    ari_username: str = "pbxguard"
    ari_password: str = field(default_factory=lambda: secrets.token_hex(12))
    ari_app: str = "pbxguard"
    process: subprocess.Popen[bytes] | None = None

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def config_file(self) -> Path:
        return self.etc / "asterisk.conf"

    @property
    def ari_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def agi_url(self) -> str:
        return f"agi://127.0.0.1:{self.agi_port}"

    @property
    def cdr_file(self) -> Path:
        return self.root / "log" / "cdr-custom" / "Master.csv"

    # -- configuration ------------------------------------------------------------------------------

    def write_config(self) -> None:
        root = self.root
        for sub in (
            "etc",
            "lib",
            "db",
            "keys",
            "agi",
            "spool",
            "run",
            "log/cdr-csv",
            "log/cdr-custom",
            "cache",
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {
            "asterisk.conf": (
                # astmoddir, astdatadir (Stasis needs its documentation/core-en_US.xml) and astsbindir
                # are left to the binary's compiled-in defaults: they belong to its installation.
                "[directories]\n"
                f"astetcdir => {root}/etc\n"
                f"astvarlibdir => {root}/lib\n"
                f"astdbdir => {root}/db\n"
                f"astkeydir => {root}\n"
                f"astagidir => {root}/agi\n"
                f"astspooldir => {root}/spool\n"
                f"astrundir => {root}/run\n"
                f"astlogdir => {root}/log\n"
                f"astcachedir => {root}/cache\n"
                "[options]\nverbose = 0\ndocumentation_language = en_US\n"
            ),
            "modules.conf": "[modules]\nautoload = yes\n" + "".join(f"noload = {m}.so\n" for m in _NOLOAD),
            "logger.conf": "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose\n",
            "cdr.conf": "[general]\nenable = yes\nunanswered = yes\ncongestion = yes\n[csv]\nusegmtime = yes\nloguniqueid = yes\n",
            "cdr_custom.conf": "[mappings]\nMaster.csv => "
            + ",".join(f"${{CSV_QUOTE(${{CDR({name})}})}}" for name in CDR_FIELDS)
            + "\n",
            "extensions.conf": (
                "[general]\nstatic = yes\nwriteprotect = yes\n\n"
                "[globals]\n"
                f"PBXGUARD_AGI={self.agi_url}\n"
                f"PBXGUARD_DIAL_CONTEXT={DIAL_CONTEXT}\n\n"
                '#include "extensions_pbxguard.conf"\n\n'
                f"[{DIAL_CONTEXT}]\n"
                "; stands for the trunk: the callee answers, talks for a second, hangs up\n"
                "exten => _[+0-9].,1,Answer()\n same => n,Wait(1)\n same => n,Hangup(16)\n\n"
                "[pbxguard-test-park]\n"
                "; where the originating (;1) leg of a test call waits\n"
                "exten => s,1,Answer()\n same => n,Wait(5)\n same => n,Hangup()\n\n"
                "[pbxguard-test-ivr]\n"
                "; an IVR after the consumer pressed 9 (refusal) or 8 (opposition)\n"
                "exten => _9.,1,Gosub(pbxguard-refusal,s,1(${EXTEN:1},${PBXGUARD_CAMPAIGN}))\n"
                " same => n,Hangup()\n"
                "exten => _8.,1,Gosub(pbxguard-opposition,s,1(${EXTEN:1},${PBXGUARD_CAMPAIGN}))\n"
                " same => n,Hangup()\n"
            ),
        }
        shipped = (CONF_DIR / "extensions_pbxguard.conf").read_text(encoding="utf-8")
        files["extensions_pbxguard.conf"] = shipped
        manager = (CONF_DIR / "manager.conf").read_text(encoding="utf-8")
        manager = _set_option(manager, "port", str(self.ami_port))
        manager = _set_option(manager, "secret", self.ami_secret)
        manager += (
            f"\n[{self.harness_username}]\nsecret = {self.harness_secret}\n"
            "deny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\nread = all\nwrite = all\n"
        )
        files["manager.conf"] = manager
        http = (CONF_DIR / "http.conf").read_text(encoding="utf-8")
        files["http.conf"] = _set_option(http, "bindport", str(self.http_port))
        ari = (CONF_DIR / "ari.conf").read_text(encoding="utf-8")
        files["ari.conf"] = _set_option(ari, "password", self.ari_password)
        for name, text in files.items():
            (self.etc / name).write_text(text, encoding="utf-8")

    # -- life cycle ---------------------------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        return [self.binary, "-C", str(self.config_file), *args]

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        out = (self.root / "stdout.log").open("wb")
        self.process = subprocess.Popen(
            self._cmd("-f", "-n", "-q"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest must not reach it before stop() does
        )
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"asterisk exited with {self.process.returncode}: {self.tail_log()}")
            try:
                result = subprocess.run(
                    self._cmd("-rx", "core waitfullybooted"),
                    capture_output=True,
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
                if result.returncode == 0 and b"fully booted" in result.stdout:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"asterisk did not boot within {timeout} s: {self.tail_log()}")
            time.sleep(0.05)
        self._wait_port(self.ami_port, deadline)
        self._wait_port(self.http_port, deadline)

    @staticmethod
    def _wait_port(port: int, deadline: float) -> None:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    self._cmd("-rx", "core stop now"), capture_output=True, timeout=10, check=False
                )
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stops and starts again on the same ports (for reconnect tests)."""
        self.stop()
        self.start()

    # -- helpers --------------------------------------------------------------------------------------

    def cli(self, command: str, timeout: float = 10.0) -> str:
        result = subprocess.run(self._cmd("-rx", command), capture_output=True, timeout=timeout, check=True)
        return result.stdout.decode("utf-8", "replace")

    def set_global(self, name: str, value: str) -> None:
        self.cli(f"dialplan set global {name} {value}")

    def tail_log(self, lines: int = 40) -> str:
        text = ""
        for name in ("stdout.log", "log/messages.log"):
            path = self.root / name
            if path.exists():
                text += "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return text

    def cdr_rows(self) -> list[dict[str, str]]:
        """Every CDR Asterisk has written so far, as dicts keyed by :data:`CDR_FIELDS`."""
        if not self.cdr_file.exists():
            return []
        with self.cdr_file.open(encoding="utf-8", newline="") as f:
            return [dict(zip(CDR_FIELDS, row, strict=False)) for row in csv.reader(f) if row]

    async def wait_cdrs(
        self, predicate: Callable[[list[dict[str, str]]], bool], limit: float = 5.0
    ) -> list[dict[str, str]]:
        """Polls the CDR file until ``predicate(rows)`` holds or ``limit`` s passed (CDRs are written
        just after hang-up, by another thread of Asterisk: there is nothing to wait on)."""
        deadline = time.monotonic() + limit
        while True:
            rows = self.cdr_rows()
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.05)


class AmiClient:
    """A minimal asyncio AMI client for tests: actions by ActionID, every event kept in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = AmiParser(expect_banner=True)
        self._responses: dict[str, asyncio.Future[Message]] = {}
        self._counter = 0
        self.events: list[Message] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, username: str, secret: str, events: str = "on") -> AmiClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        client = cls(reader, writer)
        response = await client.action("Login", Username=username, Secret=secret, Events=events)
        if response.get("Response") != "Success":
            await client.close()
            raise RuntimeError(f"AMI login failed: {response.get('Message')}")
        return client

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for item in self._parser.feed(data):
                    if isinstance(item, Banner):
                        continue
                    kind, _ = item.kind
                    action_id = item.action_id
                    if kind == "response" and action_id in self._responses:
                        future = self._responses.pop(action_id)
                        if not future.done():
                            future.set_result(item)
                    elif kind == "event":
                        self.events.append(item)
                        self._changed.set()
        finally:
            self.closed = True
            self._changed.set()
            for future in self._responses.values():
                if not future.done():
                    future.set_exception(ConnectionError("AMI connection closed"))

    async def action(self, name: str, headers: list[tuple[str, str]] | None = None, /, **kw: str) -> Message:
        self._counter += 1
        action_id = f"h{self._counter}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._responses[action_id] = future
        self._writer.write(encode(Message.action(name, headers or [], ActionID=action_id, **kw)))
        await self._writer.drain()
        return await asyncio.wait_for(future, 10)

    async def wait_for(
        self, predicate: Callable[[list[Message]], bool], limit: float = 10.0
    ) -> list[Message]:
        """Waits until ``predicate(events)`` holds; returns the events (raises TimeoutError)."""
        async with asyncio.timeout(limit):
            while not predicate(self.events):
                if self.closed:
                    raise ConnectionError("AMI connection closed")
                self._changed.clear()
                await self._changed.wait()
        return self.events

    def events_named(self, name: str) -> list[Message]:
        return [e for e in self.events if e.get("Event") == name]

    async def close(self) -> None:
        if not self._writer.is_closing():
            with contextlib.suppress(Exception):
                self._writer.write(encode(Message.action("Logoff", ActionID="bye")))
            self._writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        # Bounded: a peer that stopped reading would otherwise hold the flush, and the test, forever.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 5)


# -- reading a call's fate from Asterisk's own events -------------------------------------------------


def channel_events(events: list[Message], uniqueid: str) -> list[Message]:
    return [e for e in events if e.get("Uniqueid") == uniqueid]


def hangup_event(events: list[Message], uniqueid: str) -> Message | None:
    return next((e for e in channel_events(events, uniqueid) if e.get("Event") == "Hangup"), None)


def reached_context(events: list[Message], uniqueid: str, context: str) -> bool:
    """Whether the channel ran any priority of ``context`` (``Newexten`` events)."""
    return any(
        e.get("Event") == "Newexten" and e.get("Context") == context for e in channel_events(events, uniqueid)
    )


def variable_value(events: list[Message], uniqueid: str, name: str) -> str | None:
    """The last value Asterisk reported (``VarSet``) for a channel variable, None if never set."""
    value = None
    for e in channel_events(events, uniqueid):
        if e.get("Event") == "VarSet" and e.get("Variable") == name:
            value = e.get("Value")
    return value


async def originate_local(
    ami: AmiClient,
    number: str,
    context: str = "pbxguard-outbound",
    *,
    call_id: str,
    caller_id: str | None = None,
    variables: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Originates ``Local/NUMBER@CONTEXT`` (the ``;1`` leg parks in ``pbxguard-test-park``) and returns
    the uniqueids chosen for its two legs, ``(call_id-1, call_id-2)``: ``;2`` runs the dialplan."""
    headers = [("Variable", f"{k}={v}") for k, v in (variables or {}).items()]
    extra = {"CallerID": caller_id} if caller_id is not None else {}
    response = await ami.action(
        "Originate",
        headers,
        Channel=f"Local/{number}@{context}",
        Context="pbxguard-test-park",
        Exten="s",
        Priority="1",
        Async="true",
        ChannelId=f"{call_id}-1",
        OtherChannelId=f"{call_id}-2",
        Timeout="10000",
        **extra,
    )
    if response.get("Response") != "Success":
        raise RuntimeError(f"Originate refused: {response.get('Message')}")
    return f"{call_id}-1", f"{call_id}-2"


# One instance per test run, however many test modules ask for it: the fixture may be registered both
# as a plugin (tests/conftest.py) and by a module importing it, which pytest treats as two fixtures.
_shared: AsteriskInstance | None = None
_users = 0


def start_instance() -> AsteriskInstance:
    binary = find_asterisk()
    if binary is None:
        pytest.skip(skip_reason())
    instance = AsteriskInstance(binary)
    try:
        instance.start()
    except BaseException:
        instance.cleanup()
        raise
    return instance


@pytest.fixture(scope="session")
def asterisk() -> Iterator[AsteriskInstance]:
    """One private Asterisk for the whole run (skips when there is no binary)."""
    global _shared, _users
    if _shared is None:
        _shared = start_instance()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.cleanup()
            _shared = None


@pytest.fixture
async def ami(asterisk: AsteriskInstance) -> AsyncIterator[AmiClient]:
    """The harness AMI account (every right, every event), logged in for one test."""
    client = await AmiClient.connect(
        "127.0.0.1", asterisk.ami_port, asterisk.harness_username, asterisk.harness_secret
    )
    try:
        yield client
    finally:
        await client.close()
