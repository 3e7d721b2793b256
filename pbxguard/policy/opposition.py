"""Permanent opposition to canvassing.

RGPD art. 21 (right to object to direct marketing, without limit in time), and Code de la
consommation L221-16 as amended by loi 2025-594 (from 11 August 2026, as relayed): when the consumer
objects to the call continuing, the professional ends it and refrains from contacting him again.
An opposition recorded for one order giver binds that order giver; one recorded without an order
giver binds every order giver served by this daemon.
"""

from __future__ import annotations

from pbxguard.policy.context import RuleContext
from pbxguard.policy.model import Reason


def check(ctx: RuleContext) -> set[Reason]:
    if ctx.consumer_rules_apply and ctx.facts.opposed:
        return {Reason.OPPOSED}
    return set()
