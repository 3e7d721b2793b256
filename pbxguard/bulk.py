"""Bulk files: Bloctel number lists and consent CSV files, read as a stream with progress.

Both readers validate every line before anything is written: the first bad line raises
`ImportLineError` with its line number, and the caller's transaction then imports nothing.
"""

from __future__ import annotations

import csv
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import IO, TextIO
from zoneinfo import ZoneInfo

from pbxguard.policy.numbers import parse_destination

PARIS = ZoneInfo("Europe/Paris")

# What COPY receives for pbxguard.consents, in this column order.
CONSENT_COLUMNS: tuple[str, ...] = ("consumer", "given_at", "source", "proof", "off_hours")
ConsentRecord = tuple[str, datetime, str | None, str | None, bool]

_TRUE = frozenset({"1", "true", "yes", "y", "oui", "t"})
_FALSE = frozenset({"", "0", "false", "no", "n", "non", "f"})
_MAX_TEXT = 2000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ImportLineError(ValueError):
    def __init__(self, line_no: int, message: str) -> None:
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no
        self.detail = message


class NumberParser:
    """E.164 of a valid French consumer number, or None.  `parse_destination` already reuses one full
    parse per block of 10,000 numbers, which is what keeps an import of millions of rows fast."""

    def __call__(self, text: str) -> str | None:
        destination = parse_destination(text)
        return destination.e164 if destination.valid else None


def parse_number_lines(lines: Iterable[str]) -> list[str]:
    """Bloctel files: one number per line (national or E.164), `;`/`,` columns after it ignored,
    blank lines and `#` comments skipped.  Returns E.164 numbers."""
    parse = NumberParser()
    numbers: list[str] = []
    for line_no, line in enumerate(lines, 1):
        text = line.strip().lstrip("\ufeff").split(";", 1)[0].split(",", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        e164 = parse(text)
        if e164 is None:
            raise ImportLineError(line_no, f"not a valid French number: {text[:40]!r}")
        numbers.append(e164)
    return numbers


def parse_instant(value: str) -> datetime:
    """ISO 8601; a time without offset is read as Paris time.  Raises ValueError."""
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=PARIS)


def _optional_text(value: str, line_no: int, column: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if len(text) > _MAX_TEXT or _CONTROL.search(text):
        raise ImportLineError(line_no, f"{column}: not usable text")
    return text


def consent_record(row: list[str], line_no: int, parse: NumberParser | None = None) -> ConsentRecord:
    if len(row) < 2 or len(row) > 5:
        raise ImportLineError(
            line_no, f"expected number,given_at[,source,proof,off_hours], got {len(row)} columns"
        )
    row = row + [""] * (5 - len(row))
    e164 = (parse or NumberParser())(row[0].strip())
    if e164 is None:
        raise ImportLineError(line_no, f"not a valid French number: {row[0].strip()[:40]!r}")
    try:
        given_at = parse_instant(row[1])
    except ValueError:
        raise ImportLineError(line_no, f"given_at: not an ISO 8601 time: {row[1].strip()[:40]!r}") from None
    flag = row[4].strip().lower()
    if flag in _TRUE:
        off_hours = True
    elif flag in _FALSE:
        off_hours = False
    else:
        raise ImportLineError(line_no, f"off_hours: expected true or false, got {row[4].strip()[:20]!r}")
    return (
        e164,
        given_at,
        _optional_text(row[2], line_no, "source"),
        _optional_text(row[3], line_no, "proof"),
        off_hours,
    )


RawRow = tuple[int, list[str]]


def _raw_chunks(handle: TextIO, size: int) -> Iterator[list[RawRow]]:
    reader = csv.reader(handle)
    chunk: list[RawRow] = []
    for row in reader:
        line_no = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        first = row[0].strip().lstrip("\ufeff")
        if first.startswith("#") or (line_no == 1 and first.lower() == "number"):
            continue
        row[0] = first
        chunk.append((line_no, row))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def consent_batches(handle: TextIO, *, batch_size: int = 20_000) -> Iterator[list[ConsentRecord]]:
    """Reads a consent CSV (`number,given_at,source,proof,off_hours`, optional header line) in batches.

    The first bad line raises ImportLineError.
    """
    parse = NumberParser()
    for chunk in _raw_chunks(handle, batch_size):
        yield [consent_record(row, line_no, parse) for line_no, row in chunk]


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(
        self,
        label: str,
        total_bytes: int | None,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else 5.0
        self._last = self.started - self.interval

    def update(self, rows: int, position: int | None = None, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        percent = ""
        if self.total and position is not None:
            percent = f"  {min(100.0, 100.0 * position / self.total):5.1f}%"
        text = f"{self.label}: {rows:,} rows{percent}  {rows / elapsed:,.0f} rows/s"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, rows: int) -> float:
        elapsed = self.clock() - self.started
        text = f"{self.label}: {rows:,} rows in {elapsed:.1f} s"
        self.stream.write(("\r" + text + "\x1b[K\n") if self.tty else text + "\n")
        self.stream.flush()
        return elapsed
