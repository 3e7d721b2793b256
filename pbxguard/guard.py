"""Guard.decide(): the single decision core every gate calls.

The pure checks (destination, caller-ID ranges, days and hours) run first in memory and become plain
thresholds; then one round trip to the ledger reads the consumer's facts, applies the ledger rules,
records the attempt and journals the decision atomically.  The facts it returns are evaluated again
by the pure rules, which explain the decision (every reason, next legal instant); should the two
ever disagree the call is blocked.  Any failure to reach the ledger blocks with STORE_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from pbxguard.config import Mode
from pbxguard.ledger.store import DecideRequest, Ledger, StoreError
from pbxguard.policy import caller_id_rules, rules
from pbxguard.policy.model import (
    CallAttempt,
    CallerIdKind,
    Campaign,
    ConsumerFacts,
    Decision,
    Destination,
    Purpose,
    Reason,
    Residence,
    Sector,
    Verdict,
    sort_reasons,
)
from pbxguard.policy.numbers import classify_caller_id, parse_destination
from pbxguard.policy.settings import PolicySettings

log = logging.getLogger("pbxguard.guard")

# Called after each decision with the decision and its latency in seconds (metrics, decision log).
DecisionObserver = Callable[[Decision, float], None]
# Called after each ledger round trip with its duration in seconds.
LedgerObserver = Callable[[float], None]

# InternalClientError: asyncpg's protocol state after a connection is cut mid-operation.
_STORE_FAILURES = (
    StoreError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncio.TimeoutError,
)


def consumer_key(destination: Destination) -> str:
    """The ledger key: the E.164 number, or the raw input marked invalid (journaled, never counted)."""
    if destination.valid and destination.e164:
        return destination.e164
    return "?" + destination.raw[:64]


def parse_token(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@dataclass
class Guard:
    ledger: Ledger | None
    settings: PolicySettings = field(default_factory=PolicySettings)
    mode: Mode = Mode.ENFORCE
    timeout: float = 1.5
    _pending_next: list[tuple[str, uuid.UUID, datetime]] = field(default_factory=list)
    observers: list[DecisionObserver] = field(default_factory=list)
    ledger_observers: list[LedgerObserver] = field(default_factory=list)

    @property
    def shadow(self) -> bool:
        return self.mode is Mode.SHADOW

    async def decide(self, attempt: CallAttempt, now: datetime, *, reserve: bool = True) -> Decision:
        if not self.observers:
            return await self._decide(attempt, now, reserve=reserve)
        started = time.perf_counter()
        decision = await self._decide(attempt, now, reserve=reserve)
        elapsed = time.perf_counter() - started
        for observer in self.observers:
            try:
                observer(decision, elapsed)
            except Exception:  # an observer never changes or delays a decision
                log.exception("decision observer failed")
        return decision

    def _notify_ledger(self, seconds: float) -> None:
        for observer in self.ledger_observers:
            try:
                observer(seconds)
            except Exception:
                log.exception("ledger observer failed")

    async def _decide(self, attempt: CallAttempt, now: datetime, *, reserve: bool) -> Decision:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        destination = parse_destination(attempt.number)
        caller = classify_caller_id(attempt.caller_id)
        decision_id = uuid.uuid4()
        residence = Residence()
        try:
            if self.ledger is None:
                raise StoreError("no ledger configured")
            for _ in range(3):
                known = rules.known_at(destination, residence, now, self.settings)
                _, limits, hours = known
                static = caller_id_rules.static_reasons(caller.kind)
                if not destination.valid:
                    static.add(Reason.INVALID_DESTINATION)
                request = DecideRequest(
                    decision_id=decision_id,
                    call_key=attempt.call_key,
                    now=now,
                    consumer=consumer_key(destination),
                    consumer_valid=destination.valid,
                    campaign=attempt.campaign_id,
                    caller_id=caller.e164 or caller.raw[:64],
                    caller_kind=caller.kind.value,
                    auth_required=caller_id_rules.needs_authorization(
                        caller.kind, self.settings.caller_id_authorization
                    ),
                    gate=attempt.gate,
                    reserve=reserve,
                    shadow=self.shadow,
                    residence=f"{residence.territory or ''}|{residence.departement or ''}",
                    static_reasons=sorted(static),
                    hours_reasons=sorted(hours),
                    window_start=limits.window_start,
                    refusal_since=limits.refusal_since,
                    bloctel_since=limits.bloctel_since,
                    today=limits.today,
                    consent_since=limits.consent_since,
                    consent_regime=limits.regime.value == "consent",
                    cap=self.settings.frequency_cap,
                    territories=destination.territories,
                    zones=destination.zones,
                    token=parse_token(attempt.token),
                )
                sent = time.perf_counter()
                # asyncio.timeout, not wait_for: no task of its own for every decision.
                async with asyncio.timeout(self.timeout):
                    row = await self.ledger.decide(request, self.timeout)
                if self.ledger_observers:
                    self._notify_ledger(time.perf_counter() - sent)
                if row["status"] != "retry":
                    break
                residence = Residence(row["residence_territory"], row["residence_departement"])
            else:
                raise StoreError("consumer residence kept changing during the decision")
        except _STORE_FAILURES as exc:
            log.warning("ledger unavailable, blocking: %s", type(exc).__name__ if not str(exc) else exc)
            return self._unavailable(attempt, destination, caller.kind, decision_id, now)

        status = row["status"]
        if status == "replayed":
            return self._replayed(attempt, destination, row, now)
        if status == "token":
            return Decision(
                id=str(row["decision_id"]),
                verdict=Verdict.ALLOW,
                reasons=(),
                next_allowed_at=None,
                consumer=destination.e164 if destination.valid else None,
                territories=destination.territories,
                zones=destination.zones,
                campaign_id=attempt.campaign_id,
                order_giver=row["order_giver"],
                caller_id=attempt.caller_id,
                gate=attempt.gate,
                decided_at=now,
                call_key=attempt.call_key,
            )
        campaign = _campaign(attempt.campaign_id, row)
        facts = _facts(row, residence)
        # What was derived above for the residence the ledger confirmed.
        evaluation = rules.evaluate(campaign, destination, caller, facts, now, self.settings, known=known)
        ledger_reasons = {Reason(code) for code in row["reasons"]}
        reasons = set(evaluation.reasons)
        if ledger_reasons != reasons:
            # Both sides implement the same rules; a difference is a defect.  Fail closed.
            log.error(
                "policy and ledger disagree (policy %s, ledger %s): blocking",
                sorted(reasons),
                sorted(ledger_reasons),
            )
            reasons |= ledger_reasons
            if not reasons:
                reasons.add(Reason.STORE_UNAVAILABLE)
        ordered = sort_reasons(reasons)
        next_allowed = evaluation.next_allowed_at if reasons == set(evaluation.reasons) else None
        decision = Decision(
            id=str(decision_id),
            verdict=Verdict.BLOCK if ordered else Verdict.ALLOW,
            reasons=ordered,
            next_allowed_at=next_allowed,
            consumer=destination.e164 if destination.valid else None,
            territories=tuple(dict.fromkeys(p.territory for p in evaluation.places)) or destination.territories,
            zones=tuple(dict.fromkeys(p.zone for p in evaluation.places)) or destination.zones,
            campaign_id=attempt.campaign_id,
            order_giver=campaign.order_giver if campaign else None,
            caller_id=attempt.caller_id,
            gate=attempt.gate,
            decided_at=now,
            call_key=attempt.call_key,
            shadow=bool(ordered) and self.shadow,
            counted=bool(row["counted"]),
        )
        if reserve and next_allowed is not None:
            self._pending_next.append((consumer_key(destination), decision_id, next_allowed))
        return decision

    def _unavailable(
        self,
        attempt: CallAttempt,
        destination: Destination,
        caller_kind: CallerIdKind,
        decision_id: uuid.UUID,
        now: datetime,
    ) -> Decision:
        reasons = caller_id_rules.static_reasons(caller_kind) | {Reason.STORE_UNAVAILABLE}
        if not destination.valid:
            reasons.add(Reason.INVALID_DESTINATION)
        return Decision(
            id=str(decision_id),
            verdict=Verdict.BLOCK,
            reasons=sort_reasons(reasons),
            next_allowed_at=None,
            consumer=destination.e164 if destination.valid else None,
            territories=destination.territories,
            zones=destination.zones,
            campaign_id=attempt.campaign_id,
            order_giver=None,
            caller_id=attempt.caller_id,
            gate=attempt.gate,
            decided_at=now,
            call_key=attempt.call_key,
            shadow=self.shadow,
        )

    def _replayed(
        self, attempt: CallAttempt, destination: Destination, row: asyncpg.Record, now: datetime
    ) -> Decision:
        reasons = sort_reasons({Reason(code) for code in row["reasons"]})
        return Decision(
            id=str(row["decision_id"]),
            verdict=Verdict.BLOCK if reasons else Verdict.ALLOW,
            reasons=reasons,
            next_allowed_at=row["next_allowed_at"],
            consumer=destination.e164 if destination.valid else None,
            territories=destination.territories,
            zones=destination.zones,
            campaign_id=attempt.campaign_id,
            order_giver=row["order_giver"],
            caller_id=attempt.caller_id,
            gate=attempt.gate,
            decided_at=row["decided_at"],
            call_key=attempt.call_key,
            shadow=bool(row["shadow"]),
            replayed=True,
            counted=bool(row["counted"]),
        )

    async def record_feedback(
        self,
        number: str,
        *,
        kind: str,
        now: datetime,
        campaign_id: str | None = None,
        order_giver: str | None = None,
        source: str | None = None,
    ) -> bool:
        """Records a refusal (60-day quiet period) or an opposition fed back by a gate.

        The order giver comes from the campaign when only the campaign is known.  Returns False when
        the number or the order giver cannot be established: nothing is recorded then.
        """
        if kind not in ("refusal", "opposition"):
            raise ValueError(f"unknown feedback kind {kind!r}")
        destination = parse_destination(number)
        if not destination.valid or destination.e164 is None or self.ledger is None:
            return False
        if order_giver is None and campaign_id:
            campaign = await self.ledger.campaign(campaign_id)
            order_giver = campaign.order_giver if campaign else None
        if kind == "opposition":
            # An opposition without a known order giver binds every order giver: the safe side.
            await self.ledger.add_opposition(destination.e164, order_giver, now, source)
        elif order_giver is None:
            return False
        else:
            await self.ledger.add_refusal(destination.e164, order_giver, now, source)
        return True

    async def flush(self) -> None:
        """Writes the next legal instants computed since the last flush into the journal."""
        if not self._pending_next or self.ledger is None:
            return
        batch, self._pending_next = self._pending_next, []
        try:
            await self.ledger.set_next_allowed(batch)
        except _STORE_FAILURES as exc:
            log.warning("could not complete %d journal rows: %s", len(batch), exc)
            self._pending_next[:0] = batch[-10000:]

    async def run_flusher(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()

    async def decide_many(
        self, numbers: Sequence[str], campaign_id: str, caller_id: str, now: datetime, gate: str = "http"
    ) -> list[Decision]:
        """Pre-checks for a dialer's hopper: no reservation, bounded concurrency."""
        limiter = asyncio.Semaphore(16)

        async def one(number: str) -> Decision:
            async with limiter:
                return await self.decide(
                    CallAttempt(number=number, campaign_id=campaign_id, caller_id=caller_id, gate=gate),
                    now,
                    reserve=False,
                )

        return list(await asyncio.gather(*(one(n) for n in numbers)))


def _campaign(campaign_id: str, row: asyncpg.Record) -> Campaign | None:
    if row["order_giver"] is None:
        return None
    return Campaign(
        id=campaign_id,
        order_giver=row["order_giver"],
        purpose=Purpose(row["purpose"]),
        sector=Sector(row["sector"]),
        automated=bool(row["automated"]),
        prerecorded=bool(row["prerecorded"]),
        order_giver_siren=row["siren"],
        script_id=row["script_id"],
    )


def _facts(row: asyncpg.Record, residence: Residence) -> ConsumerFacts:
    if row["order_giver"] is None:
        return ConsumerFacts(residence=residence)
    return ConsumerFacts(
        opposed=bool(row["opposed"]),
        last_refusal_at=row["last_refusal_at"],
        consent_at=row["consent_at"],
        off_hours_consent_at=row["off_hours_consent_at"],
        contract_until=row["contract_until"],
        bloctel_status=row["bloctel_status"],
        bloctel_on=row["bloctel_on"],
        recent_attempts=tuple(row["recent_attempts"] or ()),
        caller_id_authorized=bool(row["caller_id_authorized"]),
        residence=residence,
    )
