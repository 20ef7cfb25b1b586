"""The approvals inbox: every egress command AWAITING_APPROVAL across runs, oldest first, a page at a time.

Egress waits for an operator whatever its run's window (gateway/egress.py decides one command); this
lists what waits, with what the operator needs to decide without another query: the payload the agent
asked to send, and the run and agent it came from. Oldest first, so the longest wait is decided first.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import store
from kinshasa.gateway.commands import Receipt
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.quarantine import payload_json
from kinshasa.gateway.store import commands, runs


@dataclass(frozen=True)
class PendingApproval:
    """One command waiting for approveEgress or denyEgress."""

    receipt: Receipt
    agent_id: str
    entry_point: str
    payload: dict[str, Any]

    @property
    def cursor(self) -> str:
        accepted = self.receipt.accepted_at.isoformat() if self.receipt.accepted_at else ""
        return base64.urlsafe_b64encode(json.dumps([accepted, self.receipt.command_id]).encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        accepted, command_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(accepted), str(command_id)
    except (ValueError, TypeError) as exc:
        raise Invalid(
            "invalid cursor: pass the endCursor of a previous approvals page unchanged",
            [("after", "not a cursor this gateway issued")],
        ) from exc


async def awaiting_approval(
    conn: AsyncConnection, first: int, after: str | None = None
) -> tuple[list[PendingApproval], bool]:
    """Up to `first` commands awaiting approval after the cursor `after`, and whether more follow."""
    clause: list[Any] = [commands.c.status == store.AWAITING_APPROVAL]
    if after:
        accepted, command_id = _decode(after)
        clause.append(
            or_(
                commands.c.accepted_at > accepted,
                and_(commands.c.accepted_at == accepted, commands.c.command_id > command_id),
            )
        )
    query = (
        select(commands, runs.c.agent_id, runs.c.entry_point)
        .join(runs, runs.c.run_id == commands.c.run_id)
        .where(*clause)
        .order_by(commands.c.accepted_at, commands.c.command_id)
        .limit(first + 1)
    )
    rows = (await conn.execute(query)).mappings().all()
    found = [
        PendingApproval(
            receipt=Receipt.from_row(row),
            agent_id=row["agent_id"],
            entry_point=row["entry_point"],
            payload=payload_json(row),
        )
        for row in rows[:first]
    ]
    return found, len(rows) > first
