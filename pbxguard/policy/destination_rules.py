"""The number called must be a French consumer line.

Numbers that cannot be a consumer's voice line are refused: invalid numbers, extended-length
M2M numbers (« numéros mobiles de longueur étendue », 0700 + 10 digits, Arcep décision 2012-0855),
special-rate and free-phone numbers, short numbers, and numbers outside the French territories this
daemon knows the time zone and holidays of (fail closed: D223-9 hours are "celles du fuseau horaire
du consommateur", which pbxguard cannot tell for them).
"""

from __future__ import annotations

from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason


def check(ctx: RuleContext) -> set[Reason]:
    return set() if ctx.destination.valid else {Reason.INVALID_DESTINATION}
