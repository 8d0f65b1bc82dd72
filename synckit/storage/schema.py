"""
The PostgreSQL schema's versions: numbered SQL files in ``migrations/``, applied in order, each
in its own transaction, recorded in ``synckit_migrations``.

Migrating is a separate, idempotent step (``synckit-migrate``, or ``--auto-migrate`` for
development): servers only check the version at start and refuse to run on another one, so an
old server never writes through a schema it does not know.  Several processes may migrate at
once; a session-level advisory lock makes them take turns, and each re-reads the version under it.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

#: pg_advisory_lock key: "synckit" in ASCII, so other applications' locks do not collide with it.
LOCK_KEY = 0x73796E636B6974

_FILE = re.compile(r"^(\d{3})_(\w+)\.sql$")


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


class SchemaError(Exception):
    """The database's schema is not the one this server needs; the message says what to do."""


def migrations() -> list[Migration]:
    """The migrations shipped with this package, in order."""
    found = []
    for entry in resources.files("synckit.storage").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort()
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n: {[m.version for m in found]}")
    return found


def latest() -> int:
    return len(migrations())


async def current_version(connection: Any) -> int:
    """The version recorded in the database; 0 for a database never migrated by us."""
    rows = await connection.runQuery("SELECT to_regclass('synckit_migrations') IS NOT NULL")
    if not rows[0][0]:
        return 0
    rows = await connection.runQuery("SELECT COALESCE(MAX(version), 0) FROM synckit_migrations")
    return int(rows[0][0])


async def check(connection: Any) -> None:
    """Raise L{SchemaError} unless the database is at exactly this server's version."""
    have, need = await current_version(connection), latest()
    if have < need:
        raise SchemaError(
            f"the database schema is at version {have} and this synckit needs version {need}: "
            "run 'synckit-migrate' with the same database URL (or start with --auto-migrate in development)"
        )
    if have > need:
        raise SchemaError(
            f"the database schema is at version {have}, newer than this synckit's {need}: upgrade synckit"
        )


class Migrator:
    """Brings a database to the latest version over one txpostgres Connection (not a pool: the lock is per session)."""

    _log = Logger()

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def migrate(self) -> list[Migration]:
        """Apply the missing migrations; return those applied (none if already up to date)."""
        await self._connection.runOperation("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            await self._connection.runOperation(
                "CREATE TABLE IF NOT EXISTS synckit_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW())"
            )
            have = await current_version(self._connection)
            if have > latest():
                raise SchemaError(f"the database schema is at version {have}, newer than this synckit's {latest()}")
            applied = []
            for migration in migrations()[have:]:
                await self._connection.runInteraction(lambda cursor: Deferred.fromCoroutine(_apply(cursor, migration)))
                self._log.info("applied migration {version} {name}", version=migration.version, name=migration.name)
                applied.append(migration)
            return applied
        finally:
            await self._connection.runOperation("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


async def _apply(cursor: Any, migration: Migration) -> None:
    await cursor.execute(migration.sql)
    await cursor.execute(
        "INSERT INTO synckit_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
    )
