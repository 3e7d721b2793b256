"""At most four attempts per consumer per order giver in any thirty calendar days.

Code de la consommation, D223-9 al. 3, first sentence (décret 2022-1313):
    « Il est interdit à un même professionnel, directement ou par l'intermédiaire d'un tiers agissant
    pour son compte, de démarcher ou de tenter de démarcher téléphoniquement un même consommateur plus
    de quatre fois au cours d'une période de trente jours calendaires. »

A rolling window of calendar days in the consumer's time zone: before a call on local date D, the
attempts made on dates D−29 … D are counted, answered or not ("ou de tenter de démarcher").
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pbxguard.policy import calendar
from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason


def counted(ctx: RuleContext) -> int:
    start = ctx.limits.window_start
    return sum(1 for attempt in ctx.facts.recent_attempts if attempt >= start)


def check(ctx: RuleContext) -> set[Reason]:
    if ctx.consumer_rules_apply and counted(ctx) >= ctx.settings.frequency_cap:
        return {Reason.FREQUENCY_CAP}
    return set()


def clears_at(ctx: RuleContext) -> datetime | None:
    """When the oldest attempt that keeps the count at the cap leaves the window, in every place."""
    cap = ctx.settings.frequency_cap
    attempts = sorted(ctx.facts.recent_attempts, reverse=True)
    if len(attempts) < cap:
        return None
    pivot = attempts[cap - 1]
    days = timedelta(days=ctx.settings.frequency_window_days)
    return max(
        calendar.local_midnight(calendar.local_date(pivot, place.zone) + days, place.zone)
        for place in ctx.places
    )
