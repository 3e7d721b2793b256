"""Configuration: defaults, every section from TOML, environment overrides, secrets, and errors that
name the key.  `config.parse` must never raise anything but ConfigError, whatever the table holds."""

from __future__ import annotations

import dataclasses
import enum
import sys
import tomllib
import types
import typing
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbxguard import config
from pbxguard.config import Config, ConfigError, Mode, Secret
from pbxguard.policy.settings import AuthorizationScope, PolicySettings

FULL_TOML = """
mode = "shadow"

[database]
url = "postgresql://pbx:db-password-0xA1@db.example:5432/pbxguard"
home = "/srv/pbxguard"
pool_min = 3
pool_max = 30
timeout_ms = 900

[asterisk.ami]
host = "10.0.0.5"
port = 5039
username = "pbxguard"
secret = "ami-upstream-secret-0xB2"

[asterisk.ari]
url = "http://127.0.0.1:8088"
username = "ari-user"
password = "ari-password-secret-0xC3"
app = "guard"

[gates.ami]
listen = "127.0.0.1:5040"

[[gates.ami.users]]
username = "dialer"
secret = "dialer-secret-0xD4"
campaign = "c1"

[[gates.ami.users]]
username = "admin"
secret = "admin-secret-0xE5"
allow_dangerous = true

[gates.agi]
listen = "127.0.0.1:4573"
timeout_ms = 1500

[http]
listen = "0.0.0.0:8780"
token = "http-token-secret-0xF6"

[policy]
frequency_cap = 3
end_guard_minutes = 10
consent_max_age_days = 1095
regional_holidays = false
caller_id_authorization = "npv"
consent_regime_from = 2026-09-01

[log]
format = "text"
level = "debug"
numbers = "full"
"""

SECRETS = (
    "db-password-0xA1",
    "ami-upstream-secret-0xB2",
    "ari-password-secret-0xC3",
    "dialer-secret-0xD4",
    "admin-secret-0xE5",
    "http-token-secret-0xF6",
)


