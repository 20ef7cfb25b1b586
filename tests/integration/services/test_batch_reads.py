"""A command batch reads each entity once: `Versions.current` inside the kit's `batch_reads`.

The first read of a versioned table in a batch fetches the current version of every entity the batch
names, in one query; an append keeps the row its INSERT returned. These tests hold that cache to what
the database holds, on SQLite and PostgreSQL: the states events carry, the effects of inverses, and a
savepoint rolled back after a read inside it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic_core import to_jsonable_python
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import utcnow
from kinshasa.services import documents
from kinshasa.services.kit.context import CommandContext
from kinshasa.services.kit.store import batch_reads
from tests.integration.services.helpers import (
    Factory,
    command,
    compensate,
    dispatchers,
    document_work,
    new_entity_id,
)

TABLE = documents.document_versions.name


@pytest.fixture
async def dispatcher_for(database_url: str) -> AsyncIterator[Factory]:
    async with dispatchers(database_url) as make:
        yield make


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement run on `engine` inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def reads_of_versions(seen: list[str]) -> list[str]:
    return [s for s in seen if s.upper().startswith("SELECT") and TABLE in s]


async def test_a_batch_reads_its_entities_in_one_query_per_table(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    docs = [new_entity_id() for _ in range(6)]
    created = await d.handle_batch([command("documents", "create", {"title": "t", "body": "b"}, doc)
                                    for doc in docs])
    assert {o.kind for o in created} == {"applied"}
    work = [command("documents", kind, {"document_id": doc, field: f"{field}-{i}"}, doc)
            for i in range(3) for doc in docs
            for kind, field in (("rename", "title"), ("edit", "body"))]
    with statements(d.engine) as seen:
        outcomes = await d.handle_batch(work)
    assert {o.kind for o in outcomes} == {"applied"}
    # 36 commands, each reading its document before, inside and after its handler: one query in all.
    assert len(reads_of_versions(seen)) == 1, reads_of_versions(seen)
    assert sum(1 for s in seen if s.upper().startswith(f"INSERT INTO {TABLE.upper()}")) == len(work)

    undo = [compensate(o.event) for o in reversed(created + outcomes) if o.event is not None]
    with statements(d.engine) as seen:
        undone = await d.handle_batch(undo)
    assert {o.kind for o in undone} == {"compensated"}
    assert len(reads_of_versions(seen)) == 1, reads_of_versions(seen)


async def test_events_and_inverses_see_what_the_database_holds(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    docs = [new_entity_id() for _ in range(8)]
    work = document_work(random.Random(11), docs)
    outcomes = []
    for start in range(0, len(work), 30):
        outcomes += await d.handle_batch(work[start:start + 30])
    assert {o.kind for o in outcomes} == {"applied", "rejected"}  # refusals re-ran batches with savepoints

    async with d.engine.connect() as conn:  # outside any batch: straight from the database
        history = {doc: [documents._public(row) for row in await documents.versions.history(conn, doc)]
                   for doc in docs}
    by_command = {row["command_id"]: (doc, i) for doc, rows in history.items() for i, row in enumerate(rows)}
    applied = [(c, o) for c, o in zip(work, outcomes, strict=True) if o.kind == "applied"]
    assert len(applied) == sum(len(rows) for rows in history.values())
    for cmd, outcome in applied:
        assert outcome.event is not None
        doc, i = by_command[str(cmd.message_id)]
        assert outcome.event.payload["after"] == to_jsonable_python(history[doc][i])
        assert outcome.event.payload["before"] == (to_jsonable_python(history[doc][i - 1]) if i else None)

    # Undo everything, newest first, in batches: each inverse checks the state it reads, so a stale
    # read would refuse (compensation_failed) or restore the wrong value.
    undo = [compensate(o.event) for _, o in reversed(applied) if o.event is not None]
    undone = []
    for start in range(0, len(undo), 40):
        undone += await d.handle_batch(undo[start:start + 40])
    assert {o.kind for o in undone} == {"compensated"}
    async with d.engine.connect() as conn:
        for doc in docs:
            final = await documents.versions.current(conn, doc)
            assert final is not None
            assert (final["status"], final["title"], final["body"]) == (documents.DELETED, f"t-{doc[:4]}",
                                                                        "b0")


async def test_a_rolled_back_savepoint_forgets_what_was_read_inside_it(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    envelope = command("documents", "create", {"title": "t", "body": "b"}, doc)
    assert envelope.entity is not None
    ctx = CommandContext(envelope=envelope, entity=envelope.entity, received_at=utcnow())
    versions = documents.versions
    async with UnitOfWork(d.engine) as uow:
        conn = uow.conn
        with batch_reads(conn, [doc]):
            assert await versions.current(conn, doc) is None
            await versions.append(conn, doc, ctx, after=None, title="t", body="b", status=documents.ACTIVE)
            savepoint = await conn.begin_nested()
            second = await versions.append(conn, doc, ctx, title="t2", body="b", status=documents.ACTIVE)
            inside = await versions.current(conn, doc)
            assert inside is not None and inside["version"] == second["version"] == 2
            await savepoint.rollback()
            after = await versions.current(conn, doc)
            assert after is not None and (after["version"], after["title"]) == (1, "t")
        await uow.commit()
    async with d.engine.connect() as conn:
        assert [row["version"] for row in await versions.history(conn, doc)] == [1]
