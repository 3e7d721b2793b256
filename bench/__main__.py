"""`make bench`: every figure of the performance issue, each against a baseline of the same run.

    python -m bench            default run (growth with 1 million attempt rows)
    python -m bench --quick    a smoke run of under a minute: small counts, figures indicative only
    python -m bench --full     growth with 10 million attempt rows

A real Asterisk is used for asterisk_ratio when PBXGUARD_ASTERISK_BIN (or `asterisk` on PATH) is set.
The last line printed is one JSON object with every figure (null when it could not be measured).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
import traceback

from bench import agi, ami, engine, growth
from bench.common import (
    Figure,
    Report,
    ceiling_note,
    consumer,
    fmt,
    free_port,
    grant_consents,
    host_summary,
    legal_campaign,
    rss_mb,
    settle,
    throwaway_cluster,
)
from bench.daemon import DaemonProcess, helper_process, stop_process, wait_port
from pbxguard.ledger.store import Ledger

KEYS = (
    "engine_per_s", "ledger_ratio", "agi_ratio", "agi_p99_ms", "ami_ratio", "ami_added_p50_ms",
    "asterisk_ratio", "growth_ratio", "rss_mb", "rss_growth_mb",
)  # fmt: skip


async def ledger_figures(report: Report, url: str, quick: bool) -> None:
    from bench import ledger as ledger_bench

    figures, report.durable_commit_s, report.reservation_s = await ledger_bench.run(
        url, 200 if quick else 3000
    )
    for figure in figures:
        report.add(figure)


async def gate_figures(
    report: Report, url: str, postgres_pid: int, quick: bool, numbers: itertools.count[int]
) -> None:
    """FastAGI, AMI and memory, all against one daemon process configured like production."""
    agi_port, ami_port, upstream_port, bare_port = free_port(), free_port(), free_port(), free_port()
    daemon = DaemonProcess(
        url,
        f'[gates.agi]\nlisten = "127.0.0.1:{agi_port}"\n'
        f'[gates.ami]\nlisten = "127.0.0.1:{ami_port}"\n'
        '[[gates.ami.users]]\nusername = "dialer"\nsecret = "dialer-secret"\ncampaign = "bench"\n'
        f'[asterisk.ami]\nhost = "127.0.0.1"\nport = {upstream_port}\nusername = "pbxguard"\nsecret = "x"\n',
    )
    bare = helper_process("bench.bare_agi", str(bare_port))
    upstream = helper_process("bench.fake_ami", str(upstream_port))
    try:
        await wait_port(bare_port)
        await wait_port(upstream_port)
        await asyncio.to_thread(daemon.start)
        seconds = 2.0 if quick else 8.0
        gates = agi.Server(bare_port, bare.pid), agi.Server(agi_port, daemon.pid)
        for figure in await agi.run(*gates, postgres_pid, seconds, numbers):
            report.add(figure)

        await settle(url)
        count = 300 if quick else 3000

        def channel(n: int) -> str:
            return f"PJSIP/0{consumer(n)[3:]}@trunk"

        direct_rate, direct_lat, _ = await ami.originate_rate(
            upstream_port, "x", "x", channel, numbers, count
        )
        gate_rate, gate_lat, outcomes = await ami.originate_rate(
            ami_port, "dialer", "dialer-secret", channel, numbers, count
        )
        ratio = gate_rate / direct_rate
        added = ami.p50_ms(gate_lat) - ami.p50_ms(direct_lat)
        print(
            f"    direct {direct_rate:,.0f}/s p50 {ami.p50_ms(direct_lat):.3f} ms; through the gate "
            f"{gate_rate:,.0f}/s p50 {ami.p50_ms(gate_lat):.3f} ms; answers {outcomes}"
        )
        report.add(
            Figure(
                "ami_ratio",
                ratio,
                "",
                baseline=f"direct {direct_rate:,.0f} Originates/s",
                target=">= 0.7",
                met=ratio >= 0.7,
                note=f"(gate {gate_rate:,.0f}/s, one client{ceiling_note(direct_rate, report.durable_commit_s)})",
            )
        )
        report.add(
            Figure(
                "ami_added_p50_ms",
                added,
                "ms",
                baseline=f"direct p50 {ami.p50_ms(direct_lat):.3f} ms",
                target="<= 1",
                met=added <= 1.0,
                note=""
                if report.reservation_s is None
                else f"(a reservation alone, one at a time: {report.reservation_s * 1000:.2f} ms)",
            )
        )

        # Memory: the daemon after 100k decisions, and what 100k more add.
        first, second = (2000, 2000) if quick else (100_000, 100_000)
        await agi.closed_loop_count(agi_port, 50, first, numbers)
        at_first = rss_mb(daemon.pid)
        await agi.closed_loop_count(agi_port, 50, second, numbers)
        growth_mb = rss_mb(daemon.pid) - at_first
        report.add(
            Figure(
                "rss_mb",
                at_first,
                "MB",
                baseline=f"after {first:,} decisions",
                target="<= 150",
                met=at_first <= 150,
            )
        )
        report.add(
            Figure(
                "rss_growth_mb",
                growth_mb,
                "MB",
                baseline=f"from {first:,} to {first + second:,}",
                target="<= 5",
                met=growth_mb <= 5,
            )
        )
    finally:
        daemon.cleanup()
        stop_process(bare)
        stop_process(upstream)


async def asterisk_figures(report: Report, url: str, quick: bool, numbers: itertools.count[int]) -> None:
    from bench import asterisk

    report.add(await asterisk.run(url, 200 if quick else 2000, numbers, report.durable_commit_s))


async def main(args: argparse.Namespace) -> int:
    report = Report()
    numbers = itertools.count(1_000_000)
    started = time.perf_counter()

    def section(name: str) -> None:
        print(f"\n[{name}]", flush=True)

    print(f"host: {host_summary()}")
    section("engine")
    report.add(engine.run(5_000 if args.quick else 100_000))

    async with throwaway_cluster() as cluster:
        url = cluster.dsn()
        postgres_pid = cluster.postmaster_pid()
        if postgres_pid is None:
            raise RuntimeError(f"PostgreSQL in {cluster.datadir} wrote no postmaster.pid")
        ledger = await Ledger.connect(url, min_size=1, max_size=2)
        try:
            await legal_campaign(ledger)
            total = 30_000 if args.quick else 600_000
            await grant_consents(ledger, [consumer(1_000_000 + i) for i in range(total)], off_hours=True)
        finally:
            await ledger.close()
        # This process times every check and Originate: a collection of all it holds (phonenumbers'
        # metadata from the engine figure, ~25 ms to scan here) would stop its event loop in the
        # middle of a measurement and count as pbxguard's latency.  The daemon does the same.
        gc.collect()
        gc.freeze()
        for name, body in (
            ("ledger", lambda: ledger_figures(report, url, args.quick)),
            ("gates", lambda: gate_figures(report, url, postgres_pid, args.quick, numbers)),
            ("asterisk", lambda: asterisk_figures(report, url, args.quick, numbers)),
        ):
            section(name)
            try:
                await settle(url)
                await body()
            except Exception as exc:
                if name != "asterisk":
                    traceback.print_exc()
                print(f"  {name}: could not be measured: {exc}")

    section("growth")
    try:
        report.add(await growth.run(100_000 if args.quick else 10_000_000 if args.full else 1_000_000))
    except Exception as exc:
        traceback.print_exc()
        print(f"  growth_ratio: could not be measured: {exc}")

    by_key = {f.key: f for f in report.figures}
    print(f"\n{'figure':<18} {'value':>12}  {'target':<10} {'met':<4} baseline")
    for key in KEYS:
        figure = by_key.get(key)
        if figure is None:
            print(f"{key:<18} {'null':>12}  (not measured, see above)")
            continue
        met = "yes" if figure.met else "no" if figure.met is not None else "-"
        print(
            f"{key:<18} {fmt(figure.value):>12}  {figure.target:<10} {met:<4} {figure.baseline} {figure.note}"
        )
    print(
        f"(run took {time.perf_counter() - started:.0f} s{'; --quick: indicative only' if args.quick else ''})"
    )
    print(
        json.dumps(
            {
                key: (
                    round(by_key[key].value, 4) if key in by_key and by_key[key].value is not None else None
                )
                for key in KEYS
            }
        )
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    mode.add_argument("--full", action="store_true", help="growth with 10 million attempt rows")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main(parser.parse_args())))
