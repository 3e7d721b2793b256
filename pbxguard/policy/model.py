"""The vocabulary every part of pbxguard speaks: attempts, campaigns, facts, decisions, reasons.

Everything here is an immutable value.  Gates build a `CallAttempt`, the ledger returns
`ConsumerFacts`, the pure rules turn both into a `Decision`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime


class Reason(enum.StrEnum):
    """Stable reason codes.  Their order here is the order in which a decision lists them."""

    UNKNOWN_CAMPAIGN = "UNKNOWN_CAMPAIGN"
    SECTOR_BANNED = "SECTOR_BANNED"
    CALLER_ID_MISSING = "CALLER_ID_MISSING"
    CALLER_ID_FORBIDDEN = "CALLER_ID_FORBIDDEN"
    CALLER_ID_MOBILE = "CALLER_ID_MOBILE"
    CALLER_ID_NOT_NPV = "CALLER_ID_NOT_NPV"
    CALLER_ID_NOT_AUTHORIZED = "CALLER_ID_NOT_AUTHORIZED"
    INVALID_DESTINATION = "INVALID_DESTINATION"
    BLOCTEL_REGISTERED = "BLOCTEL_REGISTERED"
    BLOCTEL_STALE = "BLOCTEL_STALE"
    NO_CONSENT = "NO_CONSENT"
    OPPOSED = "OPPOSED"
    REFUSAL_QUIET_PERIOD = "REFUSAL_QUIET_PERIOD"
    WEEKEND = "WEEKEND"
    PUBLIC_HOLIDAY = "PUBLIC_HOLIDAY"
    OUTSIDE_HOURS = "OUTSIDE_HOURS"
    FREQUENCY_CAP = "FREQUENCY_CAP"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


REASON_ORDER: dict[Reason, int] = {reason: index for index, reason in enumerate(Reason)}

# Reasons that clear by themselves with time: a decision blocked only by these has a next legal instant.
TIME_BASED: frozenset[Reason] = frozenset(
    {
        Reason.REFUSAL_QUIET_PERIOD,
        Reason.WEEKEND,
        Reason.PUBLIC_HOLIDAY,
        Reason.OUTSIDE_HOURS,
        Reason.FREQUENCY_CAP,
    }
)

# Legal references cited in decisions and in the journal, per reason.
RULE_REFERENCES: dict[Reason, str] = {
    Reason.UNKNOWN_CAMPAIGN: "C. conso L221-16, D223-9 al. 3 (order giver must be known)",
    Reason.SECTOR_BANNED: "C. conso L223-1 (energy renovation, home adaptation); C. trav. L6323-8-1 (CPF)",
    Reason.CALLER_ID_MISSING: "C. conso L221-17 (withheld number forbidden)",
    Reason.CALLER_ID_FORBIDDEN: "Arrêté du 5 juillet 2016 (089, 3BPQ, 118XYZ)",
    Reason.CALLER_ID_MOBILE: "Arcep décision 2022-1583; Arcep FAQ (06/07 interpersonal only)",
    Reason.CALLER_ID_NOT_NPV: "Arcep décision 2022-1583; CPCE L44 VI (automated systems: NPV only)",
    Reason.CALLER_ID_NOT_AUTHORIZED: "C. conso L221-17; CPCE L44 (number assigned to or authorised by the order giver)",
    Reason.INVALID_DESTINATION: "numbering plan (Arcep décision 2012-0855, 2022-1583)",
    Reason.BLOCTEL_REGISTERED: "C. conso L223-1 al. 2 (version 26/07/2020)",
    Reason.BLOCTEL_STALE: "C. conso L223-1 (version 26/07/2020), R223-6 (monthly cleaning)",
    Reason.NO_CONSENT: "C. conso L223-1 al. 1 (version 11/08/2026); CPCE L34-5 (automated messages)",
    Reason.OPPOSED: "RGPD art. 21; C. conso L221-16 (version 11/08/2026)",
    Reason.REFUSAL_QUIET_PERIOD: "C. conso D223-9 al. 3, 2nd sentence (60 days after a refusal)",
    Reason.WEEKEND: "C. conso D223-9 al. 1 (Monday to Friday)",
    Reason.PUBLIC_HOLIDAY: "C. conso D223-9 al. 1; C. trav. L3133-1, L3134-13, L3422-2",
    Reason.OUTSIDE_HOURS: "C. conso D223-9 al. 1 (10:00-13:00, 14:00-20:00 consumer time)",
    Reason.FREQUENCY_CAP: "C. conso D223-9 al. 3, 1st sentence (4 attempts per 30 days)",
    Reason.STORE_UNAVAILABLE: "fail closed: the ledger could not be consulted",
}


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    BLOCK = "block"


class Purpose(enum.StrEnum):
    B2C_PROSPECTING = "b2c_prospecting"
    B2B = "b2b"
    CONTRACT_SERVICE = "contract_service"
    SURVEY = "survey"
    NON_COMMERCIAL = "non_commercial"


# Purposes whose calls reach a consumer in the sense of D223-9 and L223-1.
CONSUMER_PURPOSES: frozenset[Purpose] = frozenset({Purpose.B2C_PROSPECTING, Purpose.CONTRACT_SERVICE})


class Sector(enum.StrEnum):
    GENERAL = "general"
    RENOVATION_ENERGETIQUE = "renovation_energetique"
    ADAPTATION_LOGEMENT = "adaptation_logement"
    FORMATION_CPF = "formation_cpf"
    PRESS = "press"


BANNED_SECTORS: frozenset[Sector] = frozenset(
    {Sector.RENOVATION_ENERGETIQUE, Sector.ADAPTATION_LOGEMENT, Sector.FORMATION_CPF}
)


class Regime(enum.StrEnum):
    """Legal basis for calling a consumer, by the consumer-local date of the call."""

    BLOCTEL = "bloctel"  # until 2026-08-10: opposition list
    CONSENT = "consent"  # from 2026-08-11: prior consent


class CallerIdKind(enum.StrEnum):
    """What a presented caller ID is, as far as the numbering plan tells."""

    MISSING = "missing"  # empty, withheld, anonymous
    FORBIDDEN = "forbidden"  # 089, 3BPQ except 30PQ/31PQ, 118XYZ, other short codes
    MOBILE = "mobile"  # French mobile, metropolitan or overseas
    NPV = "npv"  # numéro polyvalent vérifié
    SPECIAL_08 = "special_08"  # 08 except 089
    SHORT_30_31 = "short_30_31"  # 30PQ / 31PQ
    TERRITORIAL = "territorial"  # 01-05, 09 (non NPV), foreign: not allowed for automated calls


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    order_giver: str
    purpose: Purpose = Purpose.B2C_PROSPECTING
    sector: Sector = Sector.GENERAL
    automated: bool = True
    prerecorded: bool = False
    order_giver_siren: str | None = None
    script_id: str | None = None


@dataclass(frozen=True, slots=True)
class CallerId:
    raw: str
    kind: CallerIdKind
    e164: str | None  # normalised form when it is a number; short codes stay as dialled digits


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed consumer number.  `territories` has more than one entry when the range is shared."""

    raw: str
    e164: str | None
    valid: bool
    territories: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()


