"""Tunable parameters of the rules.  Defaults are the law's figures and the conservative readings of
REGULATION.md §7; the `[policy]` section of the configuration overrides them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache


class AuthorizationScope(enum.StrEnum):
    ALL = "all"  # every caller ID must be authorised for the order giver (L221-17, CPCE L44)
    NPV = "npv"  # only NPV caller IDs need an authorisation (Arcep 2022-1583 as relayed)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    frequency_cap: int = 4
    frequency_window_days: int = 30
    refusal_quiet_days: int = 60
    bloctel_validity_days: int = 30
    consent_regime_from: date = date(2026, 8, 11)
    consent_max_age_days: int | None = None
    end_guard_minutes: int = 0
    regional_holidays: bool = True
    caller_id_authorization: AuthorizationScope = AuthorizationScope.ALL

    @property
    def end_guard(self) -> timedelta:
        return _minutes(self.end_guard_minutes)


@lru_cache(maxsize=64)
def _minutes(count: int) -> timedelta:
    # Asked for by every decision; the same few values all along.
    return timedelta(minutes=count)