def write(tmp_path: Path, text: str, name: str = "pbxguard.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(table: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(table, env or {})
    return str(info.value)


AMI_ON: dict[str, Any] = {
    "asterisk": {"ami": {"username": "u", "secret": "s"}},
    "gates": {"ami": {"listen": "127.0.0.1:5039", "users": [{"username": "d", "secret": "x"}]}},
}


# -- defaults ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = config.parse({}, {})
    assert cfg.mode is Mode.ENFORCE
    assert cfg.http.listen == "127.0.0.1:8780"
    assert cfg.http.token == ""
    assert cfg.database.url == "" and cfg.database.home == ""
    assert (cfg.database.pool_min, cfg.database.pool_max, cfg.database.timeout_ms) == (2, 20, 1500)
    assert (cfg.asterisk.ami.host, cfg.asterisk.ami.port) == ("127.0.0.1", 5038)
    assert cfg.asterisk.ari.url == "" and cfg.asterisk.ari.app == "pbxguard"
    assert cfg.gates.ami.listen == "" and cfg.gates.ami.users == ()
    assert cfg.gates.agi.listen == ""
    assert (cfg.log.format, cfg.log.level, cfg.log.numbers) == ("json", "info", "masked")
    assert cfg.policy == PolicySettings()
    policy = cfg.policy
    assert policy.frequency_cap == 4
    assert policy.frequency_window_days == 30
    assert policy.refusal_quiet_days == 60
    assert policy.bloctel_validity_days == 30
    assert policy.consent_regime_from == date(2026, 8, 11)
    assert policy.consent_max_age_days is None
    assert policy.end_guard_minutes == 0
    assert policy.regional_holidays is True
    assert policy.caller_id_authorization is AuthorizationScope.ALL
    assert cfg.source == ""


def test_load_without_any_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert config.load(None, {}) == config.parse({}, {})


def test_default_path_is_used_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, 'mode = "shadow"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    cfg = config.load(None, {})
    assert cfg.mode is Mode.SHADOW and cfg.source == str(path)


def test_explicit_path_wins_over_environment(tmp_path: Path) -> None:
    explicit = write(tmp_path, 'mode = "shadow"\n', "a.toml")
    other = write(tmp_path, "[http]\nfoo = 1\n", "b.toml")
    assert config.load(str(explicit), {"PBXGUARD_CONFIG": str(other)}).mode is Mode.SHADOW
    with pytest.raises(ConfigError, match=r"http\.foo"):
        config.load(None, {"PBXGUARD_CONFIG": str(other)})


# -- every section -----------------------------------------------------------------------------------


def test_full_example(tmp_path: Path) -> None:
    cfg = config.load(str(write(tmp_path, FULL_TOML)), {})
    assert cfg.source.endswith("pbxguard.toml")
    assert cfg.mode is Mode.SHADOW
    assert cfg.database.url == "postgresql://pbx:db-password-0xA1@db.example:5432/pbxguard"
    assert isinstance(cfg.database.url, Secret)
    assert (cfg.database.home, cfg.database.pool_min, cfg.database.pool_max) == ("/srv/pbxguard", 3, 30)
    assert cfg.database.timeout_ms == 900
    ami = cfg.asterisk.ami
    assert (ami.host, ami.port, ami.username, ami.secret) == (
        "10.0.0.5",
        5039,
        "pbxguard",
        "ami-upstream-secret-0xB2",
    )
    ari = cfg.asterisk.ari
    assert (ari.url, ari.username, ari.app) == ("http://127.0.0.1:8088", "ari-user", "guard")
    assert ari.password == "ari-password-secret-0xC3"
    assert cfg.gates.ami.listen == "127.0.0.1:5040"
    dialer, admin = cfg.gates.ami.users
    assert (dialer.username, dialer.secret, dialer.campaign, dialer.allow_dangerous) == (
        "dialer", "dialer-secret-0xD4", "c1", False,
    )  # fmt: skip
    assert (admin.username, admin.secret, admin.campaign, admin.allow_dangerous) == (
        "admin", "admin-secret-0xE5", "", True,
    )  # fmt: skip
    assert (cfg.gates.agi.listen, cfg.gates.agi.timeout_ms) == ("127.0.0.1:4573", 1500)
    assert (cfg.http.listen, cfg.http.token) == ("0.0.0.0:8780", "http-token-secret-0xF6")
    policy = cfg.policy
    assert policy.frequency_cap == 3
    assert policy.end_guard_minutes == 10
    assert policy.consent_max_age_days == 1095
    assert policy.regional_holidays is False
    assert policy.caller_id_authorization is AuthorizationScope.NPV
    assert policy.consent_regime_from == date(2026, 9, 1)
    assert type(policy.consent_regime_from) is date
    assert policy.frequency_window_days == 30  # not given: the default stays
    assert (cfg.log.format, cfg.log.level, cfg.log.numbers) == ("text", "debug", "full")
    # The parsed result is frozen.
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.http.listen = "127.0.0.1:1"  # type: ignore[misc]


def test_parse_and_load_agree(tmp_path: Path) -> None:
    loaded = config.load(str(write(tmp_path, FULL_TOML)), {})
    parsed = config.parse(tomllib.loads(FULL_TOML), {}, source=loaded.source)
    assert loaded == parsed


@pytest.mark.parametrize("value", ['"2026-09-01"', "2026-09-01"])
def test_dates_as_strings_or_toml_dates(value: str) -> None:
    cfg = config.parse(tomllib.loads(f"[policy]\nconsent_regime_from = {value}\n"), {})
    assert cfg.policy.consent_regime_from == date(2026, 9, 1)


@pytest.mark.parametrize(
    "value", ["2026-09-01T00:00:00", "2026-09-01T00:00:00Z", "10:00:00", '"2026-13-01"', '"soon"', "1"]
)
def test_a_date_setting_takes_a_date_only(value: str) -> None:
    # A TOML date-time would later be compared with dates and crash a decision: refuse it here.
    message = error(tomllib.loads(f"[policy]\nconsent_regime_from = {value}\n"))
    assert message.startswith("policy.consent_regime_from:")


# -- environment -------------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    env = {
        "PBXGUARD_DATABASE_URL": "postgresql://other@/x?host=/tmp",
        "PBXGUARD_MODE": "enforce",
        "PBXGUARD_HTTP_TOKEN": "env-token",
        "PBXGUARD_HTTP_LISTEN": "127.0.0.1:9999",
        "PBXGUARD_AMI_SECRET": "env-ami",
        "PBXGUARD_ARI_PASSWORD": "env-ari",
        "PBXGUARD_HOME": "/tmp/pbx-home",
    }
    cfg = config.load(str(path), env)
    assert cfg.database.url == "postgresql://other@/x?host=/tmp"
    assert cfg.mode is Mode.ENFORCE
    assert cfg.http.token == "env-token" and isinstance(cfg.http.token, Secret)
    assert cfg.http.listen == "127.0.0.1:9999"
    assert cfg.asterisk.ami.secret == "env-ami"
    assert cfg.asterisk.ari.password == "env-ari"
    assert cfg.database.home == "/tmp/pbx-home"
    assert cfg.asterisk.ami.username == "pbxguard"  # the rest of the file stays


