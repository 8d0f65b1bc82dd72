"""
``synckit-migrate``: bring a PostgreSQL database to this synckit's schema version.

Idempotent, and safe to run from several hosts at once (the migrations take an advisory lock).
The database comes from ``--database``, ``DATABASE_URL`` or the config file, as for the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred
from txpostgres import txpostgres

from synckit.config import ConfigError, load
from synckit.storage import schema
from synckit.storage.postgres import describe, error_text


async def run(reactor: Any, url: str, check_only: bool) -> int:
    connection = txpostgres.Connection(reactor)
    try:
        await connection.connect(url, connect_timeout=10)
    except Exception as e:
        print(f"synckit-migrate: cannot connect to PostgreSQL at {describe(url)}: {error_text(e)}", file=sys.stderr)
        return 1
    try:
        if check_only:
            have = await schema.current_version(connection)
            print(f"{describe(url)}: schema version {have}, this synckit's is {schema.latest()}")
            return 0 if have == schema.latest() else 1
        applied = await schema.Migrator(connection).migrate()
    except schema.SchemaError as e:
        print(f"synckit-migrate: {e}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    for migration in applied:
        print(f"applied {migration.version:03d} {migration.name}")
    state = "brought to" if applied else "already at"
    print(f"{describe(url)}: {state} schema version {schema.latest()}")
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="synckit-migrate", description=__doc__.strip().splitlines()[0].strip("`: "))
    parser.add_argument("--database", help="PostgreSQL URL [env DATABASE_URL, or 'database' in the config file]")
    parser.add_argument("-c", "--config", help="config file (INI, [synckit] section) [env SYNCKIT_CONFIG]")
    parser.add_argument("--check", action="store_true", help="only report the schema version; exit 1 unless it is current")
    args = parser.parse_args(argv)
    try:
        config = load({"database": args.database}, os.environ, args.config or os.environ.get("SYNCKIT_CONFIG"))
    except ConfigError as e:
        parser.error(str(e))
    if not config.database:
        parser.error("no database given: use --database, DATABASE_URL or 'database' in the config file")

    async def react_main(reactor: Any) -> None:
        status = await run(reactor, config.database, args.check)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: Deferred.fromCoroutine(react_main(reactor)))
