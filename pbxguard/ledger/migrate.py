"""Numbered SQL migrations with checksums, applied under an advisory lock.

Files are `NNNN_name.sql` in this package's `migrations/` folder, applied in order, each in its own
transaction.  An applied file whose content has changed is refused: a ledger that serves as legal
proof must not have its history rewritten silently.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant shared by every pbxguard process: two daemons starting at once migrate one at a time.
_LOCK_KEY = 0x70627867


class MigrationError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled() -> list[Migration]:
    folder = resources.files("pbxguard.ledger") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Applies what is missing; returns the names applied."""
    todo = bundled() if migrations is None else migrations
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS pbxguard;
            CREATE TABLE IF NOT EXISTS pbxguard.schema_migrations (
                version     integer PRIMARY KEY,
                name        text NOT NULL,
                checksum    text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM pbxguard.schema_migrations")
        applied = {row["version"]: row for row in rows}
        known = {m.version for m in todo}
        for version, row in applied.items():
            if version not in known:
                raise MigrationError(
                    f"the database has migration {row['name']} that this pbxguard does not know: "
                    "it was migrated by a newer version"
                )
        for migration in todo:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was edited after it was applied "
                        f"(checksum {row['checksum'][:12]} in the database, {migration.checksum[:12]} on disk)"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO pbxguard.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
