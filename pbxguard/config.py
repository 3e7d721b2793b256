"""Configuration: a TOML file into frozen dataclasses, then environment overrides.

An unknown key or a value of the wrong kind is an error that names the key (`gates.ami.listen`).
A secret may be given inline, as `<key>_file = "/path"` (first line of the file), or through the
environment; it is never printed (`repr` masks it).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pbxguard.policy.settings import AuthorizationScope, PolicySettings

DEFAULT_CONFIG_PATH = Path("/etc/pbxguard/pbxguard.toml")


class ConfigError(Exception):
    pass


class Secret(str):
    """A string that never shows itself in logs, reprs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


NO_SECRET = Secret("")


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: Secret = NO_SECRET  # empty: the embedded cluster under `home`
    home: str = ""  # empty: $PBXGUARD_HOME, else a per-user default
    pool_min: int = 2
    pool_max: int = 20
    timeout_ms: int = 1500  # a decision that cannot reach the ledger within this blocks


@dataclass(frozen=True, slots=True)
class AmiUpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = ""
    secret: Secret = NO_SECRET


@dataclass(frozen=True, slots=True)
class AriUpstreamConfig:
    url: str = ""  # e.g. http://127.0.0.1:8088 ; empty: the ARI gate is off
    username: str = ""
    password: Secret = NO_SECRET
    app: str = "pbxguard"
    timeout_ms: int = 2000  # a channel in Stasis is continued or hung up within this
    max_concurrent: int = 512  # channels decided at once; more wait (within timeout_ms)


@dataclass(frozen=True, slots=True)
class AsteriskConfig:
    ami: AmiUpstreamConfig = field(default_factory=AmiUpstreamConfig)
    ari: AriUpstreamConfig = field(default_factory=AriUpstreamConfig)


@dataclass(frozen=True, slots=True)
class AmiUserConfig:
    username: str
    secret: Secret
    campaign: str = ""
    allow_dangerous: bool = False


