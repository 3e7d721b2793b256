"""The command line, through the installed `pbxguard` entry point, as an operator would use it.

Every test gets a fresh migrated database; the commands run as subprocesses with
PBXGUARD_DATABASE_URL pointing at it, no PBXGUARD_CONFIG, and a private HOME and PBXGUARD_HOME
(so that nothing can fall back to an embedded cluster shared with anything else).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

PBXGUARD = Path(sys.executable).parent / "pbxguard"

CALLER = "0162123456"  # an NPV, authorised for ACME in `story`
NUMBER = "0612345678"
TUESDAY = "2026-12-01T10:30:00+01:00"  # consent regime, inside the morning window
SATURDAY = "2026-12-05T11:00:00+01:00"
BLOCTEL_DAY = "2026-06-02T10:30:00+02:00"  # Bloctel regime (before 2026-08-11), a Tuesday


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


def instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None, text
    return value


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBXGUARD_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env["PBXGUARD_HOME"] = str(tmp_path / "pbxguard-home")
    return env


def make_cli(env: dict[str, str], cwd: Path) -> Cli:
    def run(*args: str, extra_env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [str(PBXGUARD), *args],
            env={**env, **(extra_env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    env = base_env(tmp_path)
    env["PBXGUARD_DATABASE_URL"] = database_url
    return make_cli(env, tmp_path)


@pytest.fixture
def bare_cli(tmp_path: Path) -> Cli:
    """No database at all: for what must fail (or succeed) before any connection is attempted."""
    env = base_env(tmp_path)
    env["PBXGUARD_DATABASE_URL"] = "postgresql://pbxguard@127.0.0.1:1/nothing"
    return make_cli(env, tmp_path)


def ok(result: Result, code: int = 0) -> Result:
    assert result.code == code, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err
    return result


def usage_error(result: Result) -> str:
    """Exit 2, exactly one line on stderr starting `pbxguard: error:`, nothing on stdout."""
    assert result.code == 2, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("pbxguard: error:"), result.err
    assert result.out == ""
    return lines[0]


def fetchval(database_url: str, query: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def check(cli: Cli, number: str, at: str, *extra: str, campaign: str = "c1") -> Result:
    return cli("--json", "check", number, "--campaign", campaign, "--caller-id", CALLER, "--at", at, *extra)


@pytest.fixture
def story(cli: Cli) -> Cli:
    """ACME's automated campaign c1, its authorised NPV, and a consent for NUMBER."""
    out = ok(cli("campaign", "add", "c1", "--order-giver", "ACME", "--siren", "552100554", "--automated")).out
    assert "c1" in out
    out = ok(cli("caller-id", "authorize", CALLER, "--order-giver", "ACME", "--from", "2026-01-01")).out
    assert "+33162123456" in out and "npv" in out
    ok(cli("consent", "add", NUMBER, "--order-giver", "ACME", "--at", "2026-11-01T10:00:00+01:00",
           "--source", "web", "--proof", "form-17"))  # fmt: skip
    return cli


def consent(cli: Cli, number: str) -> None:
    ok(cli("consent", "add", number, "--order-giver", "ACME", "--at", "2026-11-01T10:00:00+01:00"))


# -- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check"],
        ["run"],
        ["db"],
        ["db", "migrate"],
        ["campaign", "add"],
        ["caller-id", "authorize"],
        ["consent", "add"],
        ["consent", "revoke"],
        ["contract", "add"],
        ["refusal", "add"],
        ["opposition", "add"],
        ["consumer", "set"],
        ["bloctel", "import"],
        ["next-window"],
    ],
    ids=lambda a: " ".join(a) or "top",
)
def test_help(bare_cli: Cli, args: list[str]) -> None:
    result = ok(bare_cli(*args, "--help", timeout=30))
    assert result.out.startswith("usage: pbxguard")
    assert result.err == ""


def test_help_mentions_the_commands_and_options(bare_cli: Cli) -> None:
    top = ok(bare_cli("--help", timeout=30)).out
    for command in ("check", "next-window", "campaign", "consent", "bloctel", "run", "db"):
        assert command in top
    check_help = ok(bare_cli("check", "--help", timeout=30)).out
    for option in ("--campaign", "--caller-id", "--at", "--reserve", "--call-key", "--json"):
        assert option in check_help


