"""Days, public holidays and hours in the consumer's time zone.

Legal texts implemented here (French verbatim, as compiled in REGULATION.md §1.B, §2.1 and §4):

* Code de la consommation, art. D223-9 al. 1 (décret n° 2022-1313 du 13 octobre 2022, in force
  2023-03-01): « La sollicitation d'un consommateur par voie téléphonique à des fins de prospection
  commerciale, y compris celle visée à l'article L. 223-5, n'est autorisée d'une part que du lundi au
  vendredi, sauf lorsque ces jours sont fériés en application de l'article L. 3133-1 du code du travail,
  et d'autre part seulement de 10 heures à 13 heures et de 14 heures à 20 heures, ces heures correspondant
  à celles du fuseau horaire du consommateur. »
  → Reason.WEEKEND, Reason.PUBLIC_HOLIDAY, Reason.OUTSIDE_HOURS; windows [10:00, 13:00) and
  [14:00, 20:00) local, optionally shortened at their end by a guard so a call does not overrun.

* Code du travail, art. L3133-1, the national holidays D223-9 refers to: « 1° 1er janvier; 2° lundi de
  Pâques; 3° 1er mai; 4° 8 mai; 5° Ascension; 6° lundi de Pentecôte; 7° 14 juillet; 8° Assomption;
  9° Toussaint; 10° 11 novembre; 11° jour de Noël ».

* Regional holidays, not cited by D223-9 but « jours fériés » under other articles (REGULATION Q3:
  block them too, configurable with `regional`):
  - Code du travail, art. L3134-13 (Bas-Rhin 67, Haut-Rhin 68, Moselle 57): 26 décembre, and Vendredi
    saint « dans les communes ayant un temple protestant ou une église mixte ».  The commune is not
    known, so Good Friday is blocked in the whole of the three departements.
  - Code du travail, art. L3422-2 (abolition de l'esclavage): 27 avril Mayotte; 22 mai Martinique;
    27 mai Guadeloupe et Saint-Martin; 10 juin Guyane; 9 octobre Saint-Barthélemy; 20 décembre
    La Réunion.  Saint-Martin has commemorated 28 mai since 2018-2019: both 27 and 28 May are blocked
    (REGULATION Q4).  Saint-Pierre-et-Miquelon has no such day.

A place whose territory is ambiguous is handled by the caller passing every candidate place: a call
must be legal in each of them (intersection of windows, union of holidays, REGULATION §3.2).

Everything here is pure: no I/O and no clock; `now` is always an argument and must be aware.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo

from dateutil.easter import easter

from pbxguard.policy.model import Place, Reason

__all__ = [
    "day_reason",
    "easter_sunday",
    "holidays",
    "hours_reasons",
    "is_legal_instant",
    "local_date",
    "local_midnight",
    "next_legal_instant",
]

_ALSACE_MOSELLE: Final[frozenset[str]] = frozenset({"57", "67", "68"})

# C. trav. L3422-2, as (month, day); MF has both dates (REGULATION Q4).
_SLAVERY_DAYS: Final[dict[str, tuple[tuple[int, int], ...]]] = {
    "YT": ((4, 27),),
    "MQ": ((5, 22),),
    "GP": ((5, 27),),
    "MF": ((5, 27), (5, 28)),
    "GF": ((6, 10),),
    "BL": ((10, 9),),
    "RE": ((12, 20),),
    "PM": (),
}

_OPEN_MORNING: Final = timedelta(hours=10)
_CLOSE_MORNING: Final = timedelta(hours=13)
_OPEN_AFTERNOON: Final = timedelta(hours=14)
_CLOSE_AFTERNOON: Final = timedelta(hours=20)
_ONE_DAY: Final = timedelta(days=1)


# --- holidays -----------------------------------------------------------------------------------------


def easter_sunday(year: int) -> date:
    """Western (Gregorian) Easter Sunday."""
    return easter(year)


def holidays(year: int, territory: str, departement: str | None, *, regional: bool = True) -> frozenset[date]:
    """Public holidays of `year` for a place: L3133-1 everywhere, plus L3134-13 and L3422-2 if regional."""
    return _holidays(year, territory, departement, regional)


@lru_cache(maxsize=4096)
def _holidays(year: int, territory: str, departement: str | None, regional: bool) -> frozenset[date]:
    sunday = easter_sunday(year)
    days = {
        date(year, 1, 1),  # 1° 1er janvier
        sunday + timedelta(days=1),  # 2° lundi de Pâques
        date(year, 5, 1),  # 3° 1er mai
        date(year, 5, 8),  # 4° 8 mai
        sunday + timedelta(days=39),  # 5° Ascension
        sunday + timedelta(days=50),  # 6° lundi de Pentecôte
        date(year, 7, 14),  # 7° 14 juillet
        date(year, 8, 15),  # 8° Assomption
        date(year, 11, 1),  # 9° Toussaint
        date(year, 11, 11),  # 10° 11 novembre
        date(year, 12, 25),  # 11° jour de Noël
    }
    if regional:
        if departement is not None and departement.strip() in _ALSACE_MOSELLE:
            days.add(date(year, 12, 26))  # L3134-13
            days.add(sunday - timedelta(days=2))  # Vendredi saint, L3134-13
        for month, day in _SLAVERY_DAYS.get(territory.strip().upper(), ()):
            days.add(date(year, month, day))  # L3422-2
    return frozenset(days)


def day_reason(day: date, place: Place, *, regional: bool = True) -> Reason | None:
    """WEEKEND for Saturday and Sunday, else PUBLIC_HOLIDAY for a holiday of the place, else None."""
    if day.weekday() >= 5:
        return Reason.WEEKEND
    if day in _holidays(day.year, place.territory, place.departement, regional):
        return Reason.PUBLIC_HOLIDAY
    return None


# --- instants -----------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _require_aware(instant: datetime) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant!r}: pbxguard only reasons on aware instants")


def _require_guard(end_guard: timedelta) -> None:
    if end_guard < timedelta(0):
        raise ValueError(f"end_guard must not be negative, got {end_guard!r}")


def local_date(instant: datetime, zone: str) -> date:
    """The calendar date of `instant` in `zone`."""
    _require_aware(instant)
    return instant.astimezone(_zone(zone)).date()


@lru_cache(maxsize=4096)
def local_midnight(day: date, zone: str) -> datetime:
    """00:00 local on `day` in `zone`, as an aware UTC datetime.

    Memoised: every decision asks for the same few days (its frequency and refusal windows)."""
    return datetime.combine(day, time(0), tzinfo=_zone(zone)).astimezone(UTC)


_MICROSECOND: Final = timedelta(microseconds=1)


@lru_cache(maxsize=16)
def _window_bounds(end_guard: timedelta) -> tuple[int, int, int, int]:
    """The two windows in microseconds since local midnight, the guard taken off their ends."""
    return (
        _OPEN_MORNING // _MICROSECOND,
        (_CLOSE_MORNING - end_guard) // _MICROSECOND,
        _OPEN_AFTERNOON // _MICROSECOND,
        (_CLOSE_AFTERNOON - end_guard) // _MICROSECOND,
    )


def _in_windows(local: datetime, end_guard: timedelta) -> bool:
    # Integers, not timedeltas: this runs for every place of every decision.
    clock = ((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000 + local.microsecond
    open_morning, close_morning, open_afternoon, close_afternoon = _window_bounds(end_guard)
    return open_morning <= clock < close_morning or open_afternoon <= clock < close_afternoon


def hours_reasons(
    now: datetime,
    places: Sequence[Place],
    *,
    regional: bool = True,
    end_guard: timedelta = timedelta(0),
) -> frozenset[Reason]:
    """Every day/hour reason that forbids a call at `now` in at least one of `places`.

    WEEKEND and PUBLIC_HOLIDAY both appear when a holiday falls on a weekend; OUTSIDE_HOURS appears
    whenever the local clock is outside [10:00, 13:00 − guard) and [14:00, 20:00 − guard), whatever the
    day.  No places, no reasons (the caller blocks an unplaceable destination on its own account).
    """
    _require_aware(now)
    _require_guard(end_guard)
    reasons: set[Reason] = set()
    for place in places:
        local = now.astimezone(_zone(place.zone))
        day = local.date()
        if day.weekday() >= 5:
            reasons.add(Reason.WEEKEND)
        if day in _holidays(day.year, place.territory, place.departement, regional):
            reasons.add(Reason.PUBLIC_HOLIDAY)
        if not _in_windows(local, end_guard):
            reasons.add(Reason.OUTSIDE_HOURS)
    return frozenset(reasons)


def is_legal_instant(
    instant: datetime,
    places: Sequence[Place],
    *,
    regional: bool = True,
    end_guard: timedelta = timedelta(0),
) -> bool:
    """No day or hour reason forbids a call at `instant` in any of `places`."""
    return not hours_reasons(instant, places, regional=regional, end_guard=end_guard)


# --- next legal instant -------------------------------------------------------------------------------

_Window = tuple[datetime, datetime]  # [start, end) in UTC


@lru_cache(maxsize=65536)
def _day_windows(
    day: date, zone: str, territory: str, departement: str | None, regional: bool, end_guard: timedelta
) -> tuple[_Window, ...]:
    """The allowed [start, end) intervals of one local day, in UTC; empty on a weekend or holiday."""
    if day.weekday() >= 5 or day in _holidays(day.year, territory, departement, regional):
        return ()
    tz = _zone(zone)
    midnight = datetime.combine(day, time(0), tzinfo=tz)  # wall-clock arithmetic below, as _in_windows
    windows: list[_Window] = []
    for opening, closing in ((_OPEN_MORNING, _CLOSE_MORNING), (_OPEN_AFTERNOON, _CLOSE_AFTERNOON)):
        closing -= end_guard
        if closing > opening:
            windows.append(((midnight + opening).astimezone(UTC), (midnight + closing).astimezone(UTC)))
    return tuple(windows)


class _Cursor:
    """Walks one place's allowed intervals forward in time, one local day at a time."""

    __slots__ = (
        "_day",
        "_departement",
        "_guard",
        "_index",
        "_last",
        "_regional",
        "_territory",
        "_windows",
        "_zone",
    )

    def __init__(self, place: Place, first: date, last: date, regional: bool, end_guard: timedelta) -> None:
        self._zone = place.zone
        self._territory = place.territory
        self._departement = place.departement
        self._regional = regional
        self._guard = end_guard
        self._day = first
        self._last = last
        self._windows = self._load(first)
        self._index = 0

    def _load(self, day: date) -> tuple[_Window, ...]:
        return _day_windows(day, self._zone, self._territory, self._departement, self._regional, self._guard)

    def first_ending_after(self, instant: datetime) -> _Window | None:
        """The earliest allowed interval whose end is after `instant`, or None past the horizon."""
        while True:
            while self._index < len(self._windows):
                window = self._windows[self._index]
                if window[1] > instant:
                    return window
                self._index += 1
            if self._day >= self._last:
                return None
            self._day += _ONE_DAY
            self._windows = self._load(self._day)
            self._index = 0


def next_legal_instant(
    after: datetime,
    places: Sequence[Place],
    *,
    regional: bool = True,
    end_guard: timedelta = timedelta(0),
    horizon_days: int = 400,
) -> datetime | None:
    """The earliest instant t >= `after`, in UTC, at which a call is legal in every place at once.

    The allowed set of each place is a union of [start, end) intervals; the answer is the first point of
    their intersection.  None when places is empty or nothing is legal within `horizon_days` local days.
    """
    _require_aware(after)
    _require_guard(end_guard)
    if not places:
        return None
    candidate = after.astimezone(UTC)
    cursors: list[_Cursor] = []
    for place in dict.fromkeys(places):
        first = candidate.astimezone(_zone(place.zone)).date()
        cursors.append(_Cursor(place, first, first + timedelta(days=horizon_days), regional, end_guard))
    while True:
        moved = False
        for cursor in cursors:
            window = cursor.first_ending_after(candidate)
            if window is None:
                return None
            if window[0] > candidate:
                candidate = window[0]
                moved = True
        if not moved:
            return candidate
