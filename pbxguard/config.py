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
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import date, datetime
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
    # Statements deciding calls at once; decisions arriving meanwhile wait and go together, in one
    # transaction.  Raise it for a PostgreSQL server with many cores of its own.
    decide_concurrency: int = 2
    decide_batch_max: int = 64  # decisions per batch; 1 sends every decision alone


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


# What a dialer needs. Never Command, nor anything that reads or changes Asterisk's configuration.
DEFAULT_AMI_ACTIONS: tuple[str, ...] = (
    "Login", "Logoff", "Challenge", "Ping", "Events", "Filter", "WaitEvent", "Originate", "Hangup",
    "Status", "CoreShowChannels", "CoreStatus", "CoreSettings", "ListCommands", "Getvar", "Setvar",
    "UserEvent", "Redirect", "Atxfer", "BlindTransfer", "Bridge", "PlayDTMF", "AbsoluteTimeout",
    "ExtensionState", "DBGet", "QueueStatus", "QueueSummary", "QueueAdd", "QueueRemove", "QueuePause",
    "MixMonitor", "StopMixMonitor", "MixMonitorMute", "Monitor", "StopMonitor",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AmiUserConfig:
    username: str
    secret: Secret
    campaign: str = ""  # when the Originate names none (PBXGUARD_CAMPAIGN variable, then Account)
    allow_dangerous: bool = False  # may originate System(), SHELL(), remote AGI... (admin tools only)
    allowed_actions: tuple[str, ...] = DEFAULT_AMI_ACTIONS  # case-insensitive; others: Permission denied


@dataclass(frozen=True, slots=True)
class AmiGateConfig:
    listen: str = ""  # e.g. 127.0.0.1:5039 ; empty: the AMI gate is off
    users: tuple[AmiUserConfig, ...] = ()
    # Regexes matched against the whole Channel, with a (?P<number>...) group, tried before the
    # built-in ones (PJSIP/NUM@trunk, PJSIP/trunk/sip:NUM@host, SIP/trunk/NUM, SIP/NUM@peer,
    # IAX2/peer/NUM, DAHDI/g1/NUM, Local/NUM@context).
    dial_patterns: tuple[str, ...] = ()
    builtin_dial_patterns: bool = True
    strip_prefixes: tuple[str, ...] = ()  # removed in order from the number, e.g. ["9"] for a dial-out 9
    international_prefix: str = "00"  # replaced by "+"; "" keeps it
    # Channels that are agents' phones, not consumers (regexes on the whole Channel): an Originate
    # from one is checked on the numbers its Dial/Page application calls, if any.
    internal_channels: tuple[str, ...] = ()
    max_clients: int = 256
    login_timeout_ms: int = 30000
    client_buffer_bytes: int = 1048576  # a client that lets more output pile up is disconnected
    max_pending_actions: int = 1000  # per client, actions sent to Asterisk and not answered yet
    # Failed logins: after this many in the window, from one address or for one username, further
    # logins are refused unchecked, each answered after a delay that doubles up to the cap.
    max_login_failures: int = 5
    login_failure_window_ms: int = 60000
    login_backoff_max_ms: int = 30000
    tls_cert: str = ""  # PEM certificate chain; with tls_key, dialers connect with TLS (both or neither)
    tls_key: str = ""  # PEM private key


@dataclass(frozen=True, slots=True)
class AgiGateConfig:
    listen: str = ""  # e.g. 127.0.0.1:4573 ; empty: the FastAGI gate is off
    timeout_ms: int = 2000
    max_connections: int = 512  # beyond this a connection is refused (the dialplan then blocks)
    # FastAGI has no authentication: a non-loopback listen address is refused unless this is set
    # (a trusted network between Asterisk and pbxguard only).
    allow_remote: bool = False


@dataclass(frozen=True, slots=True)
class GatesConfig:
    ami: AmiGateConfig = field(default_factory=AmiGateConfig)
    agi: AgiGateConfig = field(default_factory=AgiGateConfig)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:8780"
    token: Secret = NO_SECRET
    tls_cert: str = ""  # PEM certificate chain; with tls_key, the API is served over HTTPS (both or neither)
    tls_key: str = ""  # PEM private key
    max_connections: int = 512  # beyond this, a new connection displaces an idle one or gets a 503
    idle_timeout_ms: int = 30000  # no whole request head this long after connecting or a response: closed
    body_timeout_ms: int = 120000  # a request body not received within this: 408


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
        if isinstance(value, date) and not isinstance(value, datetime):  # a date-time is not a date
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
        secret = Path(value).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError, ValueError) as exc:  # ValueError: NUL in the path, not UTF-8
        raise ConfigError(f"{path}: cannot read {value!r}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path}: the first line of {value!r} is empty")
    return secret


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
            child = node.get(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:-1])}: expected a table")
            node[key] = child = dict(child)  # a copy: the caller's tables stay as they were
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
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
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
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_tls(section: str, cert: str, key: str) -> None:
    """Both paths or neither; both readable, and a certificate with its key, at load time."""
    if bool(cert) != bool(key):
        missing, given = ("tls_key", "tls_cert") if cert else ("tls_cert", "tls_key")
        raise ConfigError(f"{section}.{missing}: required with {section}.{given}")
    if not cert:
        return
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(value, "rb") as handle:
                handle.read(1)
        except (OSError, ValueError) as exc:  # ValueError: NUL in the path
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{section}.{name}: cannot read {value!r}: {reason}") from None
    from pbxguard.tls import TlsError, server_context

    try:
        server_context(cert, key)
    except TlsError as exc:
        raise ConfigError(f"{section}.tls_cert: {exc}") from None


