"""Secrets never reach the logs: a full daemon (`pbxguard run` in a subprocess, debug level) with every
secret configured — inline, from a file and from the environment — exercised through every gate, with
good and failed logins and bad requests, then the CLI on the same configuration; stdout and stderr of
all of it are searched for each secret value (and for the values derived from them that would be as
good as the secret: the ARI basic-auth header and the dashboard session cookie)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_asterisk_ami import AmiTestClient, FakeAsterisk
from security_support import PBXGUARD, DaemonProcess, agi_call, free_port

from pbxguard.protocols.ami import Message, md5_challenge_key

HTTP_TOKEN = "HttpTok-7f3a9c1e5b2d4a6f8e0c"
AMI_USER_INLINE = "AmiUsrInline-91b2c3d4e5f6a7"
AMI_USER_FILE = "AmiUsrFile-a1b2c3d4e5f60718"
ASTERISK_AMI = "AstAmiSecret-2b3c4d5e6f7081"
ARI_PASSWORD = "AriPassword-3c4d5e6f708192"
JOURNAL_KEY = "JournalKey-4d5e6f708192a3"
DB_PASSWORD = "S3cretDbPw-5e6f708192a3b4"

SECRETS = {
    "http.token (environment)": HTTP_TOKEN,
    "gates.ami.users[0].secret (inline)": AMI_USER_INLINE,
    "gates.ami.users[1].secret_file": AMI_USER_FILE,
    "asterisk.ami.secret (environment)": ASTERISK_AMI,
    "asterisk.ari.password_file": ARI_PASSWORD,
    "journal.key (environment)": JOURNAL_KEY,
    "database.url password (environment)": DB_PASSWORD,
    "ARI basic-auth header": base64.b64encode(f"pbxguard:{ARI_PASSWORD}".encode()).decode(),
    "dashboard session cookie": hmac.new(
        HTTP_TOKEN.encode(), b"pbxguard dashboard session v1", hashlib.sha256
    ).hexdigest(),
}


class FakeAri:
    """Refuses the first event-stream connection (401), then accepts it and sends one StasisStart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.attempts = 0
        self.requests: list[str] = []
        self.decided = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ari/events", self.events)
        app.router.add_route("*", "/ari/channels/{id}/{what}", self.channel)
        app.router.add_route("*", "/ari/channels/{id}", self.channel)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        expected = "Basic " + SECRETS["ARI basic-auth header"]
        if self.attempts == 1 or request.headers.get("Authorization") != expected:
            return web.json_response({"message": "Authentication required"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        event = {
            "type": "StasisStart", "application": "pbxguard", "args": ["0612345678", "c1"],
            "channel": {"id": "1795900000.1", "name": "PJSIP/agent-00000001", "caller": {"number": "0162123456"},
                        "dialplan": {"context": "x", "exten": "0612345678", "priority": 1}},
        }  # fmt: skip
        await ws.send_str(json.dumps(event))
        async for _ in ws:
            pass
        return ws

    async def channel(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        if request.method == "GET":
            return web.json_response({"message": "Provided variable was not found"}, status=404)
        if request.path.endswith(("/continue",)) or request.method == "DELETE":
            self.decided.set()
        return web.Response(status=204)


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeAsterisk, FakeAri]]:
    ami = FakeAsterisk(secret=ASTERISK_AMI)
    await ami.start()
    ari = FakeAri()
    await ari.start()
    try:
        yield ami, ari
    finally:
        await ari.stop()
        await ami.kill()


def with_password(url: str, password: str) -> str:
    assert url.startswith("postgresql://pbxguard@"), url
    return url.replace("postgresql://pbxguard@", f"postgresql://pbxguard:{password}@", 1)


def cli(config: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [str(PBXGUARD), "--config", str(config), *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


async def exercise_http(base: str) -> None:
    auth = {"Authorization": f"Bearer {HTTP_TOKEN}"}
    jar = aiohttp.CookieJar(unsafe=True)  # keeps cookies set by an IP address
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), cookie_jar=jar) as session:

        async def call(method: str, path: str, expect: int, **kw: Any) -> None:
            async with session.request(method, base + path, allow_redirects=False, **kw) as response:
                await response.read()
                assert response.status == expect, (method, path, response.status)

        await call("GET", "/v1/campaigns", 401)
        await call("GET", "/v1/campaigns", 401, headers={"Authorization": f"Bearer {HTTP_TOKEN}x"})
        await call("GET", "/v1/campaigns", 401, headers={"Authorization": f"Basic {HTTP_TOKEN}"})
        await call("POST", "/v1/campaigns", 201, headers=auth, json={"id": "c1", "order_giver": "ACME"})
        await call("POST", "/v1/caller-ids/authorizations", 201, headers=auth,
                   json={"caller_id": "0162123456", "order_giver": "ACME", "valid_from": "2026-01-01"})  # fmt: skip
        await call("POST", "/v1/consents", 201, headers=auth,
                   json={"number": "0612345678", "order_giver": "ACME", "given_at": "2026-01-01T10:00:00"})  # fmt: skip
        await call("POST", "/v1/check", 200, headers=auth,
                   json={"number": "0612345678", "campaign": "c1", "caller_id": "0162123456", "reserve": True,
                         "call_key": f"http-{uuid.uuid4()}"})  # fmt: skip
        await call(
            "POST", "/v1/check", 400, headers={**auth, "Content-Type": "application/json"}, data=b"{nope"
        )
        await call("POST", "/v1/check", 422, headers=auth, json={"number": HTTP_TOKEN, "campaign": "c1"})
        await call("GET", "/v1/nothing-here", 404, headers=auth)
        await call("GET", f"/?token={HTTP_TOKEN}x", 401)
        await call("GET", f"/?token={HTTP_TOKEN}", 303)
        await call("GET", "/", 200)  # with the session cookie just set
        await call("GET", "/metrics", 200)


async def exercise_ami(fake: FakeAsterisk, port: int) -> None:
    dialer = await AmiTestClient.login("127.0.0.1", port, "dialer", AMI_USER_INLINE)
    originate = Message.action(
        "Originate", ActionID="o1", Channel="PJSIP/0612345678@trunk", Context="agents", Exten="100",
        Priority="1", CallerID='"ACME" <0162123456>', Async="true",
    )  # fmt: skip
    dialer.send(originate)
    await dialer.response("o1", within=10)
    assert (await dialer.action("Command", Command="core show channels")).get("Response") == "Error"
    await dialer.close()
    for username, secret in (("dialer", AMI_USER_INLINE + "x"), ("nobody", AMI_USER_FILE)):
        client = await AmiTestClient.connect("127.0.0.1", port)
        response = await client.action("Login", Username=username, Secret=secret)
        assert response.get("Message") == "Authentication failed"
        await client.close()
    for secret, expect in ((AMI_USER_FILE, "Success"), (AMI_USER_FILE + "x", "Error")):
        client = await AmiTestClient.connect("127.0.0.1", port)
        challenge = (await client.action("Challenge", AuthType="MD5")).get("Challenge") or ""
        key = md5_challenge_key(challenge, secret)
        response = await client.action("Login", Username="robot", AuthType="MD5", Key=key)
        assert response.get("Response") == expect
        await client.close()


async def exercise_agi(port: int) -> None:
    variables = await agi_call(port, "0612345678", "c1", f"agi-{uuid.uuid4()}")
    assert variables["PBXGUARD_VERDICT"] in ("ALLOW", "BLOCK")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\xffGARBAGE: not an AGI environment\n\n")
    await asyncio.wait_for(reader.read(), 5)
    writer.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_no_secret_in_any_output(
    tmp_path: Path, database_url: str, fakes: tuple[FakeAsterisk, FakeAri], log_format: str
) -> None:
    ami_fake, ari_fake = fakes
    (tmp_path / "robot.secret").write_text(AMI_USER_FILE + "\n")
    (tmp_path / "ari.password").write_text(ARI_PASSWORD + "\n")
    http, ami, agi = free_port(), free_port(), free_port()
    toml = f"""
[http]
listen = "127.0.0.1:{http}"
[asterisk.ami]
port = {ami_fake.port}
username = "pbxguard"
[asterisk.ari]
url = "http://127.0.0.1:{ari_fake.port}"
username = "pbxguard"
password_file = "{tmp_path / "ari.password"}"
[gates.ami]
listen = "127.0.0.1:{ami}"
[[gates.ami.users]]
username = "dialer"
secret = "{AMI_USER_INLINE}"
campaign = "c1"
[[gates.ami.users]]
username = "robot"
secret_file = "{tmp_path / "robot.secret"}"
campaign = "c1"
[gates.agi]
listen = "127.0.0.1:{agi}"
[journal]
seal_interval_ms = 50
[log]
format = "{log_format}"
level = "debug"
numbers = "full"
"""
    env = {
        "PBXGUARD_HTTP_TOKEN": HTTP_TOKEN,
        "PBXGUARD_AMI_SECRET": ASTERISK_AMI,
        "PBXGUARD_JOURNAL_KEY": JOURNAL_KEY,
        "PBXGUARD_DATABASE_URL": with_password(database_url, DB_PASSWORD),
    }
    daemon = DaemonProcess(tmp_path, toml, env)
    try:
        await daemon.wait_ready(f"http://127.0.0.1:{http}", ("ledger", "ami", "agi", "ari"), within=30)
        assert ari_fake.attempts >= 2  # the first event-stream connection was refused with 401
        await exercise_http(f"http://127.0.0.1:{http}")
        await exercise_ami(ami_fake, ami)
        await exercise_agi(agi)
        await asyncio.wait_for(ari_fake.decided.wait(), 10)  # the StasisStart was decided
        await asyncio.sleep(0.3)  # the sealer ran with the journal key
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    outputs = {"daemon": daemon.output()}
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
    cli_env.update(env, HOME=str(tmp_path), PBXGUARD_HOME=str(tmp_path / "pbxguard-home"))
    for args, expect in (
        (("campaign", "list"), 0),
        (("audit", "verify"), 0),
        (("check", "0612345678", "--campaign", "c1", "--caller-id", "0162123456"), None),
        (("check", "not-a-number", "--campaign", "c1", "--caller-id", "0162123456"), 2),
        (("--json", "consent", "add", "0612345678", "--order-giver", "nobody"), 2),
        (("db", "url"), 2),
        (("stats",), 0),
    ):
        code, text = cli(daemon.config, cli_env, *args)
        assert expect is None or code == expect, (args, code, text)
        outputs[" ".join(args)] = text
    unreachable = dict(
        cli_env, PBXGUARD_DATABASE_URL=f"postgresql://pbxguard:{DB_PASSWORD}@127.0.0.1:1/nothing"
    )
    code, text = cli(daemon.config, unreachable, "campaign", "list")
    assert code == 2 and "error" in text
    outputs["unreachable database"] = text
    assert '"level": "debug"' in outputs["daemon"] or " DEBUG " in outputs["daemon"]
    for where, text in outputs.items():
        for name, value in SECRETS.items():
            assert value not in text, f"{name} appears in the output of {where}"
    lines = sum(text.count("\n") for text in outputs.values())
    print(
        f"\n{len(SECRETS)} secret values searched in {lines} lines of output ({log_format} logs): none found"
    )
