"""One command, one transaction: a failure before commit leaves nothing; UPDATE and DELETE are refused."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.process import free_port
from kinshasa.kernel.appendonly import is_append_only_violation
from kinshasa.kernel.inbox import inbox
from kinshasa.kernel.logs import configure_logging
from kinshasa.kernel.receipts import receipts
from kinshasa.kernel.unit_of_work import UnitOfWork
from kinshasa.services import documents, ledger, links, notifier
from kinshasa.services.kit import Service
from kinshasa.services.kit.dispatcher import CommandDispatcher
from kinshasa.services.kit.runtime import ServiceTopics, record_handler
from kinshasa.services.smtp_sink import SmtpSink
from kinshasa.settings import ServiceSettings
from kinshasa.topics.consumer import Record
from tests.integration.services.helpers import (
    command,
    compensate,
    new_entity_id,
    outbox_count,
    service_engine,
)


class CrashBeforeCommit(Exception):
    """Stands for the process dying between the domain write and the commit."""


def _dispatcher(
    service: Service, engine: AsyncEngine, settings: ServiceSettings | None = None
) -> CommandDispatcher:
    topics = ServiceTopics.for_service(service.name)
    return CommandDispatcher(
        service, engine, group=topics.group, events_topic=topics.events, settings=settings
    )


async def _count(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


@pytest.fixture
async def docs_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await service_engine(database_url, documents.documents)
    yield engine
    await engine.dispose()


async def test_failure_after_domain_write_before_commit_leaves_nothing(docs_engine: AsyncEngine) -> None:
    dispatcher = _dispatcher(documents.documents, docs_engine)
    doc_id = new_entity_id()
    create = command("documents", "create", {"title": "Plan", "body": "v1"}, doc_id)

    with pytest.raises(CrashBeforeCommit):
        async with UnitOfWork(docs_engine) as uow:
            outcome = await dispatcher.process(uow, create)
            # The domain row, the step record, the inbox row and the receipt are written, and the event
            # is emitted; all that is missing is the commit.
            assert outcome.kind == "applied"
            assert await documents.versions.current(uow.conn, doc_id) is not None
            assert len(uow.pending_messages) == 1
            raise CrashBeforeCommit()

    for table in (documents.document_versions, documents.documents.store.steps, inbox, receipts):
        assert await _count(docs_engine, table) == 0, table.name
    assert await outbox_count(docs_engine) == 0

    # The redelivered command is not mistaken for a duplicate: it applies, once.
    assert (await dispatcher.handle(create)).kind == "applied"
    assert (await dispatcher.handle(create)).kind == "duplicate"
    assert await _count(docs_engine, documents.document_versions) == 1
    assert await outbox_count(docs_engine) == 1


async def test_a_rejection_commits_the_inbox_and_the_event_but_no_domain_write(
    docs_engine: AsyncEngine,
) -> None:
    dispatcher = _dispatcher(documents.documents, docs_engine)
    doc_id = new_entity_id()
    await dispatcher.handle(command("documents", "create", {"title": "Plan"}, doc_id))
    await dispatcher.handle(command("documents", "archive", {"document_id": doc_id}, doc_id))
    rejected = await dispatcher.handle(
        command("documents", "rename", {"document_id": doc_id, "title": "X"}, doc_id)
    )
    assert rejected.kind == "rejected" and rejected.event is not None
    assert rejected.event.payload["code"] == "DOCUMENT_ARCHIVED"
    assert rejected.event.type == "documents.rename.rejected"
    invalid = await dispatcher.handle(
        command("documents", "rename", {"document_id": doc_id, "title": ""}, doc_id)
    )
    assert invalid.kind == "rejected" and invalid.event is not None
    assert invalid.event.payload["code"] == "VALIDATION" and "title" in invalid.event.payload["reason"]
    assert await _count(docs_engine, documents.document_versions) == 2
    assert await outbox_count(docs_engine) == 4


async def test_smtp_failure_rolls_back_the_email_row(database_url: str) -> None:
    """A real failure between the domain write and the commit: the mail server is not there."""
    engine = await service_engine(database_url, notifier.notifier)
    try:
        closed_port = free_port()
        dispatcher = _dispatcher(notifier.notifier, engine, ServiceSettings(smtp_port=closed_port))
        send = command("notifier", "send_email", {"to": "ops@example.org", "subject": "Hi"}, new_entity_id())
        with pytest.raises(OSError):
            await dispatcher.handle(send)
        assert await _count(engine, notifier.email_versions) == 0
        assert await _count(engine, inbox) == 0
        assert await outbox_count(engine) == 0
    finally:
        await engine.dispose()


async def test_notifier_delivers_and_never_compensates(database_url: str, tmp_path: Path) -> None:
    engine = await service_engine(database_url, notifier.notifier)
    port = free_port()
    try:
        with SmtpSink(tmp_path / "mail", port=port) as sink:
            dispatcher = _dispatcher(notifier.notifier, engine, ServiceSettings(smtp_port=port))
            email_id = new_entity_id()
            send = command(
                "notifier",
                "send_email",
                {"to": "ops@example.org", "subject": "Quarterly", "body": "Numbers attached."},
                email_id,
                run_id="run-mail",
            )
            applied = await dispatcher.handle(send)
            assert applied.kind == "applied" and applied.event is not None
            assert (await dispatcher.handle(send)).kind == "duplicate"
            [mail] = sink.store.messages()
            assert mail.rcpt_tos == ["ops@example.org"]
            assert mail.subject == "Quarterly" and mail.body.strip() == "Numbers attached."
            assert mail.message_id == applied.event.payload["smtp_message_id"]
            assert mail.headers["X-Kinshasa-Run-Id"] == "run-mail"

            refused = await dispatcher.handle(compensate(applied.event))
            assert refused.kind == "compensation_failed" and refused.event is not None
            assert refused.event.type == "notifier.send_email.compensation_failed"
            assert "egress" in refused.event.payload["reason"]
            assert refused.event.payload["forward_event_id"] == str(applied.event.message_id)
            assert len(sink.store.messages()) == 1
        async with engine.connect() as conn:
            [email] = await notifier.emails_of_run(conn, "run-mail")
        assert email["id"] == email_id and email["status"] == "sent"
    finally:
        await engine.dispose()


async def _populate(service: Service, engine: AsyncEngine, url: str, tmp_path: Path) -> None:
    """Put at least one row into every table of the service (triggers fire per row)."""
    if service is notifier.notifier:
        port = free_port()
        with SmtpSink(tmp_path / "mail", port=port):
            d = _dispatcher(service, engine, ServiceSettings(smtp_port=port))
            await d.handle(
                command("notifier", "send_email", {"to": "a@example.org", "subject": "s"}, new_entity_id())
            )
        # Egress is never compensated, so this table only ever gets a row by hand.
        async with engine.begin() as conn:
            await conn.execute(
                insert(service.store.compensations).values(
                    forward_event_id=new_entity_id(),
                    compensate_command_id=new_entity_id(),
                    run_id="r",
                    actor="system:test",
                    compensated_at=datetime.now(UTC),
                )
            )
        return
    d = _dispatcher(service, engine)
    entity = new_entity_id()
    if service is documents.documents:
        first = await d.handle(command("documents", "create", {"title": "T"}, entity))
    elif service is ledger.ledger:
        await d.handle(command("ledger", "open_account", {"name": "Ops", "currency": "EUR"}, entity))
        first = await d.handle(
            command("ledger", "post_entry", {"account_id": entity, "amount_cents": 5}, entity)
        )
    else:
        first = await d.handle(
            command("links", "link", {"from_id": "a", "to_id": "b", "kind": "refs"}, entity)
        )
    assert first.event is not None
    assert (await d.handle(compensate(first.event))).kind == "compensated"


@pytest.mark.parametrize(
    "service", [documents.documents, ledger.ledger, links.links, notifier.notifier], ids=lambda s: s.name
)
async def test_update_and_delete_fail_in_the_database(
    service: Service, database_url: str, tmp_path: Path
) -> None:
    engine = await service_engine(database_url, service)
    try:
        await _populate(service, engine, database_url, tmp_path)
        for table in service.append_only_tables:
            assert await _count(engine, table) > 0, f"{table.name} has no row to test the trigger on"
            first_column = next(iter(table.c)).name
            for statement in (
                f'UPDATE "{table.name}" SET "{first_column}" = "{first_column}"',
                f'DELETE FROM "{table.name}"',
            ):
                with pytest.raises(DBAPIError) as refused:
                    async with engine.begin() as conn:
                        await conn.execute(text(statement))
                assert is_append_only_violation(refused.value), (statement, refused.value)
            assert await _count(engine, table) > 0
    finally:
        await engine.dispose()


async def test_handling_logs_carry_run_actor_and_message(docs_engine: AsyncEngine) -> None:
    stream = io.StringIO()
    handler = configure_logging("documents", "INFO", stream=stream)
    try:
        create = command("documents", "create", {"title": "Logged"}, new_entity_id(), run_id="run-logs")
        record = Record(
            topic="kinshasa.commands.documents", partition=0, offset=7, key=None, value=create.to_bytes()
        )
        await record_handler(_dispatcher(documents.documents, docs_engine))(record)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    handled = [line for line in lines if line["logger"] == "kinshasa.services.kit.dispatcher"]
    assert handled and all(
        (line["run_id"], line["actor"], line["message_id"])
        == ("run-logs", "agent:agent-7", str(create.message_id))
        for line in handled
    )
