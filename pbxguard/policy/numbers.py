"""Numbering plan: parse consumer numbers (destinations) and classify presented caller IDs.

Legal texts implemented here (French verbatim, as compiled in REGULATION.md §1.H, §2.1 and §3):

* Code de la consommation, art. L221-17 (H1):
  « l'utilisation d'un numéro masqué est interdite. Le numéro affiché … est affecté au professionnel
  pour le compte duquel l'appel est effectué. »
  → withheld, empty or unusable caller IDs are `CallerIdKind.MISSING`.

* Arrêté du 5 juillet 2016, pris pour l'application de L221-17 (H2):
  « Les tranches de numéros qui ne peuvent être utilisées comme identifiant d'appel par un professionnel
  qui joint un consommateur sont les numéros spéciaux vocaux à tarification majorée commençant par 089,
  les numéros courts à tarification banalisée ou majorée 3BPQ (hors 30PQ et 31PQ) et les numéros courts
  de service de renseignements téléphoniques 118 XYZ. »
  → `CallerIdKind.FORBIDDEN`; 30PQ/31PQ are `CallerIdKind.SHORT_30_31`.

* Arcep, FAQ « plan de numérotation – professionnels » and décision n° 2022-1583 (H3): mobile numbers
  require that « une unique personne physique se serve d'un numéro mobile donné, et ce, depuis un
  terminal mobile sur un réseau mobile »; presenting 06/07 from a call centre « n'est pas autorisée ».
  → `CallerIdKind.MOBILE`, metropolitan and overseas ranges alike.

* Arcep, décision n° 2022-1583 du 1er septembre 2022 (H4, H5): territorialised numbers may not be the
  caller ID « pour des appels ou des messages émis par des systèmes automatisés d'appels et d'envois
  de messages », i.e. systems « émettant des appels ou des messages de manière automatique vers plusieurs
  utilisateurs finals conformément aux instructions établies pour ce système », except the numéros
  polyvalents vérifiés (NPV: 0162, 0163, 0270, 0271, 0377, 0378, 0424, 0425, 0568, 0569, 0948, 0949;
  overseas 09475 to 09479). → `CallerIdKind.NPV`, `SPECIAL_08`, `TERRITORIAL`.

* Code de la consommation, art. D223-9 al. 1 (B2): « ces heures correspondant à celles du fuseau
  horaire du consommateur ». The number gives the territory, hence the zone (REGULATION §3.2, §3.3):
  CPCE L44-4 keeps a ported non-geographic number in its territory « en demeurant en métropole, dans un
  même département d'outre-mer, à Saint-Barthélemy, Saint-Martin ou à Saint-Pierre-et-Miquelon ».
  Where the number does not tell one territory, every candidate is returned and the caller applies the
  intersection of allowed windows and the union of holidays (§3.2); the CRM residence adds a place (§3.3).

Everything here is pure: no I/O, no clock.  Nothing raises on any input string.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Final

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType

from pbxguard.policy.model import (
    TERRITORY_ZONES,
    CallerId,
    CallerIdKind,
    Destination,
    Place,
    Residence,
)

__all__ = [
    "FRENCH_REGIONS",
    "classify_caller_id",
    "parse_destination",
    "places_for",
    "warm_up",
]

# The regions pbxguard serves, in the fixed order used for `Destination.territories`.
FRENCH_REGIONS: Final[tuple[str, ...]] = ("FR", "GP", "BL", "MF", "MQ", "GF", "RE", "YT", "PM")
# ITU country codes of those regions; each tuple keeps the order of FRENCH_REGIONS.
_REGIONS_BY_COUNTRY_CODE: Final[dict[int, tuple[str, ...]]] = {
    33: ("FR",),
    590: ("GP", "BL", "MF"),
    596: ("MQ",),
    594: ("GF",),
    262: ("RE", "YT"),
    508: ("PM",),
}

# Regions tried, in this order, for a national "0XXXXXXXXX" form allocated overseas.  The region only
# picks the country code (+590 for GP, BL, MF; +262 for RE, YT); territories are then computed from
# the number, so the order does not decide them.
_OVERSEAS_PARSE_REGIONS: Final[tuple[str, ...]] = ("GP", "BL", "MF", "MQ", "GF", "RE", "YT")

# French country codes as dialled without "+" (e.g. Asterisk CALLERID(num) "33162123456"), with the
# lengths of their national significant numbers.
_BARE_COUNTRY_CODES: Final[tuple[tuple[str, frozenset[int]], ...]] = (
    ("33", frozenset({9})),
    ("262", frozenset({9})),
    ("590", frozenset({9})),
    ("594", frozenset({9})),
    ("596", frozenset({9})),
    ("508", frozenset({6, 9})),
)

_CONSUMER_TYPES: Final[frozenset[int]] = frozenset(
    {
        PhoneNumberType.FIXED_LINE,
        PhoneNumberType.MOBILE,
        PhoneNumberType.FIXED_LINE_OR_MOBILE,
        PhoneNumberType.VOIP,  # 09 polyvalent numbers: consumers' internet boxes
    }
)
_MOBILE_TYPES: Final[frozenset[int]] = frozenset(
    {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}
)

# Caller IDs that Asterisk, SIP peers or CRMs use to say "no number".
_WITHHELD: Final[frozenset[str]] = frozenset(
    {"", "anonymous", "unknown", "<unknown>", "restricted", "private", "withheld", "asterisk"}
)

# Separators tolerated inside a number.  Letters are never tolerated (no vanity numbers).
_SEPARATORS: Final[re.Pattern[str]] = re.compile(r"[\s.\-()/\u00a0\u202f]+")
_TEL_PREFIX: Final[re.Pattern[str]] = re.compile(r"^tel:", re.IGNORECASE)
_DIALLABLE: Final[re.Pattern[str]] = re.compile(r"\+?[0-9]{1,24}")
_SPM_NATIONAL: Final[re.Pattern[str]] = re.compile(r"0508([0-9]{6})")

# REGULATION §3.4, on E.164 after normalisation.
_M2M_EXTENDED: Final[re.Pattern[str]] = re.compile(r"\+33700[0-9]{10}")
# 089 premium (arrêté du 5 juillet 2016).  Matched as a prefix: a mis-sized 089 is still the 089 range.
_FORBIDDEN_089: Final[re.Pattern[str]] = re.compile(r"\+3389[0-9]*")
# 06/07 (all of it: metropolitan, overseas sub-ranges, 0700 M2M of any length), then overseas mobiles.
_MOBILE_FR: Final[re.Pattern[str]] = re.compile(r"\+33[67][0-9]*")
_MOBILE_OVERSEAS: Final[re.Pattern[str]] = re.compile(r"\+(?:590|594|596|262)(?:6[0-9]{8}|709[0-9]{6})")
_NPV_METRO: Final[re.Pattern[str]] = re.compile(r"\+33(?:16[23]|27[01]|37[78]|42[45]|56[89]|94[89])[0-9]{6}")
_NPV_OVERSEAS: Final[re.Pattern[str]] = re.compile(r"\+33947[5-9][0-9]{5}")
# Overseas NPV presented under the overseas country code: normalised to the +33 form (REGULATION H5).
_NPV_OVERSEAS_LOCAL_CC: Final[re.Pattern[str]] = re.compile(r"\+(?:590|594|596|262)(947[5-9][0-9]{5})")
_SPECIAL_08: Final[re.Pattern[str]] = re.compile(r"\+338[0-8][0-9]{7}")


def warm_up() -> None:
    """Load phonenumbers' metadata for every French region now rather than on the first call."""
    _overseas_patterns()
    for region in FRENCH_REGIONS:
        example = phonenumbers.example_number(region)
        if example is None:  # pragma: no cover - metadata always has an example
            continue
        text = phonenumbers.format_number(example, PhoneNumberFormat.E164)
        parsed = phonenumbers.parse(text, None)
        phonenumbers.is_valid_number(parsed)
        phonenumbers.is_valid_number_for_region(parsed, region)
        phonenumbers.number_type(parsed)
        phonenumbers.parse("0" + phonenumbers.national_significant_number(parsed), region)


