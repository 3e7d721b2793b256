"""Numbering plan: destinations, caller-ID kinds and places (REGULATION §1.H, §3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbxguard.policy.model import TERRITORY_ZONES, CallerIdKind, Destination, Place, Residence
from pbxguard.policy.numbers import classify_caller_id, parse_destination, places_for, warm_up

FR = TERRITORY_ZONES["FR"]


def test_warm_up_loads_every_region() -> None:
    warm_up()
    warm_up()  # idempotent


# --- destinations -------------------------------------------------------------------------------------

VALID_DESTINATIONS = [
    # metropolitan fixed, mobile, 09 box, in national, E.164, 00 and bare-CC forms
    ("0123456789", "+33123456789", ("FR",)),
    ("01 23 45 67 89", "+33123456789", ("FR",)),
    ("01.23.45.67.89", "+33123456789", ("FR",)),
    ("01-23-45-67-89", "+33123456789", ("FR",)),
    ("0612345678", "+33612345678", ("FR",)),
    ("06 12 34 56 78", "+33612345678", ("FR",)),
    ("+33612345678", "+33612345678", ("FR",)),
    ("+33 6 12 34 56 78", "+33612345678", ("FR",)),
    ("+33 (0)6 12 34 56 78", "+33612345678", ("FR",)),
    ("0033612345678", "+33612345678", ("FR",)),
    ("33612345678", "+33612345678", ("FR",)),
    ("tel:+33612345678", "+33612345678", ("FR",)),
    ("0734567890", "+33734567890", ("FR",)),
    ("0756123456", "+33756123456", ("FR",)),
    ("0987654321", "+33987654321", ("FR",)),
    ("0556123456", "+33556123456", ("FR",)),
    ("0695123456", "+33695123456", ("FR",)),  # 0695 is metropolitan
    # Guadeloupe / Saint-Barthélemy / Saint-Martin (+590, shared ranges)
    ("0590201234", "+590590201234", ("GP",)),
    ("0590271234", "+590590271234", ("BL", "MF")),
    ("+590590271234", "+590590271234", ("BL", "MF")),
    ("00590590271234", "+590590271234", ("BL", "MF")),
    ("0590001234", "+590590001234", ("MF",)),
    ("0690123456", "+590690123456", ("GP", "BL", "MF")),
    ("+590690123456", "+590690123456", ("GP", "BL", "MF")),
    ("0709012345", "+590709012345", ("GP", "BL", "MF")),
    ("0976012345", "+590976012345", ("GP", "BL", "MF")),
    # Martinique (+596)
    ("0596301234", "+596596301234", ("MQ",)),
    ("0696201234", "+596696201234", ("MQ",)),
    ("0697123456", "+596697123456", ("MQ",)),
    ("+596696201234", "+596696201234", ("MQ",)),
    ("0709101234", "+596709101234", ("MQ",)),
    # Guyane (+594)
    ("0594101234", "+594594101234", ("GF",)),
    ("0694201234", "+594694201234", ("GF",)),
    ("+594694201234", "+594694201234", ("GF",)),
    ("0709301234", "+594709301234", ("GF",)),
    # La Réunion (+262)
    ("0262161234", "+262262161234", ("RE",)),
    ("0692123456", "+262692123456", ("RE",)),
    ("06 92 12 34 56", "+262692123456", ("RE",)),
    ("+262692123456", "+262692123456", ("RE",)),
    ("0709201234", "+262709201234", ("RE",)),
    # Mayotte (+262): fixed 0269, mobile 0639
    ("0269601234", "+262269601234", ("YT",)),
    ("+262269601234", "+262269601234", ("YT",)),
    ("0639012345", "+262639012345", ("YT",)),
    ("+262639012345", "+262639012345", ("YT",)),
    ("0709351234", "+262709351234", ("YT",)),
    # Saint-Pierre-et-Miquelon (+508)
    ("0508411234", "+508411234", ("PM",)),
    ("0508 55 12 34", "+508551234", ("PM",)),
    ("+508411234", "+508411234", ("PM",)),
    ("+508708412345", "+508708412345", ("PM",)),
]


@pytest.mark.parametrize(("raw", "e164", "territories"), VALID_DESTINATIONS)
def test_valid_destination(raw: str, e164: str, territories: tuple[str, ...]) -> None:
    destination = parse_destination(raw)
    assert destination.valid
    assert destination.raw == raw
    assert destination.e164 == e164
    assert destination.territories == territories
    assert destination.zones == tuple(dict.fromkeys(TERRITORY_ZONES[t] for t in territories))


def test_shared_ranges_keep_every_zone_in_fixed_order() -> None:
    assert parse_destination("+590590271234").zones == ("America/St_Barthelemy", "America/Marigot")
    assert parse_destination("+590690123456").zones == (
        "America/Guadeloupe",
        "America/St_Barthelemy",
        "America/Marigot",
    )


@pytest.mark.parametrize(
    ("raw", "territories"),
    [
        # libphonenumber accepts these as +33 fixed lines, but the national plan puts them overseas:
        # both places apply (intersection of windows).
        ("+33269601234", ("FR", "YT")),
        ("+33596301234", ("FR", "MQ")),
    ],
)
def test_plus33_form_of_an_overseas_number_adds_the_overseas_place(
    raw: str, territories: tuple[str, ...]
) -> None:
    destination = parse_destination(raw)
    assert destination.valid
    assert destination.territories == territories


INVALID_DESTINATIONS = [
    "",
    "   ",
    "abc",
    "06 12 AB 56 78",
    "0800-FLOWERS",
    "061234567",  # too short
    "06123456789",  # too long
    "12",
    "15",
    "112",
    "3010",
    "3179",
    "3900",
    "118218",
    "118712",
    "0800123456",  # toll free
    "0805123456",
    "0806123456",  # UAN
    "0810123456",  # shared cost
    "0891123456",  # premium
    "0899123456",
    "+33891123456",
    "070012345678",  # 0700 M2M, 14 digits
    "0700 1234 5678",
    "+3370012345678",
    "0033700123456789",
    "+32471123456",  # Belgium
    "0032471123456",
    "+447911123456",  # United Kingdom
    "+14155550123",
    "+",
    "+1",
    "00",
    "0",
    "+33590271234",  # 0590 under +33 is not a number
    "0590 27 12 3",
    "٠٦١٢٣٤٥٦٧٨",  # non-ASCII digits
    "06\x0012345678",
]


@pytest.mark.parametrize("raw", INVALID_DESTINATIONS)
def test_invalid_destination(raw: str) -> None:
    destination = parse_destination(raw)
    assert not destination.valid
    assert destination.raw == raw
    assert destination.territories == ()
    assert destination.zones == ()


def test_invalid_keeps_e164_when_parseable() -> None:
    assert parse_destination("0891123456").e164 == "+33891123456"
    assert parse_destination("+32471123456").e164 == "+32471123456"
    assert parse_destination("abc").e164 is None


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_destination_never_raises(raw: str) -> None:
    destination = parse_destination(raw)
    assert isinstance(destination, Destination)
    assert destination.valid == bool(destination.territories)


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A(?:\+|00|0)?[0-9 .\-]{0,20}\Z"))
def test_parse_destination_never_raises_on_digit_soup(raw: str) -> None:
    destination = parse_destination(raw)
    if destination.valid:
        assert destination.e164 is not None
        assert destination.e164.startswith("+")
        assert destination.zones


# --- caller IDs ---------------------------------------------------------------------------------------

M = CallerIdKind.MISSING
F = CallerIdKind.FORBIDDEN
MOB = CallerIdKind.MOBILE
NPV = CallerIdKind.NPV
S08 = CallerIdKind.SPECIAL_08
S30 = CallerIdKind.SHORT_30_31
T = CallerIdKind.TERRITORIAL

CALLER_IDS = [
    # withheld forms
    ("", M, None),
    ("   ", M, None),
    ("anonymous", M, None),
    ("Anonymous", M, None),
    ("ANONYMOUS", M, None),
    ("unknown", M, None),
    ("<unknown>", M, None),
    ("restricted", M, None),
    ("private", M, None),
    ("withheld", M, None),
    ("asterisk", M, None),
    ('"anonymous"', M, None),
    ("garbage", M, None),
    ("+33 1 62 AB", M, None),
    ("+", M, None),
    # metropolitan NPV and their edges
    ("0162123456", NPV, "+33162123456"),
    ("0163999999", NPV, "+33163999999"),
    ("0161123456", T, "+33161123456"),
    ("0164123456", T, "+33164123456"),
    ("0270123456", NPV, "+33270123456"),
    ("0271123456", NPV, "+33271123456"),
    ("0272123456", T, "+33272123456"),
    ("0377123456", NPV, "+33377123456"),
    ("0378123456", NPV, "+33378123456"),
    ("0424123456", NPV, "+33424123456"),
    ("0425123456", NPV, "+33425123456"),
    ("0568123456", NPV, "+33568123456"),
    ("0569123456", NPV, "+33569123456"),
    ("0570123456", T, "+33570123456"),
    ("0948123456", NPV, "+33948123456"),
    ("0949123456", NPV, "+33949123456"),
    ("0950123456", T, "+33950123456"),
    ("+33 1 62 12 34 56", NPV, "+33162123456"),
    ("tel:+33162123456", NPV, "+33162123456"),
    ("TEL:0162123456", NPV, "+33162123456"),
    ("0033162123456", NPV, "+33162123456"),
    ("33162123456", NPV, "+33162123456"),
    ("01.62.12.34.56", NPV, "+33162123456"),
    # overseas NPV 09475-09479, in national, +33 and overseas-CC forms
    ("0947412345", T, "+33947412345"),
    ("0947012345", T, "+33947012345"),
    ("0947512345", NPV, "+33947512345"),
    ("0947612345", NPV, "+33947612345"),
    ("0947712345", NPV, "+33947712345"),
    ("0947812345", NPV, "+33947812345"),
    ("0947912345", NPV, "+33947912345"),
    ("0947999999", NPV, "+33947999999"),
    ("+33947512345", NPV, "+33947512345"),
    ("+33947412345", T, "+33947412345"),
    ("+590947512345", NPV, "+33947512345"),
    ("+594947612345", NPV, "+33947612345"),
    ("+596947712345", NPV, "+33947712345"),
    ("+262947812345", NPV, "+33947812345"),
    ("+262947912345", NPV, "+33947912345"),
    ("+590947412345", T, "+590947412345"),
    # French mobiles, metropolitan and overseas
    ("0612345678", MOB, "+33612345678"),
    ("+33612345678", MOB, "+33612345678"),
    ("0712345678", MOB, "+33712345678"),
    ("+33756123456", MOB, "+33756123456"),
    ("0700123456", MOB, "+33700123456"),
    ("070012345678", MOB, "+3370012345678"),
    ("+33639123456", MOB, "+33639123456"),
    ("+33690123456", MOB, "+33690123456"),
    ("0690123456", MOB, "+590690123456"),
    ("+590690123456", MOB, "+590690123456"),
    ("+262692123456", MOB, "+262692123456"),
    ("+262639123456", MOB, "+262639123456"),
    ("0639012345", MOB, "+262639012345"),
    ("+596696201234", MOB, "+596696201234"),
    ("+594694201234", MOB, "+594694201234"),
    ("0709012345", MOB, "+590709012345"),
    ("0709201234", MOB, "+262709201234"),
    ("+590709012345", MOB, "+590709012345"),
    ("+262709351234", MOB, "+262709351234"),
    ("+508551234", MOB, "+508551234"),
    ("+508708412345", MOB, "+508708412345"),
    # 089 forbidden; other 08 special
    ("0891123456", F, "+33891123456"),
    ("0890123456", F, "+33890123456"),
    ("0899999999", F, "+33899999999"),
    ("+33891123456", F, "+33891123456"),
    ("0800123456", S08, "+33800123456"),
    ("0805123456", S08, "+33805123456"),
    ("0810123456", S08, "+33810123456"),
    ("0820123456", S08, "+33820123456"),
    ("0884123456", S08, "+33884123456"),
    # short codes
    ("3010", S30, "3010"),
    ("3000", S30, "3000"),
    ("3179", S30, "3179"),
    ("31 79", S30, "3179"),
    ("3200", F, "3200"),
    ("3999", F, "3999"),
    ("3900", F, "3900"),
    ("118712", F, "118712"),
    ("118218", F, "118218"),
    ("112", F, "112"),
    ("15", F, "15"),
    ("30100", F, "30100"),
    ("301", F, "301"),
    # territorial: geographic, 09 non-NPV, overseas fixed, foreign
    ("0123456789", T, "+33123456789"),
    ("0556123456", T, "+33556123456"),
    ("0987654321", T, "+33987654321"),
    ("0590271234", T, "+590590271234"),
    ("0262161234", T, "+262262161234"),
    ("0269601234", T, "+262269601234"),
    ("0596301234", T, "+596596301234"),
    ("+508411234", T, "+508411234"),
    ("+32471123456", T, "+32471123456"),
    ("+442079460000", T, "+442079460000"),
]


@pytest.mark.parametrize(("raw", "kind", "e164"), CALLER_IDS)
def test_classify_caller_id(raw: str, kind: CallerIdKind, e164: str | None) -> None:
    caller_id = classify_caller_id(raw)
    assert caller_id.raw == raw
    assert caller_id.kind is kind
    assert caller_id.e164 == e164


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_classify_caller_id_never_raises(raw: str) -> None:
    caller_id = classify_caller_id(raw)
    assert caller_id.kind in CallerIdKind
    if caller_id.kind is CallerIdKind.MISSING:
        assert caller_id.e164 is None


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A(?:tel:)?(?:\+|00|0)?[0-9 .\-]{0,20}\Z"))
def test_classify_caller_id_never_raises_on_digit_soup(raw: str) -> None:
    caller_id = classify_caller_id(raw)
    if caller_id.kind is CallerIdKind.NPV:
        assert caller_id.e164 is not None
        assert caller_id.e164.startswith("+33")


# --- places -------------------------------------------------------------------------------------------

PLACES = [
    ("0612345678", Residence(), (Place("FR", FR, None),)),
    (
        "0612345678",
        Residence(departement="57"),
        (Place("FR", FR, None), Place("FR", FR, "57")),
    ),
    (
        "+33612345678",
        Residence(territory="FR", departement="67"),
        (Place("FR", FR, None), Place("FR", FR, "67")),
    ),
    ("0612345678", Residence(territory="FR"), (Place("FR", FR, None),)),
    ("0612345678", Residence(departement="75"), (Place("FR", FR, None), Place("FR", FR, "75"))),
    (
        "0612345678",
        Residence(departement="974"),
        (Place("FR", FR, None), Place("RE", "Indian/Reunion", "974")),
    ),
    (
        "0612345678",
        Residence(departement="971"),
        (Place("FR", FR, None), Place("GP", "America/Guadeloupe", "971")),
    ),
    (
        "0612345678",
        Residence(departement="972"),
        (Place("FR", FR, None), Place("MQ", "America/Martinique", "972")),
    ),
    (
        "0612345678",
        Residence(departement="973"),
        (Place("FR", FR, None), Place("GF", "America/Cayenne", "973")),
    ),
    (
        "0612345678",
        Residence(departement="976"),
        (Place("FR", FR, None), Place("YT", "Indian/Mayotte", "976")),
    ),
    (
        "0692123456",
        Residence(territory="RE"),
        (Place("RE", "Indian/Reunion", None),),
    ),
    (
        "0692123456",
        Residence(territory="YT"),
        (Place("RE", "Indian/Reunion", None), Place("YT", "Indian/Mayotte", None)),
    ),
    (
        "+590590271234",
        Residence(),
        (Place("BL", "America/St_Barthelemy", None), Place("MF", "America/Marigot", None)),
    ),
    (
        "+590690123456",
        Residence(territory="GP"),
        (
            Place("GP", "America/Guadeloupe", None),
            Place("BL", "America/St_Barthelemy", None),
            Place("MF", "America/Marigot", None),
        ),
    ),
    ("0508411234", Residence(), (Place("PM", "America/Miquelon", None),)),
    ("not a number", Residence(), ()),
    ("0891123456", Residence(), ()),
    ("not a number", Residence(departement="57"), (Place("FR", FR, "57"),)),
    ("not a number", Residence(territory="RE"), (Place("RE", "Indian/Reunion", None),)),
    ("0612345678", Residence(territory="re"), (Place("FR", FR, None), Place("RE", "Indian/Reunion", None))),
    ("0612345678", Residence(departement="2A"), (Place("FR", FR, None), Place("FR", FR, "2A"))),
    (
        "0612345678",
        Residence(departement="975"),
        (Place("FR", FR, None), Place("PM", "America/Miquelon", "975")),
    ),
    # a residence outside the served territories adds nothing: the number's places still apply
    ("0612345678", Residence(territory="BE"), (Place("FR", FR, None),)),
]


@pytest.mark.parametrize(("raw", "residence", "expected"), PLACES)
def test_places_for(raw: str, residence: Residence, expected: tuple[Place, ...]) -> None:
    assert places_for(parse_destination(raw), residence) == expected
