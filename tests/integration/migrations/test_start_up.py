"""What a component's start does to its database: migrate an empty one to what the code declares, adopt
one made before migrations, run no DDL when up to date, and refuse a version this build does not know."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from kinshasa import migrations
from kinshasa.coordinator.store import ledger_metadata
from kinshasa.gateway.store import gateway_metadata
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.tables import kernel_metadata
from kinshasa.migrations.cli import app as db_app
from kinshasa.migrations.install import load_table_modules
from kinshasa.services.registry import load_service
from tests.integration.migrations.schema import FIXTURES, differences, load_dump, schema_of

COMPONENTS = ("gateway", "coordinator", "documents", "ledger", "links", "notifier")


def declared(component: str) -> list[MetaData]:
    """The MetaData the component's code reads and writes through: what its migrations must create."""
    load_table_modules()
    if component == "gateway":
        return [kernel_metadata, gateway_metadata]
    if component == "coordinator":
        return [kernel_metadata, ledger_metadata]
    return [kernel_metadata, load_service(component).metadata]


@pytest.mark.parametrize("component", COMPONENTS)
async def test_the_migrations_create_every_table_column_and_index_the_code_declares(
        component: str, database_url: str) -> None:
    """A table or column added to the code without a migration fails here, naming it."""
    engine = create_engine(database_url)
    try:
        await migrations.upgrade_component(engine, component)

        def compare(sync: Any) -> list[Any]:
            context = MigrationContext.configure(sync, opts={"compare_type": True})
            diff = compare_metadata(context, declared(component))
            return [d for d in diff if not (d[0] == "remove_table" and d[1].name == migrations.VERSION_TABLE)]

        async with engine.connect() as conn:
            assert await conn.run_sync(compare) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_database_made_before_migrations_is_adopted_as_it_is(
        component: str, database_url: str, other_database_url: str) -> None:
    """Dev databases that start-up code built with create_all (no version table) keep working."""
    await load_dump(database_url, FIXTURES / "schema-before-migrations", component)
    existing, fresh = create_engine(database_url), create_engine(other_database_url)
    try:
        moved = await migrations.upgrade_component(existing, component)
        assert moved == list(migrations.branches_for(component))
        await migrations.upgrade_component(fresh, component)
        assert all(state.up_to_date for state in await migrations.current(existing, component))
        assert differences(await schema_of(existing), await schema_of(fresh)) == []
    finally:
        await existing.dispose()
        await fresh.dispose()


async def recorded_ddl(engine: AsyncEngine, component: str) -> tuple[list[str], list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.strip())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        assert await migrations.upgrade_component(engine, component) == []
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    ddl = [s for s in statements if s.split()[0].upper() in {"CREATE", "ALTER", "DROP"}]
    return statements, ddl


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_start_against_an_up_to_date_database_runs_no_ddl_and_takes_no_lock(
        component: str, database_url: str) -> None:
    """DDL locks whole tables: a replica starting beside one that writes deadlocked with it."""
    engine = create_engine(database_url)
    try:
        await migrations.upgrade_component(engine, component)
        statements, ddl = await recorded_ddl(engine, component)
        assert statements, "the second start looked nothing up"
        assert ddl == []
        assert not [s for s in statements if "advisory" in s]
    finally:
        await engine.dispose()


async def test_a_database_at_a_revision_this_build_does_not_know_is_refused_untouched(
        database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrations.upgrade_component(engine, "gateway")
        async with engine.begin() as conn:
            await conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = 'gateway_9999' "
                                    "WHERE version_num LIKE 'gateway%'"))
        before = await schema_of(engine)
        with pytest.raises(migrations.MigrationError, match="run the newer Kinshasa"):
            await migrations.upgrade_component(engine, "gateway")
        assert await schema_of(engine) == before
    finally:
        await engine.dispose()


async def test_a_service_of_an_authors_own_gets_the_kernel_branch_only() -> None:
    assert migrations.branches_for("tickets") == ("kernel",)
    assert migrations.branches_for("documents") == ("kernel", "documents")
    assert not migrations.owns_tables_of("documents", {"tickets"})


def test_db_upgrade_then_current_on_the_command_line(database_url: str) -> None:
    runner = CliRunner()
    url = database_url
    if url.startswith("sqlite"):
        # The CLI refuses a SQLite file that does not exist (a typo would otherwise make an empty store).
        open(url.split(":///", 1)[1], "a").close()
    behind = runner.invoke(db_app, ["current", "-c", "coordinator", "--database-url", url])
    assert behind.exit_code == 1, behind.output
    assert "coordinator: no version" in behind.output

    upgraded = runner.invoke(db_app, ["upgrade", "-c", "coordinator", "--database-url", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert "upgraded kernel, coordinator" in upgraded.output

    again = runner.invoke(db_app, ["upgrade", "-c", "coordinator", "--database-url", url])
    assert "already up to date" in again.output
    now = runner.invoke(db_app, ["current", "-c", "coordinator", "--database-url", url])
    assert now.exit_code == 0, now.output
    assert "coordinator: coordinator_0002" in now.output
