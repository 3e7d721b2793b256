"""agi_ratio and agi_p99_ms: FastAGI `check` decisions against a bare FastAGI server.

The clients speak the protocol as Asterisk does: the agi_* environment, then one reply per command
(`200 result=1 (value)` to a read, `200 result=1` to a SET VARIABLE) until the server hangs up.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from bench.common import Figure, consumer, percentile

ENV_TEMPLATE = (
    "agi_network: yes\nagi_network_script: check?campaign=bench\nagi_request: agi://127.0.0.1/check\n"
    "agi_channel: Local/{number}@pbxguard-outbound-00000001;2\nagi_language: en\nagi_type: Local\n"
    "agi_uniqueid: bench.{serial}\nagi_version: 22.10.1\nagi_callerid: 0162123456\n"
    "agi_calleridname: bench\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
    "agi_callingtns: 0\nagi_dnid: unknown\nagi_rdnis: unknown\nagi_context: pbxguard-outbound\n"
    "agi_extension: {number}\nagi_priority: 2\nagi_enhanced: 0.0\nagi_accountcode: \n"
    "agi_threadid: 140000000000000\nagi_arg_1: {number}\n\n"
)


async def one_check(port: int, number: str, serial: int) -> tuple[float, str]:
    """(seconds, verdict); the verdict is "ERROR" when the server refused or dropped the check."""
    started = time.perf_counter()
    try:
        return await _exchange(port, number, serial, started)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return time.perf_counter() - started, "ERROR"


async def _exchange(port: int, number: str, serial: int, started: float) -> tuple[float, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    verdict = ""
    try:
        writer.write(ENV_TEMPLATE.format(number=number, serial=serial).encode())
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"GET FULL VARIABLE"):
                writer.write(b"200 result=1 (0162123456)\n")
            elif line.startswith(b"GET VARIABLE"):
                writer.write(b"200 result=0\n")
            else:
                if b"PBXGUARD_VERDICT" in line:
                    verdict = line.split(b'"')[3].decode()
                writer.write(b"200 result=1\n")
    finally:
        writer.close()
    return time.perf_counter() - started, verdict


async def closed_loop(
    port: int, clients: int, seconds: float, numbers: itertools.count[int]
) -> tuple[float, dict[str, int]]:
    """Checks per second with `clients` clients each starting a new check as soon as one ends."""
    verdicts: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            serial = next(numbers)
            _, verdict = await one_check(port, consumer(serial), serial)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started), verdicts


async def open_loop(
    port: int, per_second: int, seconds: float, numbers: itertools.count[int]
) -> tuple[list[float], int]:
    """Latencies of checks started at a fixed rate, whatever the previous ones are doing, and how
    many failed (refused or dropped: a gate that cannot keep up)."""
    latencies: list[float] = []
    failed = 0
    tasks = []
    interval = 1 / per_second
    started = time.perf_counter()
    for i in range(int(per_second * seconds)):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        serial = next(numbers)
        tasks.append(asyncio.ensure_future(one_check(port, consumer(serial), serial)))
    for elapsed, verdict in await asyncio.gather(*tasks):
        latencies.append(elapsed)
        failed += verdict == "ERROR"
    return latencies, failed


async def run(bare_port: int, gate_port: int, seconds: float, numbers: itertools.count[int]) -> list[Figure]:
    # Warm both (connections, caches, plans) before measuring.
    await closed_loop(bare_port, 10, 0.5, numbers)
    await closed_loop(gate_port, 10, 1.0, numbers)
    bare_rate, _ = await closed_loop(bare_port, 50, seconds, numbers)
    gate_rate, verdicts = await closed_loop(gate_port, 50, seconds, numbers)
    print(
        f"    bare FastAGI {bare_rate:,.0f} checks/s, pbxguard {gate_rate:,.0f} checks/s, verdicts {verdicts}"
    )
    latencies, failed = await open_loop(gate_port, 500, seconds, numbers)
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    ratio = gate_rate / bare_rate
    figures = [
        Figure("agi_ratio", ratio, "", baseline=f"bare FastAGI server {bare_rate:,.0f}/s (50 clients)",
               target=">= 0.5", met=ratio >= 0.5, note=f"(pbxguard {gate_rate:,.0f} decisions/s)"),
    ]  # fmt: skip
    if failed > len(latencies) // 100:
        # A refused check has no latency worth a percentile: the figure is not measurable.
        print(f"  agi_p99_ms: could not be measured: {failed:,} of {len(latencies):,} checks failed at 500/s")
        return figures
    figures.append(
        Figure("agi_p99_ms", p99, "ms", baseline="500 checks/s offered", target="<= 10", met=p99 <= 10,
               note=f"(p50 {p50:.2f} ms over {len(latencies):,} checks, {failed} failed)")
    )  # fmt: skip
    return figures


async def closed_loop_count(port: int, clients: int, total: int, numbers: itertools.count[int]) -> None:
    """Exactly `total` checks through `clients` clients (for the memory figures)."""
    remaining = total

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            serial = next(numbers)
            await one_check(port, consumer(serial), serial)

    await asyncio.gather(*(client() for _ in range(clients)))
