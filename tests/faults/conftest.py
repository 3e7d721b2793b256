"""Fixtures of the fault tests: a report that reaches the CI log whatever the capture mode, a durable
PostgreSQL cluster of its own (to be SIGKILLed), and daemons that are always cleaned up.

``make test`` runs the bounded versions (about a minute and a half on two cores). The long versions,
marked ``slow``, run with ``PBXGUARD_LONG_FAULTS=1``::

    PBXGUARD_LONG_FAULTS=1 .venv/bin/python -m pytest tests/faults -m slow

The tests needing a real Asterisk run when ``PBXGUARD_ASTERISK_BIN`` (or ``asterisk`` on PATH) finds one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import DaemonProcess

from pbxguard.ledger.pgcluster import LocalCluster

_REPORT_KEY = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_REPORT_KEY, [])
    if lines:
        terminalreporter.section("pbxguard fault tests: what was tried")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """report(line): printed (for -s), and repeated in the terminal summary (for CI logs, -q, capture)."""
    lines = request.config.stash.setdefault(_REPORT_KEY, [])

    def report(line: str) -> None:
        text = f"{request.node.name}: {line}"
        lines.append(text)
        print(text, flush=True)

    return report


@pytest.fixture
def durable_cluster() -> Iterator[LocalCluster]:
    """A private cluster with fsync and synchronous commit on: what SIGKILL may not lose, it keeps."""
    root = Path(tempfile.mkdtemp(prefix="pbxg-fault-pg-", dir="/tmp"))
    root.chmod(0o755)  # the unprivileged server account must reach its folder when we are root
    cluster = LocalCluster(root / "c", port=5432, durable=True)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.kill()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """make(database_url, **options) -> a DaemonProcess (not started); every one is SIGKILLed at the end."""
    made: list[DaemonProcess] = []

    def make(database_url: str, **options: Any) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / f"daemon{len(made) + 1}", database_url, **options)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()