def test_environment_without_file() -> None:
    cfg = config.parse({}, {"PBXGUARD_MODE": "shadow", "PBXGUARD_DATABASE_URL": "postgresql://a@/b"})
    assert cfg.mode is Mode.SHADOW
    assert cfg.database.url == "postgresql://a@/b"


def test_empty_environment_values_are_ignored() -> None:
    cfg = config.parse(
        {"mode": "shadow", "http": {"token": "t"}}, {"PBXGUARD_MODE": "", "PBXGUARD_HTTP_TOKEN": ""}
    )
    assert cfg.mode is Mode.SHADOW and cfg.http.token == "t"


def test_bad_environment_value_names_the_key() -> None:
    message = error({}, {"PBXGUARD_MODE": "loud"})
    assert message.startswith("mode:") and "enforce" in message and "shadow" in message


def test_environment_token_opens_a_public_listen() -> None:
    table = {"http": {"listen": "0.0.0.0:8780"}}
    assert "http.token" in error(table)
    assert config.parse(table, {"PBXGUARD_HTTP_TOKEN": "t"}).http.token == "t"


def test_parse_does_not_change_its_input() -> None:
    table: dict[str, Any] = {"database": {"url": "postgresql://file@/x"}, "http": {"listen": "127.0.0.1:1"}}
    before = repr(table)
    cfg = config.parse(table, {"PBXGUARD_DATABASE_URL": "postgresql://env@/y", "PBXGUARD_HTTP_TOKEN": "t"})
    assert cfg.database.url == "postgresql://env@/y"
    assert repr(table) == before


# -- secrets from files ------------------------------------------------------------------------------


def test_secret_files_give_their_first_line(tmp_path: Path) -> None:
    token = write(tmp_path, "  file-token  \nsecond line\n", "token")
    ami = write(tmp_path, "file-ami\n", "ami")
    ari = write(tmp_path, "file-ari", "ari")  # no final newline
    user = write(tmp_path, "file-user\n\n", "user")
    url = write(tmp_path, "postgresql://u:pw@/db\n", "url")
    table = {
        "database": {"url_file": str(url)},
        "http": {"listen": "0.0.0.0:8780", "token_file": str(token)},
        "asterisk": {"ami": {"username": "u", "secret_file": str(ami)},
                     "ari": {"url": "http://127.0.0.1:8088", "username": "a", "password_file": str(ari)}},
        "gates": {"ami": {"listen": "127.0.0.1:5039", "users": [{"username": "d", "secret_file": str(user)}]}},
    }  # fmt: skip
    cfg = config.parse(table, {})
    assert cfg.http.token == "file-token"
    assert cfg.asterisk.ami.secret == "file-ami"
    assert cfg.asterisk.ari.password == "file-ari"
    assert cfg.gates.ami.users[0].secret == "file-user"
    assert cfg.database.url == "postgresql://u:pw@/db"
    for value in (cfg.http.token, cfg.asterisk.ami.secret, cfg.asterisk.ari.password, cfg.database.url):
        assert isinstance(value, Secret)
    for secret in ("file-token", "file-ami", "file-ari", "file-user", "pw@"):
        assert secret not in repr(cfg)


def test_secret_and_secret_file_together(tmp_path: Path) -> None:
    token = write(tmp_path, "x\n", "token")
    message = error({"http": {"token": "t", "token_file": str(token)}})
    assert message.startswith("http.token_file:")


@pytest.mark.parametrize("content", [None, "", "\n"], ids=["missing", "empty", "blank"])
def test_unreadable_secret_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    message = error({"http": {"token_file": str(path)}})
    assert message.startswith("http.token_file:")


@pytest.mark.parametrize("value", ["/tmp/a\x00b", 42, ["a"]], ids=["nul", "int", "list"])
def test_bad_secret_file_value(value: object) -> None:
    assert error({"http": {"token_file": value}}).startswith("http.token_file:")


