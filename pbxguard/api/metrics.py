"""Prometheus metrics and the decision log line, both fed by the guard's observer hook.

Each `Metrics` owns its CollectorRegistry: no module-level state, so two daemons (or two tests) in
one process never share counters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pbxguard.logs import mask_number
from pbxguard.policy.model import Decision

CONTENT_TYPE = CONTENT_TYPE_LATEST

# 0.5 ms to 1 s: the decision budget is a few milliseconds, the ledger timeout 1.5 s by default.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

# Names the daemon's readiness checks use -> the `link` label.
LINK_NAMES: dict[str, str] = {"ledger": "postgresql"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "pbxguard_decisions",
            "Decisions by gate, verdict and first (primary) reason; 'none' for allowed calls.",
            ["gate", "verdict", "reason"],
            registry=self.registry,
        )
        self.block_reasons = Counter(
            "pbxguard_block_reasons",
            "Reasons of blocked decisions: a decision blocked for two reasons counts once under each.",
            ["gate", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "pbxguard_decision_seconds",
            "Time to decide one call, from the gate's request to the verdict.",
            ["gate"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ledger_seconds = Histogram(
            "pbxguard_ledger_seconds",
            "Round trip of the ledger's decide() call (one per decision, more on a residence retry).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.link_up = Gauge(
            "pbxguard_link_up",
            "1 when the link (postgresql, and each configured gate or upstream: ami, ari, agi) is up.",
            ["link"],
            registry=self.registry,
        )
        self.journal_unsealed = Gauge(
            "pbxguard_journal_unsealed",
            "Journal rows not yet sealed into the hash chain (0 until the journal chain exists).",
            registry=self.registry,
        )
        self.shadow_passes = Counter(
            "pbxguard_shadow_passes",
            "Calls shadow mode let through although enforce mode would have blocked them.",
            ["gate"],
            registry=self.registry,
        )

        # Labelled children by label values; bounded: gates x verdicts x reason codes.
        self._decision_counters: dict[tuple[str, str, str], Counter] = {}
        self._decision_histograms: dict[str, Histogram] = {}

    # -- guard observers (hot path: a few dictionary look-ups) ---------------------------------

    def observe_decision(self, decision: Decision, seconds: float) -> None:
        gate = decision.gate
        reasons = decision.reasons
        key = (gate, decision.verdict.value, reasons[0].value if reasons else "none")
        # labels() checks and converts its arguments on every call: each child is looked up once.
        counter = self._decision_counters.get(key)
        if counter is None:
            counter = self._decision_counters[key] = self.decisions.labels(*key)
        counter.inc()
        for reason in reasons:
            self.block_reasons.labels(gate, reason.value).inc()
        if decision.shadow:
            self.shadow_passes.labels(gate).inc()
        histogram = self._decision_histograms.get(gate)
        if histogram is None:
            histogram = self._decision_histograms[gate] = self.decision_seconds.labels(gate)
        histogram.observe(seconds)

    def observe_ledger(self, seconds: float) -> None:
        self.ledger_seconds.observe(seconds)

    # -- scrape ---------------------------------------------------------------------------------

    def set_links(self, state: Mapping[str, bool]) -> None:
        for name, up in state.items():
            self.link_up.labels(LINK_NAMES.get(name, name)).set(1 if up else 0)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class DecisionLog:
    """One log record per decision on the `pbxguard.decisions` logger (JSON or text, see logs.py).

    Pre-checks of whole hoppers (gate `http-batch`) are logged at debug level: thousands per request.
    """

    def __init__(self, full_numbers: bool = False, logger: logging.Logger | None = None) -> None:
        self.full_numbers = full_numbers
        self.log = logger or logging.getLogger("pbxguard.decisions")
        self.quiet_gates = frozenset({"http-batch"})

    def __call__(self, decision: Decision, seconds: float) -> None:
        level = logging.DEBUG if decision.gate in self.quiet_gates else logging.INFO
        if not self.log.isEnabledFor(level):
            return
        fields: dict[str, object] = {
            "decision": decision.id,
            "gate": decision.gate,
            "campaign": decision.campaign_id,
            "order_giver": decision.order_giver,
            "verdict": decision.verdict.value,
            "reasons": [reason.value for reason in decision.reasons],
            "latency_ms": round(seconds * 1000, 3),
            "number": mask_number(decision.consumer, self.full_numbers),
            "next_allowed_at": decision.next_allowed_at.isoformat() if decision.next_allowed_at else None,
        }
        if decision.call_key is not None:
            fields["call_key"] = decision.call_key
        if decision.shadow:
            fields["shadow"] = True
        if decision.replayed:
            fields["replayed"] = True
        if decision.counted:
            fields["counted"] = True
        self.log.log(level, "decision", extra={"fields": fields})
