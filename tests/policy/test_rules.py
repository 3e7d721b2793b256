"""The rules end to end in memory: one call, the ledger's facts, a fixed instant -> reasons."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbxguard.policy import (
    caller_id_rules,
    campaign_rules,
    destination_rules,
    frequency,
    hours,
    legal_basis,
    opposition,
    refusal,
    rules,
)
from pbxguard.policy.model import (
    TIME_BASED,
    Campaign,
    ConsumerFacts,
    Purpose,
    Reason,
    Residence,
    Sector,
)
from pbxguard.policy.numbers import classify_caller_id, parse_destination
from pbxguard.policy.settings import AuthorizationScope, PolicySettings

PARIS = ZoneInfo("Europe/Paris")
R = Reason

MOBILE = "+33612345678"
NPV = "0162123456"
CAMPAIGN = Campaign("c1", "ACME", automated=True)
MANUAL = Campaign("m1", "ACME", automated=False)
CONSENTED = ConsumerFacts(consent_at=datetime(2026, 1, 15, tzinfo=UTC), caller_id_authorized=True)


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS)  # type: ignore[misc]


# Tuesday 1 December 2026, 10:30 in Paris: a legal instant under the consent regime.
NOW = paris(2026, 12, 1, 10, 30)
# Tuesday 2 June 2026, 10:30: the Bloctel regime.
BLOCTEL_NOW = paris(2026, 6, 2, 10, 30)
BLOCTEL_CLEARED = ConsumerFacts(
    bloctel_status="cleared", bloctel_on=date(2026, 5, 20), caller_id_authorized=True
)


def evaluate(
    number: str = MOBILE,
    caller: str = NPV,
    campaign: Campaign | None = CAMPAIGN,
    facts: ConsumerFacts = CONSENTED,
    now: datetime = NOW,
    policy: PolicySettings | None = None,
) -> rules.Evaluation:
    return rules.evaluate(
        campaign,
        parse_destination(number),
        classify_caller_id(caller),
        facts,
        now,
        policy or PolicySettings(),
    )


def reasons(**kwargs: object) -> set[Reason]:
    return set(evaluate(**kwargs).reasons)  # type: ignore[arg-type]


def with_facts(base: ConsumerFacts = CONSENTED, **changes: object) -> ConsumerFacts:
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# -- the table ------------------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, object], set[Reason]]] = [
    ("legal call", {}, set()),
    ("unknown campaign", {"campaign": None}, {R.UNKNOWN_CAMPAIGN}),
    # consent regime (L223-1, 2026)
    ("no consent", {"facts": with_facts(consent_at=None)}, {R.NO_CONSENT}),
    (
        "consent given later than now",
        {"facts": with_facts(consent_at=NOW + timedelta(minutes=1))},
        {R.NO_CONSENT},
    ),
    (
        "contract replaces consent",
        {"facts": with_facts(consent_at=None, contract_until=date(2026, 12, 1))},
        set(),
    ),
    (
        "contract ended yesterday",
        {"facts": with_facts(consent_at=None, contract_until=date(2026, 11, 30))},
        {R.NO_CONSENT},
    ),
    ("consent expired by max age", {"policy": PolicySettings(consent_max_age_days=300)}, {R.NO_CONSENT}),
    ("consent within max age", {"policy": PolicySettings(consent_max_age_days=365)}, set()),
    # regime switch: 10 August 2026 is Bloctel, 11 August consent
    (
        "10 Aug: Bloctel cleared, no consent",
        {
            "now": paris(2026, 8, 10, 10, 30),
            "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 8, 1)),
        },
        set(),
    ),
    (
        "11 Aug: Bloctel cleared is not enough",
        {
            "now": paris(2026, 8, 11, 10, 30),
            "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 8, 1)),
        },
        {R.NO_CONSENT},
    ),
    ("11 Aug: consent", {"now": paris(2026, 8, 11, 10, 30)}, set()),
    ("10 Aug: consent alone, never cleaned", {"now": paris(2026, 8, 10, 10, 30)}, {R.BLOCTEL_STALE}),
    # Bloctel regime (L223-1, 2020)
    ("Bloctel cleared", {"now": BLOCTEL_NOW, "facts": BLOCTEL_CLEARED}, set()),
    (
        "Bloctel registered",
        {"now": BLOCTEL_NOW, "facts": with_facts(BLOCTEL_CLEARED, bloctel_status="registered")},
        {R.BLOCTEL_REGISTERED},
    ),
    (
        "Bloctel registered, contract in progress",
        {
            "now": BLOCTEL_NOW,
            "facts": with_facts(
                BLOCTEL_CLEARED, bloctel_status="registered", contract_until=date(2027, 1, 1)
            ),
        },
        set(),
    ),
    (
        "Bloctel never cleaned",
        {"now": BLOCTEL_NOW, "facts": with_facts(BLOCTEL_CLEARED, bloctel_status=None, bloctel_on=None)},
        {R.BLOCTEL_STALE},
    ),
    (
        "Bloctel cleaned 29 days ago",
        {"now": BLOCTEL_NOW, "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 5, 4))},
        set(),
    ),
    (
        "Bloctel cleaned 30 days ago",
        {"now": BLOCTEL_NOW, "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 5, 3))},
        {R.BLOCTEL_STALE},
    ),
    (
        "Bloctel cleaning dated tomorrow",
        {"now": BLOCTEL_NOW, "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 6, 3))},
        {R.BLOCTEL_STALE},
    ),
    (
        "prerecorded needs consent before 2026-08-11",
        {
            "now": BLOCTEL_NOW,
            "facts": BLOCTEL_CLEARED,
            "campaign": dataclasses.replace(CAMPAIGN, prerecorded=True),
        },
        {R.NO_CONSENT},
    ),
    (
        "prerecorded with consent",
        {
            "now": BLOCTEL_NOW,
            "facts": with_facts(BLOCTEL_CLEARED, consent_at=datetime(2026, 5, 1, tzinfo=UTC)),
            "campaign": dataclasses.replace(CAMPAIGN, prerecorded=True),
        },
        set(),
    ),
    # sector bans
    (
        "energy renovation",
        {"campaign": dataclasses.replace(CAMPAIGN, sector=Sector.RENOVATION_ENERGETIQUE)},
        {R.SECTOR_BANNED},
    ),
    (
        "home adaptation",
        {"campaign": dataclasses.replace(CAMPAIGN, sector=Sector.ADAPTATION_LOGEMENT)},
        {R.SECTOR_BANNED},
    ),
    (
        "CPF training",
        {"campaign": dataclasses.replace(CAMPAIGN, sector=Sector.FORMATION_CPF)},
        {R.SECTOR_BANNED},
    ),
    (
        "energy renovation under contract",
        {
            "campaign": dataclasses.replace(CAMPAIGN, sector=Sector.RENOVATION_ENERGETIQUE),
            "facts": with_facts(contract_until=date(2027, 1, 1)),
        },
        set(),
    ),
    (
        "energy renovation, consent does not cure",
        {
            "campaign": dataclasses.replace(CAMPAIGN, sector=Sector.RENOVATION_ENERGETIQUE),
            "facts": with_facts(off_hours_consent_at=datetime(2026, 11, 1, tzinfo=UTC)),
        },
        {R.SECTOR_BANNED},
    ),
    (
        "press is not exempt from consent",
        {
            "campaign": dataclasses.replace(CAMPAIGN, sector=Sector.PRESS),
            "facts": with_facts(consent_at=None),
        },
        {R.NO_CONSENT},
    ),
    (
        "b2b in a banned sector",
        {
            "campaign": dataclasses.replace(
                CAMPAIGN, purpose=Purpose.B2B, sector=Sector.RENOVATION_ENERGETIQUE
            ),
            "facts": with_facts(consent_at=None),
        },
        set(),
    ),
    # purposes outside the consumer rules: only caller-ID rules
    (
        "b2b on Sunday without consent",
        {
            "campaign": dataclasses.replace(CAMPAIGN, purpose=Purpose.B2B),
            "now": paris(2026, 12, 6, 21, 0),
            "facts": ConsumerFacts(caller_id_authorized=True),
        },
        set(),
    ),
    (
        "survey with a mobile caller ID",
        {"campaign": dataclasses.replace(CAMPAIGN, purpose=Purpose.SURVEY), "caller": "0612345678"},
        {R.CALLER_ID_MOBILE, R.CALLER_ID_NOT_NPV},
    ),
    (
        "non-commercial at night",
        {
            "campaign": dataclasses.replace(CAMPAIGN, purpose=Purpose.NON_COMMERCIAL),
            "now": paris(2026, 12, 1, 22, 0),
        },
        set(),
    ),
    (
        "contract service still bound by hours",
        {
            "campaign": dataclasses.replace(CAMPAIGN, purpose=Purpose.CONTRACT_SERVICE),
            "now": paris(2026, 12, 1, 21, 0),
        },
        {R.OUTSIDE_HOURS},
    ),
    (
        "contract service needs a basis",
        {
            "campaign": dataclasses.replace(CAMPAIGN, purpose=Purpose.CONTRACT_SERVICE),
            "facts": with_facts(consent_at=None),
        },
        {R.NO_CONSENT},
    ),
    # caller ID
    ("withheld caller ID", {"caller": "anonymous"}, {R.CALLER_ID_MISSING}),
    ("empty caller ID", {"caller": ""}, {R.CALLER_ID_MISSING}),
    ("089 premium caller ID", {"caller": "0892123456"}, {R.CALLER_ID_FORBIDDEN}),
    ("3BPQ caller ID", {"caller": "3240"}, {R.CALLER_ID_FORBIDDEN}),
    ("118 caller ID", {"caller": "118218"}, {R.CALLER_ID_FORBIDDEN}),
    ("30PQ caller ID", {"caller": "3010"}, set()),
    ("31PQ caller ID", {"caller": "3179"}, set()),
    ("metropolitan mobile caller ID", {"caller": "0612345678"}, {R.CALLER_ID_MOBILE, R.CALLER_ID_NOT_NPV}),
    ("metropolitan 07 caller ID, manual", {"caller": "0712345678", "campaign": MANUAL}, {R.CALLER_ID_MOBILE}),
    ("Réunion mobile caller ID", {"caller": "+262692123456", "campaign": MANUAL}, {R.CALLER_ID_MOBILE}),
    ("Guadeloupe mobile caller ID", {"caller": "0690123456", "campaign": MANUAL}, {R.CALLER_ID_MOBILE}),
    ("geographic caller ID on an automated campaign", {"caller": "0142123456"}, {R.CALLER_ID_NOT_NPV}),
    ("geographic caller ID, manual", {"caller": "0142123456", "campaign": MANUAL}, set()),
    ("09 non-NPV caller ID, automated", {"caller": "0972123456"}, {R.CALLER_ID_NOT_NPV}),
    ("0948 NPV caller ID", {"caller": "0948123456"}, set()),
    ("overseas NPV 09479", {"caller": "0947912345"}, set()),
    ("08 caller ID, automated", {"caller": "0810123456"}, set()),
    ("NPV not authorised", {"facts": with_facts(caller_id_authorized=False)}, {R.CALLER_ID_NOT_AUTHORIZED}),
    (
        "geographic not authorised, scope all",
        {"caller": "0142123456", "campaign": MANUAL, "facts": with_facts(caller_id_authorized=False)},
        {R.CALLER_ID_NOT_AUTHORIZED},
    ),
    (
        "geographic not authorised, scope npv",
        {
            "caller": "0142123456",
            "campaign": MANUAL,
            "facts": with_facts(caller_id_authorized=False),
            "policy": PolicySettings(caller_id_authorization=AuthorizationScope.NPV),
        },
        set(),
    ),
    (
        "NPV not authorised, scope npv",
        {
            "facts": with_facts(caller_id_authorized=False),
            "policy": PolicySettings(caller_id_authorization=AuthorizationScope.NPV),
        },
        {R.CALLER_ID_NOT_AUTHORIZED},
    ),
    # destination
    ("invalid destination", {"number": "12345"}, {R.INVALID_DESTINATION}),
    ("M2M destination", {"number": "+33700123456789"}, {R.INVALID_DESTINATION}),
    ("free-phone destination", {"number": "0800123456"}, {R.INVALID_DESTINATION}),
    ("foreign destination", {"number": "+3225123456"}, {R.INVALID_DESTINATION}),
    (
        "invalid destination and bad caller ID",
        {"number": "abc", "caller": "0612345678"},
        {R.INVALID_DESTINATION, R.CALLER_ID_MOBILE, R.CALLER_ID_NOT_NPV},
    ),
    # opposition
    ("opposed", {"facts": with_facts(opposed=True)}, {R.OPPOSED}),
    (
        "opposed even under contract",
        {"facts": with_facts(opposed=True, contract_until=date(2027, 1, 1))},
        {R.OPPOSED},
    ),
    # refusal quiet period: refused 1 Oct 2026 -> allowed from 1 Dec 2026 00:00 (Oct 1 + 61 days)
    (
        "refused 60 days ago",
        {"now": paris(2026, 11, 30, 10, 30), "facts": with_facts(last_refusal_at=paris(2026, 10, 1, 18, 0))},
        {R.REFUSAL_QUIET_PERIOD},
    ),
    (
        "refused 61 days ago",
        {"now": paris(2026, 12, 1, 10, 0), "facts": with_facts(last_refusal_at=paris(2026, 10, 1, 18, 0))},
        set(),
    ),
    (
        "refused just before midnight 61 days ago",
        {
            "now": paris(2026, 12, 1, 10, 0),
            "facts": with_facts(last_refusal_at=paris(2026, 10, 1, 23, 59, 59)),
        },
        set(),
    ),
    (
        "refused just after midnight 60 days ago",
        {"now": paris(2026, 12, 1, 10, 0), "facts": with_facts(last_refusal_at=paris(2026, 10, 2, 0, 0, 1))},
        {R.REFUSAL_QUIET_PERIOD},
    ),
    (
        "refusal not lifted by off-hours consent",
        {
            "now": paris(2026, 11, 30, 10, 30),
            "facts": with_facts(
                last_refusal_at=paris(2026, 10, 1, 18, 0),
                off_hours_consent_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
        },
        {R.REFUSAL_QUIET_PERIOD},
    ),
    # hours
    ("09:59:59", {"now": paris(2026, 12, 1, 9, 59, 59)}, {R.OUTSIDE_HOURS}),
    ("10:00:00", {"now": paris(2026, 12, 1, 10, 0, 0)}, set()),
    ("12:59:59", {"now": paris(2026, 12, 1, 12, 59, 59)}, set()),
    ("13:00:00", {"now": paris(2026, 12, 1, 13, 0, 0)}, {R.OUTSIDE_HOURS}),
    ("13:59:59", {"now": paris(2026, 12, 1, 13, 59, 59)}, {R.OUTSIDE_HOURS}),
    ("14:00:00", {"now": paris(2026, 12, 1, 14, 0, 0)}, set()),
    ("19:59:59", {"now": paris(2026, 12, 1, 19, 59, 59)}, set()),
    ("20:00:00", {"now": paris(2026, 12, 1, 20, 0, 0)}, {R.OUTSIDE_HOURS}),
    (
        "end guard 5 min at 19:56",
        {"now": paris(2026, 12, 1, 19, 56), "policy": PolicySettings(end_guard_minutes=5)},
        {R.OUTSIDE_HOURS},
    ),
    (
        "end guard 5 min at 19:54",
        {"now": paris(2026, 12, 1, 19, 54), "policy": PolicySettings(end_guard_minutes=5)},
        set(),
    ),
    (
        "summer 10:00 (UTC+2)",
        {"now": paris(2026, 7, 7, 10, 0), "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 7, 1))},
        set(),
    ),
    (
        "summer 09:59 (UTC+2)",
        {"now": paris(2026, 7, 7, 9, 59), "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 7, 1))},
        {R.OUTSIDE_HOURS},
    ),
    (
        "day after spring DST change",
        {
            "now": paris(2026, 3, 30, 10, 0),
            "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 3, 20)),
        },
        set(),
    ),
    ("Saturday", {"now": paris(2026, 12, 5, 11, 0)}, {R.WEEKEND}),
    ("Sunday night", {"now": paris(2026, 12, 6, 21, 0)}, {R.WEEKEND, R.OUTSIDE_HOURS}),
    ("Christmas", {"now": paris(2026, 12, 25, 11, 0)}, {R.PUBLIC_HOLIDAY}),
    ("Whit Monday 2027", {"now": paris(2027, 5, 17, 11, 0)}, {R.PUBLIC_HOLIDAY}),
    ("Ascension 2027", {"now": paris(2027, 5, 6, 11, 0)}, {R.PUBLIC_HOLIDAY}),
    ("Easter Monday 2027", {"now": paris(2027, 3, 29, 11, 0)}, {R.PUBLIC_HOLIDAY}),
    ("11 November 2026 (Wednesday)", {"now": paris(2026, 11, 11, 11, 0)}, {R.PUBLIC_HOLIDAY}),
    (
        "26 December 2028 in Paris",
        {
            "now": paris(2028, 12, 26, 11, 0),
            "facts": with_facts(consent_at=datetime(2028, 12, 1, tzinfo=UTC)),
        },
        set(),
    ),
    (
        "26 December 2028 in Moselle",
        {
            "now": paris(2028, 12, 26, 11, 0),
            "facts": with_facts(
                consent_at=datetime(2028, 12, 1, tzinfo=UTC), residence=Residence(departement="57")
            ),
        },
        {R.PUBLIC_HOLIDAY},
    ),
    (
        "Good Friday 2027 in Bas-Rhin",
        {"now": paris(2027, 3, 26, 11, 0), "facts": with_facts(residence=Residence(departement="67"))},
        {R.PUBLIC_HOLIDAY},
    ),
    (
        "Good Friday 2027 in Moselle, regional off",
        {
            "now": paris(2027, 3, 26, 11, 0),
            "facts": with_facts(residence=Residence(departement="57")),
            "policy": PolicySettings(regional_holidays=False),
        },
        set(),
    ),
    (
        "off-hours consent lifts Saturday",
        {
            "now": paris(2026, 12, 5, 21, 0),
            "facts": with_facts(off_hours_consent_at=datetime(2026, 11, 1, tzinfo=UTC)),
        },
        set(),
    ),
    (
        "off-hours consent lifts Christmas",
        {
            "now": paris(2026, 12, 25, 8, 0),
            "facts": with_facts(off_hours_consent_at=datetime(2026, 11, 1, tzinfo=UTC)),
        },
        set(),
    ),
    (
        "expired off-hours consent",
        {
            "now": paris(2026, 12, 5, 11, 0),
            "facts": with_facts(off_hours_consent_at=datetime(2025, 11, 1, tzinfo=UTC)),
            "policy": PolicySettings(consent_max_age_days=365),
        },
        {R.WEEKEND},
    ),
    # overseas zones: 10:30 in Paris is 13:30 in Réunion (UTC+4) and 05:30 in Guadeloupe (UTC-4)
    ("Réunion consumer at 10:30 Paris", {"number": "+262692123456"}, {R.OUTSIDE_HOURS}),
    ("Réunion consumer at 07:00 Paris", {"number": "+262692123456", "now": paris(2026, 12, 1, 7, 0)}, set()),
    ("Guadeloupe consumer at 10:30 Paris", {"number": "+590690123456"}, {R.OUTSIDE_HOURS}),
    (
        "Guadeloupe consumer at 16:00 Paris",
        {"number": "+590690123456", "now": paris(2026, 12, 1, 16, 0)},
        set(),
    ),
    (
        "Guyane consumer at 15:00 Paris (11:00 Cayenne)",
        {"number": "+594594123456", "now": paris(2026, 12, 1, 15, 0)},
        set(),
    ),
    (
        "Martinique slavery day 22 May 2026 (Friday)",
        {
            "number": "+596696123456",
            "now": paris(2026, 5, 22, 17, 0),
            "facts": with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 5, 20)),
        },
        {R.PUBLIC_HOLIDAY},
    ),
    (
        "Réunion slavery day 20 Dec 2027 (Monday)",
        {
            "number": "+262692123456",
            "now": paris(2027, 12, 20, 8, 0),
            "facts": with_facts(consent_at=datetime(2027, 12, 1, tzinfo=UTC)),
        },
        {R.PUBLIC_HOLIDAY},
    ),
    (
        "metropolitan number, residence in Réunion",
        {"facts": with_facts(residence=Residence(territory="RE"))},
        {R.OUTSIDE_HOURS},
    ),
    ("Mayotte number, 10:30 Mayotte", {"number": "+262639012345", "now": paris(2026, 12, 1, 8, 30)}, set()),
    (
        "Saint-Pierre-et-Miquelon at 15:00 Paris (11:00 Miquelon)",
        {"number": "+508411234", "now": paris(2026, 12, 1, 15, 0)},
        set(),
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rule_table(name: str, kwargs: dict[str, object], expected: set[Reason]) -> None:
    assert reasons(**kwargs) == expected


# -- frequency: the rolling window of 30 consumer-local calendar days --------------------------------


def attempts_at(*instants: datetime) -> ConsumerFacts:
    return with_facts(recent_attempts=tuple(sorted(instants, reverse=True)))


@pytest.mark.parametrize(
    ("oldest", "expected"),
    [
        (paris(2026, 11, 2, 0, 0), {R.FREQUENCY_CAP}),  # D-29 00:00 counts
        (paris(2026, 11, 1, 23, 59, 59), set()),  # D-30 23:59:59 does not
        (paris(2026, 11, 30, 19, 0), {R.FREQUENCY_CAP}),
    ],
)
def test_frequency_window_edges(oldest: datetime, expected: set[Reason]) -> None:
    facts = attempts_at(oldest, paris(2026, 11, 20, 11), paris(2026, 11, 25, 11), paris(2026, 11, 30, 11))
    assert reasons(facts=facts) == expected


def test_three_attempts_allow_a_fourth() -> None:
    facts = attempts_at(paris(2026, 11, 20, 11), paris(2026, 11, 25, 11), paris(2026, 11, 30, 11))
    assert reasons(facts=facts) == set()


def test_cap_is_configurable() -> None:
    facts = attempts_at(paris(2026, 11, 25, 11), paris(2026, 11, 30, 11))
    assert reasons(facts=facts, policy=PolicySettings(frequency_cap=2)) == {R.FREQUENCY_CAP}


def test_cap_next_allowed_is_when_oldest_counted_attempt_leaves() -> None:
    facts = attempts_at(
        paris(2026, 11, 3, 11), paris(2026, 11, 20, 11), paris(2026, 11, 25, 11), paris(2026, 11, 30, 11)
    )
    result = evaluate(facts=facts)
    assert result.reasons == (R.FREQUENCY_CAP,)
    # 3 Nov + 30 days = 3 Dec 2026, a Thursday: the window opens at 10:00 Paris.
    assert result.next_allowed_at == paris(2026, 12, 3, 10, 0)


def test_cap_next_allowed_skips_a_weekend() -> None:
    facts = attempts_at(
        paris(2026, 11, 5, 11), paris(2026, 11, 20, 11), paris(2026, 11, 25, 11), paris(2026, 11, 30, 11)
    )
    # 5 Nov + 30 = 5 Dec 2026, a Saturday: next legal instant Monday 7 Dec 10:00.
    assert evaluate(facts=facts).next_allowed_at == paris(2026, 12, 7, 10, 0)


# -- next legal instant -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "facts", "expected"),
    [
        (paris(2026, 12, 1, 13, 0), CONSENTED, paris(2026, 12, 1, 14, 0)),
        (paris(2026, 12, 1, 20, 0), CONSENTED, paris(2026, 12, 2, 10, 0)),
        (paris(2026, 12, 4, 20, 0), CONSENTED, paris(2026, 12, 7, 10, 0)),  # Friday evening
        (paris(2026, 12, 24, 20, 0), CONSENTED, paris(2026, 12, 28, 10, 0)),  # Christmas, weekend
        (paris(2026, 10, 24, 12, 0), CONSENTED, paris(2026, 10, 26, 10, 0)),  # across the autumn DST change
        (
            paris(2026, 11, 30, 10, 30),
            with_facts(last_refusal_at=paris(2026, 10, 1, 18, 0)),
            paris(2026, 12, 1, 10, 0),
        ),
        (
            paris(2026, 11, 27, 10, 30),  # Friday; refusal clears Sunday 29 Nov -> Monday 30 Nov 10:00
            with_facts(last_refusal_at=paris(2026, 9, 29, 12, 0)),
            paris(2026, 11, 30, 10, 0),
        ),
    ],
)
def test_next_allowed(now: datetime, facts: ConsumerFacts, expected: datetime) -> None:
    result = evaluate(now=now, facts=facts)
    assert result.reasons
    assert result.next_allowed_at == expected


def test_refusal_with_off_hours_consent_clears_at_midnight() -> None:
    facts = with_facts(
        last_refusal_at=paris(2026, 10, 1, 18, 0), off_hours_consent_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert evaluate(now=paris(2026, 11, 30, 10, 30), facts=facts).next_allowed_at == paris(2026, 12, 1, 0, 0)


def test_no_next_allowed_when_a_reason_does_not_clear_with_time() -> None:
    result = evaluate(now=paris(2026, 12, 5, 11, 0), facts=with_facts(opposed=True))
    assert set(result.reasons) == {R.OPPOSED, R.WEEKEND}
    assert result.next_allowed_at is None


def test_no_next_allowed_when_the_regime_changes_first() -> None:
    # Saturday 8 Aug 2026 under Bloctel, cleared: the next window, Monday 10 Aug, is fine...
    cleared = with_facts(BLOCTEL_CLEARED, bloctel_on=date(2026, 8, 1), consent_at=None)
    assert evaluate(now=paris(2026, 8, 8, 11, 0), facts=cleared).next_allowed_at == paris(2026, 8, 10, 10, 0)
    # ...but from Monday 20:00 the next window is 11 Aug, under the consent regime: no consent, no window.
    assert evaluate(now=paris(2026, 8, 10, 20, 0), facts=cleared).next_allowed_at is None


def test_two_zones_must_both_be_legal() -> None:
    # A Réunion number (UTC+4) for a consumer known to live in Mayotte (UTC+3): 10:00 in Mayotte is
    # 11:00 in Réunion; 13:00 in Réunion ends the morning in both.
    facts = with_facts(residence=Residence(territory="YT"))
    result = evaluate(number="+262692123456", now=datetime(2026, 12, 1, 6, 30, tzinfo=UTC), facts=facts)
    assert result.reasons == (R.OUTSIDE_HOURS,)
    assert result.next_allowed_at == datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    assert {p.zone for p in result.places} == {"Indian/Reunion", "Indian/Mayotte"}


def test_all_reasons_in_stable_order() -> None:
    result = evaluate(
        caller="0612345678",
        now=paris(2026, 12, 5, 21, 0),
        facts=with_facts(consent_at=None, opposed=True, caller_id_authorized=False),
    )
    assert result.reasons == (
        R.CALLER_ID_MOBILE,
        R.CALLER_ID_NOT_NPV,
        R.NO_CONSENT,
        R.OPPOSED,
        R.WEEKEND,
        R.OUTSIDE_HOURS,
    )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(now=datetime(2026, 12, 1, 10, 30))


# -- properties ---------------------------------------------------------------------------------

RULE_FUNCTIONS = (
    campaign_rules.check,
    caller_id_rules.check,
    destination_rules.check,
    legal_basis.check,
    opposition.check,
    refusal.check,
    hours.check,
    frequency.check,
)

instants = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)
optional_instants = st.none() | instants
numbers = st.sampled_from(
    [MOBILE, "+33142123456", "+262692123456", "+262639012345", "+590690123456", "+596596301234",
     "+594594123456", "+508411234", "+590590271234", "0800123456", "garbage"]
)  # fmt: skip
callers = st.sampled_from(
    [NPV, "0948123456", "0810123456", "3010", "0142123456", "0612345678", "", "0892123456"]
)
facts_strategy = st.builds(
    ConsumerFacts,
    opposed=st.booleans(),
    last_refusal_at=optional_instants,
    consent_at=optional_instants,
    off_hours_consent_at=optional_instants,
    contract_until=st.none() | st.dates(min_value=date(2025, 1, 1), max_value=date(2028, 12, 31)),
    bloctel_status=st.sampled_from([None, "cleared", "registered"]),
    bloctel_on=st.none() | st.dates(min_value=date(2025, 1, 1), max_value=date(2028, 12, 31)),
    recent_attempts=st.lists(instants, max_size=4).map(lambda xs: tuple(sorted(xs, reverse=True))),
    caller_id_authorized=st.booleans(),
    residence=st.sampled_from([Residence(), Residence(departement="57"), Residence(territory="RE")]),
)
campaigns = (
    st.builds(
        Campaign,
        id=st.just("c"),
        order_giver=st.just("ACME"),
        purpose=st.sampled_from(list(Purpose)),
        sector=st.sampled_from(list(Sector)),
        automated=st.booleans(),
        prerecorded=st.booleans(),
    )
    | st.none()
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(number=numbers, caller=callers, campaign=campaigns, facts=facts_strategy, now=instants)
def test_never_allows_when_a_rule_blocks(
    number: str, caller: str, campaign: Campaign | None, facts: ConsumerFacts, now: datetime
) -> None:
    policy = PolicySettings()
    ctx = rules.context(campaign, parse_destination(number), classify_caller_id(caller), facts, now, policy)
    individually = set().union(*(rule(ctx) for rule in RULE_FUNCTIONS))
    result = evaluate(number=number, caller=caller, campaign=campaign, facts=facts, now=now)
    assert set(result.reasons) == individually
    assert result.allowed == (not individually)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(number=numbers, caller=callers, campaign=campaigns, facts=facts_strategy, now=instants)
def test_next_allowed_is_legal_for_every_time_based_rule(
    number: str, caller: str, campaign: Campaign | None, facts: ConsumerFacts, now: datetime
) -> None:
    result = evaluate(number=number, caller=caller, campaign=campaign, facts=facts, now=now)
    if result.next_allowed_at is None:
        return
    assert set(result.reasons) <= TIME_BASED
    assert result.next_allowed_at > now
    later = evaluate(number=number, caller=caller, campaign=campaign, facts=facts, now=result.next_allowed_at)
    assert not set(later.reasons) & TIME_BASED
    assert later.allowed
