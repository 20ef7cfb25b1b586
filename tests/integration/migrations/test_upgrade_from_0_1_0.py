"""A database release 0.1.0 made, with rows in it, upgrades to today's schema: the rows stay, the
append-only tables still refuse UPDATE and DELETE, and the schema is the one a fresh database migrates to,
on SQLite and PostgreSQL, for every component."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa import migrations
from kinshasa.kernel.database import create_engine
from tests.integration.migrations.schema import FIXTURES, differences, load_dump, schema_of

COMPONENTS = ("gateway", "coordinator", "documents", "ledger", "links", "notifier")
AT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

# Rows as 0.1.0 wrote them, per component: (table, its columns and values). Every component's database
# holds the kernel's outbox; the rest are the component's own tables, append-only ones among them.
OUTBOX = ("outbox", {"message_id": "6f1c0d5e-1b7a-4c1e-9a51-0d5e1b7a4c1e", "topic": "kinshasa.events",
                     "key": b"k1", "value": b"{}", "created_at": AT, "status": "pending", "attempts": 0,
                     "next_attempt_at": AT})
ROWS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "gateway": [
        OUTBOX,
        ("gw_runs", {"run_id": "r1", "agent_id": "a1", "entry_point": "docs", "status": "FINISHED",
                     "started_at": AT, "breaker_state": "CLOSED", "writes": 2, "errors": 0, "services": "[]",
                     "probes_left": 0, "trip_count": 0, "on_hold": False, "published": 2, "applied": 2,
                     "compensated": 0}),
        ("gw_commands", {"command_id": "c1", "run_id": "r1", "command_type": "documents.rename",
                         "graphql_name": "renameDocument", "service": "documents", "entity_id": "d1",
                         "status": "PUBLISHED", "egress": False, "probe": False, "manual_hold": False,
                         "accepted_at": AT, "result": "APPLIED", "envelope": "{}"}),
        ("gw_policy_versions", {"version": 1, "scope": "global", "subject": "*", "document": "{}",
                                "author": "ops", "reason": "first", "created_at": AT}),
    ],
    "coordinator": [
        OUTBOX,
        ("ledger_runs", {"run_id": "r1", "status": "RUNNING", "published_count": 1, "next_step_id": 2,
                         "settle_counter": 0, "first_seen_at": AT, "last_event_at": AT}),
        ("ledger_steps", {"run_id": "r1", "step_id": 1, "forward_event_id": "e1", "forward_type": "x.applied",
                          "service": "documents", "entity_type": "document", "entity_id": "d1",
                          "entity_key": "documents/document/d1", "actor_kind": "agent", "actor_id": "a1",
                          "applied_at": AT, "status": "applied", "forward_seen": True, "attempt": 0}),
    ],
    "documents": [OUTBOX, ("document_versions", {
        "document_id": "d1", "version": 1, "title": "t", "body": "b", "status": "draft", "command_id": "c1",
        "actor": "agent:a1", "recorded_at": AT})],
    "ledger": [OUTBOX],
    "links": [OUTBOX],
    "notifier": [OUTBOX],
}
# One append-only table per component that had one in 0.1.0, and the row key to aim the UPDATE at.
APPEND_ONLY = {"gateway": ("gw_policy_versions", "version = 1"),
               "documents": ("document_versions", "document_id = 'd1'")}


async def load_0_1_0(url: str, component: str) -> None:
    """Create the component's database exactly as release 0.1.0 left it."""
    await load_dump(url, FIXTURES / "schema-0.1.0", component)


async def fill(engine: AsyncEngine, component: str) -> None:
    async with engine.begin() as conn:
        for table, values in ROWS[component]:
            columns = ", ".join(f'"{c}"' for c in values)
            params = ", ".join(f":{c}" for c in values)
            await conn.execute(text(f'INSERT INTO "{table}" ({columns}) VALUES ({params})'), values)


async def read_rows(engine: AsyncEngine, component: str) -> dict[str, list[tuple[Any, ...]]]:
    rows = {}
    async with engine.connect() as conn:
        for table, values in ROWS[component]:
            columns = ", ".join(f'"{c}"' for c in values)
            rows[table] = [tuple(r) for r in await conn.execute(text(f'SELECT {columns} FROM "{table}"'))]
    return rows


async def refused(engine: AsyncEngine, statement: str) -> bool:
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    except DBAPIError as error:
        return "append-only" in str(error)
    return False


@pytest.mark.parametrize("component", COMPONENTS)
async def test_a_0_1_0_database_upgrades_with_its_rows_and_triggers_and_matches_a_fresh_one(
        component: str, database_url: str, other_database_url: str) -> None:
    await load_0_1_0(database_url, component)
    old, fresh = create_engine(database_url), create_engine(other_database_url)
    try:
        await fill(old, component)
        before = await read_rows(old, component)

        moved = await migrations.upgrade_component(old, component)
        await migrations.upgrade_component(fresh, component)

        assert moved == list(migrations.branches_for(component))
        assert all(state.up_to_date for state in await migrations.current(old, component))
        assert await read_rows(old, component) == before
        if component in APPEND_ONLY:
            table, where = APPEND_ONLY[component]
            assert await refused(old, f"UPDATE {table} SET {where.split(' = ')[0]} = "
                                      f"{where.split(' = ')[0]} WHERE {where}")
            assert await refused(old, f"DELETE FROM {table} WHERE {where}")
            assert await read_rows(old, component) == before
        assert differences(await schema_of(old), await schema_of(fresh)) == []
    finally:
        await old.dispose()
        await fresh.dispose()


async def test_the_fixture_is_the_0_1_0_schema_not_an_empty_file(database_url: str) -> None:
    """A fixture that lost its DDL would make every upgrade test above a fresh install."""
    await load_0_1_0(database_url, "gateway")
    engine = create_engine(database_url)
    try:
        schema = await schema_of(engine)
        assert {"outbox", "inbox", "gw_runs", "gw_commands", "gw_policy_versions"} <= set(schema["tables"])
        assert "gw_incidents" not in schema["tables"]
        assert "applied_at" not in schema["tables"]["gw_commands"]["columns"]
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_two_replicas_starting_at_once_both_start_and_migrate_once(postgres_url: str) -> None:
    first, second = create_engine(postgres_url), create_engine(postgres_url)
    try:
        results = await asyncio.wait_for(asyncio.gather(
            migrations.upgrade_component(first, "gateway"), migrations.upgrade_component(second, "gateway")),
            timeout=120)
        assert sorted(results, key=len) == [[], ["kernel", "gateway"]]
        assert all(state.up_to_date for state in await migrations.current(first, "gateway"))
    finally:
        await first.dispose()
        await second.dispose()