def test_secret_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\xff\xfe\x00bad\n")
    assert error({"http": {"token_file": str(path)}}).startswith("http.token_file:")


def test_file_suffix_only_for_secrets() -> None:
    assert error({"http": {"listen_file": "/etc/hostname"}}).startswith("http.listen_file:")


# -- errors name the key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"foo": 1}, "foo"),
        ({"source": "x"}, "source"),
        ({"database": {"foo": 1}}, "database.foo"),
        ({"asterisk": {"foo": 1}}, "asterisk.foo"),
        ({"asterisk": {"ami": {"foo": 1}}}, "asterisk.ami.foo"),
        ({"asterisk": {"ari": {"foo": 1}}}, "asterisk.ari.foo"),
        ({"gates": {"foo": 1}}, "gates.foo"),
        ({"gates": {"ami": {"foo": 1}}}, "gates.ami.foo"),
        (
            {"gates": {"ami": {"users": [{"username": "a", "secret": "b", "foo": 1}]}}},
            "gates.ami.users[0].foo",
        ),
        ({"gates": {"agi": {"foo": 1}}}, "gates.agi.foo"),
        ({"http": {"foo": 1}}, "http.foo"),
        ({"policy": {"foo": 1}}, "policy.foo"),
        ({"log": {"foo": 1}}, "log.foo"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unknown_keys_name_the_full_key(table: dict[str, Any], key: str) -> None:
    message = error(table)
    assert message.startswith(f"{key}:")
    assert "unknown" in message


def test_unknown_key_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^http\.foo: unknown setting$"):
        config.load(str(write(tmp_path, "[http]\nfoo = 1\n")), {})


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"mode": 1}, "mode"),
        ({"database": "postgresql://x"}, "database"),
        ({"database": {"url": 5}}, "database.url"),
        ({"database": {"pool_max": "20"}}, "database.pool_max"),
        ({"asterisk": {"ami": {"port": "5038"}}}, "asterisk.ami.port"),
        ({"asterisk": {"ami": {"port": 50.38}}}, "asterisk.ami.port"),
        ({"asterisk": {"ari": {"password": ["x"]}}}, "asterisk.ari.password"),
        ({"gates": {"ami": {"users": {"username": "a"}}}}, "gates.ami.users"),
        ({"gates": {"ami": {"users": ["a"]}}}, "gates.ami.users[0]"),
        (
            {"gates": {"ami": {"users": [{"username": "a", "secret": "b", "allow_dangerous": "yes"}]}}},
            "gates.ami.users[0].allow_dangerous",
        ),
        ({"gates": {"ami": {"users": [{"username": "a"}]}}}, "gates.ami.users[0]"),
        ({"gates": {"agi": {"timeout_ms": True}}}, "gates.agi.timeout_ms"),
        ({"http": {"listen": 8780}}, "http.listen"),
        ({"policy": {"frequency_cap": "4"}}, "policy.frequency_cap"),
        ({"policy": {"frequency_cap": 4.0}}, "policy.frequency_cap"),
        ({"policy": {"frequency_cap": -1}}, "policy.frequency_cap"),
        ({"policy": {"regional_holidays": 1}}, "policy.regional_holidays"),
        ({"policy": {"consent_max_age_days": "never"}}, "policy.consent_max_age_days"),
        ({"policy": {"consent_regime_from": 20260811}}, "policy.consent_regime_from"),
        ({"log": {"format": None}}, "log.format"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_wrong_types_name_the_key(table: dict[str, Any], key: str) -> None:
    assert error(table).startswith(f"{key}:")


@pytest.mark.parametrize(
    ("table", "key", "allowed"),
    [
        ({"mode": "loud"}, "mode", ("enforce", "shadow")),
        ({"log": {"format": "xml"}}, "log.format", ("json", "text")),
        ({"log": {"level": "verbose"}}, "log.level", ("debug", "info", "warning", "error")),
        ({"log": {"numbers": "partial"}}, "log.numbers", ("masked", "full")),
        ({"policy": {"caller_id_authorization": "some"}}, "policy.caller_id_authorization", ("all", "npv")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_choices_list_the_allowed_values(
    table: dict[str, Any], key: str, allowed: tuple[str, ...]
) -> None:
    message = error(table)
    assert message.startswith(f"{key}:")
    for value in allowed:
        assert value in message


# -- cross-field validation --------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8780", "localhost:8780", "[::1]:8780", "127.1.2.3:80"])
def test_loopback_listen_needs_no_token(listen: str) -> None:
    assert config.parse({"http": {"listen": listen}}, {}).http.listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:8780", "[::]:8780", "10.1.2.3:8780", "pbx.example:8780"])
def test_public_listen_needs_a_token(listen: str) -> None:
    assert error({"http": {"listen": listen}}).startswith("http.token:")
    assert config.parse({"http": {"listen": listen, "token": "t"}}, {}).http.token == "t"


@pytest.mark.parametrize(
    "listen",
    ["8780", ":8780", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http", "127.0.0.1:²", ""],
)
def test_bad_listen_values(listen: str) -> None:
    assert error({"http": {"listen": listen}}).startswith("http.listen:")


@pytest.mark.parametrize("section", ["ami", "agi"])
def test_bad_gate_listen(section: str) -> None:
    table: dict[str, Any] = {"gates": {section: {"listen": "nowhere"}}}
    assert error(table).startswith(f"gates.{section}.listen:")


def test_ami_gate_needs_users() -> None:
    message = error({"asterisk": AMI_ON["asterisk"], "gates": {"ami": {"listen": "127.0.0.1:5039"}}})
    assert message.startswith("gates.ami.users:")


def test_ami_gate_with_users_parses() -> None:
    cfg = config.parse(AMI_ON, {})
    assert cfg.gates.ami.users[0].username == "d"


def test_ami_gate_needs_unique_users_and_upstream_credentials() -> None:
    twice = {"listen": "127.0.0.1:5039", "users": [{"username": "d", "secret": "x"}] * 2}
    assert "duplicate" in error({"asterisk": AMI_ON["asterisk"], "gates": {"ami": twice}})
    assert error({"gates": AMI_ON["gates"]}).startswith("asterisk.ami:")
    no_secret = {"listen": "127.0.0.1:5039", "users": [{"username": "d", "secret": ""}]}
    assert error({"asterisk": AMI_ON["asterisk"], "gates": {"ami": no_secret}}).startswith(
        "gates.ami.users[0]"
    )


def test_ari_url_needs_credentials() -> None:
    assert error({"asterisk": {"ari": {"url": "http://127.0.0.1:8088"}}}).startswith("asterisk.ari:")


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"frequency_cap": 0}, "policy.frequency_cap"),
        ({"frequency_window_days": 0}, "policy"),
        ({"bloctel_validity_days": 0}, "policy"),
        ({"end_guard_minutes": 61}, "policy.end_guard_minutes"),
        ({"consent_max_age_days": 0}, "policy.consent_max_age_days"),
    ],
)
def test_policy_bounds(policy: dict[str, Any], key: str) -> None:
    assert error({"policy": policy}).startswith(key)


@pytest.mark.parametrize(
    "policy",
    [
        {"frequency_window_days": 10**9},
        {"refusal_quiet_days": 10**9},
        {"bloctel_validity_days": 10**9},
        {"consent_max_age_days": 10**9},
        {"frequency_cap": 2**40},
    ],
    ids=lambda p: next(iter(p)),
)
def test_absurdly_large_policy_values_are_refused(policy: dict[str, Any]) -> None:
    # Accepted, they would make every decision fail (date overflow, integer out of range).
    assert error({"policy": policy}).startswith(f"policy.{next(iter(policy))}")


def test_database_pool_and_timeouts() -> None:
    assert error({"database": {"pool_min": 0}}).startswith("database.pool")
    assert error({"database": {"pool_min": 5, "pool_max": 4}}).startswith("database.pool_max")
    assert error({"database": {"timeout_ms": 0}}).startswith("database.timeout_ms")
    assert error({"database": {"decide_concurrency": 0}}).startswith("database.decide_concurrency")
    assert error({"database": {"decide_concurrency": 21}}).startswith("database.decide_concurrency")
    assert error({"database": {"decide_batch_max": 0}}).startswith("database.decide_batch_max")
    assert error({"gates": {"agi": {"timeout_ms": 0}}}).startswith("gates.agi.timeout_ms")


# -- loading files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load(str(tmp_path / "absent.toml"), {})


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(write(tmp_path, "[http\n")), {})


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pbxguard.toml"
    path.write_bytes(b'mode = "\xff"\n')
    with pytest.raises(ConfigError, match=r"pbxguard\.toml: not UTF-8"):
        config.load(str(path), {})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load(str(tmp_path), {})


