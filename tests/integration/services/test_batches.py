"""One transaction per batch of commands: the same effects, events and receipts as one per command.

`CommandDispatcher.handle_batch` is what a service process runs for every fetched batch; these tests
hold it to `handle`, on SQLite and PostgreSQL, including the awkward batches: a refused command in the
middle, copies of one command, two compensates of one step, a step applied and undone in one batch,
and a poison message (which must leave nothing behind for the per-command fallback to trip over).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.process import free_port
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.outbox import outbox
from kinshasa.kernel.receipts import ReceiptChain, receipts
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import documents, ledger, notifier
from kinshasa.services.kit import PoisonMessageError
from kinshasa.services.kit.dispatcher import CommandDispatcher, Outcome
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.smtp_sink import MailStore, SmtpSink
from kinshasa.settings import ServiceSettings
from tests.integration.services.helpers import (
    Factory,
    command,
    compensate,
    dispatchers,
    document_work,
    new_entity_id,
    service_engine,
)


@pytest.fixture
async def dispatcher_for(database_url: str, other_database_url: str) -> AsyncIterator[Factory]:
    """Dispatchers for services, each on a database of its own (two at most)."""
    async with dispatchers(database_url, other_database_url) as make:
        yield make


async def _count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def _untimed(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without the `recorded_at` of its before/after states."""
    return {k: {n: v for n, v in s.items() if n != "recorded_at"} if k in ("before", "after") and s else s
            for k, s in payload.items()}


def _summary(outcomes: list[Outcome]) -> list[tuple[str, str | None, str | None, Any]]:
    """What a consumer of the events sees, without the timestamps."""
    return [(o.kind, o.event.type if o.event else None, str(o.event.message_id) if o.event else None,
             _untimed(o.event.payload) if o.event else None) for o in outcomes]


async def _title(d: CommandDispatcher, doc: str) -> str:
    async with d.engine.connect() as conn:
        current = await documents.versions.current(conn, doc)
    assert current is not None
    return str(current["title"])


async def _state(d: CommandDispatcher) -> dict[str, Any]:
    async with d.engine.connect() as conn:
        return await documents.domain_state(conn)


async def test_a_batch_does_what_one_command_at_a_time_does(dispatcher_for: Factory) -> None:
    one, many = await dispatcher_for(documents.documents), await dispatcher_for(documents.documents)
    rng = random.Random(7)
    docs = [new_entity_id() for _ in range(12)]
    work = document_work(rng, docs)
    singly = [await one.handle(c) for c in work]
    batched: list[Outcome] = []
    for start in range(0, len(work), 25):
        batched += await many.handle_batch(work[start:start + 25])
    assert _summary(batched) == _summary(singly)
    assert {o.kind for o in batched} == {"applied", "rejected"}  # the batches did meet refusals

    # Now undo every applied step newest first, in batches on one side and singly on the other.
    undo = [compensate(o.event) for o in reversed(singly) if o.kind == "applied" and o.event]
    undone_singly = [await one.handle(c) for c in undo]
    undone_batched: list[Outcome] = []
    for start in range(0, len(undo), 40):
        undone_batched += await many.handle_batch(undo[start:start + 40])
    assert _summary(undone_batched) == _summary(undone_singly)
    assert {o.kind for o in undone_batched} == {"compensated"}

    assert await _state(many) == await _state(one)
    for table in (inbox, outbox, receipts, documents.document_versions,
                  documents.documents.store.steps, documents.documents.store.compensations):
        assert await _count(many.engine, table) == await _count(one.engine, table), table.name
    async with many.engine.connect() as conn:
        report = await ReceiptChain("documents").verify(conn)
    assert report.ok and report.checked == len(work) + len(undo)


