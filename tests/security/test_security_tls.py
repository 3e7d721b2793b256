"""Optional TLS on the HTTP API and the AMI gate: configuration, TLS >= 1.2, verification against the
CA, and plaintext refused on a TLS port. Certificates are made at run time (security_support)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_asterisk_ami import AmiTestClient, FakeAsterisk
from security_support import TlsFiles, free_port

from pbxguard import config as config_module
from pbxguard.config import (
    AmiGateConfig,
    AmiUpstreamConfig,
    AmiUserConfig,
    AsteriskConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    GatesConfig,
    HttpConfig,
    Mode,
    Secret,
)
from pbxguard.daemon import Daemon
from pbxguard.gates.ami_proxy import AmiGate
from pbxguard.guard import Guard
from pbxguard.policy.settings import PolicySettings
from pbxguard.protocols.ami import Message, encode

pytestmark = pytest.mark.timeout(60)

TOKEN = "tls-test-token-0123456789abcdef"


def error(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_module.parse(table, {})
    return str(info.value)


# -- configuration ------------------------------------------------------------------------------------

AMI_ON: dict[str, Any] = {
    "asterisk": {"ami": {"username": "pbxguard", "secret": "s"}},
    "gates": {"ami": {"listen": "127.0.0.1:5039", "users": [{"username": "d", "secret": "x"}]}},
}


@pytest.mark.parametrize("section", ["http", "gates.ami"])
def test_tls_cert_and_key_go_together(section: str, tls_files: TlsFiles) -> None:
    def table(**tls: str) -> dict[str, Any]:
        if section == "http":
            return {"http": tls}
        return {**AMI_ON, "gates": {"ami": {**AMI_ON["gates"]["ami"], **tls}}}

    assert (
        error(table(tls_cert=str(tls_files.cert))) == f"{section}.tls_key: required with {section}.tls_cert"
    )
    assert error(table(tls_key=str(tls_files.key))) == f"{section}.tls_cert: required with {section}.tls_key"
    missing = str(tls_files.cert.parent / "nope.pem")
    assert error(table(tls_cert=missing, tls_key=str(tls_files.key))).startswith(
        f"{section}.tls_cert: cannot read {missing!r}"
    )
    assert error(table(tls_cert=str(tls_files.cert), tls_key=missing)).startswith(
        f"{section}.tls_key: cannot read {missing!r}"
    )
    # Readable but not a certificate and its key (here the CA's certificate as the key).
    assert error(table(tls_cert=str(tls_files.cert), tls_key=str(tls_files.ca))).startswith(
        f"{section}.tls_cert: cannot load the certificate"
    )
    cfg = config_module.parse(table(tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)), {})
    tls = cfg.http if section == "http" else cfg.gates.ami
    assert (tls.tls_cert, tls.tls_key) == (str(tls_files.cert), str(tls_files.key))


def test_tls_is_off_by_default() -> None:
    cfg = config_module.parse({}, {})
    assert cfg.http.tls_cert == cfg.http.tls_key == ""
    assert cfg.gates.ami.tls_cert == cfg.gates.ami.tls_key == ""


def test_server_context_refuses_old_protocols(tls_files: TlsFiles) -> None:
    from pbxguard.tls import server_context

    context = server_context(str(tls_files.cert), str(tls_files.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.verify_mode == ssl.CERT_NONE  # clients authenticate inside the protocol


# -- the HTTP API over TLS --------------------------------------------------------------------------------


@pytest.fixture
async def https_daemon(database_url: str, tls_files: TlsFiles) -> AsyncIterator[int]:
    port = free_port()
    config = Config(
        database=DatabaseConfig(url=Secret(database_url)),
        http=HttpConfig(
            listen=f"127.0.0.1:{port}", token=Secret(TOKEN), tls_cert=str(tls_files.cert),
            tls_key=str(tls_files.key),
        ),
    )  # fmt: skip
    daemon = Daemon(config)
    await daemon.start()
    try:
        yield port
    finally:
        await daemon.stop()


async def test_http_api_over_tls_verified_against_the_ca(https_daemon: int, tls_files: TlsFiles) -> None:
    port = https_daemon
    connector = aiohttp.TCPConnector(ssl=tls_files.client_context())
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"https://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "alive"}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"https://localhost:{port}/v1/campaigns", headers=headers) as response:
            assert response.status == 200
            assert await response.json() == []
        # Over TLS the dashboard's session cookie is Secure: a browser never sends it over plain HTTP.
        async with session.get(f"https://127.0.0.1:{port}/?token={TOKEN}", allow_redirects=False) as response:
            assert response.status == 303
            cookie = response.cookies["pbxguard_session"]
            assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_files.client_context())
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK")
    writer.close()


async def test_https_certificate_is_checked_by_clients(https_daemon: int, tls_files: TlsFiles) -> None:
    """A client trusting another CA refuses the server: the certificate is what it claims."""
    connector = aiohttp.TCPConnector(ssl=tls_files.client_context(tls_files.other_ca))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"https://127.0.0.1:{https_daemon}/healthz")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_https_refuses_tls_1_1_and_older(https_daemon: int, tls_files: TlsFiles) -> None:
    context = tls_files.client_context()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", https_daemon, ssl=context), 5)


async def plaintext_answer(port: int, request: bytes) -> bytes:
    """What a plaintext client gets back from a TLS port (up to the server closing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(4096):
                data += chunk
    writer.close()
    return data


async def test_plaintext_http_is_refused_on_the_tls_port(https_daemon: int) -> None:
    data = await plaintext_answer(
        https_daemon,
        f"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert b"HTTP/1." not in data and b"campaign" not in data  # at most a TLS alert, then closed


# -- the AMI gate over TLS --------------------------------------------------------------------------------


@pytest.fixture
async def tls_gate(tls_files: TlsFiles) -> AsyncIterator[tuple[AmiGate, FakeAsterisk]]:
    fake = FakeAsterisk()
    await fake.start()
    ami = AmiGateConfig(
        listen="127.0.0.1:0", users=(AmiUserConfig("dialer", Secret("dialer-secret"), campaign="c1"),),
        tls_cert=str(tls_files.cert), tls_key=str(tls_files.key), login_timeout_ms=3000,
    )  # fmt: skip
    config = Config(
        asterisk=AsteriskConfig(
            ami=AmiUpstreamConfig("127.0.0.1", fake.port, fake.username, Secret(fake.secret))
        ),
        gates=GatesConfig(ami=ami),
    )
    gate = AmiGate(
        config, Guard(None, PolicySettings(), Mode.ENFORCE, timeout=0.5), listen=("127.0.0.1", 0),
        auth_failure_delay=0.01, boot_grace=0.1,
    )  # fmt: skip
    await gate.start()
    try:
        yield gate, fake
    finally:
        await gate.stop()
        await fake.kill()


async def test_ami_gate_over_tls(tls_gate: tuple[AmiGate, FakeAsterisk], tls_files: TlsFiles) -> None:
    gate, _ = tls_gate
    host, port = gate.address
    reader, writer = await asyncio.open_connection(host, port, ssl=tls_files.client_context())
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    client = AmiTestClient(reader, writer)
    try:
        await client.wait_for(lambda _: client.banner is not None)
        response = await client.action("Login", Username="dialer", Secret="dialer-secret")
        assert response.get("Message") == "Authentication accepted"
        assert (await client.action("Ping")).get("Response") in ("Success", "Error")
    finally:
        await client.close()


async def test_ami_gate_certificate_is_checked_by_clients(
    tls_gate: tuple[AmiGate, FakeAsterisk], tls_files: TlsFiles
) -> None:
    gate, _ = tls_gate
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(
            asyncio.open_connection(*gate.address, ssl=tls_files.client_context(tls_files.other_ca)), 5
        )


async def test_plaintext_ami_is_refused_on_the_tls_port(tls_gate: tuple[AmiGate, FakeAsterisk]) -> None:
    gate, fake = tls_gate
    before = len(fake.actions)
    login = encode(Message.action("Login", Username="dialer", Secret="dialer-secret"))
    data = await plaintext_answer(
        gate.address[1], login + encode(Message.action("Command", Command="core stop now"))
    )
    assert b"Asterisk Call Manager" not in data and b"Response" not in data
    await asyncio.sleep(0.05)
    assert not [a for a in fake.actions[before:] if not (a.action_id or "").startswith("pbxg-link-")]
