"""Quiet period after a refusal during a conversation.

Code de la consommation, D223-9 al. 3, second sentence (décret 2022-1313):
    « Cependant, lorsque le consommateur refuse ce démarchage lors de la conversation, le
    professionnel s'abstient de le contacter ou de tenter de le contacter avant l'expiration d'une
    période de soixante jours calendaires révolus à compter de ce refus. »

"Révolus" means complete days and the text does not say whether the refusal day counts: the
conservative reading (REGULATION.md Q2) allows calls again from the refusal date + 61 days at 00:00
in the consumer's time zone.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pbxguard.policy import calendar
from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason


def check(ctx: RuleContext) -> set[Reason]:
    refused = ctx.facts.last_refusal_at
    if ctx.consumer_rules_apply and refused is not None and refused >= ctx.limits.refusal_since:
        return {Reason.REFUSAL_QUIET_PERIOD}
    return set()


def clears_at(ctx: RuleContext) -> datetime | None:
    refused = ctx.facts.last_refusal_at
    if refused is None:
        return None
    days = timedelta(days=ctx.settings.refusal_quiet_days + 1)
    return max(
        calendar.local_midnight(calendar.local_date(refused, place.zone) + days, place.zone)
        for place in ctx.places
    )
