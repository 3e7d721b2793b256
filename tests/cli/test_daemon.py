"""The daemon: `pbxguard run` as a subprocess (health, readiness, JSON logs, clean shutdown on
signals, an unreachable or late database), and `pbxguard.daemon.serve` in process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pbxguard import config as config_module
from pbxguard.daemon import Daemon, serve

PBXGUARD = Path(sys.executable).parent / "pbxguard"
UNREACHABLE = "postgresql://pbxguard@127.0.0.1:1/nothing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_port_free(port: int) -> None:
    """Nothing listens there any more (SO_REUSEADDR: connections left in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for(url: str, predicate: Any, deadline_s: float = 10.0) -> tuple[int, Any]:
    """Polls until predicate(status, body) holds; the last answer otherwise (or raises if none)."""
    deadline = time.monotonic() + deadline_s
    last: tuple[int, Any] | None = None
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = get(url)
            if predicate(*last):
                return last
        except (OSError, ValueError) as exc:  # not listening yet
            error = exc
        time.sleep(0.1)
    if last is None:
        raise AssertionError(f"{url} never answered: {error}")
    return last


class DaemonProcess:
    def __init__(self, tmp_path: Path, database_url: str, extra_toml: str = "") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "pbxguard.toml"
        self.config.write_text(
            f'[database]\nurl = "{database_url}"\n[http]\nlisten = "127.0.0.1:{self.port}"\n{extra_toml}',
            encoding="utf-8",
        )
        self.stderr_path = tmp_path / "daemon.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
        env["HOME"] = str(tmp_path)
        env["PBXGUARD_HOME"] = str(tmp_path / "pbxguard-home")  # never the shared embedded cluster
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [str(PBXGUARD), "--config", str(self.config), "run", "--log-format", "json"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=tmp_path,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs(self) -> list[dict[str, Any]]:
        """Every stderr line is one JSON object."""
        lines = self.stderr_path.read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            record = json.loads(line)
            assert isinstance(record, dict), line
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
            records.append(record)
        return records


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def start(database_url: str, extra_toml: str = "") -> DaemonProcess:
        daemon = DaemonProcess(tmp_path, database_url, extra_toml)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def test_health_readiness_and_sigterm(start_daemon: Any, database_url: str) -> None:
    daemon = start_daemon(database_url)
    assert wait_for(f"{daemon.base}/healthz", lambda s, b: s == 200) == (200, {"status": "alive"})
    status, body = wait_for(f"{daemon.base}/readyz", lambda s, b: s == 200 and b["checks"]["ledger"])
    assert status == 200
    assert body["ready"] is True and body["checks"]["ledger"] is True

    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    records = daemon.logs()
    messages = [r["msg"] for r in records]
    assert "ledger connected" in messages
    assert messages[-1] == "stopped"
    listening = next(r for r in records if r["msg"] == "http listening")
    assert listening["listen"] == f"127.0.0.1:{daemon.port}"
    assert all(r["logger"].startswith("pbxguard") for r in records)
    assert_port_free(daemon.port)


def test_sigint_also_stops_cleanly(start_daemon: Any, database_url: str) -> None:
    daemon = start_daemon(database_url)
    wait_for(f"{daemon.base}/readyz", lambda s, b: s == 200)
    assert daemon.stop(signal.SIGINT) == 0
    assert daemon.logs()[-1]["msg"] == "stopped"


def test_unreachable_database_keeps_the_daemon_up(start_daemon: Any) -> None:
    daemon = start_daemon(UNREACHABLE)
    assert wait_for(f"{daemon.base}/healthz", lambda s, b: s == 200) == (200, {"status": "alive"})
    status, body = get(f"{daemon.base}/readyz")
    assert status == 503
    assert body["ready"] is False and body["checks"]["ledger"] is False
    time.sleep(1.5)  # it keeps retrying, and stays up
    assert daemon.proc.poll() is None
    assert get(f"{daemon.base}/readyz")[0] == 503
    assert daemon.stop(signal.SIGTERM) == 0
    records = daemon.logs()
    assert any(r["level"] == "warning" and "ledger not reachable" in r["msg"] for r in records)
    assert records[-1]["msg"] == "stopped"


def test_ledger_that_appears_later_makes_the_daemon_ready(
    start_daemon: Any, database_url: str, tmp_path: Path
) -> None:
    # The daemon is pointed at a socket folder that is empty at start; the socket appears later.
    query = parse_qs(urlparse(database_url).query)
    socket_dir, port = Path(query["host"][0]), query["port"][0]
    late_dir = tmp_path / "late"
    late_dir.mkdir()
    late_url = database_url.replace(f"host={socket_dir}", f"host={late_dir}")
    assert late_url != database_url
    daemon = start_daemon(late_url)
    assert wait_for(f"{daemon.base}/readyz", lambda s, b: s == 503)[0] == 503
    (late_dir / f".s.PGSQL.{port}").symlink_to(socket_dir / f".s.PGSQL.{port}")
    status, body = wait_for(f"{daemon.base}/readyz", lambda s, b: s == 200, deadline_s=15)
    assert status == 200 and body["checks"]["ledger"] is True
    assert daemon.stop() == 0
    messages = [r["msg"] for r in daemon.logs()]
    assert "ledger connected" in messages
    assert messages[-1] == "stopped"


def test_port_already_taken_is_one_line_exit_2(tmp_path: Path, database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "pbxguard.toml"
        path.write_text(
            f'[database]\nurl = "{database_url}"\n[http]\nlisten = "127.0.0.1:{port}"\n', encoding="utf-8"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
        env["PBXGUARD_HOME"] = str(tmp_path / "pbxguard-home")
        proc = subprocess.run(
            [str(PBXGUARD), "--config", str(path), "run", "--log-format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pbxguard: error:")]
    assert len(errors) == 1 and str(port) in errors[0]
    # Everything else on stderr is the daemon's JSON log, which still says it stopped.
    logs = [json.loads(line) for line in proc.stderr.splitlines() if not line.startswith("pbxguard: error:")]
    assert logs and logs[-1]["msg"] == "stopped"


def test_bad_config_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "pbxguard.toml"
    path.write_text("[http]\nfoo = 1\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
    proc = subprocess.run(
        [str(PBXGUARD), "--config", str(path), "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["pbxguard: error: http.foo: unknown setting"]


# -- in process ------------------------------------------------------------------------------------


def make_config(database_url: str, port: int, **extra: Any) -> config_module.Config:
    table: dict[str, Any] = {"database": {"url": database_url}, "http": {"listen": f"127.0.0.1:{port}"}}
    table.update(extra)
    return config_module.parse(table, {})


async def poll(session: aiohttp.ClientSession, url: str, status: int, deadline_s: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + deadline_s
    while True:
        try:
            async with session.get(url) as response:
                if response.status == status:
                    return await response.json()
        except aiohttp.ClientConnectionError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{url} never answered {status}")
        await asyncio.sleep(0.05)


async def test_serve_in_process(database_url: str) -> None:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(make_config(database_url, port), stop))
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert await poll(session, f"http://127.0.0.1:{port}/healthz", 200) == {"status": "alive"}
        body = await poll(session, f"http://127.0.0.1:{port}/readyz", 200)
        assert body == {"ready": True, "checks": {"ledger": True}}
    stop.set()
    await asyncio.wait_for(task, 5)
    # Shut down: the port is free, and serve() gave the signal handlers back to the loop.
    assert_port_free(port)
    loop = asyncio.get_running_loop()
    assert loop.remove_signal_handler(signal.SIGTERM) is False
    assert loop.remove_signal_handler(signal.SIGINT) is False


async def test_serve_in_process_without_database() -> None:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(make_config(UNREACHABLE, port), stop))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        body = await poll(session, f"http://127.0.0.1:{port}/readyz", 503)
        assert body == {"ready": False, "checks": {"ledger": False}}
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_serve_that_cannot_start_leaves_nothing_behind(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await asyncio.wait_for(serve(make_config(database_url, port)), 10)
    await asyncio.sleep(0.05)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []
    loop = asyncio.get_running_loop()
    assert loop.remove_signal_handler(signal.SIGTERM) is False


async def test_readiness_includes_the_gates(database_url: str) -> None:
    daemon = Daemon(make_config(database_url, free_port()))
    state = {"gate": False}
    daemon.readiness["ami"] = lambda: state["gate"]
    server = TestServer(daemon.http_app())
    async with TestClient(server) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        assert await response.json() == {"ready": False, "checks": {"ledger": False, "ami": False}}
        daemon.ledger_ready = True
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["checks"] == {"ledger": True, "ami": False}
        state["gate"] = True
        response = await client.get("/readyz")
        assert response.status == 200
        assert await response.json() == {"ready": True, "checks": {"ledger": True, "ami": True}}
        response = await client.get("/healthz")
        assert response.status == 200 and await response.json() == {"status": "alive"}
