"""Fixtures of the security tests: a throwaway certificate authority, the gate tests' fake Asterisk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The gate tests' fake Asterisk (tests/gates/fake_asterisk_ami.py), the API tests' client (tests/api).
for _folder in ("gates", "api"):
    _path = str(Path(__file__).resolve().parents[1] / _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from security_support import TlsFiles, make_tls_files  # noqa: E402


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it, made at run time."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))
