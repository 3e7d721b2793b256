"""Bulk imports through the CLI: consent CSV files into COPY (whole or nothing, with progress), Bloctel
files with progress, and a 1,000,000-row consent file whose import time is printed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from api_support import legal_setup

from pbxguard import cli
from pbxguard.bulk import ImportLineError, NumberParser, Progress, consent_batches
from pbxguard.ledger.store import Ledger
from pbxguard.policy.model import Campaign

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(database_url: str, monkeypatch: Any) -> str:
    monkeypatch.setenv("PBXGUARD_DATABASE_URL", database_url)
    monkeypatch.delenv("PBXGUARD_CONFIG", raising=False)
    return database_url


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_consent_csv_import(ledger: Ledger, env: str, tmp_path: Path, capsys: Any) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME"))
    path = tmp_path / "consents.csv"
    path.write_text(
        "\ufeffnumber,given_at,source,proof,off_hours\n"
        "0612345678,2026-11-01T10:00:00+01:00,web form,form-1,false\n"
        '+33698765432,2026-11-02T11:00:00,"salon, stand 4",,true\n'
        "\n"
        "06 11 22 33 44,2026-11-03\n",
        encoding="utf-8",
    )
    assert await run_cli("consent", "import", str(path), "--order-giver", "ACME") == 0
    captured = capsys.readouterr()
    assert "3 consents imported for ACME" in captured.out
    assert "consent import: 3 rows in" in captured.err  # progress summary on stderr
    async with ledger.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT consumer, source, proof, off_hours, given_at FROM pbxguard.consents ORDER BY id"
        )
    assert [r["consumer"] for r in rows] == ["+33612345678", "+33698765432", "+33611223344"]
    assert rows[1]["source"] == "salon, stand 4" and rows[1]["proof"] is None and rows[1]["off_hours"] is True
    assert rows[1]["given_at"].isoformat() == "2026-11-02T10:00:00+00:00"  # no offset: Paris time
    assert (
        await run_cli("--json", "consent", "import", str(path), "--order-giver", "ACME", "--no-progress") == 0
    )
    captured = capsys.readouterr()
    assert '"consents": 3' in captured.out and captured.err == ""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0899123456,2026-11-01", "not a valid French number"),
        ("0612345678,yesterday", "given_at: not an ISO 8601 time"),
        ("0612345678,2026-11-01,web,proof,maybe", "off_hours: expected true or false"),
        ("0612345678", "expected number,given_at"),
    ],
)
async def test_a_bad_consent_line_imports_nothing(
    ledger: Ledger, env: str, tmp_path: Path, capsys: Any, line: str, message: str
) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME"))
    path = tmp_path / "consents.csv"
    path.write_text(f"0612345678,2026-11-01\n0698765432,2026-11-01\n{line}\n0611223344,2026-11-01\n")
    assert await run_cli("consent", "import", str(path), "--order-giver", "ACME", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pbxguard: error: {path}:3: {message}") and err.endswith("; nothing imported\n")
    assert await ledger.consents_count() == 0


async def test_consent_import_for_an_unknown_order_giver(
    ledger: Ledger, env: str, tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "consents.csv"
    path.write_text("0612345678,2026-11-01\n")
    assert await run_cli("consent", "import", str(path), "--order-giver", "Nobody") == 2
    assert "unknown order giver" in capsys.readouterr().err
    assert await run_cli("consent", "import", str(tmp_path / "missing.csv"), "--order-giver", "ACME") == 2
    assert "cannot read" in capsys.readouterr().err


async def test_bloctel_import_shows_progress(ledger: Ledger, env: str, tmp_path: Path, capsys: Any) -> None:
    await legal_setup(ledger)
    path = tmp_path / "bloctel.txt"
    path.write_text("".join(f"06{i:08d}\n" for i in range(120_000)))
    assert (
        await run_cli("bloctel", "import", str(path), "--order-giver", "ACME", "--cleaned-at", "2026-07-20")
        == 0
    )
    captured = capsys.readouterr()
    assert "120000 numbers imported as cleared" in captured.out
    assert "bloctel file: 120,000 rows in" in captured.err


def test_progress_on_a_terminal_and_in_a_log() -> None:
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.text, self.tty = "", tty

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return self.tty

    ticks = iter(float(t) for t in range(100))
    tty = Stream(True)
    progress = Progress("import", 1000, tty, clock=lambda: next(ticks))  # type: ignore[arg-type]
    progress.update(10, 500)
    progress.update(20, 1000)
    progress.done(20)
    assert (
        tty.text.startswith("\rimport: 10 rows   50.0%") and "100.0%" in tty.text and tty.text.endswith("\n")
    )
    ticks = iter(float(t) for t in range(0, 1000, 2))
    log = Stream(False)
    progress = Progress("import", None, log, clock=lambda: next(ticks))  # type: ignore[arg-type]
    progress.update(10)  # first update prints
    progress.update(20)  # 2 s later: too soon
    progress.update(30, force=True)
    assert log.text.count("\n") == 2 and "\r" not in log.text


def test_consent_batches_report_the_line_of_an_error() -> None:
    import io

    good = "".join(f"06{i:08d},2026-11-01\n" for i in range(5))
    assert sum(len(b) for b in consent_batches(io.StringIO(good), batch_size=2)) == 5
    with pytest.raises(ImportLineError) as caught:
        list(consent_batches(io.StringIO(good + "garbage,2026-11-01\n"), batch_size=2))
    assert caught.value.line_no == 6


def test_the_block_memo_agrees_with_parse_destination() -> None:
    """NumberParser reuses one parse per block of 10,000 numbers: for random blocks of every French
    range and every input form, a second number of the block gets what parse_destination says."""
    import random

    from pbxguard.policy.numbers import parse_destination

    rng = random.Random(2026)
    forms = ("0", "+33", "+262", "+590", "+594", "+596")
    disagreements = []
    parser = NumberParser()
    for _ in range(6000):
        key = f"{rng.choice(forms)}{rng.randrange(10000, 100000)}"
        first, second = f"{key}{rng.randrange(10000):04d}", f"{key}{rng.randrange(10000):04d}"
        for number in (first, second):
            expected = parse_destination(number)
            got = parser(number)
            if got != (expected.e164 if expected.valid else None):
                disagreements.append((number, got, expected.e164, expected.valid))
    for number in ("0612345678", "+33612345678", "0262201234", "+262692123456", "0508411234", "070012345678",
                   "0899123456", "06 12 34 56 78", "3615", "+3361234567", "0012"):  # fmt: skip
        expected = parse_destination(number)
        assert parser(number) == (expected.e164 if expected.valid else None), number
    assert disagreements == []
    assert parser("0612345678") == "+33612345678" and parser("0612349999") == "+33612349999"


@pytest.mark.timeout(900)
async def test_import_of_a_million_consents(ledger: Ledger, env: str, tmp_path: Path, capsys: Any) -> None:
    await ledger.add_campaign(Campaign("c1", "ACME"))
    path = tmp_path / "million.csv"
    started = time.perf_counter()
    with path.open("w", encoding="utf-8") as out:
        out.write("number,given_at,source,proof,off_hours\n")
        for i in range(1_000_000):
            prefix = "06" if i % 2 else "+3377"
            number = f"{prefix}{i:08d}" if i % 2 else f"{prefix}{i:07d}"
            out.write(
                f"{number},2026-{1 + i % 12:02d}-{1 + i % 28:02d}T10:{i % 60:02d}:00+01:00,web,form-{i},{i % 7 == 0}\n"
            )
    generated = time.perf_counter() - started
    started = time.perf_counter()
    code = await run_cli("consent", "import", str(path), "--order-giver", "ACME")
    duration = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert await ledger.consents_count("ACME") == 1_000_000
    with capsys.disabled():
        print(
            f"\n1,000,000-row consent import: {duration:.1f} s ({1_000_000 / duration:,.0f} rows/s; "
            f"file {path.stat().st_size / 1e6:.0f} MB generated in {generated:.1f} s)"
        )
