"""A command batch reads each entity once: `Versions.current` inside the kit's `batch_reads`.

The first read of a versioned table in a batch fetches the current version of every entity the batch
names, in one query; an append keeps the row its INSERT returned. These tests hold that cache to what
the database holds, on SQLite and PostgreSQL: the states events carry, the effects of inverses, and a
savepoint rolled back after a read inside it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python
from sqlalchemy import Column, Integer, MetaData, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import EntityRef, Envelope, utcnow
from kinshasa.services import documents
from kinshasa.services.kit import AppliedStep, CommandContext, DomainError, Service, Versions, versioned_table
from kinshasa.services.kit.store import batch_reads, serialize_on
from tests.integration.services.helpers import (
    AGENT,
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


def creating(doc: str) -> CommandContext:
    """The context of a command creating document `doc`, for writing its versions by hand."""
    envelope = command("documents", "create", {"title": "t", "body": "b"}, doc)
    assert envelope.entity is not None
    return CommandContext(envelope=envelope, entity=envelope.entity, received_at=utcnow())


async def test_a_rolled_back_savepoint_forgets_what_was_read_inside_it(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    ctx, versions = creating(doc), documents.versions
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


# A service whose handler writes, then refuses: the savepoint around it undoes the write, and the next
# command of the batch must read the entity as the database has it, not as the undone write left it.
counters_metadata = MetaData()
counter_versions = versioned_table("counter_versions", counters_metadata, "counter_id",
                                   Column("value", Integer, nullable=False))
counter_rows = Versions(counter_versions, "counter_id")
counters = Service("counters", metadata=counters_metadata, domain_tables=[counter_versions])


class Bump(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"counter_id": "c1"}]})
    counter_id: str
    refuse_after_writing: bool = False


class Overdrawn(DomainError):
    code = "OVERDRAWN"


async def unbump(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    row = await counter_rows.current(conn, step.entity.id)
    assert row is not None
    await counter_rows.append(conn, step.entity.id, ctx, after=row, value=row["value"] - 1)


@counters.operation("bump", payload=Bump, mutation="bumpCounter", entity="counter",
                    entity_id_field="counter_id", inverse=unbump)
async def bump(conn: AsyncConnection, cmd: Bump, ctx: CommandContext) -> dict[str, Any]:
    row = await counter_rows.current(conn, cmd.counter_id)
    value = 1 if row is None else row["value"] + 1
    await counter_rows.append(conn, cmd.counter_id, ctx, after=row, value=value)
    if cmd.refuse_after_writing:
        raise Overdrawn("refused after writing: the savepoint takes the write back")
    return {"value": value}


async def read_counter(conn: AsyncConnection, counter_id: str) -> dict[str, Any] | None:
    return await counter_rows.current(conn, counter_id)


async def counter_history(conn: AsyncConnection, counter_id: str) -> list[dict[str, Any]]:
    return await counter_rows.history(conn, counter_id)


counters.read_model("counter", current=read_counter, versions=counter_history)


def bump_command(counter_id: str, *, refuse: bool = False) -> Envelope:
    entity = EntityRef(service="counters", type="counter", id=counter_id)
    return Envelope(message_id=uuid.uuid4(), type="counters.bump", run_id="run-1", actor=AGENT,
                    correlation_id="run-1", entity=entity, occurred_at=utcnow(),
                    payload={"counter_id": counter_id, "refuse_after_writing": refuse})


async def test_a_write_its_handler_refused_is_not_read_by_the_next_command(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(counters)
    counter = new_entity_id()
    batch = [bump_command(counter), bump_command(counter, refuse=True), bump_command(counter)]
    outcomes = await d.handle_batch(batch)
    assert [o.kind for o in outcomes] == ["applied", "rejected", "applied"]
    assert outcomes[2].event is not None and outcomes[2].event.payload["value"] == 2
    async with d.engine.connect() as conn:
        history = await counter_rows.history(conn, counter)
    assert [(row["version"], row["value"]) for row in history] == [(1, 1), (2, 2)]


async def test_serialize_on_reads_again_what_was_read_before_its_lock(postgres_url: str) -> None:
    """On PostgreSQL a transaction sees every commit made before each statement: what a batch read
    before `serialize_on` may predate a commit the lock waited for, so the lock forgets it."""
    async with dispatchers(postgres_url) as make:
        d = await make(documents.documents)
        doc = new_entity_id()
        ctx, versions = creating(doc), documents.versions
        async with d.engine.begin() as conn:
            await versions.append(conn, doc, ctx, after=None, title="t", body="b", status=documents.ACTIVE)
        async with UnitOfWork(d.engine) as uow:
            with batch_reads(uow.conn, [doc]):
                before = await versions.current(uow.conn, doc)
                assert before is not None and before["version"] == 1
                async with d.engine.begin() as other:  # another writer commits meanwhile
                    await versions.append(other, doc, ctx, title="t2", body="b", status=documents.ACTIVE)
                assert (await versions.current(uow.conn, doc) or {})["version"] == 1  # still the batch's read
                await serialize_on(uow.conn, "documents", doc)
                after = await versions.current(uow.conn, doc)
                assert after is not None and (after["version"], after["title"]) == (2, "t2")
