"""A service author's own migrations: the kit runs the service's script directory at start, after
Kinshasa's, adopts tables created before it had one, and keeps the rows and the append-only triggers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, String, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa import migrations
from kinshasa.kernel.database import create_engine
from kinshasa.services.kit import Service
from kinshasa.services.kit.install import install_service
from kinshasa.services.kit.store import versioned_table

ENV = "from kinshasa.migrations import run_env\n\nrun_env()\n"
FIRST = '''
import sqlalchemy as sa
from alembic import op

revision = "notes_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "note_versions",
        sa.Column("note_id", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(256), nullable=True),
        sa.Column("command_id", sa.String(36), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("note_id", "version", name="pk_note_versions"),
    )
    op.create_index("ix_note_versions_run_id", "note_versions", ["run_id"])
'''
SECOND = '''
import sqlalchemy as sa
from alembic import op

revision = "notes_0002"
down_revision = "notes_0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("note_versions", sa.Column("body", sa.Text(), nullable=True))
'''
ROW = ("INSERT INTO note_versions (note_id, version, title, command_id, actor, recorded_at) "
       "VALUES ('n1', 1, 'first', 'c1', 'agent:a1', '2026-12-01 10:00:00')")


def notes_service(location: Path | None, *, with_body: bool) -> Service:
    metadata = MetaData()
    columns = [Column("title", String(200), nullable=False)]
    if with_body:
        columns.append(Column("body", String, nullable=True))
    table = versioned_table("note_versions", metadata, "note_id", *columns)
    return Service("notes", metadata=metadata, domain_tables=[table],
                   migrations=None if location is None else str(location))


def script_directory(root: Path, *revisions: str) -> Path:
    (root / "versions").mkdir(parents=True, exist_ok=True)
    (root / "env.py").write_text(ENV)
    for number, body in enumerate(revisions, start=1):
        (root / "versions" / f"notes_000{number}.py").write_text(body)
    return root


async def columns_of(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as conn:
        names: set[str] = await conn.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns(table)})
    return names


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        names: list[str] = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names)


async def test_the_services_own_migrations_run_at_start_and_keep_rows_and_triggers(
        database_url: str, tmp_path: Path) -> None:
    location = script_directory(tmp_path / "notes_migrations", FIRST)
    engine = create_engine(database_url)
    try:
        await install_service(engine, notes_service(location, with_body=False))
        async with engine.begin() as conn:
            await conn.execute(text(ROW))

        script_directory(location, FIRST, SECOND)  # the author's next release adds a column
        await install_service(engine, notes_service(location, with_body=True))

        assert "body" in await columns_of(engine, "note_versions")
        assert {"notes_applied_steps", "notes_compensations", "outbox"} <= await table_names(engine)
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT title FROM note_versions"))).scalar_one() == "first"
            version = await conn.execute(text("SELECT version_num FROM notes_schema_version"))
            assert version.scalar_one() == "notes_0002"
        with pytest.raises(DBAPIError, match="append-only"):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE note_versions SET title = 'changed'"))
        assert not await migrations.upgrade_own(engine, str(location), "notes_schema_version",
                                                {"note_versions"})
    finally:
        await engine.dispose()


async def test_tables_created_before_the_service_had_migrations_are_adopted(
        database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    try:
        await install_service(engine, notes_service(None, with_body=False))  # create_all, as before
        async with engine.begin() as conn:
            await conn.execute(text(ROW))

        location = script_directory(tmp_path / "notes_migrations", FIRST, SECOND)
        await install_service(engine, notes_service(location, with_body=True))

        assert "body" in await columns_of(engine, "note_versions")
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM note_versions"))).scalar_one() == 1
    finally:
        await engine.dispose()

