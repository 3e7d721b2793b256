"""engine_per_s: pure-rule decisions per second on one core, no database.

Each decision parses a distinct consumer number (a dialer rarely calls the same one twice in a row),
classifies the caller ID, derives the places and thresholds and evaluates every rule.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import UTC, datetime

from bench.common import CALLER_ID, LEGAL_NOW, Figure, consumer
from pbxguard.policy import calendar, numbers, rules
from pbxguard.policy.context import thresholds
from pbxguard.policy.model import Campaign, ConsumerFacts
from pbxguard.policy.settings import PolicySettings


def run(count: int) -> Figure:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    numbers.warm_up()
    campaign = Campaign("bench", "BENCH")
    facts = ConsumerFacts(consent_at=datetime(2026, 1, 1, tzinfo=UTC), caller_id_authorized=True)
    policy = PolicySettings()
    # Numbers beyond the parse cache, as a dialer's hopper would be.
    dialled = [consumer(10_000_000 + i * 7) for i in range(count)]
    started = time.perf_counter()
    allowed = 0
    for number in dialled:
        destination = numbers.parse_destination(number)
        caller = numbers.classify_caller_id(CALLER_ID)
        places = numbers.places_for(destination, facts.residence)
        thresholds(LEGAL_NOW, places, policy)
        calendar.hours_reasons(LEGAL_NOW, places)
        allowed += rules.evaluate(campaign, destination, caller, facts, LEGAL_NOW, policy).allowed
    elapsed = time.perf_counter() - started
    assert allowed == count, "the bench's calls should all be legal"
    per_s = count / elapsed
    return Figure(
        "engine_per_s", per_s, "decisions/s", baseline="-", target=">= 20,000", met=per_s >= 20_000,
        note=f"({count:,} distinct numbers, {elapsed * 1e6 / count:.1f} µs each)",
    )  # fmt: skip