_MAX_MS = 86_400_000  # a day: longer timeouts are mistakes (and overflow float seconds when absurd)


def _validate_http(http: HttpConfig) -> None:
    for key in ("max_connections", "idle_timeout_ms", "body_timeout_ms"):
        if not 1 <= getattr(http, key) <= _MAX_MS:
            raise ConfigError(f"http.{key}: must be between 1 and {_MAX_MS}")
    _validate_tls("http", http.tls_cert, http.tls_key)


def _validate_ami_gate(gate: AmiGateConfig) -> None:
    for key, patterns in (
        ("dial_patterns", gate.dial_patterns),
        ("internal_channels", gate.internal_channels),
    ):
        for index, text in enumerate(patterns):
            try:
                compiled = re.compile(text)
            except re.error as exc:
                raise ConfigError(f"gates.ami.{key}[{index}]: not a valid regex: {exc}") from None
            if key == "dial_patterns" and "number" not in compiled.groupindex:
                raise ConfigError(f"gates.ami.dial_patterns[{index}]: needs a (?P<number>...) group")
    if gate.max_clients < 1 or gate.login_timeout_ms < 1 or gate.client_buffer_bytes < 4096:
        raise ConfigError("gates.ami: max_clients, login_timeout_ms >= 1 and client_buffer_bytes >= 4096")
    if gate.max_pending_actions < 1:
        raise ConfigError("gates.ami.max_pending_actions: must be at least 1")
    for key in ("max_login_failures", "login_failure_window_ms", "login_backoff_max_ms"):
        if not 1 <= getattr(gate, key) <= _MAX_MS:
            raise ConfigError(f"gates.ami.{key}: must be between 1 and {_MAX_MS}")
    _validate_tls("gates.ami", gate.tls_cert, gate.tls_key)


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
    _validate_http(config.http)
    agi = config.gates.agi
    agi_host = parse_listen("gates.agi.listen", agi.listen)[0] if agi.listen else "127.0.0.1"
    if not agi.allow_remote and not is_loopback(agi_host):
        raise ConfigError(
            "gates.agi.listen: FastAGI has no authentication: listen on a loopback address, or set "
            "gates.agi.allow_remote = true for a trusted network between Asterisk and pbxguard"
        )
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
        _validate_ami_gate(config.gates.ami)
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
    # Larger values would make every decision fail (dates out of range, integers out of range).
    for key in ("frequency_window_days", "refusal_quiet_days", "bloctel_validity_days", "consent_max_age_days"):
        days = getattr(policy, key)
        if days is not None and days > 36500:
            raise ConfigError(f"policy.{key}: at most 36500 days")
    if policy.frequency_cap > 1000:
        raise ConfigError("policy.frequency_cap: at most 1000")
    if config.database.pool_min < 1 or config.database.pool_max < config.database.pool_min:
        raise ConfigError("database.pool_max: must be at least pool_min (>= 1)")
    if config.database.timeout_ms < 1:
        raise ConfigError("database.timeout_ms: must be at least 1")
    if not 1 <= config.database.decide_concurrency <= config.database.pool_max:
        raise ConfigError("database.decide_concurrency: must be between 1 and pool_max")
    if not 1 <= config.database.decide_batch_max <= 1000:
        raise ConfigError("database.decide_batch_max: must be between 1 and 1000")
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