# -- the user story ----------------------------------------------------------------------------------


def test_campaign_list_text_and_json(story: Cli) -> None:
    text = ok(story("campaign", "list")).out
    line = next(line for line in text.splitlines() if line.startswith("c1"))
    assert "ACME" in line and "b2c_prospecting" in line and "automated" in line
    expected = [
        {"id": "c1", "order_giver": "ACME", "siren": "552100554", "purpose": "b2c_prospecting",
         "sector": "general", "automated": True, "prerecorded": False}
    ]  # fmt: skip
    assert ok(story("--json", "campaign", "list")).json == expected
    assert ok(story("campaign", "list", "--json")).json == expected  # --json after the subcommand too


def test_campaign_list_empty_and_manual_campaign(cli: Cli) -> None:
    assert ok(cli("campaign", "list")).out.strip() == "(no campaigns)"
    assert ok(cli("--json", "campaign", "list")).json == []
    ok(cli("campaign", "add", "m1", "--order-giver", "Beta", "--manual", "--purpose", "survey"))
    [row] = ok(cli("--json", "campaign", "list")).json
    assert row["automated"] is False and row["purpose"] == "survey" and row["siren"] is None


def test_check_allows_a_consented_call_on_a_weekday(story: Cli) -> None:
    text = ok(story("check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", TUESDAY)).out
    assert text.startswith("ALLOW")
    assert "+33612345678" in text and "Europe/Paris" in text

    decision = ok(check(story, NUMBER, TUESDAY)).json
    assert decision["verdict"] == "allow"
    assert decision["reasons"] == []
    assert decision["next_allowed_at"] is None
    assert decision["territories"] == ["FR"]
    assert decision["zones"] == ["Europe/Paris"]
    assert decision["consumer"] == "+33612345678"
    assert decision["campaign"] == "c1" and decision["order_giver"] == "ACME"
    assert decision["counted"] is False  # no --reserve, nothing recorded


def test_check_json_after_the_subcommand(story: Cli) -> None:
    result = ok(story("check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", TUESDAY, "--json"))
    assert result.json["verdict"] == "allow"


def test_weekend_blocks_until_monday_ten(story: Cli) -> None:
    result = ok(check(story, NUMBER, SATURDAY), code=1)
    decision = result.json
    assert decision["verdict"] == "block"
    assert decision["reasons"] == ["WEEKEND"]
    assert decision["rules"] and "D223-9" in decision["rules"][0]
    assert instant(decision["next_allowed_at"]) == instant("2026-12-07T10:00:00+01:00")

    text = ok(story("check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", SATURDAY), 1).out
    assert text.startswith("BLOCK")
    assert "WEEKEND" in text and "next allowed" in text


def test_time_without_offset_is_paris_time(story: Cli) -> None:
    # 09:30 in Paris is before the window; read as UTC it would be 10:30 Paris, allowed.
    decision = ok(check(story, NUMBER, "2026-12-01T09:30:00"), code=1).json
    assert decision["reasons"] == ["OUTSIDE_HOURS"]
    assert instant(decision["next_allowed_at"]) == instant("2026-12-01T10:00:00+01:00")


def test_reserve_with_a_call_key_is_idempotent(story: Cli, database_url: str) -> None:
    first = ok(check(story, NUMBER, TUESDAY, "--reserve", "--call-key", "k1")).json
    assert first["counted"] is True and first["replayed"] is False
    second = ok(check(story, NUMBER, TUESDAY, "--reserve", "--call-key", "k1")).json
    assert second["replayed"] is True
    assert second["decision"] == first["decision"]
    assert second["verdict"] == "allow"
    text = ok(story("check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", TUESDAY,
                    "--reserve", "--call-key", "k1")).out  # fmt: skip
    assert "replayed" in text
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.attempts") == 1


