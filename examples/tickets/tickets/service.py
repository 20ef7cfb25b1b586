"""The tickets service: open, assign and close support tickets, each declared beside its domain inverse.

It lives outside Kinshasa and uses it only as a library, as any service of yours would. Run it on the
local stack with `kinshasa up --service tickets.service:tickets`, or alone with
`kinshasa service --module tickets.service:tickets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from kinshasa.services.kit import (
    AppliedStep,
    CommandContext,
    DomainError,
    EntityExistsError,
    EntityNotFoundError,
    Service,
    StateChangedError,
    Versions,
    versioned_table,
)
from kinshasa.services.kit.fields import NOT_BLANK, SINGLE_LINE, EntityId
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import Column, MetaData, String, Text, select
from sqlalchemy.ext.asyncio import AsyncConnection

Priority = Literal["low", "normal", "high"]
Status = Literal["open", "closed", "withdrawn"]
OPEN: Status = "open"
CLOSED: Status = "closed"
# A withdrawn ticket is the tombstone an undone open leaves: it reads as absent, its history stays.
WITHDRAWN: Status = "withdrawn"

TITLE_MAX = 200
BODY_MAX = 20_000
ASSIGNEE_MAX = 100
RESOLUTION_MAX = 2_000

metadata = MetaData()
ticket_versions = versioned_table(
    "ticket_versions", metadata, "ticket_id",
    Column("title", String(TITLE_MAX), nullable=False),
    Column("body", Text, nullable=False),
    Column("priority", String(8), nullable=False),
    Column("status", String(16), nullable=False),
    Column("assignee", String(ASSIGNEE_MAX), nullable=True),
    Column("resolution", Text, nullable=True),
)
versions = Versions(ticket_versions, "ticket_id")

tickets = Service("tickets", version=1, metadata=metadata, domain_tables=[ticket_versions],
                  description="Support tickets: open, assign, close.")

Title = Annotated[str, StringConstraints(min_length=1, max_length=TITLE_MAX), NOT_BLANK]
Body = Annotated[str, StringConstraints(max_length=BODY_MAX)]
Assignee = Annotated[str, StringConstraints(min_length=1, max_length=ASSIGNEE_MAX), SINGLE_LINE,
                     Field(description="who works on the ticket: a person's or a team's handle")]
Resolution = Annotated[str, StringConstraints(min_length=1, max_length=RESOLUTION_MAX), NOT_BLANK,
                       Field(description="what was done, for whoever reads the ticket later")]


# payloads: what agents send; the gateway validates them against the JSON Schema each one publishes


class OpenTicket(BaseModel):
    """Open a support ticket; the gateway mints its id."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [
        {"title": "Printer on fire", "body": "Smoke from tray 2 since 9:00.", "priority": "high"}]})
    title: Title
    body: Body = ""
    priority: Priority = Field(default="normal", description="low, normal or high")


class AssignTicket(BaseModel):
    """Give an open ticket to someone."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [
        {"ticket_id": "t-1", "assignee": "alice"}]})
    ticket_id: EntityId
    assignee: Assignee


class CloseTicket(BaseModel):
    """Close an open ticket, saying how it was resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [
        {"ticket_id": "t-1", "resolution": "Replaced the fuser unit."}]})
    ticket_id: EntityId
    resolution: Resolution


class TicketState(BaseModel):
    """What `GET /entities/ticket/{id}` answers."""

    id: str
    version: int
    title: str
    body: str
    priority: Priority
    status: Literal["open", "closed"]
    assignee: str | None
    resolution: str | None
    run_id: str | None
    command_id: str
    actor: str
    recorded_at: str


# domain errors


class TicketNotFoundError(EntityNotFoundError):
    code = "TICKET_NOT_FOUND"


class TicketExistsError(EntityExistsError):
    code = "TICKET_EXISTS"


class TicketClosedError(DomainError):
    code = "TICKET_CLOSED"


class TicketChangedError(StateChangedError):
    code = "TICKET_CHANGED"


# invariants


def check_absent(current: Mapping[str, Any] | None, ticket_id: str) -> None:
    if current is not None:
        raise TicketExistsError(
            f"ticket {ticket_id} already exists: opening it again would overwrite it; use a fresh id "
            "(the gateway mints one per openTicket)"
        )


def check_exists(current: dict[str, Any] | None, ticket_id: str) -> dict[str, Any]:
    if current is None or current["status"] == WITHDRAWN:
        raise TicketNotFoundError(
            f"ticket {ticket_id} does not exist{' any more: it was withdrawn' if current else ''}: check "
            "the id openTicket returned"
        )
    return current


def check_open(ticket: Mapping[str, Any]) -> None:
    if ticket["status"] == CLOSED:
        raise TicketClosedError(
            f"ticket {ticket['ticket_id']} is closed and refuses changes: revert the run that closed it, "
            "or open a new ticket"
        )


def check_unchanged(ticket: Mapping[str, Any], field: str, expected: Any, since: str) -> None:
    """An inverse may only undo a step if nobody changed what the step left behind."""
    if ticket[field] != expected:
        raise TicketChangedError(
            f"ticket {ticket['ticket_id']}'s {field} is {ticket[field]!r}, not {expected!r} as {since} left "
            f"it (latest change by command {ticket['command_id']}): revert that change first, or fix the "
            "ticket by hand"
        )


