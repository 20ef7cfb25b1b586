"""Append-only triggers refuse UPDATE and DELETE in the database itself, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.appendonly import AppendOnlyViolation, install_append_only, is_append_only_violation

domain = MetaData()
versions = Table("document_versions", domain,
                 Column("document_id", String(50), primary_key=True),
                 Column("version", Integer, primary_key=True),
                 Column("title", String(200), nullable=False))
scratch = Table("scratch", domain, Column("id", Integer, primary_key=True), Column("note", String(50)))


async def append_only_versions_with_a_row_each(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await install_append_only(conn, [versions])
        # Idempotent: a component calls it on every start.
        await install_append_only(conn, ["document_versions"])
    async with engine.begin() as conn:
        await conn.execute(insert(versions).values(document_id="d1", version=1, title="draft"))
        await conn.execute(insert(scratch).values(id=1, note="mutable"))


pytestmark = pytest.mark.schema(domain, append_only_versions_with_a_row_each)


async def titles(engine: AsyncEngine) -> list[tuple[str, int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(versions).order_by(versions.c.document_id, versions.c.version))
        return [(r.document_id, r.version, r.title) for r in rows]


async def test_insert_works_and_a_new_version_is_a_new_row(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(versions).values(document_id="d1", version=2, title="final"))
    assert await titles(engine) == [("d1", 1, "draft"), ("d1", 2, "final")]


async def test_update_is_refused_by_the_database(engine: AsyncEngine) -> None:
    with pytest.raises(DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(update(versions).values(title="rewritten"))
    violation = AppendOnlyViolation.from_error(caught.value)
    assert violation is not None and violation.table == "document_versions"
    assert "write a new version row instead" in str(violation)
    assert await titles(engine) == [("d1", 1, "draft")]


async def test_delete_is_refused_by_the_database(engine: AsyncEngine) -> None:
    with pytest.raises(DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(delete(versions).where(versions.c.document_id == "d1"))
    assert is_append_only_violation(caught.value)
    assert await titles(engine) == [("d1", 1, "draft")]


async def test_raw_sql_is_refused_too_and_other_tables_stay_mutable(engine: AsyncEngine) -> None:
    with pytest.raises(DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM document_versions"))
    assert is_append_only_violation(caught.value)
    async with engine.begin() as conn:
        await conn.execute(update(scratch).values(note="changed"))
        await conn.execute(delete(scratch))
    assert not is_append_only_violation(RuntimeError("unrelated"))


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_truncate_is_refused(database_url: str, engine: AsyncEngine) -> None:
    with pytest.raises(DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(text("TRUNCATE document_versions"))
    assert is_append_only_violation(caught.value)
    assert await titles(engine) == [("d1", 1, "draft")]


async def test_missing_table_names_the_fix(engine: AsyncEngine, database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        # SQLite accepts CREATE TRIGGER only on an existing table and says so itself.
        with pytest.raises(DBAPIError, match="no such table"):
            async with engine.begin() as conn:
                await install_append_only(conn, ["nope"])
        return
    with pytest.raises(ValueError, match="create the domain tables before"):
        async with engine.begin() as conn:
            await install_append_only(conn, ["nope"])