async def test_refusals_in_a_batch_leave_the_rest_of_it_applied(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(ledger.ledger)
    account = new_entity_id()

    def post(to: str, cents: int) -> Envelope:
        return command("ledger", "post_entry", {"account_id": to, "amount_cents": cents}, to)

    opened, first_post = await d.handle_batch([
        command("ledger", "open_account", {"name": "ops", "currency": "EUR"}, account), post(account, 500)])
    assert opened.event is not None and first_post.kind == "applied"
    outcomes = await d.handle_batch([
        compensate(opened.event),  # refused: money sits on the account
        command("ledger", "open_account", {"name": "dup", "currency": "EUR"}, account),  # exists
        post(new_entity_id(), 100),  # no such account
        post(account, 100),
    ])
    assert [o.kind for o in outcomes] == ["compensation_failed", "rejected", "rejected", "applied"]
    async with d.engine.connect() as conn:
        state = await ledger.domain_state(conn)
    assert state[account]["status"] == "open" and state[account]["balance_cents"] == 600
    assert await _count(d.engine, inbox) == 6 and await _count(d.engine, outbox) == 6
    assert await _count(d.engine, ledger.ledger.store.compensations) == 0


async def test_copies_and_repeated_compensates_in_one_batch_count_once(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    create = command("documents", "create", {"title": "A"}, doc)
    rename = command("documents", "rename", {"document_id": doc, "title": "B"}, doc)
    first = await d.handle_batch([create, rename, rename, create])
    assert [o.kind for o in first] == ["applied", "applied", "duplicate", "duplicate"]

    renamed = first[1].event
    assert renamed is not None
    # The coordinator re-sent a straggler: attempts 0 and 1 of one step arrive together.
    second = await d.handle_batch([compensate(renamed, 0), compensate(renamed, 1)])
    assert [o.kind for o in second] == ["compensated", "compensated"]
    assert second[0].event is not None and second[1].event is not None
    assert second[0].event.message_id == second[1].event.message_id
    assert await _count(d.engine, documents.documents.store.compensations) == 1
    assert await _count(d.engine, outbox) == 3  # two applied, one compensated
    assert await _title(d, doc) == "A"
    async with d.engine.connect() as conn:
        assert (await ReceiptChain("documents").verify(conn)).checked == 3


async def test_an_inverse_sees_what_earlier_commands_of_its_batch_wrote(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    await d.handle(command("documents", "create", {"title": "A"}, doc))
    to_b = (await d.handle(command("documents", "rename", {"document_id": doc, "title": "B"}, doc))).event
    assert to_b is not None
    both = await d.handle_batch([command("documents", "rename", {"document_id": doc, "title": "C"}, doc),
                                 compensate(to_b)])
    # C changed the title since B, earlier in the same transaction: undoing B is refused.
    assert [o.kind for o in both] == ["applied", "compensation_failed"]
    to_c = both[0].event
    assert to_c is not None
    undo = await d.handle_batch([compensate(to_c), compensate(to_b, 1)])
    assert [o.kind for o in undo] == ["compensated", "compensated"]
    assert await _title(d, doc) == "A"


async def test_a_step_recorded_in_the_batch_is_found_by_its_compensate(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    [created] = await d.handle_batch([command("documents", "create", {"title": "A"}, doc)])
    rename = command("documents", "rename", {"document_id": doc, "title": "B"}, doc)
    # The rename's applied event id is deterministic from its command, so its compensate can be built
    # before the rename ran, and both can share one batch.
    expected = (await _dry_run(d, rename)).event
    assert expected is not None
    outcomes = await d.handle_batch([rename, compensate(expected)])
    assert [o.kind for o in outcomes] == ["applied", "compensated"]
    assert created.event is not None
    assert await _title(d, doc) == "A"
    assert await _count(d.engine, documents.documents.store.steps) == 2
    assert await _count(d.engine, documents.documents.store.compensations) == 1


async def _dry_run(d: CommandDispatcher, envelope: Envelope) -> Outcome:
    """What handling `envelope` would emit, rolled back."""
    async with UnitOfWork(d.engine) as uow:
        return await d.process(uow, envelope)  # never committed: the unit rolls back on exit


async def test_a_poison_message_rolls_the_whole_batch_back(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    good = command("documents", "create", {"title": "A"}, doc)
    poison = good.model_copy(update={"type": "ledger.open_account", "message_id": uuid.uuid4()})
    with pytest.raises(PoisonMessageError, match="wrong topic"):
        await d.handle_batch([good, poison])
    for table in (inbox, outbox, receipts, documents.document_versions, documents.documents.store.steps):
        assert await _count(d.engine, table) == 0, table.name
    # The per-command fallback then applies the good one and refuses only the poison.
    assert (await d.handle(good)).kind == "applied"
    with pytest.raises(PoisonMessageError):
        await d.handle(poison)
    assert await _count(d.engine, inbox) == 1


async def test_egress_commands_each_commit_alone_so_no_email_goes_twice(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    engine = await service_engine(database_url, notifier.notifier)
    topics = ServiceTopics.for_service("notifier")
    d = CommandDispatcher(notifier.notifier, engine, group=topics.group, events_topic=topics.events,
                          settings=ServiceSettings(smtp_port=port))
    first, second = new_entity_id(), new_entity_id()

    def mail(email_id: str, subject: str) -> Envelope:
        return command("notifier", "send_email", {"to": "ops@example.org", "subject": subject, "body": "b"},
                       email_id)

    try:
        with SmtpSink(tmp_path / "mail", port=port):
            # The second command reuses the first's id and is refused; a batch rolled back and run again
            # would send the first email twice.
            outcomes = await d.handle_batch([mail(first, "one"), mail(first, "again"), mail(second, "two")])
            assert [o.kind for o in outcomes] == ["applied", "rejected", "applied"]
            with pytest.raises(PoisonMessageError):
                await d.handle_batch([mail(new_entity_id(), "three"),
                                      mail(new_entity_id(), "bad").model_copy(update={"entity": None})])
        sent = sorted(m.subject for m in MailStore(tmp_path / "mail").messages())
        # "three" committed before the poison message raised; the consumer's per-record fallback then
        # finds it in the inbox and sends nothing more.
        assert sent == ["one", "three", "two"]
        assert await _count(engine, inbox) == 4
    finally:
        await engine.dispose()