# -- secrets never show ------------------------------------------------------------------------------


def test_repr_never_shows_a_secret(tmp_path: Path) -> None:
    cfg = config.load(str(write(tmp_path, FULL_TOML)), {})
    for text in (
        repr(cfg),
        str(cfg),
        f"{cfg!r}",
        repr(cfg.gates.ami.users),
        repr(cfg.asterisk),
        repr(cfg.http),
    ):
        for secret in SECRETS:
            assert secret not in text
    assert "***" in repr(cfg.http.token)
    assert repr(Secret("")) == "Secret('')"
    # The values themselves are intact for the code that needs them.
    assert cfg.http.token == "http-token-secret-0xF6"


def test_repr_hides_secrets_given_through_the_environment() -> None:
    env = {"PBXGUARD_HTTP_TOKEN": "env-token-0x11", "PBXGUARD_AMI_SECRET": "env-ami-0x22",
           "PBXGUARD_ARI_PASSWORD": "env-ari-0x33", "PBXGUARD_DATABASE_URL": "postgresql://u:env-pw-0x44@h/d"}  # fmt: skip
    text = repr(config.parse({}, env))
    for secret in ("env-token-0x11", "env-ami-0x22", "env-ari-0x33", "env-pw-0x44"):
        assert secret not in text


def test_config_errors_do_not_echo_secret_values() -> None:
    # A secret of the wrong type is reported by key, not by value.
    message = error({"http": {"token": ["http-token-secret-0xF6"]}})
    assert "0xF6" not in message