def test_fifth_attempt_hits_the_frequency_cap(story: Cli, database_url: str) -> None:
    for key in ("a1", "a2", "a3", "a4"):
        assert ok(check(story, NUMBER, TUESDAY, "--reserve", "--call-key", key)).json["counted"] is True
    fifth = ok(check(story, NUMBER, TUESDAY, "--reserve", "--call-key", "a5"), code=1).json
    assert fifth["reasons"] == ["FREQUENCY_CAP"]
    assert fifth["counted"] is False
    # The four attempts of 2026-12-01 leave the 30-day window D-29..D on 2026-12-31.
    assert instant(fifth["next_allowed_at"]) == instant("2026-12-31T10:00:00+01:00")
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.attempts") == 4
    # A check without --reserve sees the cap too, and records nothing.
    assert ok(check(story, NUMBER, TUESDAY), code=1).json["reasons"] == ["FREQUENCY_CAP"]
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.attempts") == 4


def test_refusal_imposes_the_quiet_period(story: Cli) -> None:
    ok(story("refusal", "add", NUMBER, "--order-giver", "ACME", "--at", "2026-11-20T10:00:00+01:00"))
    decision = ok(check(story, NUMBER, TUESDAY), code=1).json
    assert decision["reasons"] == ["REFUSAL_QUIET_PERIOD"]
    # 60 full days after 2026-11-20, then the first window: Wednesday 2027-01-20 10:00.
    assert instant(decision["next_allowed_at"]) == instant("2027-01-20T10:00:00+01:00")


def test_opposition_without_order_giver_binds_every_order_giver(story: Cli) -> None:
    ok(story("campaign", "add", "o1", "--order-giver", "Other"))
    ok(story("caller-id", "authorize", CALLER, "--order-giver", "Other", "--from", "2026-01-01"))
    ok(story("consent", "add", NUMBER, "--order-giver", "Other", "--at", "2026-11-01T10:00:00+01:00"))
    assert ok(check(story, NUMBER, TUESDAY, campaign="o1")).json["verdict"] == "allow"

    out = ok(story("opposition", "add", NUMBER, "--at", "2026-11-20T10:00:00+01:00")).out
    assert "every order giver" in out
    for campaign in ("c1", "o1"):
        decision = ok(check(story, NUMBER, TUESDAY, campaign=campaign), code=1).json
        assert decision["reasons"] == ["OPPOSED"]
        assert decision["next_allowed_at"] is None


def test_revoked_consent_means_no_consent(story: Cli) -> None:
    out = ok(
        story("consent", "revoke", NUMBER, "--order-giver", "ACME", "--at", "2026-11-15T10:00:00+01:00")
    ).out
    assert out.startswith("1 ")
    decision = ok(check(story, NUMBER, TUESDAY), code=1).json
    assert decision["reasons"] == ["NO_CONSENT"]
    assert decision["next_allowed_at"] is None


def test_contract_in_progress_allows_without_consent(story: Cli) -> None:
    other = "0612345690"
    assert ok(check(story, other, TUESDAY), code=1).json["reasons"] == ["NO_CONSENT"]
    ok(
        story(
            "contract", "add", other, "--order-giver", "ACME", "--until", "2027-06-30", "--reference", "K-1"
        )
    )
    assert ok(check(story, other, TUESDAY)).json["verdict"] == "allow"
    # After the contract ends, the consent rule is back.
    assert ok(check(story, other, "2027-07-06T10:30:00+02:00"), code=1).json["reasons"] == ["NO_CONSENT"]


def test_consumer_territory_moves_the_hours(story: Cli) -> None:
    ok(story("consumer", "set", NUMBER, "--territory", "RE"))
    # 10:30 in Paris is 13:30 in Réunion: the lunch break there.
    decision = ok(check(story, NUMBER, TUESDAY), code=1).json
    assert decision["reasons"] == ["OUTSIDE_HOURS"]
    assert "RE" in decision["territories"]
    assert "Indian/Reunion" in decision["zones"]
    # 14:00 in Réunion is 11:00 in Paris: both windows open.
    assert instant(decision["next_allowed_at"]) == instant("2026-12-01T14:00:00+04:00")