async def _current(conn: AsyncConnection, ticket_id: str) -> dict[str, Any]:
    return check_exists(await versions.current(conn, ticket_id), ticket_id)


async def _write(conn: AsyncConnection, ticket: Mapping[str, Any], ctx: CommandContext,
                 **changes: Any) -> None:
    """The next version of `ticket` (the current version, read in this transaction) with `changes`."""
    values = {field: ticket[field] for field in ("title", "body", "priority", "status", "assignee",
                                                 "resolution")}
    await versions.append(conn, ticket["ticket_id"], ctx, after=ticket, **{**values, **changes})


# operations: each inverse sits right above the forward handler it undoes


async def withdraw_ticket(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Withdraw the ticket it opened, if nobody changed it since."""
    ticket = await _current(conn, step.entity.id)
    for field in ("title", "body", "priority"):
        check_unchanged(ticket, field, step.data[field], "the open")
    check_unchanged(ticket, "status", OPEN, "the open")
    check_unchanged(ticket, "assignee", None, "the open")
    await _write(conn, ticket, ctx, status=WITHDRAWN)


@tickets.operation("open", payload=OpenTicket, mutation="openTicket", entity="ticket",
                   inverse=withdraw_ticket,
                   description="Open a support ticket; returns its id at once. Reverted by withdrawing it.")
async def open_ticket(conn: AsyncConnection, cmd: OpenTicket, ctx: CommandContext) -> dict[str, Any]:
    check_absent(await versions.current(conn, ctx.entity_id), ctx.entity_id)
    await versions.append(conn, ctx.entity_id, ctx, after=None, title=cmd.title, body=cmd.body,
                          priority=cmd.priority, status=OPEN, assignee=None, resolution=None)
    return {"ticket_id": ctx.entity_id, "title": cmd.title, "body": cmd.body, "priority": cmd.priority}


async def restore_assignee(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Give the ticket back its previous assignee, if it is still with the one this step chose."""
    ticket = await _current(conn, step.entity.id)
    check_open(ticket)
    check_unchanged(ticket, "assignee", step.data["new_assignee"], "the assignment")
    await _write(conn, ticket, ctx, assignee=step.data["old_assignee"])


@tickets.operation("assign", payload=AssignTicket, mutation="assignTicket", entity="ticket",
                   entity_id_field="ticket_id", inverse=restore_assignee,
                   description="Give an open ticket to someone. Reverted by restoring the previous assignee.")
async def assign(conn: AsyncConnection, cmd: AssignTicket, ctx: CommandContext) -> dict[str, Any]:
    ticket = await _current(conn, cmd.ticket_id)
    check_open(ticket)
    await _write(conn, ticket, ctx, assignee=cmd.assignee)
    return {"ticket_id": cmd.ticket_id, "old_assignee": ticket["assignee"], "new_assignee": cmd.assignee}


async def reopen_ticket(conn: AsyncConnection, step: AppliedStep, ctx: CommandContext) -> None:
    """Reopen the ticket it closed, if it is still closed with that resolution."""
    ticket = await _current(conn, step.entity.id)
    check_unchanged(ticket, "status", CLOSED, "the close")
    check_unchanged(ticket, "resolution", step.data["resolution"], "the close")
    # An open ticket has no resolution, so there is nothing else to restore.
    await _write(conn, ticket, ctx, status=OPEN, resolution=None)


@tickets.operation("close", payload=CloseTicket, mutation="closeTicket", entity="ticket",
                   entity_id_field="ticket_id", inverse=reopen_ticket,
                   description="Close an open ticket with a resolution. Reverted by reopening it.")
async def close(conn: AsyncConnection, cmd: CloseTicket, ctx: CommandContext) -> dict[str, Any]:
    ticket = await _current(conn, cmd.ticket_id)
    check_open(ticket)
    await _write(conn, ticket, ctx, status=CLOSED, resolution=cmd.resolution)
    return {"ticket_id": cmd.ticket_id, "resolution": cmd.resolution}


# reads


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["ticket_id"], "version": row["version"], "title": row["title"], "body": row["body"],
        "priority": row["priority"], "status": row["status"], "assignee": row["assignee"],
        "resolution": row["resolution"], "run_id": row["run_id"], "command_id": row["command_id"],
        "actor": row["actor"], "recorded_at": row["recorded_at"],
    }


async def read_ticket(conn: AsyncConnection, ticket_id: str) -> dict[str, Any] | None:
    row = await versions.current(conn, ticket_id)
    return None if row is None or row["status"] == WITHDRAWN else _public(row)


async def read_ticket_versions(conn: AsyncConnection, ticket_id: str) -> list[dict[str, Any]]:
    return [_public(row) for row in await versions.history(conn, ticket_id)]


async def tickets_of_run(conn: AsyncConnection, run_id: str) -> list[dict[str, Any]]:
    """Tickets whose current state the run wrote, as the contract lists by a field of the current state."""
    c = ticket_versions.c
    # Narrowed by ticket id (true for all versions of a ticket or none), the run's own versions found
    # through the run_id index; whether the run wrote the newest one is decided on the current rows.
    touched = c.ticket_id.in_(select(c.ticket_id).where(c.run_id == run_id))
    return [_public(row) for row in await versions.all_current(conn, touched)
            if row["run_id"] == run_id and row["status"] != WITHDRAWN]


tickets.read_model("ticket", current=read_ticket, versions=read_ticket_versions, schema=TicketState,
                   lists={"run_id": tickets_of_run})
