"""Compensation edge cases: state changed since, unknown steps, stragglers, messages no service can handle."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kinshasa.schemas.envelope import Envelope, InvalidMessage, deterministic_id
from kinshasa.services import documents, ledger
from kinshasa.services.kit import PoisonMessageError
from kinshasa.services.kit.dispatcher import Outcome
from tests.integration.services.helpers import (
    Factory,
    command,
    compensate,
    dispatchers,
    new_entity_id,
    outbox_count,
)


@pytest.fixture
async def dispatcher_for(database_url: str) -> AsyncIterator[Factory]:
    """Dispatchers for services, all on one database."""
    async with dispatchers(database_url) as make:
        yield make


def _event(outcome: Outcome) -> Envelope:
    assert outcome.event is not None
    return outcome.event


async def test_rename_back_refused_when_renamed_since(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    await d.handle(command("documents", "create", {"title": "A"}, doc))
    mine = _event(await d.handle(command("documents", "rename", {"document_id": doc, "title": "B"}, doc)))
    # Another run renames it afterwards and is not reverted.
    await d.handle(command("documents", "rename", {"document_id": doc, "title": "C"}, doc, run_id="run-2"))
    undo = compensate(mine)
    failed = _event(await d.handle(undo))
    assert failed.type == "documents.rename.compensation_failed"
    assert failed.message_id == deterministic_id("compensation_failed", str(undo.message_id))
    assert failed.causation_id == undo.message_id and failed.actor.id == "coordinator"
    assert failed.payload["forward_event_id"] == str(mine.message_id)
    assert "changed since the rename" in failed.payload["reason"]
    async with d.engine.connect() as conn:
        assert (await documents.versions.current(conn, doc) or {})["title"] == "C"

    # Once the later rename is reverted too, a new attempt succeeds.
    later = _event(await d.handle(command("documents", "rename", {"document_id": doc, "title": "D"}, doc)))
    assert (await d.handle(compensate(later))).kind == "compensated"


async def test_close_refused_while_money_sits_on_the_account(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(ledger.ledger)
    account = new_entity_id()
    opened = _event(
        await d.handle(command("ledger", "open_account", {"name": "Ops", "currency": "EUR"}, account))
    )
    await d.handle(
        command("ledger", "post_entry", {"account_id": account, "amount_cents": 700}, account, run_id="run-2")
    )
    failed = _event(await d.handle(compensate(opened)))
    assert failed.type == "ledger.open_account.compensation_failed"
    assert "balance is 700 cents" in failed.payload["reason"]
    async with d.engine.connect() as conn:
        assert (await ledger.accounts.current(conn, account) or {})["status"] == "open"


async def test_compensated_twice_acknowledges_with_the_same_event(
    dispatcher_for: Factory,
) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    created = _event(await d.handle(command("documents", "create", {"title": "A"}, doc)))
    first = _event(await d.handle(compensate(created, attempt=0)))
    again = _event(await d.handle(compensate(created, attempt=1)))
    assert first.type == again.type == "documents.create.compensated"
    assert first.message_id == again.message_id == deterministic_id("compensated", str(created.message_id))
    assert (await d.handle(compensate(created, attempt=1))).kind == "duplicate"
    # The forward event, one compensated (the re-emission shares its id and is absorbed by the outbox).
    assert await outbox_count(d.engine) == 2
    async with d.engine.connect() as conn:
        assert len(await documents.versions.history(conn, doc)) == 2


async def test_unknown_or_mismatched_steps_fail_with_a_reason(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    created = _event(await d.handle(command("documents", "create", {"title": "A"}, doc)))
    ghost = created.model_copy(update={"message_id": deterministic_id("ghost", doc)})
    unknown = _event(await d.handle(compensate(ghost)))
    assert unknown.type == "documents.create.compensation_failed"
    assert "no applied documents.create step" in unknown.payload["reason"]

    wrong = compensate(created).model_copy(update={"type": "documents.rename.compensate"})
    mismatched = _event(await d.handle(wrong))
    assert mismatched.type == "documents.rename.compensation_failed"
    assert "documents.create.compensate instead" in mismatched.payload["reason"]


async def test_messages_no_service_can_handle_are_poison(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    other_service = command("ledger", "open_account", {"name": "x", "currency": "EUR"}, doc)
    event = command("documents", "create", {"title": "A"}, doc).model_copy(
        update={"type": "documents.create.applied"}
    )
    no_entity = command("documents", "create", {"title": "A"}, doc).model_copy(update={"entity": None})
    bad_compensate = compensate(_event(await d.handle(command("documents", "create", {"title": "A"}, doc))))
    bad_compensate = bad_compensate.model_copy(update={"payload": {"forward_event_id": "nope"}})
    for message, field in (
        (other_service, "type"),
        (event, "type"),
        (no_entity, "entity"),
        (bad_compensate, "forward_event_id"),
    ):
        with pytest.raises(PoisonMessageError if field != "forward_event_id" else InvalidMessage) as caught:
            await d.handle(message)
        assert field in str(caught.value)
    assert await outbox_count(d.engine) == 1


async def test_unknown_operation_is_rejected(dispatcher_for: Factory) -> None:
    d = await dispatcher_for(documents.documents)
    doc = new_entity_id()
    weird = command("documents", "create", {"title": "A"}, doc).model_copy(update={"type": "documents.shred"})
    rejected = _event(await d.handle(weird))
    assert rejected.type == "documents.shred.rejected" and rejected.payload["code"] == "UNKNOWN_OPERATION"
    mismatched = command("documents", "rename", {"document_id": new_entity_id(), "title": "x"}, doc)
    refused = _event(await d.handle(mismatched))
    assert (
        refused.payload["code"] == "VALIDATION"
        and "differs from payload document_id" in refused.payload["reason"]
    )