def test_departement_57_has_st_stephens_day(story: Cli) -> None:
    boxing_day = "2028-12-26T10:30:00+01:00"  # a Tuesday
    assert ok(check(story, NUMBER, boxing_day)).json["verdict"] == "allow"
    ok(story("consumer", "set", NUMBER, "--departement", "57"))
    decision = ok(check(story, NUMBER, boxing_day), code=1).json
    assert decision["reasons"] == ["PUBLIC_HOLIDAY"]
    assert instant(decision["next_allowed_at"]) == instant("2028-12-27T10:00:00+01:00")


def test_shadow_mode_blocks_but_says_the_call_goes_through(story: Cli) -> None:
    result = story("--json", "check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", SATURDAY,
                   extra_env={"PBXGUARD_MODE": "shadow"})  # fmt: skip
    decision = ok(result, code=1).json
    assert decision["verdict"] == "block" and decision["shadow"] is True
    text = story("check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", SATURDAY,
                 extra_env={"PBXGUARD_MODE": "shadow"}).out  # fmt: skip
    assert "shadow mode" in text


# -- Bloctel ---------------------------------------------------------------------------------------


def test_bloctel_import_clears_numbers(story: Cli, tmp_path: Path, database_url: str) -> None:
    cleaned = tmp_path / "cleaned.txt"
    cleaned.write_text("# returned by Bloctel\n0612340001\n\n+33612340002\n", encoding="utf-8")
    assert ok(check(story, "0612340001", BLOCTEL_DAY), code=1).json["reasons"] == ["BLOCTEL_STALE"]

    args = ("bloctel", "import", str(cleaned), "--order-giver", "ACME", "--cleaned-at", "2026-05-20")
    out = ok(story("--json", *args)).json
    assert out["numbers"] == 2 and out["status"] == "cleared"
    for number in ("0612340001", "+33612340002"):
        assert ok(check(story, number, BLOCTEL_DAY)).json["verdict"] == "allow"
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.bloctel_status") == 2
    # 30 days from the cleaning date, the cleaning is stale again.
    stale = ok(check(story, "0612340001", "2026-06-19T10:30:00+02:00"), code=1).json
    assert stale["reasons"] == ["BLOCTEL_STALE"]


def test_bloctel_registered_numbers_are_blocked(story: Cli, tmp_path: Path) -> None:
    registered = tmp_path / "registered.txt"
    registered.write_text("0612340003\n", encoding="utf-8")
    ok(story("bloctel", "import", str(registered), "--order-giver", "ACME", "--cleaned-at", "2026-05-20",
             "--registered"))  # fmt: skip
    decision = ok(check(story, "0612340003", BLOCTEL_DAY), code=1).json
    assert decision["reasons"] == ["BLOCTEL_REGISTERED"]
    assert decision["next_allowed_at"] is None


def test_bloctel_bad_line_imports_nothing(story: Cli, tmp_path: Path, database_url: str) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("0612340004\n0612340005\nnot-a-number\n0612340006\n", encoding="utf-8")
    message = usage_error(
        story("bloctel", "import", str(bad), "--order-giver", "ACME", "--cleaned-at", "2026-05-20")
    )
    assert ":3:" in message and "not-a-number" in message
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.bloctel_status") == 0
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.bloctel_cleanings") == 0


# -- next-window -------------------------------------------------------------------------------------


def test_next_window(story: Cli) -> None:
    result = ok(story("--json", "next-window", NUMBER, "--campaign", "c1", "--after", SATURDAY))
    assert instant(result.json["next_window"]) == instant("2026-12-07T10:00:00+01:00")
    assert result.json["blocking_reasons"] == []
    text = ok(story("next-window", NUMBER, "--campaign", "c1", "--after", SATURDAY)).out
    assert instant(text.split()[0]) == instant("2026-12-07T10:00:00+01:00")
    assert "Europe/Paris" in text
    # Already legal: the instant itself.
    now = ok(story("--json", "next-window", NUMBER, "--campaign", "c1", "--after", TUESDAY)).json
    assert instant(now["next_window"]) == instant(TUESDAY)


