"""The ordered rule list and the evaluation of one call (REGULATION.md §6).

`evaluate` is pure: the campaign and the consumer's facts are read by the caller, `now` is passed in.
All failing reasons are reported, in the stable order of `Reason`, with the earliest instant at which
every time-based reason has cleared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pbxguard.policy import (
    calendar,
    caller_id_rules,
    campaign_rules,
    destination_rules,
    frequency,
    hours,
    legal_basis,
    opposition,
    refusal,
)
from pbxguard.policy.context import RuleContext, Thresholds, thresholds
from pbxguard.policy.model import (
    TIME_BASED,
    CallerId,
    Campaign,
    ConsumerFacts,
    Destination,
    Place,
    Reason,
    Residence,
    sort_reasons,
)
from pbxguard.policy.numbers import places_for
from pbxguard.policy.settings import PolicySettings

Rule = Callable[[RuleContext], set[Reason]]

# REGULATION.md §6 order: metadata, sector, caller ID, destination, legal basis, opposition,
# refusal, days and hours, frequency.
RULES: tuple[Rule, ...] = (
    campaign_rules.check,
    caller_id_rules.check,
    destination_rules.check,
    legal_basis.check,
    opposition.check,
    refusal.check,
    hours.check,
    frequency.check,
)

# A next legal instant is looked for at most this many times: each step clears one time-based
# reason, and a new one (an attempt leaving the window lands on a Sunday) may appear.
_MAX_STEPS = 8


@dataclass(frozen=True, slots=True)
class Evaluation:
    reasons: tuple[Reason, ...]
    next_allowed_at: datetime | None
    places: tuple[Place, ...]

    @property
    def allowed(self) -> bool:
        return not self.reasons


# The places of a residence, their thresholds at `now`, and the day and hour reasons at `now`: what
# the guard works out before its ledger round trip (known_at()) and hands back to evaluate().
Known = tuple[tuple[Place, ...], Thresholds, frozenset[Reason]]


def known_at(
    destination: Destination, residence: Residence, now: datetime, settings: PolicySettings
) -> Known:
    places = places_for(destination, residence)
    day_hours = calendar.hours_reasons(
        now, places, regional=settings.regional_holidays, end_guard=settings.end_guard
    )
    return places, thresholds(now, places, settings), day_hours


def context(
    campaign: Campaign | None,
    destination: Destination,
    caller_id: CallerId,
    facts: ConsumerFacts,
    now: datetime,
    settings: PolicySettings,
    known: Known | None = None,
) -> RuleContext:
    """`known`: what the caller already derived for this residence at `now` (see Known)."""
    hours = None
    if known is None:
        places = places_for(destination, facts.residence)
        limits = thresholds(now, places, settings)
    else:
        places, limits, hours = known
    return RuleContext(
        campaign=campaign,
        destination=destination,
        caller_id=caller_id,
        facts=facts,
        places=places,
        now=now,
        settings=settings,
        limits=limits,
        hours=hours,
    )


def reasons_at(ctx: RuleContext) -> set[Reason]:
    found: set[Reason] = set()
    for rule in RULES:
        found |= rule(ctx)
    return found


def evaluate(
    campaign: Campaign | None,
    destination: Destination,
    caller_id: CallerId,
    facts: ConsumerFacts,
    now: datetime,
    settings: PolicySettings,
    known: Known | None = None,
) -> Evaluation:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ctx = context(campaign, destination, caller_id, facts, now, settings, known)
    reasons = reasons_at(ctx)
    return Evaluation(
        reasons=sort_reasons(reasons),
        next_allowed_at=next_allowed(ctx, reasons) if reasons else None,
        places=ctx.places,
    )


_HOURS = frozenset({Reason.WEEKEND, Reason.PUBLIC_HOLIDAY, Reason.OUTSIDE_HOURS})


def _step(ctx: RuleContext, reasons: set[Reason]) -> datetime:
    """The earliest instant that may clear every time-based reason found at ctx.now."""
    candidate = ctx.now
    if Reason.REFUSAL_QUIET_PERIOD in reasons:
        candidate = max(candidate, refusal.clears_at(ctx) or candidate)
    if Reason.FREQUENCY_CAP in reasons:
        candidate = max(candidate, frequency.clears_at(ctx) or candidate)
    if reasons & _HOURS:
        legal = calendar.next_legal_instant(
            candidate,
            ctx.places,
            regional=ctx.settings.regional_holidays,
            end_guard=ctx.settings.end_guard,
        )
        if legal is None:
            raise _NoLegalInstant
        candidate = legal
    return candidate


class _NoLegalInstant(Exception):
    pass


def next_allowed(ctx: RuleContext, reasons: set[Reason]) -> datetime | None:
    """Re-evaluates the same request at each candidate instant until every reason has cleared."""
    for _ in range(_MAX_STEPS):
        if not reasons <= TIME_BASED:
            return None
        try:
            candidate = _step(ctx, reasons)
        except _NoLegalInstant:
            return None
        ctx = RuleContext(
            campaign=ctx.campaign,
            destination=ctx.destination,
            caller_id=ctx.caller_id,
            facts=ctx.facts,
            places=ctx.places,
            now=candidate,
            settings=ctx.settings,
            limits=thresholds(candidate, ctx.places, ctx.settings),
        )
        reasons = reasons_at(ctx)
        if not reasons:
            return candidate
    return None
