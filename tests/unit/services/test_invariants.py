"""The example services' invariants and naming rules, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kinshasa.schemas.envelope import EntityRef
from kinshasa.services import documents, ledger, links, notifier
from kinshasa.services.kit import CommandContext, DomainError
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.notifier import SendEmail
from tests.integration.services.helpers import command

DOC = {"document_id": "d1", "title": "T", "body": "B", "status": "active", "command_id": "c1"}


def test_document_checks_name_the_next_step() -> None:
    documents.check_exists(dict(DOC), "d1")
    with pytest.raises(documents.DocumentNotFoundError, match="check the id"):
        documents.check_exists(None, "d1")
    with pytest.raises(documents.DocumentNotFoundError, match="any more"):
        documents.check_exists({**DOC, "status": "deleted"}, "d1")
    with pytest.raises(documents.DocumentArchivedError, match="unarchive it first") as err:
        documents.check_not_archived({**DOC, "status": "archived"})
    assert err.value.code == "DOCUMENT_ARCHIVED" and isinstance(err.value, DomainError)
    with pytest.raises(documents.DocumentChangedError, match="revert that change first"):
        documents.check_unchanged(DOC, "title", "Other", "the rename")
    with pytest.raises(documents.DocumentExistsError):
        documents.check_absent(DOC, "d1")


def test_ledger_refuses_closing_with_money_on_it() -> None:
    ledger.check_zero_balance("a1", 0)
    with pytest.raises(ledger.BalanceNotZeroError, match="balance is 250 cents"):
        ledger.check_zero_balance("a1", 250)
    with pytest.raises(ledger.AccountClosedError):
        ledger.check_open({"status": "closed"}, "a1")
    with pytest.raises(ledger.AccountNotFoundError):
        ledger.check_open(None, "a1")


def test_links_refuse_unlinking_twice() -> None:
    with pytest.raises(links.LinkRemovedError, match="already removed"):
        links.check_active({"link_id": "l1", "status": "removed"})


def test_email_carries_a_message_id_per_command() -> None:
    envelope = command("notifier", "send_email", {"to": "a@example.org", "subject": "Hi", "body": "x"}, "e1")
    ctx = CommandContext(
        envelope=envelope,
        entity=EntityRef(service="notifier", type="email", id="e1"),
        received_at=datetime(2024, 5, 1, tzinfo=UTC),
    )
    message = notifier.build_message(SendEmail(to="a@example.org", subject="Hi", body="x"), ctx)
    assert message["Message-ID"] == f"<{envelope.message_id}@kinshasa.invalid>"
    assert message["X-Kinshasa-Run-Id"] == "run-1"
    assert message["To"] == "a@example.org"


def test_topics_default_to_the_catalogue_and_isolate_with_a_suffix() -> None:
    plain = ServiceTopics.for_service("documents")
    assert (plain.commands, plain.events, plain.group, plain.dlq) == (
        "kinshasa.commands.documents",
        "kinshasa.events.documents",
        "kinshasa.svc.documents",
        "kinshasa.svc.documents.dlq",
    )
    isolated = ServiceTopics.for_service("documents", "t1")
    assert isolated.commands == "kinshasa.commands.documents.t1"
    assert isolated.group == "kinshasa.svc.documents.t1"
    assert isolated.declarations == "kinshasa.catalogue.t1"
    assert {s.name for s in isolated.specs("documents")} == {isolated.commands, isolated.events, isolated.dlq,
                                                             isolated.declarations}
