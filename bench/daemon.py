"""Runs pbxguard's daemon as its own process, as in production, for the gate benchmarks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import free_port


class DaemonProcess:
    def __init__(self, database_url: str, extra_toml: str = "", http_token: str = "") -> None:
        self.http_port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pbxg-benchd-"))
        self.config = self.folder / "pbxguard.toml"
        self.config.write_text(
            f'[database]\nurl = "{database_url}"\npool_min = 4\npool_max = 32\n'
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            + (f'token = "{http_token}"\n' if http_token else "")
            + '[log]\nlevel = "warning"\n'
            + extra_toml,
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: str = "ledger", timeout: float = 30.0) -> None:
        env = dict(os.environ, PBXGUARD_CONFIG=str(self.config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pbxguard.cli", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "daemon.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
                ) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.folder / "daemon.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"daemon did not become ready: {log}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def cleanup(self) -> None:
        """Stops the daemon and removes its folder (configuration and log)."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


async def wait_port(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def helper_process(module: str, *args: str) -> subprocess.Popen[bytes]:
    """A bench helper server (bare FastAGI, fake AMI) in its own process, like the real peers."""
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