# --- normalisation shared by destinations and caller IDs ---------------------------------------------


def _clean(raw: str) -> str | None:
    """Strip "tel:" and separators; the rest must be "+"? and ASCII digits, else None."""
    text = _TEL_PREFIX.sub("", raw.strip())
    text = _SEPARATORS.sub("", text)
    if not _DIALLABLE.fullmatch(text):
        return None
    return text


def _parse(text: str, region: str | None) -> Any | None:
    try:
        return phonenumbers.parse(text, region)
    except NumberParseException:
        return None


def _e164(number: Any) -> str:
    return str(phonenumbers.format_number(number, PhoneNumberFormat.E164))


_PATTERN_KINDS: Final[tuple[str, ...]] = (
    "fixed_line",
    "mobile",
    "voip",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "uan",
    "voicemail",
    "pager",
)


@lru_cache(maxsize=1)
def _overseas_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Per overseas region, one regex of every national number valid there (from phonenumbers' metadata).

    A cheap filter so that only a plausible region is actually parsed; validity is still decided by
    phonenumbers.
    """
    compiled: list[tuple[str, re.Pattern[str]]] = []
    for region in _OVERSEAS_PARSE_REGIONS:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        patterns = [
            str(desc.national_number_pattern)
            for desc in (getattr(metadata, kind, None) for kind in _PATTERN_KINDS)
            if desc is not None and desc.national_number_pattern
        ]
        compiled.append((region, re.compile("|".join(f"(?:{p})" for p in patterns))))
    return tuple(compiled)


def _overseas_national(text: str) -> Any | None:
    """A national "0" + 9 digits form valid in an overseas numbering plan, else None.

    The French plan allocates 0262/0263/0269, 0590/0594/0596/0598x, 0639, 069x, 0709x, 0939x, 0947x and
    0976x overseas (REGULATION §3.1, §3.2), but libphonenumber's FR metadata also accepts some of them
    (0263, 0269, 0596, 0598x) as metropolitan; the overseas reading wins.  08 numbers are national
    special numbers and are never read as overseas (GP metadata calls 0806-0809 fixed lines).
    """
    if len(text) != 10 or text[1] == "8":
        return None
    national = text[1:]
    for region, pattern in _overseas_patterns():
        if not pattern.fullmatch(national):
            continue
        number = _parse(text, region)
        if number is not None and phonenumbers.is_valid_number_for_region(number, region):
            return number
    return None


def _normalise(text: str) -> Any | None:
    """Parse a cleaned, non-short number (national, overseas national, E.164, 00-prefixed, bare CC)."""
    if text.startswith("+"):
        return _parse(text, None)
    if text.startswith("00"):
        return _parse("+" + text[2:], None)
    if text.startswith("0"):
        spm = _SPM_NATIONAL.fullmatch(text)
        if spm is not None:
            return _parse("+508" + spm.group(1), None)
        overseas = _overseas_national(text)
        if overseas is not None:
            return overseas
        return _parse(text, "FR")
    for code, lengths in _BARE_COUNTRY_CODES:
        if text.startswith(code) and len(text) - len(code) in lengths:
            return _parse("+" + text, None)
    return None


def _territories(number: Any) -> tuple[str, ...]:
    regions = _REGIONS_BY_COUNTRY_CODE.get(number.country_code, ())
    return tuple(region for region in regions if phonenumbers.is_valid_number_for_region(number, region))


def _overseas_reading_of_plus33(number: Any) -> tuple[str, ...]:
    """Overseas territories of a +33 number whose national form is allocated overseas.

    "+33269601234" is valid for FR in libphonenumber, but "0269601234" is a Mayotte number in the French
    plan: a CRM that prefixed "+33" to an overseas national number would otherwise get Paris hours.  The
    overseas territories are added so that the intersection of windows applies (REGULATION §3.2).
    """
    if number.country_code != 33:
        return ()
    overseas = _overseas_national("0" + phonenumbers.national_significant_number(number))
    if overseas is None:
        return ()
    return _territories(overseas)


# --- destinations -------------------------------------------------------------------------------------


def parse_destination(raw: str) -> Destination:
    """Parse a consumer number; `valid` only for a French consumer line (fixed, mobile, 09 box).

    Never raises: anything else, including non-strings in disguise, is an invalid destination.
    """
    if not isinstance(raw, str):
        return Destination(raw=str(raw), e164=None, valid=False)
    if _BLOCK_FORM.fullmatch(raw):
        return _parse_in_block(raw)
    return _parse_destination(raw)


# A number written as digits only, national or E.164 with a French country code, that is neither short,
# M2M (0700, 13 digits) nor Saint-Pierre-et-Miquelon (+508, 6 digits).
_BLOCK_FORM: Final = re.compile(r"(?:0|\+33|\+262|\+590|\+594|\+596)[1-9][0-9]{8}")
_BLOCKS_MAX: Final = 200_000


def _parse_in_block(raw: str) -> Destination:
    """Numbers are allocated by blocks of 10,000 (ZABPQ + MCDU, Arcep): the last four digits never
    change a number's validity, type or territory, and phonenumbers' metadata never looks at them.
    The full parse (tens of microseconds) runs once per block and written form; every other number of
    the block reuses its result with its own last four digits.  tests/policy/test_numbers.py checks
    this against the full parse over every French range."""
    key, tail = raw[:-4], raw[-4:]
    template = _BLOCKS.get(key)
    if template is None:
        template = _parse_destination(raw)
        if template.e164 is not None and not template.e164.endswith(tail):
            return template  # a form whose digits the E.164 rewrites: never reused
        if len(_BLOCKS) >= _BLOCKS_MAX:
            _BLOCKS.clear()  # bounded memory; the blocks a campaign calls come back at once
        _BLOCKS[key] = template
        if template.raw == raw:
            return template
    e164 = template.e164[:-4] + tail if template.e164 is not None else None
    return Destination(raw=raw, e164=e164, valid=template.valid, territories=template.territories, zones=template.zones)


# Immutable results only, keyed by a written prefix: sharing them across decisions changes nothing.
_BLOCKS: dict[str, Destination] = {}


@lru_cache(maxsize=16384)
def _parse_destination(raw: str) -> Destination:
    text = _clean(raw)
    if text is None:
        return Destination(raw=raw, e164=None, valid=False)
    digits = text.lstrip("+")
    if not text.startswith("+") and len(digits) <= 6:
        return Destination(raw=raw, e164=None, valid=False)  # 3BPQ, 118XYZ, 15/17/18/112...
    if not text.startswith("+") and text.startswith("0") and not text.startswith("00") and len(text) > 10:
        return Destination(raw=raw, e164=None, valid=False)  # 0700 + 10 digits (14-digit M2M) and longer
    number = _normalise(text)
    if number is None:
        return Destination(raw=raw, e164=None, valid=False)
    e164 = _e164(number)
    if _M2M_EXTENDED.fullmatch(e164) or (
        number.country_code == 33 and len(phonenumbers.national_significant_number(number)) != 9
    ):
        return Destination(raw=raw, e164=e164, valid=False)
    if phonenumbers.number_type(number) not in _CONSUMER_TYPES:  # UNKNOWN when invalid
        return Destination(raw=raw, e164=e164, valid=False)
    found = set(_territories(number)) | set(_overseas_reading_of_plus33(number))
    territories = tuple(region for region in FRENCH_REGIONS if region in found)
    if not territories:
        return Destination(raw=raw, e164=e164, valid=False)  # a foreign number
    zones = tuple(dict.fromkeys(TERRITORY_ZONES[region] for region in territories))
    return Destination(raw=raw, e164=e164, valid=True, territories=territories, zones=zones)


# --- caller IDs ---------------------------------------------------------------------------------------


def classify_caller_id(raw: str) -> CallerId:
    """Classify a presented caller ID by numbering range.  Never raises."""
    if not isinstance(raw, str):
        return CallerId(raw=str(raw), kind=CallerIdKind.MISSING, e164=None)
    return _classify_caller_id(raw)


@lru_cache(maxsize=4096)
def _classify_caller_id(raw: str) -> CallerId:
    if raw.strip().strip('"').strip().lower() in _WITHHELD:
        return CallerId(raw=raw, kind=CallerIdKind.MISSING, e164=None)
    text = _clean(raw)
    if text is None:
        return CallerId(raw=raw, kind=CallerIdKind.MISSING, e164=None)
    if not text.startswith("+") and len(text) <= 6:
        # Short codes: only 30PQ and 31PQ may be presented; 3[2-9]PQ, 118XYZ and any other are forbidden.
        if len(text) == 4 and text[:2] in {"30", "31"}:
            return CallerId(raw=raw, kind=CallerIdKind.SHORT_30_31, e164=text)
        return CallerId(raw=raw, kind=CallerIdKind.FORBIDDEN, e164=text)
    number = _normalise(text)
    if number is None:
        return CallerId(raw=raw, kind=CallerIdKind.MISSING, e164=None)
    e164 = _e164(number)
    if _FORBIDDEN_089.fullmatch(e164):
        return CallerId(raw=raw, kind=CallerIdKind.FORBIDDEN, e164=e164)
    if _MOBILE_FR.fullmatch(e164) or _MOBILE_OVERSEAS.fullmatch(e164) or _is_french_mobile(number):
        return CallerId(raw=raw, kind=CallerIdKind.MOBILE, e164=e164)
    overseas_npv = _NPV_OVERSEAS_LOCAL_CC.fullmatch(e164)
    if overseas_npv is not None:
        return CallerId(raw=raw, kind=CallerIdKind.NPV, e164="+33" + overseas_npv.group(1))
    if _NPV_METRO.fullmatch(e164) or _NPV_OVERSEAS.fullmatch(e164):
        return CallerId(raw=raw, kind=CallerIdKind.NPV, e164=e164)
    if _SPECIAL_08.fullmatch(e164):
        return CallerId(raw=raw, kind=CallerIdKind.SPECIAL_08, e164=e164)
    if not phonenumbers.is_possible_number(number):
        return CallerId(raw=raw, kind=CallerIdKind.MISSING, e164=None)  # not a number anyone can call back
    return CallerId(raw=raw, kind=CallerIdKind.TERRITORIAL, e164=e164)


def _is_french_mobile(number: Any) -> bool:
    """phonenumbers types it mobile in one of the 9 regions (covers +508 mobiles)."""
    if phonenumbers.number_type(number) not in _MOBILE_TYPES:
        return False
    return bool(_territories(number))


# --- places -------------------------------------------------------------------------------------------

# INSEE codes of the overseas departements and collectivities, for a residence known only by code.
_DEPARTEMENT_TERRITORY: Final[dict[str, str]] = {
    "971": "GP",
    "972": "MQ",
    "973": "GF",
    "974": "RE",
    "975": "PM",
    "976": "YT",
    "977": "BL",
    "978": "MF",
}


def _residence_place(residence: Residence) -> Place | None:
    territory = residence.territory.strip().upper() if residence.territory else None
    departement = residence.departement.strip().upper() if residence.departement else None
    if territory is None and departement is None:
        return None
    if territory is None:
        territory = _DEPARTEMENT_TERRITORY.get(departement or "", "FR")
    zone = TERRITORY_ZONES.get(territory)
    if zone is None:
        return None  # outside the territories pbxguard serves: the number's places still apply
    return Place(territory=territory, zone=zone, departement=departement)


def places_for(destination: Destination, residence: Residence) -> tuple[Place, ...]:
    """Every place where the consumer may be: the number's territories, then the known residence.

    A call must be legal in each of them.  The residence place is kept next to a number place of the
    same territory when its departement differs (a Moselle consumer with a +33 number: Paris hours,
    plus the Alsace-Moselle holidays).
    """
    return _places(destination.territories if destination.valid else (), residence)


@lru_cache(maxsize=1024)
def _places(territories: tuple[str, ...], residence: Residence) -> tuple[Place, ...]:
    # A handful of territory and residence combinations serve every call: worked out once each.
    places: list[Place] = []
    for territory in territories:
        zone = TERRITORY_ZONES.get(territory)
        if zone is not None:
            places.append(Place(territory=territory, zone=zone, departement=None))
    home = _residence_place(residence)
    if home is not None:
        places.append(home)
    return tuple(dict.fromkeys(places))
