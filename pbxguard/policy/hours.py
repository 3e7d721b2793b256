"""Days and hours, in the consumer's time zone.

Code de la consommation, D223-9 al. 1 (décret 2022-1313, in force 2023-03-01):
    « La sollicitation d'un consommateur par voie téléphonique à des fins de prospection commerciale,
    y compris celle visée à l'article L. 223-5, n'est autorisée d'une part que du lundi au vendredi,
    sauf lorsque ces jours sont fériés en application de l'article L. 3133-1 du code du travail, et
    d'autre part seulement de 10 heures à 13 heures et de 14 heures à 20 heures, ces heures
    correspondant à celles du fuseau horaire du consommateur. »
D223-9 al. 2:
    « Toutefois, le professionnel […] peut solliciter par voie téléphonique un consommateur en dehors
    de ces jours et de ces plages horaires s'il a obtenu le consentement exprès et préalable du
    consommateur et qu'il peut l'établir. »

The off-hours consent lifts the days and hours only, never the frequency or refusal rules
(REGULATION.md Q5).  Regional holidays (L3134-13, L3422-2) are blocked too when configured (Q3).
"""

from __future__ import annotations

from pbxguard.policy import calendar
from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason


def lifted_by_consent(ctx: RuleContext) -> bool:
    return ctx.consent_valid(ctx.facts.off_hours_consent_at)


def check(ctx: RuleContext) -> set[Reason]:
    if not ctx.consumer_rules_apply or lifted_by_consent(ctx):
        return set()
    if ctx.hours is not None:
        return set(ctx.hours)
    return set(
        calendar.hours_reasons(
            ctx.now,
            ctx.places,
            regional=ctx.settings.regional_holidays,
            end_guard=ctx.settings.end_guard,
        )
    )
