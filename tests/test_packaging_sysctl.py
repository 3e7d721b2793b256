"""packaging/60-pbxguard-writeback.conf: a sysctl.d file that the kernel of this host would take,
key by key (a misspelt key is only a warning from `sysctl --system`, and the setting silently lost)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "packaging" / "60-pbxguard-writeback.conf"


def settings(text: str) -> dict[str, str]:
    """sysctl.d's syntax: `key = value`, # and ; comments, dots or slashes between key parts."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number} is not key = value: {raw}"
        out[key.strip()] = value.strip()
    return out


def test_every_key_is_a_kernel_setting_with_an_integer_value() -> None:
    found = settings(CONF.read_text(encoding="utf-8"))
    assert found == {"vm.dirty_background_bytes": "16777216"}
    if not Path("/proc/sys/vm").is_dir():
        pytest.skip("no /proc/sys on this host")
    for key, value in found.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        assert path.is_file(), f"{key}: no such kernel setting"
        assert int(value) >= 0
        assert path.read_text().strip().isdigit(), f"{key}: the kernel does not hold an integer there"


def test_settings_parser_rejects_a_line_without_a_value() -> None:
    with pytest.raises(AssertionError, match="line 2"):
        settings("# comment\nvm.dirty_background_bytes\n")
    assert settings("; x\n vm.a = 1 \n") == {"vm.a": "1"}


def test_readme_points_at_it() -> None:
    readme = (CONF.parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"packaging/{CONF.name}" in readme
