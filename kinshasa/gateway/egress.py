"""Egress approval: irreversible operations wait, whatever their window, until an operator decides."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from kinshasa.gateway import store
from kinshasa.gateway.commands import get_command
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.incidents import IncidentKind, open_incident
from kinshasa.gateway.quarantine import closed, publish
from kinshasa.gateway.runs import RunRecord, load_run
from kinshasa.gateway.store import commands
from kinshasa.gateway.uow import Tx
from kinshasa.schemas.envelope import utcnow

REASON_MAX = 2_000


async def _locked(tx: Tx, command_id: str) -> tuple[RunRecord, Any]:
    """The command's run, its row locked, and the command re-read under that lock."""
    row = await get_command(tx.conn, command_id)
    # Lock the run first, then re-read: a trip or revert committed meanwhile must be seen.
    run = await load_run(tx.conn, row["run_id"], lock=True)
    row = (
        (await tx.conn.execute(select(commands).where(commands.c.command_id == command_id))).mappings().one()
    )
    return run, row


def _check_awaiting(command_id: str, row: Any) -> None:
    if row["status"] != store.AWAITING_APPROVAL:
        raise Invalid(
            f"command {command_id} is {row['status']}, not AWAITING_APPROVAL: it was already decided",
            [("commandId", "not awaiting approval")],
        )


async def approve(tx: Tx, command_id: str, operator_id: str) -> Any:
    """Publish an egress command. Refused for a run being reverted: its side effects are being undone.

    The run is checked before the command: the revert already discarded the command, and the operator
    is told why (RUN_CLOSED), not only that it is no longer awaiting approval.
    """
    run, row = await _locked(tx, command_id)
    if run.reverting_or_done:
        raise closed(run, "approved")
    _check_awaiting(command_id, row)
    await publish(tx, [row], utcnow(), decided_by=operator_id)
    return await get_command(tx.conn, command_id)


async def deny(tx: Tx, command_id: str, reason: str, operator_id: str) -> Any:
    """Discard an egress command with the operator's reason; it never reaches Kafka.

    On a run whose revert discarded the command, denying it again answers the command as it is: what
    the operator asks for (it never leaves) already holds.
    """
    reason = reason.strip()
    if not reason or len(reason) > REASON_MAX:
        raise Invalid(
            f"reason must be 1-{REASON_MAX} characters saying why the egress is denied",
            [("reason", "required")],
        )
    run, row = await _locked(tx, command_id)
    if run.reverting_or_done and row["status"] == store.DISCARDED:
        return row
    _check_awaiting(command_id, row)
    now = utcnow()
    await tx.conn.execute(
        update(commands)
        .where(commands.c.command_id == command_id)
        .values(status=store.DISCARDED, reason=reason, decided_by=operator_id)
    )
    await open_incident(
        tx.conn,
        IncidentKind.EGRESS_DENIED,
        now,
        run_id=run.run_id,
        agent_id=run.agent_id,
        entry_point=run.entry_point,
        policy_version=run.policy_version,
        escaped={},
        held=1,
        services=[row["service"]],
        detail={"command_id": command_id, "operation": row["command_type"], "reason": reason,
                "denied_by": operator_id},
    )
    return await get_command(tx.conn, command_id)
