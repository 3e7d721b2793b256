"""agi_ratio and agi_p99_ms: FastAGI `check` decisions against a bare FastAGI server.

The clients speak the protocol as Asterisk does with the shipped dialplan: the agi_* environment,
whose third argument holds the channel facts as Asterisk expands them for caller ID 0162123456
without token or campaign variable, then one reply per command until the server hangs up:
`200 result=0` to EXEC MSet (and, should the gate fall back to them, what Asterisk answers to the
GET FULL VARIABLE of the same facts and `200 result=1` to a SET VARIABLE).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import time
from typing import NamedTuple

from bench.common import (
    CALLER_ID,
    CpuMeter,
    Figure,
    consumer,
    family_cpu_seconds,
    percentile,
    process_cpu_seconds,
)

ENV_TEMPLATE = (
    "agi_network: yes\nagi_network_script: check?campaign=bench\nagi_request: agi://127.0.0.1/check\n"
    "agi_channel: Local/{number}@pbxguard-outbound-00000001;2\nagi_language: en\nagi_type: Local\n"
    "agi_uniqueid: bench.{serial}\nagi_version: 22.10.1\nagi_callerid: 0162123456\n"
    "agi_calleridname: bench\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
    "agi_callingtns: 0\nagi_dnid: unknown\nagi_rdnis: unknown\nagi_context: pbxguard-outbound\n"
    "agi_extension: {number}\nagi_priority: 2\nagi_enhanced: 0.0\nagi_accountcode: \n"
    "agi_threadid: 140000000000000\nagi_arg_1: {number}\nagi_arg_2: \n"
    f"agi_arg_3: {len(CALLER_ID)}:0:0:{CALLER_ID}\n\n"
)


class Server(NamedTuple):
    port: int
    pid: int


# What Asterisk answers to pbxguard.gates.fastagi.CHANNEL_FACTS for this caller ID and no token.
FACTS_REPLY = f"200 result=1 ({len(CALLER_ID)}:0:{CALLER_ID})\n".encode()
_MSET_PAIR = re.compile(rb'(?:^EXEC "MSet" "|,)(PBXGUARD_[A-Z]+)=((?:[^,"\\]|\\\\,)*)')
_SET_VARIABLE = re.compile(rb'^SET VARIABLE "?([A-Za-z0-9_]+)"? "(.*)"$')


def answer(line: bytes, variables: dict[str, str]) -> bytes:
    """Asterisk's reply to one command of a `check`; what it sets goes into ``variables``."""
    if line.startswith(b"GET FULL VARIABLE"):
        return FACTS_REPLY
    if line.startswith(b"GET VARIABLE"):
        return b"200 result=0\n"
    if line.startswith(b'EXEC "MSet"'):
        for name, value in _MSET_PAIR.findall(line):
            variables[name.decode()] = value.replace(b"\\\\,", b",").decode()
        return b"200 result=0\n"
    if match := _SET_VARIABLE.match(line.rstrip(b"\r\n")):
        variables[match[1].decode()] = match[2].decode()
    return b"200 result=1\n"


async def one_check(port: int, number: str, serial: int) -> tuple[float, str]:
    """(seconds, verdict); the verdict is "ERROR" when the server refused or dropped the check."""
    started = time.perf_counter()
    try:
        return await _exchange(port, number, serial, started)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return time.perf_counter() - started, "ERROR"


async def _exchange(port: int, number: str, serial: int, started: float) -> tuple[float, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    variables: dict[str, str] = {}
    try:
        writer.write(ENV_TEMPLATE.format(number=number, serial=serial).encode())
        while line := await reader.readline():
            writer.write(answer(line, variables))
    finally:
        writer.close()
    return time.perf_counter() - started, variables.get("PBXGUARD_VERDICT", "")


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


async def run(
    bare: Server, gate: Server, postgres_pid: int, seconds: float, numbers: itertools.count[int]
) -> list[Figure]:
    # Warm both (connections, caches, plans) before measuring.
    await closed_loop(bare.port, 10, 0.5, numbers)
    await closed_loop(gate.port, 10, 1.0, numbers)
    client = functools.partial(process_cpu_seconds, os.getpid())
    meter = CpuMeter(server=functools.partial(process_cpu_seconds, bare.pid), client=client)
    bare_rate, bare_verdicts = await closed_loop(bare.port, 50, seconds, numbers)
    bare_cpu = meter.per_operation_us(sum(bare_verdicts.values()))
    meter = CpuMeter(
        server=functools.partial(process_cpu_seconds, gate.pid),
        client=client,
        postgres=functools.partial(family_cpu_seconds, postgres_pid),
    )
    gate_rate, verdicts = await closed_loop(gate.port, 50, seconds, numbers)
    gate_cpu = meter.per_operation_us(sum(verdicts.values()))
    print(
        f"    bare FastAGI {bare_rate:,.0f} checks/s, pbxguard {gate_rate:,.0f} checks/s, verdicts {verdicts}"
    )
    # Where the two cores went: what a check costs pbxguard against the bare server, and what the
    # same client and PostgreSQL take beside it.
    cpu_note = (
        f"CPU per check: pbxguard {gate_cpu['server']:,.0f} µs, PostgreSQL {gate_cpu['postgres']:,.0f},"
        f" client {gate_cpu['client']:,.0f}; bare server {bare_cpu['server']:,.0f},"
        f" client {bare_cpu['client']:,.0f}"
    )
    print(f"    {cpu_note}")
    latencies, failed = await open_loop(gate.port, 500, seconds, numbers)
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    ratio = gate_rate / bare_rate
    figures = [
        Figure("agi_ratio", ratio, "", baseline=f"bare FastAGI server {bare_rate:,.0f}/s (50 clients)",
               target=">= 0.5", met=ratio >= 0.5, note=f"(pbxguard {gate_rate:,.0f} decisions/s; {cpu_note})"),
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
