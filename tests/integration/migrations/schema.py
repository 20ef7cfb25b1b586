"""A database's schema as plain data (tables, columns, keys, indexes, triggers), for comparing two
databases on one backend; and loading a dumped schema (tests/fixtures/schema-*) into an empty database."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


async def load_dump(url: str, directory: Path, component: str) -> None:
    """Run a dumped schema (tests/fixtures/schema-*/<component>.<backend>.sql) as is in an empty database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(parsed.database))
        try:
            conn.executescript((directory / f"{component}.sqlite.sql").read_text())
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(host=parsed.host, port=parsed.port, user=parsed.username,
                               database=parsed.database)
    try:
        await pg.execute((directory / f"{component}.postgresql.sql").read_text())
    finally:
        await pg.close()


def _expression(sql: str) -> str:
    """A CHECK's text without PostgreSQL's casts and parentheses: a constraint restored from pg_dump reads
    back cast differently from the one created, with the same meaning."""
    return re.sub(r"::[a-z ]+(\[\])?|[()\s]", "", sql)


def _options(options: dict[str, Any]) -> str:
    """An index's dialect options (a partial index's WHERE) as text: reflection hands clause objects."""
    return repr(sorted((key, str(value)) for key, value in options.items()))


def _schema(conn: Connection) -> dict[str, Any]:
    inspector = inspect(conn)
    tables: dict[str, Any] = {}
    for name in inspector.get_table_names():
        tables[name] = {
            "columns": {c["name"]: (str(c["type"]), c["nullable"], str(c.get("default")))
                        for c in inspector.get_columns(name)},
            "primary_key": tuple(inspector.get_pk_constraint(name)["constrained_columns"]),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]),
                               _options(i.get("dialect_options", {})))
                              for i in inspector.get_indexes(name)),
            "unique": sorted((u["name"] or "", tuple(u["column_names"]))
                             for u in inspector.get_unique_constraints(name)),
            "checks": sorted((c["name"] or "", _expression(c["sqltext"]))
                             for c in inspector.get_check_constraints(name)),
        }
    if conn.dialect.name == "sqlite":
        triggers = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    else:
        triggers = conn.execute(text(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"))
    return {"tables": tables, "triggers": sorted(tuple(t) for t in triggers)}


async def schema_of(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        result: dict[str, Any] = await conn.run_sync(_schema)
    return result


def differences(left: dict[str, Any], right: dict[str, Any]) -> list[str]:
    """What differs between two schemas, one line per table part or trigger, for a readable failure."""
    found = []
    for table in sorted(set(left["tables"]) | set(right["tables"])):
        a, b = left["tables"].get(table), right["tables"].get(table)
        if a is None or b is None:
            found.append(f"{table}: only in the {'right' if a is None else 'left'} database")
            continue
        found += [f"{table}.{part}: {a[part]} != {b[part]}" for part in a if a[part] != b[part]]
    one_side = set(left["triggers"]) ^ set(right["triggers"])
    found += [f"trigger only on one side: {trigger}" for trigger in sorted(one_side)]
    return found
