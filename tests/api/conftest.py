"""Fixtures for the operator surface: an API client on a real ledger, with a fixed clock and token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from api_support import Api, make_api

from pbxguard.ledger.store import Ledger


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    made = await make_api(ledger)
    try:
        yield made
    finally:
        await made.client.close()


@pytest.fixture
async def tokenless_api(ledger: Ledger) -> AsyncIterator[Api]:
    made = await make_api(ledger, token="")
    try:
        yield made
    finally:
        await made.client.close()
