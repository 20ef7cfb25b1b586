"""The suite's one `engine` fixture: the kernel's tables by default, or the schema a test names."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.dlq import dead_letters
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.outbox import outbox

extra = MetaData()
notes = Table("fixture_notes", extra, Column("id", Integer, primary_key=True))
seeded: list[str] = []


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def seed(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(notes).values(id=7))
    seeded.append(engine.dialect.name)


async def test_by_default_it_holds_the_kernel_tables(engine: AsyncEngine) -> None:
    assert {outbox.name, inbox.name, dead_letters.name} <= await table_names(engine)


@pytest.mark.schema()
async def test_an_empty_schema_leaves_the_database_empty(engine: AsyncEngine) -> None:
    assert await table_names(engine) == set()


@pytest.mark.schema(outbox, extra, seed)
async def test_the_named_steps_run_in_order(engine: AsyncEngine) -> None:
    assert await table_names(engine) == {outbox.name, notes.name}
    async with engine.connect() as conn:
        assert (await conn.execute(select(notes.c.id))).scalars().all() == [7]
    assert seeded[-1] == engine.dialect.name
