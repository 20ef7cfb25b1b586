"""Append-only domain tables enforced in the database: triggers refuse UPDATE and DELETE (SQLite, PostgreSQL).

An update is a new version row and a delete is a tombstone row; code that forgets this fails in the
database rather than silently rewriting history. Migrations create the triggers of Kinshasa's own tables
(`append_only_statements`); `install_append_only(conn, tables)` is idempotent, so a service whose tables
no migration owns calls it on every start after creating them.

On SQLite an upsert (`ON CONFLICT DO UPDATE`) runs the UPDATE trigger and is refused too. PostgreSQL
also gets a statement-level trigger refusing TRUNCATE, which skips row triggers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

MESSAGE_SUFFIX = "is append-only: write a new version row instead"
# SQLSTATE of the PostgreSQL refusal, so callers can tell it from other errors without reading text.
SQLSTATE = "KS001"
_PG_FUNCTION = "kinshasa_refuse_mutation"
_PG_INSTALL_LOCK = 0x4B4E0003

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_VIOLATION_RE = re.compile(r"([A-Za-z0-9_.]+) " + re.escape(MESSAGE_SUFFIX))


class AppendOnlyViolation(Exception):
    """An UPDATE, DELETE or TRUNCATE hit an append-only table; `table` names it."""

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"{table} {MESSAGE_SUFFIX} (a delete is a tombstone row)")

    @classmethod
    def from_error(cls, error: BaseException) -> AppendOnlyViolation | None:
        """The violation an exception (or any exception in its cause chain) reports, else None.

        Works on the SQLAlchemy error, the driver's error or this class, on both backends.
        """
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, AppendOnlyViolation):
                return current
            match = _VIOLATION_RE.search(str(current))
            if match is not None:
                return cls(table=match.group(1))
            if getattr(current, "sqlstate", None) == SQLSTATE:
                return cls(table="(unknown table)")
            orig = getattr(current, "orig", None)
            current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
        return None


def is_append_only_violation(error: BaseException) -> bool:
    """True when `error` is the database refusing to change an append-only table."""
    return AppendOnlyViolation.from_error(error) is not None


def _name(table: str | Table) -> str:
    name = table.fullname if isinstance(table, Table) else table
    if not _NAME_RE.match(name):
        raise ValueError(f"table name {name!r} is not a plain identifier: pass the table's name as created")
    return name


def _trigger_base(name: str) -> str:
    return name.replace(".", "_")


async def install_append_only(conn: AsyncConnection, table_names: Iterable[str | Table]) -> None:
    """Create the triggers that make each table insert-only; safe to call on every start."""
    names = [_name(t) for t in table_names]
    if not names:
        return
    if conn.dialect.name == "postgresql":
        await _install_postgres(conn, names)
    elif conn.dialect.name == "sqlite":
        await _install_sqlite(conn, names)
    else:
        raise NotImplementedError(f"append-only triggers are not implemented for {conn.dialect.name}")


def _sqlite_triggers(name: str) -> list[str]:
    message = f"{name} {MESSAGE_SUFFIX}".replace("'", "''")
    return [f'CREATE TRIGGER IF NOT EXISTS "{_trigger_base(name)}_append_only_{operation.lower()}" '
            f'BEFORE {operation} ON "{name}" BEGIN SELECT RAISE(ABORT, \'{message}\'); END'
            for operation in ("UPDATE", "DELETE")]


_PG_FUNCTION_DDL = f"""
        CREATE OR REPLACE FUNCTION {_PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            RAISE EXCEPTION '% {MESSAGE_SUFFIX}', TG_TABLE_NAME
                USING ERRCODE = '{SQLSTATE}',
                      DETAIL = TG_OP || ' refused on ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
                      HINT = 'insert a new version row, or a tombstone row to delete';
        END
        $fn$"""


def _postgres_triggers(name: str) -> dict[str, str]:
    """Each trigger's name and its CREATE TRIGGER statement."""
    base = _trigger_base(name)
    quoted = ".".join(f'"{part}"' for part in name.split("."))
    wanted = {
        f"{base}_append_only_row": f"BEFORE UPDATE OR DELETE ON {quoted} FOR EACH ROW",
        f"{base}_append_only_truncate": f"BEFORE TRUNCATE ON {quoted} FOR EACH STATEMENT",
    }
    return {trigger: f'CREATE TRIGGER "{trigger}" {when} EXECUTE FUNCTION {_PG_FUNCTION}()'
            for trigger, when in wanted.items()}


def append_only_statements(dialect: str, table_names: Iterable[str | Table]) -> list[str]:
    """The DDL that makes tables which have no such triggers yet insert-only: what a migration runs."""
    names = [_name(t) for t in table_names]
    if dialect == "sqlite":
        return [statement for name in names for statement in _sqlite_triggers(name)]
    if dialect == "postgresql":
        return [_PG_FUNCTION_DDL] + [statement for name in names
                                     for statement in _postgres_triggers(name).values()]
    raise NotImplementedError(f"append-only triggers are not implemented for {dialect}")


async def _install_sqlite(conn: AsyncConnection, names: list[str]) -> None:
    for name in names:
        for statement in _sqlite_triggers(name):
            await conn.exec_driver_sql(statement)


async def _install_postgres(conn: AsyncConnection, names: list[str]) -> None:
    # Two processes starting at once would race between "does the trigger exist" and CREATE TRIGGER.
    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_INSTALL_LOCK})
    await conn.exec_driver_sql(_PG_FUNCTION_DDL)
    for name in names:
        relation = (await conn.execute(text("SELECT to_regclass(:n)::oid"), {"n": name})).scalar()
        if relation is None:
            raise ValueError(f"table {name!r} does not exist: create the domain tables before "
                             "install_append_only")
        existing = set((await conn.execute(
            text("SELECT tgname FROM pg_trigger WHERE tgrelid = :r AND NOT tgisinternal"), {"r": relation}
        )).scalars())
        for trigger, statement in _postgres_triggers(name).items():
            if trigger not in existing:
                await conn.exec_driver_sql(statement)
