"""Who can reach what by default: every listener on loopback, FastAGI (no authentication in the
protocol) refused on a non-loopback address unless explicitly allowed, the HTTP API refused on one
without a token."""

from __future__ import annotations

from typing import Any

import pytest

from pbxguard import config as config_module
from pbxguard.config import ConfigError

pytestmark = pytest.mark.timeout(30)


def error(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_module.parse(table, {})
    return str(info.value)


def test_defaults_listen_on_loopback_only() -> None:
    cfg = config_module.parse({}, {})
    assert cfg.http.listen == "127.0.0.1:8780"
    assert cfg.gates.ami.listen == "" and cfg.gates.agi.listen == ""  # gates are off until configured
    assert cfg.gates.agi.allow_remote is False
    assert cfg.asterisk.ami.host == "127.0.0.1"


@pytest.mark.parametrize("listen", ["0.0.0.0:4573", "[::]:4573", "192.0.2.10:4573", "pbx.example:4573"])
def test_fastagi_is_refused_on_a_non_loopback_address(listen: str) -> None:
    message = error({"gates": {"agi": {"listen": listen}}})
    assert message.startswith("gates.agi.listen: FastAGI has no authentication")
    assert "gates.agi.allow_remote = true" in message


@pytest.mark.parametrize("listen", ["0.0.0.0:4573", "192.0.2.10:4573"])
def test_fastagi_on_a_trusted_network_needs_allow_remote(listen: str) -> None:
    cfg = config_module.parse({"gates": {"agi": {"listen": listen, "allow_remote": True}}}, {})
    assert cfg.gates.agi.listen == listen and cfg.gates.agi.allow_remote is True


@pytest.mark.parametrize("listen", ["127.0.0.1:4573", "127.0.0.2:4573", "[::1]:4573", "localhost:4573"])
def test_fastagi_on_loopback_needs_nothing(listen: str) -> None:
    assert config_module.parse({"gates": {"agi": {"listen": listen}}}, {}).gates.agi.listen == listen


def test_allow_remote_must_be_a_boolean() -> None:
    assert error({"gates": {"agi": {"listen": "0.0.0.0:4573", "allow_remote": "yes"}}}) == (
        "gates.agi.allow_remote: expected true or false"
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:8780", "192.0.2.10:8780"])
def test_http_on_a_non_loopback_address_needs_a_token(listen: str) -> None:
    assert error({"http": {"listen": listen}}) == (
        "http.token: required when http.listen is not a loopback address"
    )
    assert config_module.parse({"http": {"listen": listen, "token": "t" * 32}}, {}).http.listen == listen


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"http": {"max_connections": 0}}, "http.max_connections"),
        ({"http": {"idle_timeout_ms": 0}}, "http.idle_timeout_ms"),
        ({"http": {"body_timeout_ms": 10**12}}, "http.body_timeout_ms"),
    ],
)
def test_http_limits_are_bounded(table: dict[str, Any], key: str) -> None:
    assert error(table).startswith(f"{key}: must be between 1 and")


def test_http_limit_defaults() -> None:
    http = config_module.parse({}, {}).http
    assert (http.max_connections, http.idle_timeout_ms, http.body_timeout_ms) == (512, 30000, 120000)
