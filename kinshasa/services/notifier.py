"""The notifier service: sends email over SMTP; egress, so no inverse: gated first, never compensated."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints
from sqlalchemy import Column, MetaData, String, Text
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.services.kit import (
    CommandContext,
    EntityExistsError,
    Service,
    Versions,
    versioned_table,
)
from kinshasa.services.kit.fields import EMAIL_MAX, SINGLE_LINE, Email

SUBJECT_MAX = 300
SENT = "sent"
# The catalogue's payload has no sender; every email leaves from this address. `.invalid` is reserved
# (RFC 2606), so a misrouted dev email can never reach a real domain.
SENDER = "Kinshasa notifier <notifier@kinshasa.invalid>"
SMTP_TIMEOUT_S = 15.0

metadata = MetaData()
email_versions = versioned_table(
    "email_versions", metadata, "email_id",
    Column("recipient", String(EMAIL_MAX), nullable=False),
    Column("subject", String(SUBJECT_MAX), nullable=False),
    Column("body", Text, nullable=False),
    Column("smtp_message_id", String(300), nullable=False),
    Column("status", String(16), nullable=False),
)
versions = Versions(email_versions, "email_id")

notifier = Service("notifier", version=1, metadata=metadata, domain_tables=[email_versions],
                   description="Email over SMTP: egress, gated for approval and never compensated.")


class SendEmail(BaseModel):
    """Send an email. Irreversible egress: it waits for operator approval and is never compensated."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [{"to": "ops@example.org", "subject": "Weekly report", "body": "All green."}]})
    to: Email
    subject: Annotated[str, StringConstraints(min_length=1, max_length=SUBJECT_MAX), SINGLE_LINE]
    body: Annotated[str, StringConstraints(max_length=100_000)] = ""


class EmailExistsError(EntityExistsError):
    code = "EMAIL_EXISTS"


def check_absent(current: Mapping[str, Any] | None, email_id: str) -> None:
    if current is not None:
        raise EmailExistsError(f"email {email_id} was already sent: use a fresh id (the gateway mints one)")


def smtp_message_id(command_id: str) -> str:
    """One Message-ID per command, so a receiver can drop the copy a crash-and-retry may send."""
    return f"<{command_id}@kinshasa.invalid>"


def build_message(cmd: SendEmail, ctx: CommandContext) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = cmd.to
    message["Subject"] = cmd.subject
    message["Message-ID"] = smtp_message_id(ctx.command_id)
    message["Date"] = format_datetime(ctx.received_at)
    if ctx.run_id:
        message["X-Kinshasa-Run-Id"] = ctx.run_id
    message["X-Kinshasa-Command-Id"] = ctx.command_id
    message.set_content(cmd.body)
    return message


def deliver(message: EmailMessage, host: str, port: int) -> None:
    """Send over SMTP; any refusal raises, so the command is retried, then dead-lettered."""
    with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT_S) as smtp:
        smtp.send_message(message)


# Egress: the row is written first and the email sent inside the same transaction, before it commits.
# A failed send rolls the row back and the command is retried (then dead-lettered), so nothing is
# recorded as sent that did not leave. A crash between the send and the commit sends it again on
# redelivery (at-least-once); the Message-ID is the same both times, so the receiver can tell.
@notifier.operation("send_email", payload=SendEmail, mutation="sendEmail", entity="email", egress=True,
                    description="Send an email. Irreversible: held for operator approval, never compensated.")
async def send_email(conn: AsyncConnection, cmd: SendEmail, ctx: CommandContext) -> dict[str, Any]:
    check_absent(await versions.current(conn, ctx.entity_id), ctx.entity_id)
    message = build_message(cmd, ctx)
    await versions.append(conn, ctx.entity_id, ctx, recipient=cmd.to, subject=cmd.subject, body=cmd.body,
                          smtp_message_id=message["Message-ID"], status=SENT)
    await asyncio.to_thread(deliver, message, ctx.settings.smtp_host, ctx.settings.smtp_port)
    return {"email_id": ctx.entity_id, "to": cmd.to, "subject": cmd.subject,
            "smtp_message_id": message["Message-ID"]}


# reads


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["email_id"], "version": row["version"], "to": row["recipient"],
            "subject": row["subject"],
            "body": row["body"], "status": row["status"], "smtp_message_id": row["smtp_message_id"],
            "run_id": row["run_id"], "command_id": row["command_id"], "actor": row["actor"],
            "recorded_at": row["recorded_at"]}


async def read_email(conn: AsyncConnection, email_id: str) -> dict[str, Any] | None:
    row = await versions.current(conn, email_id)
    return None if row is None else _public(row)


async def read_email_versions(conn: AsyncConnection, email_id: str) -> list[dict[str, Any]]:
    return [_public(row) for row in await versions.history(conn, email_id)]


async def emails_of_run(conn: AsyncConnection, run_id: str) -> list[dict[str, Any]]:
    """Emails sent for one run, oldest first."""
    rows = await versions.all_current(conn, email_versions.c.run_id == run_id)
    return sorted((_public(r) for r in rows), key=lambda e: (e["recorded_at"], e["id"]))


notifier.read_model("email", current=read_email, versions=read_email_versions,
                    schema={"type": "object", "properties": {
                        "id": {"type": "string"}, "version": {"type": "integer"}, "to": {"type": "string"},
                        "subject": {"type": "string"}, "body": {"type": "string"},
                        "status": {"type": "string"}, "run_id": {"type": ["string", "null"]}}},
                    lists={"run_id": emails_of_run})


async def domain_state(conn: AsyncConnection) -> dict[str, dict[str, Any]]:
    return {row["email_id"]: {"to": row["recipient"], "subject": row["subject"], "status": row["status"]}
            for row in await versions.all_current(conn)}