# ISO region of each French territory pbxguard serves, to its IANA zone.  phonenumbers gives two
# zones for +262 mobiles, so the mapping is ours, by region.
TERRITORY_ZONES: dict[str, str] = {
    "FR": "Europe/Paris",
    "GP": "America/Guadeloupe",
    "BL": "America/St_Barthelemy",
    "MF": "America/Marigot",
    "MQ": "America/Martinique",
    "GF": "America/Cayenne",
    "RE": "Indian/Reunion",
    "YT": "Indian/Mayotte",
    "PM": "America/Miquelon",
}


@dataclass(frozen=True, slots=True)
class Place:
    """Where the consumer may be: a call must be legal in every place that applies to it."""

    territory: str
    zone: str
    departement: str | None = None


@dataclass(frozen=True, slots=True)
class Residence:
    """What the CRM knows of where the consumer lives; adds to what the number shows."""

    territory: str | None = None
    departement: str | None = None


@dataclass(frozen=True, slots=True)
class CallAttempt:
    number: str
    campaign_id: str
    caller_id: str
    gate: str = "cli"
    call_key: str | None = None
    token: str | None = None  # PBXGUARD_TOKEN carried by a channel an earlier gate already allowed


@dataclass(frozen=True, slots=True)
class ConsumerFacts:
    """What the ledger knows of one consumer for one order giver, read at decision time."""

    opposed: bool = False
    last_refusal_at: datetime | None = None
    consent_at: datetime | None = None  # latest unrevoked consent given at or before now
    off_hours_consent_at: datetime | None = None  # same, for consent that covers calls off hours
    contract_until: date | None = None  # latest end date of a contract in progress
    bloctel_status: str | None = None  # "cleared" | "registered" | None, from the latest cleaning
    bloctel_on: date | None = None  # date of that cleaning
    recent_attempts: tuple[datetime, ...] = ()  # most recent first, at most `cap` of them
    caller_id_authorized: bool = False
    residence: Residence = field(default_factory=Residence)


@dataclass(frozen=True, slots=True)
class Decision:
    id: str
    verdict: Verdict
    reasons: tuple[Reason, ...]
    next_allowed_at: datetime | None
    consumer: str | None
    territories: tuple[str, ...]
    zones: tuple[str, ...]
    campaign_id: str
    order_giver: str | None
    caller_id: str
    gate: str
    decided_at: datetime
    call_key: str | None = None
    shadow: bool = False  # enforce mode would have blocked; shadow mode let it through
    replayed: bool = False  # the call key had already been decided: this is the stored decision
    counted: bool = False  # an attempt was recorded against the frequency cap

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(RULE_REFERENCES[reason] for reason in self.reasons)

    @property
    def permits_call(self) -> bool:
        """What a gate does: allowed calls, and in shadow mode blocked ones too, go through."""
        return self.allowed or self.shadow

    def to_json(self) -> dict[str, object]:
        return {
            "decision": self.id,
            "verdict": self.verdict.value,
            "reasons": [reason.value for reason in self.reasons],
            "rules": list(self.rules),
            "next_allowed_at": self.next_allowed_at.isoformat() if self.next_allowed_at else None,
            "consumer": self.consumer,
            "territories": list(self.territories),
            "zones": list(self.zones),
            "campaign": self.campaign_id,
            "order_giver": self.order_giver,
            "caller_id": self.caller_id,
            "gate": self.gate,
            "decided_at": self.decided_at.isoformat(),
            "call_key": self.call_key,
            "shadow": self.shadow,
            "replayed": self.replayed,
            "counted": self.counted,
        }


def sort_reasons(reasons: set[Reason] | frozenset[Reason]) -> tuple[Reason, ...]:
    return tuple(sorted(reasons, key=REASON_ORDER.__getitem__))
