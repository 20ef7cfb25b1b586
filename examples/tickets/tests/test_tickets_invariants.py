"""The tickets invariants and payloads, on plain values: what each refuses, and with which code."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tickets.service import (
    CLOSED,
    OPEN,
    WITHDRAWN,
    AssignTicket,
    CloseTicket,
    OpenTicket,
    TicketChangedError,
    TicketClosedError,
    TicketExistsError,
    TicketNotFoundError,
    check_absent,
    check_exists,
    check_open,
    check_unchanged,
    tickets,
)


def ticket(**changes: Any) -> dict[str, Any]:
    return {"ticket_id": "t-1", "version": 1, "title": "Printer on fire", "body": "", "priority": "high",
            "status": OPEN, "assignee": None, "resolution": None, "command_id": "c-1", **changes}


def test_a_new_id_may_be_opened() -> None:
    check_absent(None, "t-1")


def test_opening_an_existing_id_is_refused_as_ticket_exists() -> None:
    with pytest.raises(TicketExistsError) as refused:
        check_absent(ticket(), "t-1")
    assert refused.value.code == "TICKET_EXISTS"
    assert "fresh id" in refused.value.reason


def test_an_open_ticket_exists() -> None:
    current = ticket()
    assert check_exists(current, "t-1") is current


def test_a_ticket_never_opened_is_not_found() -> None:
    with pytest.raises(TicketNotFoundError) as refused:
        check_exists(None, "t-9")
    assert refused.value.code == "TICKET_NOT_FOUND"
    assert "t-9" in refused.value.reason


def test_a_withdrawn_ticket_is_not_found_and_says_so() -> None:
    with pytest.raises(TicketNotFoundError) as refused:
        check_exists(ticket(status=WITHDRAWN), "t-1")
    assert "withdrawn" in refused.value.reason


def test_a_closed_ticket_refuses_changes_as_ticket_closed() -> None:
    check_open(ticket())
    with pytest.raises(TicketClosedError) as refused:
        check_open(ticket(status=CLOSED, resolution="done"))
    assert refused.value.code == "TICKET_CLOSED"


def test_an_inverse_is_refused_when_the_field_changed_since_and_names_the_change() -> None:
    check_unchanged(ticket(assignee="alice"), "assignee", "alice", "the assignment")
    with pytest.raises(TicketChangedError) as refused:
        check_unchanged(ticket(assignee="bob", command_id="c-7"), "assignee", "alice", "the assignment")
    assert refused.value.code == "TICKET_CHANGED"
    assert "'bob'" in refused.value.reason and "'alice'" in refused.value.reason
    assert "c-7" in refused.value.reason


def test_priority_defaults_to_normal_and_accepts_only_low_normal_high() -> None:
    assert OpenTicket(title="Printer on fire").priority == "normal"
    with pytest.raises(ValidationError):
        OpenTicket.model_validate({"title": "Printer on fire", "priority": "urgent"})


@pytest.mark.parametrize("payload", [
    {"title": "   "},
    {"title": "x", "unexpected": True},
])
def test_an_open_payload_with_a_blank_title_or_an_extra_field_is_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OpenTicket.model_validate(payload)


def test_an_assignee_is_one_line_and_a_resolution_not_blank() -> None:
    with pytest.raises(ValidationError):
        AssignTicket.model_validate({"ticket_id": "t-1", "assignee": "alice\nBcc: eve"})
    with pytest.raises(ValidationError):
        CloseTicket.model_validate({"ticket_id": "t-1", "resolution": " "})


def test_every_example_payload_validates_against_its_own_model() -> None:
    for op in tickets.operations.values():
        for example in op.declaration.payload_schema["examples"]:
            op.payload.model_validate(example)


def test_the_service_declares_open_assign_close_each_with_its_inverse() -> None:
    tickets.verify()
    declared = {op.declaration.name: op.declaration for op in tickets.operations.values()}
    assert {name: (d.mutation, d.entity_id_field, d.inverse and d.inverse.name)
            for name, d in declared.items()} == {
        "open": ("openTicket", None, "withdraw_ticket"),
        "assign": ("assignTicket", "ticket_id", "restore_assignee"),
        "close": ("closeTicket", "ticket_id", "reopen_ticket"),
    }
    assert tickets.declaration().entity("ticket").list_by == ["run_id"]  # type: ignore[union-attr]
