"""Shared fixtures: a throwaway PostgreSQL cluster for the whole run, a fresh database per test."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from pbxguard.ledger.migrate import migrate
from pbxguard.ledger.pgcluster import LocalCluster
from pbxguard.ledger.store import Ledger

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="pbxg-pg-", dir="/tmp"))
    root.chmod(0o755)
    cluster = LocalCluster(root / "c", port=5432, durable=False, database="template_pbxguard")
    cluster.start()

    async def prepare() -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(pg_cluster: LocalCluster) -> AsyncIterator[str]:
    """A migrated database of its own, copied from the template in a few milliseconds."""
    name = f"t{next(_counter)}_{id(pg_cluster) % 10000}"
    admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template_pbxguard')
    finally:
        await admin.close()
    yield pg_cluster.dsn(name)
    admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    store = await Ledger.connect(database_url, min_size=1, max_size=10)
    try:
        yield store
    finally:
        await store.close()
