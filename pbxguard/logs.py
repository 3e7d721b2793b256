"""Logging: one JSON object per line (or plain text), consumer numbers masked by default."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


def mask_number(number: str | None, full: bool = False) -> str | None:
    if number is None or full:
        return number
    if len(number) <= 4:
        return "*" * len(number)
    return "*" * (len(number) - 4) + number[-4:]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            payload["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(payload, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{datetime.fromtimestamp(record.created, UTC):%Y-%m-%dT%H:%M:%S}Z {record.levelname:<7} {record.name}: "
        text = base + record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("pbxguard")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Libraries log too (asyncpg's pool when PostgreSQL goes away, asyncio's unhandled errors):
    # through the same handler, so that every line of the daemon's output is one JSON object.
    for name in ("asyncpg", "asyncio", "aiohttp"):
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(max(logging.WARNING, root.level))
        library.propagate = False
