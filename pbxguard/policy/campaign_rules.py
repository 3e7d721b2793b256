"""Campaign metadata and sector bans.

Every call belongs to a campaign that names its order giver (*donneur d'ordre*): the prohibitions of
D223-9 apply to the professional "directement ou par l'intermédiaire d'un tiers agissant pour son
compte", so counters are kept per order giver and an unknown campaign is blocked (fail closed).

Code de la consommation, L223-1 (loi 2020-901, extended by loi 2025-594):
    « Toute prospection commerciale de consommateurs par des professionnels, par voie téléphonique,
    ayant pour objet l'offre de prestations de service, la vente d'équipements ou la réalisation de
    travaux pour des logements en vue de leur adaptation au vieillissement ou au handicap ou de la
    réalisation d'économies d'énergie ou de la production d'énergies renouvelables est interdite, à
    l'exception des sollicitations intervenant dans le cadre de l'exécution d'un contrat en cours »

Code du travail, L6323-8-1 (loi 2022-1587):
    « Est interdite toute prospection commerciale des titulaires d'un compte personnel de formation,
    par voie téléphonique, […] à l'exception des sollicitations intervenant dans le cadre d'une action
    en cours et présentant un lien direct avec l'objet de celle-ci. »
"""

from __future__ import annotations

from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import BANNED_SECTORS, CONSUMER_PURPOSES, Reason


def check(ctx: RuleContext) -> set[Reason]:
    campaign = ctx.campaign
    if campaign is None:
        return {Reason.UNKNOWN_CAMPAIGN}
    if (
        campaign.purpose in CONSUMER_PURPOSES
        and campaign.sector in BANNED_SECTORS
        and not ctx.contract_in_progress
    ):
        return {Reason.SECTOR_BANNED}
    return set()