# -- property: parse raises ConfigError and nothing else ---------------------------------------------

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.times(),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
LISTEN = st.builds(
    lambda host, port: f"{host}:{port}",
    st.sampled_from(["127.0.0.1", "0.0.0.0", "[::1]", "::1", "localhost", "", "pbx.example", "[::]"])
    | st.text(max_size=8),
    st.integers(min_value=0, max_value=70000).map(str)
    | st.sampled_from(["", "-1", "http", "²", "٣", "8780 ", "0x50"])
    | st.text(max_size=5),
) | st.text(max_size=12)
# A readable file, missing ones, a directory, an empty file, a NUL in the path, a binary file.
SECRET_PATHS = st.sampled_from(
    [__file__, "/nonexistent/secret", "/", "/dev/null", "", "/tmp/a\x00b", sys.executable]
) | st.text(max_size=10)
ENV = st.fixed_dictionaries(
    {},
    optional={
        "PBXGUARD_DATABASE_URL": st.text(max_size=20),
        "PBXGUARD_HOME": st.text(max_size=10),
        "PBXGUARD_MODE": st.sampled_from(["enforce", "shadow", "", "loud"]),
        "PBXGUARD_HTTP_LISTEN": LISTEN,
        "PBXGUARD_HTTP_TOKEN": st.text(max_size=8),
        "PBXGUARD_AMI_SECRET": st.text(max_size=8),
        "PBXGUARD_ARI_PASSWORD": st.text(max_size=8),
    },
)


def value_for(name: str, hint: Any) -> st.SearchStrategy[Any]:
    """Values of roughly the right kind for a setting, now and then anything TOML can hold."""
    good = right_kind(name, hint)
    if dataclasses.is_dataclass(hint):
        return good
    # Mostly the right kind, so that the checks after the first key get exercised too.
    return st.one_of(good, good, good, good, good, TOML_VALUES)


