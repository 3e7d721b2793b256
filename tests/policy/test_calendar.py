"""Days, holidays and hours (D223-9 al. 1; C. trav. L3133-1, L3134-13, L3422-2; REGULATION §1.B, §4)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pbxguard.policy.calendar import (
    day_reason,
    easter_sunday,
    holidays,
    hours_reasons,
    is_legal_instant,
    local_date,
    local_midnight,
    next_legal_instant,
)
from pbxguard.policy.model import TERRITORY_ZONES, Place, Reason

PARIS = ZoneInfo("Europe/Paris")
FR = Place("FR", "Europe/Paris")
MOSELLE = Place("FR", "Europe/Paris", "57")
BAS_RHIN = Place("FR", "Europe/Paris", "67")
HAUT_RHIN = Place("FR", "Europe/Paris", "68")
PARIS_75 = Place("FR", "Europe/Paris", "75")
RE = Place("RE", "Indian/Reunion")
YT = Place("YT", "Indian/Mayotte")
ALL_TERRITORIES = [Place(t, z) for t, z in TERRITORY_ZONES.items()]

W = Reason.WEEKEND
H = Reason.PUBLIC_HOLIDAY
O = Reason.OUTSIDE_HOURS  # noqa: E741


def paris(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=PARIS)


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


# --- window boundaries --------------------------------------------------------------------------------

BOUNDARIES = [
    (time(0, 0), False),
    (time(9, 59, 59), False),
    (time(9, 59, 59, 999999), False),
    (time(10, 0), True),
    (time(11, 30), True),
    (time(12, 59, 59), True),
    (time(12, 59, 59, 999999), True),
    (time(13, 0), False),
    (time(13, 30), False),
    (time(13, 59, 59), False),
    (time(14, 0), True),
    (time(19, 59, 59), True),
    (time(20, 0), False),
    (time(23, 59, 59), False),
]


@pytest.mark.parametrize("day", [date(2026, 1, 14), date(2026, 7, 15)], ids=["winter", "summer"])
@pytest.mark.parametrize(("clock", "legal"), BOUNDARIES)
def test_window_boundaries_in_paris(day: date, clock: time, legal: bool) -> None:
    instant = datetime.combine(day, clock, tzinfo=PARIS)
    assert is_legal_instant(instant, [FR]) is legal
    assert hours_reasons(instant, [FR]) == (frozenset() if legal else frozenset({O}))
    # the same instant expressed in UTC gives the same answer
    assert is_legal_instant(instant.astimezone(UTC), [FR]) is legal


@pytest.mark.parametrize(
    ("instant", "legal"),
    [
        # 2026-03-29: Paris goes to UTC+2 at 02:00; Monday 30 March is the first weekday in CEST
        (utc(2026, 3, 30, 7, 59, 59), False),
        (utc(2026, 3, 30, 8, 0), True),
        (utc(2026, 3, 27, 8, 59, 59), False),  # Friday before: still UTC+1
        (utc(2026, 3, 27, 9, 0), True),
        # 2026-10-25: back to UTC+1; Monday 26 October
        (utc(2026, 10, 26, 8, 59, 59), False),
        (utc(2026, 10, 26, 9, 0), True),
        (utc(2026, 10, 23, 7, 59, 59), False),  # Friday before: still UTC+2
        (utc(2026, 10, 23, 8, 0), True),
        (utc(2026, 10, 26, 18, 59, 59), True),
        (utc(2026, 10, 26, 19, 0), False),
    ],
)
def test_dst_changes_2026(instant: datetime, legal: bool) -> None:
    assert is_legal_instant(instant, [FR]) is legal


def test_dst_sunday_itself_is_weekend() -> None:
    assert hours_reasons(paris(2026, 3, 29, 10, 0), [FR]) == {W}
    assert hours_reasons(paris(2026, 10, 25, 10, 0), [FR]) == {W}


# 10:00 local on Wednesday 14 January 2026, in UTC, per territory.
ZONE_OPENINGS = [
    ("FR", utc(2026, 1, 14, 9, 0)),
    ("GP", utc(2026, 1, 14, 14, 0)),
    ("BL", utc(2026, 1, 14, 14, 0)),
    ("MF", utc(2026, 1, 14, 14, 0)),
    ("MQ", utc(2026, 1, 14, 14, 0)),
    ("GF", utc(2026, 1, 14, 13, 0)),
    ("RE", utc(2026, 1, 14, 6, 0)),
    ("YT", utc(2026, 1, 14, 7, 0)),
    ("PM", utc(2026, 1, 14, 13, 0)),  # UTC-3 in winter
]


@pytest.mark.parametrize(("territory", "opening"), ZONE_OPENINGS)
def test_each_territory_opens_at_ten_local(territory: str, opening: datetime) -> None:
    place = Place(territory, TERRITORY_ZONES[territory])
    assert not is_legal_instant(opening - timedelta(seconds=1), [place])
    assert is_legal_instant(opening, [place])
    assert next_legal_instant(opening - timedelta(hours=2), [place]) == opening


def test_ten_in_reunion_is_seven_in_paris_in_winter() -> None:
    assert is_legal_instant(paris(2026, 1, 14, 7, 0), [RE])
    assert not is_legal_instant(paris(2026, 1, 14, 6, 59, 59), [RE])
    assert not is_legal_instant(paris(2026, 1, 14, 7, 0), [FR])


def test_miquelon_observes_dst() -> None:
    pm = Place("PM", "America/Miquelon")
    assert is_legal_instant(utc(2026, 7, 15, 12, 0), [pm])  # 10:00 at UTC-2
    assert not is_legal_instant(utc(2026, 7, 15, 11, 59, 59), [pm])


# --- holidays -----------------------------------------------------------------------------------------

NATIONAL_2026 = [
    date(2026, 1, 1),
    date(2026, 4, 6),  # lundi de Pâques
    date(2026, 5, 1),
    date(2026, 5, 8),
    date(2026, 5, 14),  # Ascension
    date(2026, 5, 25),  # lundi de Pentecôte
    date(2026, 7, 14),
    date(2026, 8, 15),
    date(2026, 11, 1),
    date(2026, 11, 11),
    date(2026, 12, 25),
]


@pytest.mark.parametrize("day", NATIONAL_2026)
@pytest.mark.parametrize("place", ALL_TERRITORIES, ids=lambda p: p.territory)
def test_national_holidays_2026_everywhere(day: date, place: Place) -> None:
    assert day in holidays(2026, place.territory, None)
    assert day in holidays(2026, place.territory, None, regional=False)
    expected = W if day.weekday() >= 5 else H
    assert day_reason(day, place, regional=False) is expected
    noon = datetime.combine(day, time(11, 0), tzinfo=ZoneInfo(place.zone))
    reasons = hours_reasons(noon, [place], regional=False)
    assert H in reasons
    assert (W in reasons) is (day.weekday() >= 5)
    assert O not in reasons


def test_national_list_has_eleven_days() -> None:
    assert holidays(2026, "FR", None, regional=False) == frozenset(NATIONAL_2026)
    assert len(holidays(2026, "FR", None)) == 11  # no regional day in metropolitan France w/o departement


EASTER = [
    (2025, date(2025, 4, 20), date(2025, 4, 21), date(2025, 5, 29), date(2025, 6, 9)),
    (2026, date(2026, 4, 5), date(2026, 4, 6), date(2026, 5, 14), date(2026, 5, 25)),
    (2027, date(2027, 3, 28), date(2027, 3, 29), date(2027, 5, 6), date(2027, 5, 17)),
    (2028, date(2028, 4, 16), date(2028, 4, 17), date(2028, 5, 25), date(2028, 6, 5)),
]


@pytest.mark.parametrize(("year", "sunday", "monday", "ascension", "whit_monday"), EASTER)
def test_easter_based_holidays(
    year: int, sunday: date, monday: date, ascension: date, whit_monday: date
) -> None:
    assert easter_sunday(year) == sunday
    days = holidays(year, "FR", None)
    assert {monday, ascension, whit_monday} <= days
    assert sunday not in days or sunday.weekday() == 6
    assert ascension.weekday() == 3
    for day in (monday, ascension, whit_monday):
        assert day_reason(day, FR) is H
        assert not is_legal_instant(datetime.combine(day, time(11), tzinfo=PARIS), [FR])
    assert day_reason(monday + timedelta(days=1), FR) is None


SLAVERY_DAYS = [
    ("YT", date(2026, 4, 27)),
    ("MQ", date(2026, 5, 22)),
    ("GP", date(2026, 5, 27)),
    ("MF", date(2026, 5, 27)),
    ("MF", date(2026, 5, 28)),
    ("GF", date(2026, 6, 10)),
    ("BL", date(2026, 10, 9)),
    ("RE", date(2026, 12, 20)),
    ("RE", date(2024, 12, 20)),
    ("GP", date(2025, 5, 27)),
]


@pytest.mark.parametrize(("territory", "day"), SLAVERY_DAYS)
def test_overseas_slavery_days(territory: str, day: date) -> None:
    place = Place(territory, TERRITORY_ZONES[territory])
    assert day in holidays(day.year, territory, None)
    assert day not in holidays(day.year, territory, None, regional=False)
    assert day not in holidays(day.year, "FR", None)
    sharing = {t for t, d in SLAVERY_DAYS if (d.month, d.day) == (day.month, day.day)}
    others = set(TERRITORY_ZONES) - sharing
    for other in others:
        assert day not in holidays(day.year, other, None), other
    if day.weekday() < 5:
        noon = datetime.combine(day, time(11), tzinfo=ZoneInfo(place.zone))
        assert hours_reasons(noon, [place]) == {H}
        assert hours_reasons(noon, [place], regional=False) == frozenset()


def test_saint_pierre_has_no_slavery_day() -> None:
    assert holidays(2026, "PM", None) == holidays(2026, "PM", None, regional=False)


ALSACE_MOSELLE = [
    (MOSELLE, True, True),
    (BAS_RHIN, True, True),
    (HAUT_RHIN, True, True),
    (MOSELLE, False, False),
    (BAS_RHIN, False, False),
    (PARIS_75, True, False),
    (FR, True, False),
]


@pytest.mark.parametrize(("place", "regional", "blocked"), ALSACE_MOSELLE)
@pytest.mark.parametrize(
    "day",
    [
        date(2026, 4, 3),  # Vendredi saint 2026
        date(2025, 4, 18),  # Vendredi saint 2025
        date(2025, 12, 26),  # a Friday
        date(2024, 12, 26),  # a Thursday
    ],
)
def test_alsace_moselle(place: Place, regional: bool, blocked: bool, day: date) -> None:
    assert (day in holidays(day.year, place.territory, place.departement, regional=regional)) is blocked
    instant = datetime.combine(day, time(11), tzinfo=PARIS)
    assert hours_reasons(instant, [place], regional=regional) == (frozenset({H}) if blocked else frozenset())
    assert day_reason(day, place, regional=regional) is (H if blocked else None)


def test_moselle_26_december_on_saturday_is_both() -> None:
    assert hours_reasons(paris(2026, 12, 26, 11), [MOSELLE]) == {W, H}


WEEKEND = [
    (paris(2026, 1, 17, 11, 0), {W}),  # Saturday, in window
    (paris(2026, 1, 18, 15, 0), {W}),  # Sunday, in window
    (paris(2026, 1, 17, 9, 0), {W, O}),  # Saturday, out of window
    (paris(2026, 1, 18, 21, 0), {W, O}),
    (paris(2026, 8, 15, 11, 0), {W, H}),  # Assomption on a Saturday
    (paris(2026, 11, 1, 11, 0), {W, H}),  # Toussaint on a Sunday
    (paris(2026, 11, 1, 13, 30), {W, H, O}),
    (paris(2026, 5, 1, 11, 0), {H}),  # Friday holiday
    (paris(2026, 5, 1, 8, 0), {H, O}),
    (paris(2026, 1, 16, 11, 0), set()),  # plain Friday
    (paris(2026, 1, 19, 11, 0), set()),  # plain Monday
]


@pytest.mark.parametrize(("instant", "expected"), WEEKEND)
def test_weekend_and_holiday_reasons(instant: datetime, expected: set[Reason]) -> None:
    assert hours_reasons(instant, [FR]) == expected


def test_reasons_are_collected_over_all_places() -> None:
    # 10:30 Paris on a winter Wednesday is 13:30 in Réunion and 12:30 in Mayotte
    instant = paris(2026, 1, 14, 10, 30)
    assert hours_reasons(instant, [FR]) == frozenset()
    assert hours_reasons(instant, [FR, YT]) == frozenset()
    assert hours_reasons(instant, [FR, RE]) == {O}
    # Sunday 20 December 2026 is the Réunion slavery day
    assert hours_reasons(datetime(2026, 12, 20, 11, tzinfo=ZoneInfo("Indian/Reunion")), [RE, FR]) == {W, H, O}


def test_empty_places() -> None:
    assert hours_reasons(paris(2026, 1, 14, 11), []) == frozenset()
    assert next_legal_instant(paris(2026, 1, 14, 11), []) is None


# --- end guard ----------------------------------------------------------------------------------------

GUARD = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("clock", "legal"),
    [
        (time(10, 0), True),
        (time(12, 54, 59), True),
        (time(12, 55), False),
        (time(12, 59, 59), False),
        (time(14, 0), True),
        (time(19, 54, 59), True),
        (time(19, 55), False),
    ],
)
def test_end_guard(clock: time, legal: bool) -> None:
    instant = datetime.combine(date(2026, 1, 14), clock, tzinfo=PARIS)
    assert is_legal_instant(instant, [FR], end_guard=GUARD) is legal
    assert is_legal_instant(instant, [FR])  # without a guard every one of these is legal


def test_end_guard_moves_next_legal_instant() -> None:
    assert next_legal_instant(paris(2026, 1, 14, 12, 55), [FR], end_guard=GUARD) == paris(2026, 1, 14, 14)
    assert next_legal_instant(paris(2026, 1, 14, 19, 55), [FR], end_guard=GUARD) == paris(2026, 1, 15, 10)


def test_end_guard_covering_whole_windows_never_legal() -> None:
    assert next_legal_instant(paris(2026, 1, 14, 9), [FR], end_guard=timedelta(hours=6)) is None


def test_negative_guard_rejected() -> None:
    with pytest.raises(ValueError):
        hours_reasons(paris(2026, 1, 14, 11), [FR], end_guard=timedelta(seconds=-1))
    with pytest.raises(ValueError):
        next_legal_instant(paris(2026, 1, 14, 11), [FR], end_guard=timedelta(seconds=-1))


@pytest.mark.parametrize(
    "call",
    [
        lambda: hours_reasons(datetime(2026, 1, 14, 11), [FR]),
        lambda: is_legal_instant(datetime(2026, 1, 14, 11), [FR]),
        lambda: next_legal_instant(datetime(2026, 1, 14, 11), [FR]),
        lambda: local_date(datetime(2026, 1, 14, 11), "Europe/Paris"),
    ],
)
def test_naive_datetimes_rejected(call: object) -> None:
    assert callable(call)
    with pytest.raises(ValueError):
        call()


# --- next legal instant -------------------------------------------------------------------------------

NEXT = [
    # Friday 20:00 -> Monday 10:00
    (paris(2026, 1, 16, 20, 0), [FR], paris(2026, 1, 19, 10, 0)),
    (paris(2026, 1, 16, 19, 59, 59), [FR], paris(2026, 1, 16, 19, 59, 59)),
    (paris(2026, 1, 17, 12, 0), [FR], paris(2026, 1, 19, 10, 0)),
    # lunch break
    (paris(2026, 1, 14, 13, 0), [FR], paris(2026, 1, 14, 14, 0)),
    (paris(2026, 1, 14, 13, 59, 59), [FR], paris(2026, 1, 14, 14, 0)),
    (paris(2026, 1, 14, 9, 0), [FR], paris(2026, 1, 14, 10, 0)),
    (paris(2026, 1, 14, 0, 0), [FR], paris(2026, 1, 14, 10, 0)),
    (paris(2026, 1, 14, 11, 11, 11, 111), [FR], paris(2026, 1, 14, 11, 11, 11, 111)),
    # 1 May 2026 is a Friday holiday
    (paris(2026, 4, 30, 21, 0), [FR], paris(2026, 5, 4, 10, 0)),
    # Ascension Thursday 14 May 2026 -> Friday 15 May
    (paris(2026, 5, 13, 20, 0), [FR], paris(2026, 5, 15, 10, 0)),
    # Christmas Friday 2026 -> Monday 28 December (Saturday 26 is also a Moselle holiday)
    (paris(2026, 12, 24, 20, 0), [MOSELLE], paris(2026, 12, 28, 10, 0)),
    # Moselle 26 December 2025 (Friday) -> Monday 29 December
    (paris(2025, 12, 24, 20, 0), [MOSELLE], paris(2025, 12, 29, 10, 0)),
    (paris(2025, 12, 24, 20, 0), [FR], paris(2025, 12, 26, 10, 0)),
    (paris(2025, 12, 24, 20, 0), [FR, MOSELLE], paris(2025, 12, 29, 10, 0)),
    # across the DST changes
    (paris(2026, 3, 27, 20, 0), [FR], utc(2026, 3, 30, 8, 0)),
    (paris(2026, 10, 23, 20, 0), [FR], utc(2026, 10, 26, 9, 0)),
    # Réunion (UTC+4) and Mayotte (UTC+3): allowed UTC windows 06-09/10-16 and 07-10/11-17
    (utc(2026, 6, 2, 6, 0), [RE, YT], utc(2026, 6, 2, 7, 0)),
    (utc(2026, 6, 2, 9, 0), [RE, YT], utc(2026, 6, 2, 11, 0)),
    (utc(2026, 6, 2, 16, 0), [RE, YT], utc(2026, 6, 3, 7, 0)),
    (utc(2026, 6, 2, 8, 30), [RE, YT], utc(2026, 6, 2, 8, 30)),
    # Paris and Réunion in winter: Paris 09-12/13-19 UTC, Réunion 06-09/10-16 UTC -> no morning overlap
    (utc(2026, 1, 14, 6, 0), [FR, RE], utc(2026, 1, 14, 10, 0)),
    (utc(2026, 1, 14, 12, 0), [FR, RE], utc(2026, 1, 14, 13, 0)),
    (utc(2026, 1, 14, 16, 0), [FR, RE], utc(2026, 1, 15, 10, 0)),
    # Réunion slavery day on Friday 20 December 2024
    (datetime(2024, 12, 19, 20, tzinfo=ZoneInfo("Indian/Reunion")), [RE], utc(2024, 12, 23, 6, 0)),
    # Saint-Martin: both 27 and 28 May 2026 (Wednesday, Thursday)
    (
        datetime(2026, 5, 26, 20, tzinfo=ZoneInfo("America/Marigot")),
        [Place("MF", "America/Marigot")],
        datetime(2026, 5, 29, 10, tzinfo=ZoneInfo("America/Marigot")),
    ),
]


@pytest.mark.parametrize(("after", "places", "expected"), NEXT)
def test_next_legal_instant(after: datetime, places: list[Place], expected: datetime) -> None:
    found = next_legal_instant(after, places)
    assert found == expected
    assert found is not None
    assert found.tzinfo is UTC
    assert is_legal_instant(found, places)
    assert found - timedelta(seconds=1) < after or not is_legal_instant(found - timedelta(seconds=1), places)


def test_next_legal_instant_without_regional_days() -> None:
    found = next_legal_instant(paris(2025, 12, 24, 20, 0), [MOSELLE], regional=False)
    assert found == paris(2025, 12, 26, 10)


def test_next_legal_instant_horizon() -> None:
    assert next_legal_instant(paris(2026, 1, 16, 20, 0), [FR], horizon_days=2) is None
    assert next_legal_instant(paris(2026, 1, 16, 20, 0), [FR], horizon_days=3) == paris(2026, 1, 19, 10)


def test_local_helpers() -> None:
    assert local_midnight(date(2026, 1, 14), "Europe/Paris") == utc(2026, 1, 13, 23, 0)
    assert local_midnight(date(2026, 7, 14), "Europe/Paris") == utc(2026, 7, 13, 22, 0)
    assert local_midnight(date(2026, 1, 14), "Indian/Reunion") == utc(2026, 1, 13, 20, 0)
    assert local_midnight(date(2026, 1, 14), "America/Cayenne") == utc(2026, 1, 14, 3, 0)
    assert local_midnight(date(2026, 3, 29), "Europe/Paris").tzinfo is UTC
    assert local_date(utc(2026, 1, 13, 23, 30), "Europe/Paris") == date(2026, 1, 14)
    assert local_date(utc(2026, 1, 13, 23, 30), "America/Guadeloupe") == date(2026, 1, 13)
    assert local_date(utc(2026, 1, 13, 20, 30), "Indian/Reunion") == date(2026, 1, 14)


def test_holidays_are_cached_values() -> None:
    assert holidays(2026, "FR", "57") is holidays(2026, "FR", "57")


# --- properties ---------------------------------------------------------------------------------------

PLACE_POOL = [*ALL_TERRITORIES, MOSELLE, BAS_RHIN, PARIS_75]
instants = st.datetimes(
    min_value=datetime(2024, 1, 1),
    max_value=datetime(2029, 12, 31),
    timezones=st.sampled_from([UTC, PARIS, ZoneInfo("Indian/Reunion"), ZoneInfo("America/Miquelon")]),
)
place_sets = st.lists(st.sampled_from(PLACE_POOL), min_size=1, max_size=4)
guards = st.sampled_from([timedelta(0), timedelta(minutes=5), timedelta(minutes=1, seconds=30)])


@settings(max_examples=500, deadline=None)
@given(after=instants, places=place_sets, regional=st.booleans(), guard=guards)
def test_next_legal_instant_is_the_earliest_legal_instant(
    after: datetime, places: list[Place], regional: bool, guard: timedelta
) -> None:
    assume(after.utcoffset() is not None)
    found = next_legal_instant(after, places, regional=regional, end_guard=guard)
    if found is None:
        return
    assert found >= after
    assert is_legal_instant(found, places, regional=regional, end_guard=guard)
    before = found - timedelta(seconds=1)
    assert before < after or not is_legal_instant(before, places, regional=regional, end_guard=guard)
    if found > after:
        assert not is_legal_instant(after, places, regional=regional, end_guard=guard)


@settings(max_examples=300, deadline=None)
@given(after=instants, places=place_sets)
def test_legal_instant_is_its_own_next(after: datetime, places: list[Place]) -> None:
    if is_legal_instant(after, places):
        assert next_legal_instant(after, places) == after


@settings(max_examples=200, deadline=None)
@given(after=instants, place=st.sampled_from(PLACE_POOL))
def test_one_place_always_has_a_next_legal_instant_within_a_week(after: datetime, place: Place) -> None:
    found = next_legal_instant(after, [place])
    assert found is not None
    assert found - after < timedelta(days=7)
