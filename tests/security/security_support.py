"""Helpers for the security tests: certificates made at run time, process memory, raw clients."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agi_channel import Channel
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate clients verify against
    cert: Path  # the server's certificate (127.0.0.1, ::1, localhost)
    key: Path  # its private key
    other_ca: Path  # a CA that signed nothing here: verification against it must fail

    def client_context(self, ca: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca or self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def make_tls_files(folder: Path) -> TlsFiles:
    ca_key, ca_cert = _ca("pbxguard test CA")
    _, other_cert = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("pbxguard test server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def raise_open_files(at_least: int) -> int:
    """Raises this process's soft RLIMIT_NOFILE (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < at_least:
        target = at_least if hard == resource.RLIM_INFINITY else min(at_least, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agi_environment(number: str, campaign: str, uniqueid: str, script: str = "check") -> bytes:
    pairs = [
        ("agi_network", "yes"),
        ("agi_network_script", script),
        ("agi_request", f"agi://127.0.0.1/{script}"),
        ("agi_channel", f"Local/{number}@pbxguard-outbound-00000001;2"),
        ("agi_uniqueid", uniqueid),
        ("agi_callerid", "0162123456"),
        ("agi_context", "pbxguard-check"),
        ("agi_extension", "s"),
        ("agi_priority", "10"),
        ("agi_arg_1", number),
        ("agi_arg_2", campaign),
    ]
    return "".join(f"{k}: {v}\n" for k, v in pairs).encode() + b"\n"


async def agi_call(
    port: int, number: str, campaign: str, uniqueid: str, caller_id: str = "0162123456", within: float = 5.0
) -> dict[str, str]:
    """One FastAGI exchange as Asterisk runs it; the channel variables pbxguard set."""
    channel = Channel(caller_id=caller_id)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(agi_environment(number, campaign, uniqueid))
        async with asyncio.timeout(within):
            while line := await reader.readline():
                writer.write((channel.reply(line.decode()) + "\n").encode())
    finally:
        writer.close()
    return channel.variables


PBXGUARD = Path(sys.executable).parent / "pbxguard"


class DaemonProcess:
    """`pbxguard run` as a subprocess with a configuration file; stdout and stderr kept in files."""

    def __init__(self, folder: Path, toml: str, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.config = folder / "pbxguard.toml"
        self.config.write_text(toml, encoding="utf-8")
        self.stdout_path = folder / "daemon.out"
        self.stderr_path = folder / "daemon.err"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
        full_env["HOME"] = str(folder)
        full_env["PBXGUARD_HOME"] = str(folder / "pbxguard-home")  # never the shared embedded cluster
        full_env.update(env or {})
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(PBXGUARD), "--config", str(self.config), "run"],
                env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=folder,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace") + self.stderr_path.read_text(
            encoding="utf-8", errors="replace"
        )

    async def wait_ready(
        self,
        base_url: str,
        checks: tuple[str, ...] = ("ledger",),
        within: float = 20.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Until /readyz says every one of `checks` is up (gates register after the HTTP server starts)."""
        import aiohttp

        deadline = asyncio.get_running_loop().time() + within
        last = ""
        connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2), connector=connector
        ) as session:
            while asyncio.get_running_loop().time() < deadline:
                assert self.proc.poll() is None, f"the daemon exited:\n{self.output()[-3000:]}"
                try:
                    async with session.get(f"{base_url}/readyz") as response:
                        last = await response.text()
                        state = (await response.json()).get("checks", {})
                        if response.status == 200 and all(state.get(name) for name in checks):
                            return
                except (aiohttp.ClientError, OSError) as exc:
                    last = repr(exc)
                await asyncio.sleep(0.1)
        raise AssertionError(f"the daemon never got ready: {last}\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