def test_next_window_ignores_an_unauthorised_caller_id_unless_given(story: Cli) -> None:
    ok(story("campaign", "add", "o1", "--order-giver", "Other"))
    ok(story("consent", "add", NUMBER, "--order-giver", "Other", "--at", "2026-11-01T10:00:00+01:00"))
    result = ok(story("--json", "next-window", NUMBER, "--campaign", "o1", "--after", SATURDAY)).json
    assert instant(result["next_window"]) == instant("2026-12-07T10:00:00+01:00")
    blocked = story(
        "--json", "next-window", NUMBER, "--campaign", "o1", "--caller-id", CALLER, "--after", SATURDAY
    )
    payload = ok(blocked, code=1).json
    assert payload["next_window"] is None
    assert payload["blocking_reasons"] == ["CALLER_ID_NOT_AUTHORIZED", "WEEKEND"]


def test_next_window_for_an_opposed_consumer(story: Cli) -> None:
    ok(story("opposition", "add", NUMBER, "--order-giver", "ACME", "--at", "2026-11-20T10:00:00+01:00"))
    result = ok(story("next-window", NUMBER, "--campaign", "c1", "--after", TUESDAY), code=1)
    assert "no legal window" in result.out and "OPPOSED" in result.out
    payload = ok(story("--json", "next-window", NUMBER, "--campaign", "c1", "--after", TUESDAY), code=1).json
    assert payload["next_window"] is None
    assert payload["blocking_reasons"] == ["OPPOSED"]


# -- database ----------------------------------------------------------------------------------------


def test_db_migrate_on_a_migrated_database(cli: Cli) -> None:
    assert "nothing (up to date)" in ok(cli("db", "migrate")).out
    assert ok(cli("--json", "db", "migrate")).json == {"applied": []}


def test_db_migrate_on_an_empty_database(cli: Cli, database_url: str) -> None:
    fetchval(database_url, "DROP SCHEMA pbxguard CASCADE")
    out = ok(cli("db", "migrate")).out
    assert out.startswith("applied: ") and "0001" in out
    assert "nothing (up to date)" in ok(cli("db", "migrate")).out


def test_db_url_refuses_when_an_external_database_is_configured(cli: Cli) -> None:
    assert "database.url" in usage_error(cli("db", "url"))


# -- bad input: exit 2, one line, no traceback -------------------------------------------------------

