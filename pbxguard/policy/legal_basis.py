"""Legal basis for calling a consumer, by the consumer-local date of the call.

Until 10 August 2026 — Code de la consommation, L223-1 al. 2 (version of 26/07/2020):
    « Il est interdit à un professionnel, directement ou par l'intermédiaire d'un tiers agissant pour
    son compte, de démarcher téléphoniquement un consommateur inscrit sur cette liste, sauf lorsqu'il
    s'agit de sollicitations intervenant dans le cadre de l'exécution d'un contrat en cours et ayant un
    rapport avec l'objet de ce contrat »
and the cleaning duty (same article, R223-6): « Au moins une fois par mois s'il exerce à titre
habituel une activité de démarchage téléphonique » — a cleaned file is valid for 30 days.

From 11 August 2026 — L223-1 al. 1 (loi 2025-594 art. 13):
    « Il est interdit de démarcher par téléphone, directement ou par l'intermédiaire d'un tiers
    agissant pour son compte, un consommateur qui n'a pas exprimé préalablement son consentement à
    faire l'objet de prospections commerciales par ce moyen. »
    « L'interdiction prévue au premier alinéa n'est pas applicable lorsque la sollicitation intervient
    dans le cadre de l'exécution d'un contrat en cours et a un rapport avec l'objet de ce contrat »

At any date, pre-recorded messages — CPCE L34-5: « Est interdite la prospection directe au moyen de
système automatisé […] utilisant les coordonnées d'une personne physique […] qui n'a pas exprimé
préalablement son consentement ».
"""

from __future__ import annotations

from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason, Regime


def check(ctx: RuleContext) -> set[Reason]:
    if not ctx.consumer_rules_apply or ctx.contract_in_progress:
        return set()
    facts = ctx.facts
    reasons: set[Reason] = set()
    has_consent = ctx.consent_valid(facts.consent_at)
    if ctx.limits.regime is Regime.CONSENT:
        if not has_consent:
            reasons.add(Reason.NO_CONSENT)
    else:
        if facts.bloctel_status == "registered":
            reasons.add(Reason.BLOCTEL_REGISTERED)
        elif (
            facts.bloctel_status != "cleared"
            or facts.bloctel_on is None
            or facts.bloctel_on < ctx.limits.bloctel_since
            or facts.bloctel_on > ctx.limits.today
        ):
            reasons.add(Reason.BLOCTEL_STALE)
    assert ctx.campaign is not None  # consumer_rules_apply implies it
    if ctx.campaign.prerecorded and not has_consent:
        reasons.add(Reason.NO_CONSENT)
    return reasons
