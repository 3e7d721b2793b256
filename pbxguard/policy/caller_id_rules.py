"""Caller ID presented to the consumer.

Code de la consommation, L221-17:
    « l'utilisation d'un numéro masqué est interdite. Le numéro affiché […] est affecté au
    professionnel pour le compte duquel l'appel est effectué. »

Arrêté du 5 juillet 2016:
    « Les tranches de numéros qui ne peuvent être utilisées comme identifiant d'appel par un
    professionnel qui joint un consommateur sont les numéros spéciaux vocaux à tarification majorée
    commençant par 089, les numéros courts à tarification banalisée ou majorée 3BPQ (hors 30PQ et
    31PQ) et les numéros courts de service de renseignements téléphoniques 118 XYZ. »

Arcep, décision n° 2022-1583 and FAQ "plan de numérotation – professionnels": a mobile number is for
« une unique personne physique […] depuis un terminal mobile sur un réseau mobile »; 06/07 as caller
ID from a call centre « n'est pas autorisée ». Territorialised numbers may not present calls
« émis par des systèmes automatisés d'appels », except numéros polyvalents vérifiés (NPV); 08
(except 089) and 30PQ/31PQ remain usable.  The operator exploiting an NPV checks that « l'utilisation
d'un tel numéro a reçu l'accord explicite préalable de l'affectataire ».

Caller-ID rules apply to every call, whatever its purpose (CE 6 juin 2024 n° 489787 for surveys).
"""

from __future__ import annotations

from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import CallerIdKind, Reason
from pbxguard.policy.settings import AuthorizationScope

_KIND_REASON: dict[CallerIdKind, Reason] = {
    CallerIdKind.MISSING: Reason.CALLER_ID_MISSING,
    CallerIdKind.FORBIDDEN: Reason.CALLER_ID_FORBIDDEN,
    CallerIdKind.MOBILE: Reason.CALLER_ID_MOBILE,
}

# What an automated campaign may present (Arcep 2022-1583).
AUTOMATED_ALLOWED: frozenset[CallerIdKind] = frozenset(
    {CallerIdKind.NPV, CallerIdKind.SPECIAL_08, CallerIdKind.SHORT_30_31}
)

# Kinds that are real numbers a professional may hold, so whose authorisation can be checked.
ASSIGNABLE: frozenset[CallerIdKind] = frozenset(
    {CallerIdKind.NPV, CallerIdKind.SPECIAL_08, CallerIdKind.SHORT_30_31, CallerIdKind.TERRITORIAL}
)


def static_reasons(kind: CallerIdKind) -> set[Reason]:
    """The reasons the caller ID earns on its own, before the campaign is known."""
    reason = _KIND_REASON.get(kind)
    return {reason} if reason else set()


def needs_authorization(kind: CallerIdKind, scope: AuthorizationScope) -> bool:
    if kind is CallerIdKind.NPV:
        return True
    return scope is AuthorizationScope.ALL and kind in ASSIGNABLE


def check(ctx: RuleContext) -> set[Reason]:
    kind = ctx.caller_id.kind
    reasons = static_reasons(kind)
    campaign = ctx.campaign
    if campaign is None:
        return reasons
    if campaign.automated and kind in (CallerIdKind.TERRITORIAL, CallerIdKind.MOBILE):
        reasons.add(Reason.CALLER_ID_NOT_NPV)
    if needs_authorization(kind, ctx.settings.caller_id_authorization) and not ctx.facts.caller_id_authorized:
        reasons.add(Reason.CALLER_ID_NOT_AUTHORIZED)
    return reasons