def right_kind(name: str, hint: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return right_kind(name, inner)
    if dataclasses.is_dataclass(hint):
        return table_for(typing.cast(type, hint))
    if origin is tuple:
        return st.lists(value_for(name, typing.get_args(hint)[0]), max_size=3)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from([m.value for m in hint])
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(min_value=-3, max_value=100) | st.integers()
    if hint is date:
        return (
            st.dates() | st.dates().map(date.isoformat) | st.datetimes() | st.times() | st.text(max_size=10)
        )
    if name.endswith("listen"):
        return LISTEN
    if name == "format":
        return st.sampled_from(["json", "text", "xml"])
    if name in ("level", "numbers"):
        return st.sampled_from(["debug", "info", "masked", "full", "loud"])
    return st.text(max_size=12)


def table_for(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for item in dataclasses.fields(cls):
        if item.name == "source":
            continue
        optional[item.name] = value_for(item.name, hints[item.name])
        if hints[item.name] is Secret:
            optional[item.name + "_file"] = st.one_of(SECRET_PATHS, SECRET_PATHS, TOML_SCALARS)
    known = st.fixed_dictionaries({}, optional=optional)
    stray = st.dictionaries(st.text(max_size=10), TOML_VALUES, max_size=1)
    return st.one_of(known, known, known, st.tuples(known, stray).map(lambda kv: {**kv[0], **kv[1]}))


def parse_or_config_error(table: dict[str, Any], env: dict[str, str]) -> Config | None:
    try:
        cfg = config.parse(table, env)
    except ConfigError as exc:
        message = str(exc)
        if not message:
            raise AssertionError("a ConfigError without a message") from None
        return None
    assert isinstance(cfg, Config)
    # Whatever got through is usable: dates are dates, listen addresses parse, secrets stay secret.
    assert type(cfg.policy.consent_regime_from) is date
    config.parse_listen("http.listen", cfg.http.listen)
    for secret in (cfg.http.token, cfg.asterisk.ami.secret, cfg.asterisk.ari.password, cfg.database.url):
        assert isinstance(secret, Secret)
    return cfg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=table_for(Config), env=ENV)
def test_parse_raises_only_config_error_on_schema_shaped_tables(
    table: dict[str, Any], env: dict[str, str]
) -> None:
    parse_or_config_error(table, env)


SECTIONS = {
    item.name: typing.get_type_hints(Config)[item.name]
    for item in dataclasses.fields(Config)
    if dataclasses.is_dataclass(typing.get_type_hints(Config)[item.name])
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_raises_only_config_error_section_by_section(section: str, data: st.DataObject) -> None:
    """One section at a time, the others left at their defaults, so that its checks all get reached."""
    table = data.draw(table_for(SECTIONS[section]), label=section)
    if section == "gates" and data.draw(st.booleans(), label="upstream AMI credentials"):
        parse_or_config_error({section: table, "asterisk": {"ami": {"username": "u", "secret": "s"}}}, {})
    else:
        parse_or_config_error({section: table}, {})


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every setting's dotted path and type hint (and `<secret>_file` for each secret)."""
    hints = typing.get_type_hints(cls)
    found: list[tuple[tuple[str, ...], Any]] = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if item.name == "source":
            continue
        if dataclasses.is_dataclass(hint):
            found += leaves(typing.cast(type, hint), (*prefix, item.name))
            continue
        found.append(((*prefix, item.name), hint))
        if hint is Secret:
            found.append(((*prefix, item.name + "_file"), None))
    return found


def merged(base: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    table = dict(base)
    head, *rest = path
    table[head] = merged(table.get(head, {}), tuple(rest), value) if rest else value
    return table


# With the AMI gate on, its users and the upstream credentials get validated as well.
CONTEXTS: dict[str, dict[str, Any]] = {"alone": {}, "ami-gate-on": AMI_ON}


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize(
    ("path", "hint"), leaves(Config), ids=lambda v: ".".join(v) if isinstance(v, tuple) else ""
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_raises_only_config_error_setting_by_setting(
    path: tuple[str, ...], hint: Any, context: str, data: st.DataObject
) -> None:
    """One setting at a time on top of a valid configuration, so that every converter and check is
    reached with odd values: NUL bytes in paths, non-ASCII digits, date-times for dates, huge integers."""
    strategy = st.one_of(SECRET_PATHS, TOML_SCALARS) if hint is None else value_for(path[-1], hint)
    value = data.draw(strategy, label=".".join(path))
    parse_or_config_error(merged(CONTEXTS[context], path, value), {})


@settings(max_examples=300, deadline=None)
@given(table=st.dictionaries(st.text(max_size=12), TOML_VALUES, max_size=4), env=ENV)
def test_parse_raises_only_config_error_on_arbitrary_tables(
    table: dict[str, Any], env: dict[str, str]
) -> None:
    parse_or_config_error(table, env)


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(["database", "asterisk", "gates", "http", "policy", "log"]),
    inner=st.dictionaries(st.text(max_size=12), TOML_VALUES, max_size=3),
)
def test_parse_raises_only_config_error_inside_sections(section: str, inner: dict[str, Any]) -> None:
    parse_or_config_error({section: inner}, {})


@pytest.mark.parametrize("value", [time(10, 0), datetime(2026, 1, 1), float("nan"), [], {}])
def test_odd_toml_values_for_an_integer(value: object) -> None:
    assert error({"policy": {"frequency_cap": value}}).startswith("policy.frequency_cap:")
