"""Egress approval: irreversible operations wait, whatever their window, until an operator decides."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from kinshasa.gateway import store
from kinshasa.gateway.commands import get_command
from kinshasa.gateway.errors import Invalid, RunClosed
from kinshasa.gateway.quarantine import publish
from kinshasa.gateway.runs import load_run
from kinshasa.gateway.store import commands
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import utcnow

REASON_MAX = 2_000


async def _awaiting(tx: Tx, command_id: str) -> Any:
    row = await get_command(tx.conn, command_id)
    # Lock the run first, then re-read: a trip or revert committed meanwhile must be seen.
    run = await load_run(tx.conn, row["run_id"], lock=True)
    row = (
        (await tx.conn.execute(select(commands).where(commands.c.command_id == command_id))).mappings().one()
    )
    if row["status"] != store.AWAITING_APPROVAL:
        raise Invalid(
            f"command {command_id} is {row['status']}, not AWAITING_APPROVAL: it was already decided",
            [("commandId", "not awaiting approval")],
        )
    return run, row


async def approve(tx: Tx, command_id: str, operator_id: str) -> Any:
    """Publish an egress command. Refused for a run being reverted: its side effects are being undone."""
    run, row = await _awaiting(tx, command_id)
    if run.reverting_or_done:
        raise RunClosed(f"run {run.run_id} is {run.status}: deny its egress instead of approving it")
    await publish(tx, [row], utcnow(), decided_by=operator_id)
    return await get_command(tx.conn, command_id)


async def deny(tx: Tx, command_id: str, reason: str, operator_id: str) -> Any:
    """Discard an egress command with the operator's reason; it never reaches Kafka."""
    reason = reason.strip()
    if not reason or len(reason) > REASON_MAX:
        raise Invalid(
            f"reason must be 1-{REASON_MAX} characters saying why the egress is denied",
            [("reason", "required")],
        )
    _run, _row = await _awaiting(tx, command_id)
    await tx.conn.execute(
        update(commands)
        .where(commands.c.command_id == command_id)
        .values(status=store.DISCARDED, reason=reason, decided_by=operator_id)
    )
    return await get_command(tx.conn, command_id)
