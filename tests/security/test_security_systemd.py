"""packaging/pbxguard.service: the hardening options are there, and systemd itself accepts the unit
(`systemd-analyze verify`, and the offline `security` exposure score, when systemd-analyze exists)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "pbxguard.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's syntax: [Section], Key=Value, a key may repeat, # and ; comments, \\ continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for number, raw in enumerate(logical.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: {raw}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {number}: {raw}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_has_the_hardening_options() -> None:
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    service = {key: values[-1] for key, values in unit["Service"].items()}
    expected = {
        "User": "pbxguard", "Group": "pbxguard", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ReadWritePaths": "/var/lib/pbxguard",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes", "RestrictRealtime": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "UMask": "0077",
        "Restart": "on-failure", "SystemCallArchitectures": "native",
    }  # fmt: skip
    for key, value in expected.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}, expected {value!r}"
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
    assert (
        service["ExecStart"].endswith(" run")
        and "--config /etc/pbxguard/pbxguard.toml" in service["ExecStart"]
    )
    assert "DynamicUser" not in service and "AmbientCapabilities" in service
    assert int(service["LimitNOFILE"]) >= 4096  # the connection limits need file descriptors
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # No secret in the unit: they belong in *_file keys or an EnvironmentFile= readable by root only.
    for key, values in unit["Service"].items():
        for value in values:
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|KEY)=", value), f"{key}={value}"


def _checkable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it is executable)."""
    text = UNIT.read_text(encoding="utf-8")
    true = shutil.which("true") or "/bin/true"
    copy = tmp_path / "pbxguard.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={true}", text, flags=re.M), encoding="utf-8")
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: only the unit's contents were checked")
    result = subprocess.run(
        [tool, "verify", "--man=no", str(_checkable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys and bad values are only warnings


def test_systemd_analyze_security_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(_checkable_copy(tmp_path))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if "offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr.strip()[:200]}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    with capsys.disabled():
        print(f"\nsystemd-analyze security: exposure {match.group(1)} {match.group(2)} (0 best, 10 worst)")
    assert float(match.group(1)) <= 2.0
