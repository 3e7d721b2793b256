"""The per-decision view the rules share: who is called, from where, when, and what the ledger knows.

Thresholds are instants and dates derived once from `now` and the consumer's places, so that every
rule, and the ledger's reserve statement, compare plain values and never convert time zones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pbxguard.policy import calendar
from pbxguard.policy.model import (
    CONSUMER_PURPOSES,
    CallerId,
    Campaign,
    ConsumerFacts,
    Destination,
    Place,
    Reason,
    Regime,
)
from pbxguard.policy.settings import PolicySettings


@dataclass(frozen=True, slots=True)
class Thresholds:
    today: date  # the latest consumer-local date among the places
    regime: Regime
    window_start: datetime  # attempts at or after this count against the frequency cap
    refusal_since: datetime  # a refusal at or after this still imposes the quiet period
    bloctel_since: date  # a Bloctel cleaning on or after this date is still valid
    contract_on: date  # a contract must run at least until this date
    consent_since: datetime | None  # consent given before this has expired (None: never expires)


def thresholds(now: datetime, places: tuple[Place, ...], settings: PolicySettings) -> Thresholds:
    """Most restrictive reading across places: a call must be legal wherever the consumer may be."""
    consent_since = (
        None if settings.consent_max_age_days is None else now - timedelta(days=settings.consent_max_age_days)
    )
    if not places:
        today, window_start, refusal_since = now.date(), now, now
    else:
        days = tuple([calendar.local_date(now, place.zone) for place in places])
        today, window_start, refusal_since = _day_starts(
            days, places, settings.frequency_window_days, settings.refusal_quiet_days
        )
    return Thresholds(
        today=today,
        regime=Regime.CONSENT if today >= settings.consent_regime_from else Regime.BLOCTEL,
        window_start=window_start,
        refusal_since=refusal_since,
        bloctel_since=today - timedelta(days=settings.bloctel_validity_days - 1),
        contract_on=today,
        consent_since=consent_since,
    )


@functools.lru_cache(maxsize=1024)
def _day_starts(
    days: tuple[date, ...], places: tuple[Place, ...], window_days: int, quiet_days: int
) -> tuple[date, datetime, datetime]:
    """Today, the frequency window's start and the quiet period's start, from the places' local
    dates alone: the same for every call of a day, so worked out once.  (Keyed by the two settings
    it reads, not by the settings: hashing those costs more than the rest of the lookup.)"""
    window_start = min(
        calendar.local_midnight(day - timedelta(days=window_days - 1), place.zone)
        for day, place in zip(days, places, strict=True)
    )
    refusal_since = min(
        calendar.local_midnight(day - timedelta(days=quiet_days), place.zone)
        for day, place in zip(days, places, strict=True)
    )
    return max(days), window_start, refusal_since


@dataclass(frozen=True, slots=True)
class RuleContext:
    campaign: Campaign | None
    destination: Destination
    caller_id: CallerId
    facts: ConsumerFacts
    places: tuple[Place, ...]
    now: datetime
    settings: PolicySettings
    limits: Thresholds
    # The day and hour reasons at `now` in `places`, when the caller already worked them out.
    hours: frozenset[Reason] | None = None

    @property
    def contract_in_progress(self) -> bool:
        until = self.facts.contract_until
        return until is not None and until >= self.limits.contract_on

    def consent_valid(self, given_at: datetime | None) -> bool:
        if given_at is None or given_at > self.now:
            return False
        since = self.limits.consent_since
        return since is None or given_at >= since

    @property
    def consumer_rules_apply(self) -> bool:
        return (
            self.campaign is not None
            and self.campaign.purpose in CONSUMER_PURPOSES
            and self.destination.valid
        )