BAD_INPUT = [
    (["check", "abc", "--campaign", "c1", "--caller-id", CALLER], "'abc'"),
    (["check", "0612", "--campaign", "c1", "--caller-id", CALLER], "'0612'"),
    (["consent", "add", "12", "--order-giver", "ACME"], "'12'"),
    (["next-window", "nope", "--campaign", "c1"], "'nope'"),
    (["check", NUMBER, "--campaign", "nope", "--caller-id", CALLER], "unknown campaign 'nope'"),
    (["next-window", NUMBER, "--campaign", "nope"], "unknown campaign 'nope'"),
    (["contract", "add", NUMBER, "--order-giver", "ACME", "--until", "2026-13-01"], "2026-13-01"),
    (["check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--at", "yesterday"], "yesterday"),
    (["caller-id", "authorize", CALLER, "--order-giver", "ACME", "--from", "01/02/2026"], "01/02/2026"),
    (["campaign", "add", "c2", "--order-giver", "ACME", "--siren", "55210055"], "SIREN"),
    (["campaign", "add", "c2", "--order-giver", "ACME", "--siren", "55210055A"], "SIREN"),
    (["campaign", "add", "c2", "--order-giver", "ACME", "--purpose", "spam"], "spam"),
    (["campaign", "add", "c2", "--order-giver", "ACME", "--automated", "--manual"], "--manual"),
    (["consumer", "set", NUMBER, "--territory", "XX"], "'XX'"),
    (["consumer", "set", NUMBER, "--departement", "9"], "'9'"),
    (["consent", "add", NUMBER, "--order-giver", "Nobody"], "unknown order giver 'Nobody'"),
    (["caller-id", "authorize", "0612345678", "--order-giver", "ACME"], "mobile"),
    (
        [
            "caller-id",
            "authorize",
            CALLER,
            "--order-giver",
            "ACME",
            "--from",
            "2026-02-01",
            "--until",
            "2026-01-01",
        ],
        "--until",
    ),
    (
        ["bloctel", "import", "/nonexistent/file.txt", "--order-giver", "ACME", "--cleaned-at", "2026-05-20"],
        "cannot read",
    ),
    (["check", NUMBER, "--campaign", "c1", "--caller-id", CALLER, "--bogus"], "--bogus"),
    (["check", NUMBER, "--campaign", "c1"], "--caller-id"),
    ([], "command"),
    (["campaign"], "action"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize(
    ("args", "fragment"), BAD_INPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_input_is_one_line_and_exit_2(cli: Cli, args: list[str], fragment: str) -> None:
    message = usage_error(cli(*args))
    assert fragment in message


def test_bad_input_changes_nothing(story: Cli, database_url: str) -> None:
    usage_error(story("check", "abc", "--campaign", "c1", "--caller-id", CALLER, "--reserve"))
    usage_error(story("check", NUMBER, "--campaign", "nope", "--caller-id", CALLER, "--reserve"))
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.attempts") == 0
    assert fetchval(database_url, "SELECT count(*) FROM pbxguard.decisions") == 0


# -- configuration errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[http]\nfoo = 1\n", "http.foo"),
        ('[policy]\nfrequency_cap = "four"\n', "policy.frequency_cap"),
        ("[policy]\nregional_holidays = 1\n", "policy.regional_holidays"),
        ('mode = "loud"\n', "enforce, shadow"),
        ('[gates.ami]\nlisten = "127.0.0.1:5039"\n', "gates.ami.users"),
        ('[http]\nlisten = "0.0.0.0:8780"\n', "http.token"),
        ("[http\nlisten = 1\n", "not valid TOML"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "wrong-type-bool",
        "bad-enum",
        "ami-no-users",
        "open-listen",
        "bad-toml",
    ],
)
def test_config_errors(cli: Cli, tmp_path: Path, toml: str, fragment: str) -> None:
    path = tmp_path / "pbxguard.toml"
    path.write_text(toml, encoding="utf-8")
    assert fragment in usage_error(cli("--config", str(path), "campaign", "list"))
    # The same through PBXGUARD_CONFIG, and for the daemon, which must not start.
    assert fragment in usage_error(cli("campaign", "list", extra_env={"PBXGUARD_CONFIG": str(path)}))
    assert fragment in usage_error(cli("--config", str(path), "run"))


def test_missing_config_file(cli: Cli, tmp_path: Path) -> None:
    message = usage_error(cli("--config", str(tmp_path / "absent.toml"), "campaign", "list"))
    assert "absent.toml" in message


def test_config_file_is_used(cli: Cli, tmp_path: Path, database_url: str) -> None:
    path = tmp_path / "pbxguard.toml"
    path.write_text(f'mode = "shadow"\n[database]\nurl = "{database_url}"\n', encoding="utf-8")
    ok(cli("campaign", "add", "c1", "--order-giver", "ACME"))
    result = cli("--json", "--config", str(path), "check", NUMBER, "--campaign", "c1", "--caller-id", CALLER,
                 "--at", SATURDAY, extra_env={"PBXGUARD_DATABASE_URL": ""})  # fmt: skip
    assert ok(result, code=1).json["shadow"] is True


def test_bad_environment_value(cli: Cli) -> None:
    assert "mode" in usage_error(cli("campaign", "list", extra_env={"PBXGUARD_MODE": "loud"}))


@pytest.mark.parametrize(
    "args",
    [
        ["campaign", "list"],
        ["check", NUMBER, "--campaign", "c1", "--caller-id", CALLER],
        ["consent", "add", NUMBER, "--order-giver", "ACME"],
        ["db", "migrate"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_unreachable_database(bare_cli: Cli, args: list[str]) -> None:
    message = usage_error(bare_cli(*args, timeout=60))
    assert "PostgreSQL" in message or "connect" in message.lower()
