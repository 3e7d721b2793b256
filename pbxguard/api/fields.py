"""Request fields: one declaration per field drives both its validation and its OpenAPI schema."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pbxguard.api.errors import invalid
from pbxguard.bulk import parse_instant
from pbxguard.policy.model import TERRITORY_ZONES
from pbxguard.policy.numbers import parse_destination


class Kind(enum.StrEnum):
    NAME = "name"  # identifiers and short labels: 1-200 characters, no control characters
    TEXT = "text"  # free text up to 2000 characters
    CONSUMER = "consumer"  # a valid French consumer number, returned as E.164
    RAW_NUMBER = "raw_number"  # a dialled string: <= 64 characters, no control one (the guard classifies it)
    INSTANT = "instant"  # ISO 8601; without offset: Paris time
    DATE = "date"  # YYYY-MM-DD
    BOOLEAN = "boolean"
    INTEGER = "integer"
    ENUM = "enum"
    TERRITORY = "territory"
    DEPARTEMENT = "departement"
    SIREN = "siren"
    NUMBER_LIST = "number_list"  # array of raw numbers
    UUID = "uuid"
    CURSOR = "cursor"  # opaque pagination cursor


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    required: bool = False
    description: str = ""
    choices: tuple[str, ...] = ()
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    max_items: int | None = None

    # -- OpenAPI ------------------------------------------------------------------------------

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any]
        kind = self.kind
        if kind is Kind.NAME:
            schema = {"type": "string", "minLength": 1, "maxLength": 200}
        elif kind is Kind.TEXT:
            schema = {"type": "string", "maxLength": 2000}
        elif kind is Kind.CONSUMER:
            schema = {"type": "string", "maxLength": 64, "examples": ["0612345678", "+33612345678"]}
        elif kind is Kind.RAW_NUMBER:
            schema = {"type": "string", "maxLength": 64}
        elif kind is Kind.INSTANT:
            schema = {"type": "string", "format": "date-time", "examples": ["2026-12-01T10:30:00+01:00"]}
        elif kind is Kind.DATE:
            schema = {"type": "string", "format": "date"}
        elif kind is Kind.BOOLEAN:
            schema = {"type": "boolean"}
        elif kind is Kind.INTEGER:
            schema = {"type": "integer"}
            if self.minimum is not None:
                schema["minimum"] = self.minimum
            if self.maximum is not None:
                schema["maximum"] = self.maximum
        elif kind is Kind.ENUM:
            schema = {"type": "string", "enum": list(self.choices)}
        elif kind is Kind.TERRITORY:
            schema = {"type": "string", "enum": list(TERRITORY_ZONES)}
        elif kind is Kind.DEPARTEMENT:
            schema = {"type": "string", "pattern": "^([0-9]{2}|2[AB]|97[0-9])$"}
        elif kind is Kind.SIREN:
            schema = {"type": "string", "pattern": "^[0-9]{9}$"}
        elif kind is Kind.NUMBER_LIST:
            schema = {"type": "array", "items": {"type": "string", "maxLength": 64}, "minItems": 1}
            if self.max_items is not None:
                schema["maxItems"] = self.max_items
        elif kind is Kind.UUID:
            schema = {"type": "string", "format": "uuid"}
        else:
            schema = {"type": "string"}
        if self.description:
            schema["description"] = self.description
        if self.default is not None:
            schema["default"] = self.default
        return schema

    # -- validation ---------------------------------------------------------------------------

    def parse(self, value: Any, *, from_text: bool = False) -> Any:
        """Validates a JSON value (or a query/path string when `from_text`); raises a 422 ApiError."""
        kind = self.kind
        if kind is Kind.BOOLEAN:
            if from_text and isinstance(value, str):
                lowered = value.lower()
                if lowered in ("true", "1", "yes"):
                    return True
                if lowered in ("false", "0", "no"):
                    return False
            if isinstance(value, bool):
                return value
            raise invalid(self.name, f"{self.name}: expected true or false")
        if kind is Kind.INTEGER:
            if from_text and isinstance(value, str) and value.lstrip("-").isdigit() and len(value) < 12:
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid(self.name, f"{self.name}: expected an integer")
            if self.minimum is not None and value < self.minimum:
                raise invalid(self.name, f"{self.name}: at least {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise invalid(self.name, f"{self.name}: at most {self.maximum}")
            return value
        if kind is Kind.NUMBER_LIST:
            if not isinstance(value, list) or not value:
                raise invalid(self.name, f"{self.name}: expected a non-empty array of numbers")
            if self.max_items is not None and len(value) > self.max_items:
                raise invalid(self.name, f"{self.name}: at most {self.max_items} numbers per request")
            for index, item in enumerate(value):
                if not isinstance(item, str) or len(item) > 64 or _has_control(item):
                    raise invalid(
                        f"{self.name}[{index}]", f"{self.name}[{index}]: expected a number as a string"
                    )
            return list(value)
        if not isinstance(value, str):
            raise invalid(self.name, f"{self.name}: expected a string")
        return self._parse_text(value)

    def _parse_text(self, value: str) -> Any:
        name, kind = self.name, self.kind
        if kind is Kind.NAME:
            text = value.strip()
            if not text or len(text) > 200 or any(ord(ch) < 32 for ch in text):
                raise invalid(name, f"{name}: expected 1 to 200 printable characters")
            return text
        if kind is Kind.TEXT:
            if len(value) > 2000 or any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
                raise invalid(name, f"{name}: expected at most 2000 printable characters")
            return value
        if kind is Kind.CONSUMER:
            destination = parse_destination(value[:64])
            if len(value) > 64 or not destination.valid or destination.e164 is None:
                raise invalid(name, f"{name}: not a valid French consumer number: {value[:40]!r}")
            return destination.e164
        if kind is Kind.RAW_NUMBER:
            if len(value) > 64:
                raise invalid(name, f"{name}: at most 64 characters")
            if _has_control(value):  # NUL cannot even be stored: refused here rather than failing the ledger
                raise invalid(name, f"{name}: control characters are not allowed")
            return value
        if kind is Kind.INSTANT:
            try:
                return parse_instant(value)
            except ValueError:
                raise invalid(
                    name, f"{name}: not an ISO 8601 time (e.g. 2026-12-01T10:30:00+01:00)"
                ) from None
        if kind is Kind.DATE:
            try:
                return date.fromisoformat(value)
            except ValueError:
                raise invalid(name, f"{name}: not a date (YYYY-MM-DD)") from None
        if kind is Kind.ENUM:
            if value not in self.choices:
                raise invalid(name, f"{name}: one of {', '.join(self.choices)}")
            return value
        if kind is Kind.TERRITORY:
            code = value.upper()
            if code not in TERRITORY_ZONES:
                raise invalid(name, f"{name}: one of {', '.join(TERRITORY_ZONES)}")
            return code
        if kind is Kind.DEPARTEMENT:
            code = value.upper()
            if not (
                (len(code) == 2 and (code.isdigit() or code in ("2A", "2B")))
                or (len(code) == 3 and code.isdigit() and code.startswith("97"))
            ):
                raise invalid(name, f"{name}: not a département code (e.g. 57, 2A, 974)")
            return code
        if kind is Kind.SIREN:
            digits = value.replace(" ", "")
            if len(digits) != 9 or not digits.isdigit():
                raise invalid(name, f"{name}: a SIREN has 9 digits")
            return digits
        if kind is Kind.UUID:
            try:
                return uuid.UUID(value)
            except ValueError:
                raise invalid(name, f"{name}: not a decision id (UUID)") from None
        return value


def _has_control(text: str) -> bool:
    return any(ord(ch) < 32 or ch == "\x7f" for ch in text)


def parse_fields(
    fields: tuple[Field, ...], values: dict[str, Any], *, from_text: bool, where: str
) -> dict[str, Any]:
    """Validates `values` against `fields`: unknown names, missing required ones and bad values are 422."""
    known = {f.name for f in fields}
    for key in values:
        if key not in known:
            raise invalid(key, f"{key}: unknown {where} field")
    parsed: dict[str, Any] = {}
    for spec in fields:
        raw = values.get(spec.name)
        if raw is None or (from_text and raw == ""):
            if spec.required:
                raise invalid(spec.name, f"{spec.name}: required")
            parsed[spec.name] = spec.default
            continue
        parsed[spec.name] = spec.parse(raw, from_text=from_text)
    return parsed


def instant_now_or(value: datetime | None, now: datetime) -> datetime:
    return value if value is not None else now