@dataclass(frozen=True, slots=True)
class AmiGateConfig:
    listen: str = ""  # e.g. 127.0.0.1:5039 ; empty: the AMI gate is off
    users: tuple[AmiUserConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class AgiGateConfig:
    listen: str = ""  # e.g. 127.0.0.1:4573 ; empty: the FastAGI gate is off
    timeout_ms: int = 2000
    max_connections: int = 512  # beyond this a connection is refused (the dialplan then blocks)


@dataclass(frozen=True, slots=True)
class GatesConfig:
    ami: AmiGateConfig = field(default_factory=AmiGateConfig)
    agi: AgiGateConfig = field(default_factory=AgiGateConfig)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:8780"
    token: Secret = NO_SECRET


@dataclass(frozen=True, slots=True)
class JournalConfig:
    key: Secret = NO_SECRET  # set: entries are chained with HMAC-SHA-256 instead of SHA-256
    seal_interval_ms: int = 200


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "json"  # json | text
    level: str = "info"
    numbers: str = "masked"  # masked | full


@dataclass(frozen=True, slots=True)
class Config:
    mode: Mode = Mode.ENFORCE
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    asterisk: AsteriskConfig = field(default_factory=AsteriskConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    policy: PolicySettings = field(default_factory=PolicySettings)
    journal: JournalConfig = field(default_factory=JournalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = ""  # the file this was read from, for messages


_CHOICES: dict[str, tuple[str, ...]] = {
    "log.format": ("json", "text"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.numbers": ("masked", "full"),
}


def _convert(path: str, hint: Any, value: Any, table: dict[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, args[0], value, table)
    if hint is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string")
        return Secret(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise ConfigError(f"{path}: {value!r} is not one of {allowed}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer")
        if value < 0:
            raise ConfigError(f"{path}: must not be negative")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string")
        choices = _CHOICES.get(path)
        if choices and value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
        return value
    if hint is date:
        if isinstance(value, date):
            return value
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a date (YYYY-MM-DD)")
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list")
        return tuple(_convert(f"{path}[{i}]", item, v, table) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table")
        return _build(path, typing.cast(type, hint), value)
    raise ConfigError(f"{path}: unsupported setting type")  # pragma: no cover


def _build(prefix: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    secrets = {n for n in names if hints[n] is Secret}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key.endswith("_file") and key[: -len("_file")] in secrets:
            name = key[: -len("_file")]
            if name in table:
                raise ConfigError(f"{path}: give either {name} or {key}, not both")
            kwargs[name] = Secret(_read_secret_file(path, value))
            continue
        if key not in names:
            raise ConfigError(f"{path}: unknown setting")
        kwargs[key] = _convert(path, hints[key], value, table)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = str(exc).split("argument", 1)[-1].strip(": '")
        raise ConfigError(f"{prefix}: missing setting {missing}") from None


def _read_secret_file(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a file path")
    try:
        return Path(value).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"{path}: cannot read {value}: {exc}") from None


_ENV: dict[str, tuple[str, ...]] = {
    "PBXGUARD_DATABASE_URL": ("database", "url"),
    "PBXGUARD_HOME": ("database", "home"),
    "PBXGUARD_MODE": ("mode",),
    "PBXGUARD_HTTP_LISTEN": ("http", "listen"),
    "PBXGUARD_HTTP_TOKEN": ("http", "token"),
    "PBXGUARD_AMI_SECRET": ("asterisk", "ami", "secret"),
    "PBXGUARD_ARI_PASSWORD": ("asterisk", "ari", "password"),
    "PBXGUARD_JOURNAL_KEY": ("journal", "key"),
}


def _apply_env(table: dict[str, Any], env: typing.Mapping[str, str]) -> None:
    for name, keys in _ENV.items():
        value = env.get(name)
        if value is None or value == "":
            continue
        node = table
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:-1])}: expected a table")
            node = child
        node[keys[-1]] = value


def config_path(explicit: str | None, env: typing.Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("PBXGUARD_CONFIG"):
        return Path(env["PBXGUARD_CONFIG"])
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    return None


def load(explicit: str | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    environ = os.environ if env is None else env
    path = config_path(explicit, environ)
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(table, environ, source=str(path) if path else "")


def parse(table: dict[str, Any], env: typing.Mapping[str, str] | None = None, source: str = "") -> Config:
    table = dict(table)
    _apply_env(table, env or {})
    config: Config = _build("", Config, table)
    config = dataclasses.replace(config, source=source)
    validate(config)
    return config


def parse_listen(path: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(config: Config) -> None:
    for path, value in (
        ("http.listen", config.http.listen),
        ("gates.ami.listen", config.gates.ami.listen),
        ("gates.agi.listen", config.gates.agi.listen),
    ):
        if value:
            parse_listen(path, value)
    host, _ = parse_listen("http.listen", config.http.listen)
    if not config.http.token and not is_loopback(host):
        raise ConfigError("http.token: required when http.listen is not a loopback address")
    if config.gates.ami.listen:
        if not config.gates.ami.users:
            raise ConfigError("gates.ami.users: the AMI gate needs at least one user")
        names = [user.username for user in config.gates.ami.users]
        if len(set(names)) != len(names):
            raise ConfigError("gates.ami.users: duplicate username")
        for index, user in enumerate(config.gates.ami.users):
            if not user.username or not user.secret:
                raise ConfigError(f"gates.ami.users[{index}]: username and secret are required")
        if not config.asterisk.ami.username or not config.asterisk.ami.secret:
            raise ConfigError("asterisk.ami: username and secret are required when the AMI gate is on")
    if config.asterisk.ari.url and (not config.asterisk.ari.username or not config.asterisk.ari.password):
        raise ConfigError("asterisk.ari: username and password are required when url is set")
    policy = config.policy
    if policy.frequency_cap < 1:
        raise ConfigError("policy.frequency_cap: must be at least 1")
    if policy.frequency_window_days < 1 or policy.bloctel_validity_days < 1:
        raise ConfigError("policy: window lengths must be at least 1 day")
    if policy.end_guard_minutes > 60:
        raise ConfigError("policy.end_guard_minutes: at most 60")
    if policy.consent_max_age_days is not None and policy.consent_max_age_days < 1:
        raise ConfigError("policy.consent_max_age_days: must be at least 1")
    if config.database.pool_min < 1 or config.database.pool_max < config.database.pool_min:
        raise ConfigError("database.pool_max: must be at least pool_min (>= 1)")
    if config.database.timeout_ms < 1:
        raise ConfigError("database.timeout_ms: must be at least 1")
    if config.journal.seal_interval_ms < 10:
        raise ConfigError("journal.seal_interval_ms: at least 10")
    if config.gates.agi.timeout_ms < 1:
        raise ConfigError("gates.agi.timeout_ms: must be at least 1")


__all__ = [
    "AuthorizationScope",
    "Config",
    "ConfigError",
    "Mode",
    "Secret",
    "load",
    "parse",
]
