"""What every benchmark shares: a throwaway PostgreSQL, a legal campaign, percentiles, a clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg

from pbxguard.ledger.pgcluster import LocalCluster, child_pids, proc_stat_fields
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign

# A Tuesday, 10:30 in Paris: a legal instant, so decisions go all the way to the ledger.
LEGAL_NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
CALLER_ID = "0162123456"


@dataclass
class Figure:
    key: str
    value: float | None
    unit: str = ""
    baseline: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    # Seconds of the cheapest durable write, one at a time (bench/ledger.py): what any decision that
    # is committed before its call goes out adds at the least.
    durable_commit_s: float | None = None
    # Seconds of one whole reservation (the ledger side of a decision), one at a time: what a gate
    # adds to a call at the least, whatever its own code costs.
    reservation_s: float | None = None

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        print(f"  {figure.key} = {fmt(figure.value)} {figure.unit}  {figure.note}", flush=True)


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    # Four digits from 10 up: three would print 10.02 as "10", beside a target of <= 10 not met.
    return f"{value:.4g}" if value >= 10 else f"{value:.3g}"


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def throwaway_cluster(durable: bool = True) -> AsyncIterator[LocalCluster]:
    """A private PostgreSQL configured like the embedded default (fsync and synchronous commit on)."""
    root = Path(tempfile.mkdtemp(prefix="pbxg-bench-", dir="/tmp"))
    os.chmod(root, 0o755)  # the unprivileged server account must reach its folder
    cluster = LocalCluster(root / "c", durable=durable, tcp=False)
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop, "immediate")
        shutil.rmtree(root, ignore_errors=True)


async def legal_campaign(ledger: Ledger) -> None:
    """A campaign whose calls are legal at LEGAL_NOW for any +336 number given consent."""
    await ledger.add_campaign(Campaign("bench", "BENCH", automated=True))
    await ledger.authorize_caller_id("+33162123456", "BENCH", date(2026, 1, 1), None, "bench")


async def grant_consents(ledger: Ledger, numbers: list[str], off_hours: bool = False) -> None:
    """Consents by COPY.  Off-hours consent makes the wall-clock time irrelevant to the daemon's
    decisions, so a gate benchmark run at night still exercises the allowed path."""
    if not numbers:
        return
    async with ledger.pool.acquire() as conn:
        await conn.copy_records_to_table(
            "consents",
            schema_name="pbxguard",
            columns=["consumer", "order_giver", "given_at", "off_hours"],
            records=[(n, "BENCH", datetime(2026, 1, 1, tzinfo=UTC), off_hours) for n in numbers],
        )
        # Now rather than by autovacuum in the middle of a measurement.
        await conn.execute("VACUUM ANALYZE pbxguard.consents")
        await conn.execute("CHECKPOINT")  # see settle()


async def settle(url: str) -> None:
    """Writes back what was written so far, before something is measured.

    The kernel keeps written pages (a bulk load, or the pages PostgreSQL adds to its files as they
    grow, which it writes at once and flushes only at a checkpoint) for 30 s before writing them
    back (vm.dirty_expire_centisecs), and every commit then waits behind that writeback: 600,000
    consents left ~110 MB and stalled the checks measured 30 s later for 200-350 ms.  A measurement
    must not pay for the writes of the set-up or of the section before it.
    """
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def consumer(i: int) -> str:
    return f"+336{i:08d}"


async def rate(worker: Callable[[int], Awaitable[None]], concurrency: int, per_worker: int) -> float:
    """Operations per second of `concurrency` workers each doing `per_worker` operations."""
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return concurrency * per_worker / (time.perf_counter() - started)


def commit_ceiling(direct_rate: float, durable_commit_s: float | None) -> float | None:
    """The best ratio a one-client gate can reach against `direct_rate` if it must wait, for each
    action, for one durable commit: each action then takes at least its direct time plus the commit."""
    if durable_commit_s is None or direct_rate <= 0:
        return None
    direct_s = 1 / direct_rate
    return direct_s / (direct_s + durable_commit_s)


def ceiling_note(direct_rate: float, durable_commit_s: float | None) -> str:
    ceiling = commit_ceiling(direct_rate, durable_commit_s)
    return "" if ceiling is None else f"; about {ceiling:.2f} at most with one durable commit per decision"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def process_cpu_seconds(pid: int, *, with_waited_children: bool = False) -> float:
    """User and system CPU the process has used, all its threads; 0 once it is gone.

    `with_waited_children` adds what its children that have ended used (a postmaster's backends
    that closed): without it, a group's CPU would shrink when one of its processes exits."""
    fields = proc_stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if with_waited_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def family_cpu_seconds(parent: int) -> float:
    """A process and its direct children: a postmaster and its backends, writers and workers."""
    return process_cpu_seconds(parent, with_waited_children=True) + sum(
        process_cpu_seconds(child) for child in child_pids(parent)
    )


class CpuMeter:
    """CPU per operation of named processes over one measurement: on a machine whose cores the
    load's own client, the daemon and PostgreSQL share, a throughput says little without it."""

    def __init__(self, **readers: Callable[[], float]) -> None:
        self._readers = readers
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        return {name: read() for name, read in self._readers.items()}

    def per_operation_us(self, operations: int) -> dict[str, float]:
        end = self._read()
        return {name: (end[name] - self._start[name]) / max(operations, 1) * 1e6 for name in end}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def host_summary() -> str:
    """The host settings the tail latencies depend on (see settle())."""
    vm = Path("/proc/sys/vm")

    def setting(name: str) -> str:
        try:
            return (vm / name).read_text().strip()
        except OSError:
            return "?"

    background, expire = setting("dirty_background_bytes"), setting("dirty_expire_centisecs")
    threshold = (
        f"{int(background) / 2**20:g} MB" if background.isdigit() and background != "0"
        else f"{setting('dirty_background_ratio')} % of memory"
    )  # fmt: skip
    age = f"{int(expire) / 100:g} s" if expire.isdigit() else "?"
    return f"{cpu_count()} cores; the kernel writes back written pages past {threshold} or after {age}"
