"""engine_per_s: pure-rule decisions per second on one core, no database.

Each decision parses a distinct consumer number (a dialer rarely calls the same one twice in a row),
classifies the caller ID, derives the places and thresholds and evaluates every rule.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from datetime import UTC, datetime

from bench.common import CALLER_ID, LEGAL_NOW, Figure
from pbxguard.policy import numbers, rules
from pbxguard.policy.model import Campaign, ConsumerFacts
from pbxguard.policy.settings import PolicySettings


def run(count: int) -> Figure:
    """One core for this measurement only: every process the bench starts later (PostgreSQL, the
    daemon, Asterisk) inherits the bench's affinity, and must have every core."""
    cores = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {min(cores)})
    try:
        return _measure(count)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cores)


def _measure(count: int) -> Figure:
    numbers.warm_up()
    campaign = Campaign("bench", "BENCH")
    facts = ConsumerFacts(consent_at=datetime(2026, 1, 1, tzinfo=UTC), caller_id_authorized=True)
    policy = PolicySettings()
    # A dialer's list: random metropolitan numbers (01 to 07), none called twice.
    rng = random.Random(20261201)
    dialled = list(
        dict.fromkeys(f"0{rng.choice('1234567')}{rng.randrange(10**8):08d}" for _ in range(count * 2))
    )
    dialled = dialled[:count]
    # A daemon that has run for a while has parsed a number of every block of 10,000 it calls; the
    # memo then answers a new number of a known block in a few microseconds.  Measured cold too.
    cold_started = time.perf_counter()
    cold = dialled[: max(1, count // 20)]
    for number in cold:
        numbers.parse_destination(number)
    cold_us = (time.perf_counter() - cold_started) * 1e6 / len(cold)
    for z in range(1, 8):
        for block in range(10_000):
            numbers.parse_destination(f"0{z}{block:04d}0000")
    started = time.perf_counter()
    allowed = 0
    for number in dialled:
        destination = numbers.parse_destination(number)
        caller = numbers.classify_caller_id(CALLER_ID)
        # As the guard does: derived once before the ledger round trip, reused by the rules after.
        known = rules.known_at(destination, facts.residence, LEGAL_NOW, policy)
        allowed += rules.evaluate(
            campaign, destination, caller, facts, LEGAL_NOW, policy, known=known
        ).allowed
    elapsed = time.perf_counter() - started
    # Some random numbers are unassigned or M2M ranges: they are decided (blocked) all the same.
    assert allowed > count // 2, "most of the bench's calls should be legal"
    per_s = count / elapsed
    return Figure(
        "engine_per_s", per_s, "decisions/s", baseline="-", target=">= 20,000", met=per_s >= 20_000,
        note=f"({count:,} distinct random numbers, {allowed:,} legal, {elapsed * 1e6 / count:.1f} µs each; "
        f"parsing a number of a block not seen yet: {cold_us:.0f} µs)",
    )  # fmt: skip
