"""Incidents: every punch the system absorbed, recorded where it landed, for the operator and for learning.

A trip, a revert and its outcome (REVERT, REVERT_FAILED), an agent over a budget, a denied egress and a
dead-lettered command each become one row, written in the transaction that decided it, with the policy
version in force. A trip's row also keeps what a replay needs beyond the command rows: the refused
write that tripped the breaker, and which commands had escaped and which were held at that moment.
Proposals (gateway/proposals.py) are computed from an incident and the recorded runs.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kinshasa.gateway import store
from kinshasa.gateway.errors import Invalid, NotFound
from kinshasa.gateway.store import commands, incidents


class IncidentKind(StrEnum):
    TRIP = "TRIP"
    REVERT = "REVERT"
    REVERT_FAILED = "REVERT_FAILED"
    AGENT_BUDGET = "AGENT_BUDGET"
    EGRESS_DENIED = "EGRESS_DENIED"
    DEAD_LETTER = "DEAD_LETTER"


@dataclass(frozen=True)
class Incident:
    incident_id: str
    kind: IncidentKind
    run_id: str | None
    agent_id: str | None
    entry_point: str | None
    policy_version: int | None
    threshold: str | None
    count: float | None
    limit: float | None
    write_index: int | None
    escaped: tuple[tuple[str, int], ...]
    held: int
    services: tuple[str, ...]
    opened_at: datetime
    decided_at: datetime | None = None
    decision: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    proposed: bool = False

    @classmethod
    def from_row(cls, row: Any) -> Incident:
        return cls(
            incident_id=row["incident_id"],
            kind=IncidentKind(row["kind"]),
            run_id=row["run_id"],
            agent_id=row["agent_id"],
            entry_point=row["entry_point"],
            policy_version=row["policy_version"],
            threshold=row["threshold"],
            count=row["count"],
            limit=row["limit"],
            write_index=row["write_index"],
            escaped=tuple((str(op), int(n)) for op, n in json.loads(row["escaped"] or "[]")),
            held=int(row["held"] or 0),
            services=tuple(json.loads(row["services"] or "[]")),
            opened_at=row["opened_at"],
            decided_at=row["decided_at"],
            decision=row["decision"],
            detail=json.loads(row["detail"] or "{}"),
            proposed=bool(row["proposed"]),
        )


async def open_incident(
    conn: AsyncConnection,
    kind: IncidentKind,
    opened_at: datetime,
    *,
    run_id: str | None = None,
    agent_id: str | None = None,
    entry_point: str | None = None,
    policy_version: int | None = None,
    threshold: str | None = None,
    count: float | None = None,
    limit: float | None = None,
    write_index: int | None = None,
    escaped: dict[str, int] | None = None,
    held: int = 0,
    services: tuple[str, ...] | list[str] = (),
    detail: dict[str, Any] | None = None,
    incident_id: str | None = None,
) -> str:
    """Insert one incident in the caller's transaction; returns its id."""
    incident_id = incident_id or str(uuid.uuid4())
    await conn.execute(
        insert(incidents).values(
            incident_id=incident_id,
            kind=kind.value,
            run_id=run_id,
            agent_id=agent_id,
            entry_point=entry_point,
            policy_version=policy_version,
            threshold=threshold,
            count=count,
            limit=limit,
            write_index=write_index,
            escaped=json.dumps(sorted((escaped or {}).items())),
            held=held,
            services=json.dumps(sorted(services)),
            opened_at=opened_at,
            detail=json.dumps(detail or {}, sort_keys=True, default=str),
            proposed=False,
        )
    )
    return incident_id


async def run_commands_at(conn: AsyncConnection, run_id: str) -> tuple[list[Any], list[Any]]:
    """The run's commands that have left the gateway, and those still unpublished, oldest first."""
    rows = (
        (
            await conn.execute(
                select(
                    commands.c.command_id, commands.c.command_type, commands.c.status, commands.c.published_at
                )
                .where(commands.c.run_id == run_id)
                .order_by(commands.c.accepted_at, commands.c.command_id)
            )
        )
        .mappings()
        .all()
    )
    out = [r for r in rows if r["published_at"] is not None]
    waiting = [r for r in rows if r["status"] in (store.HELD, store.AWAITING_APPROVAL)]
    return out, waiting


def by_operation(rows: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["command_type"]] = counts.get(row["command_type"], 0) + 1
    return counts


async def mark_decided(conn: AsyncConnection, incident_id: str, decision: str, at: datetime) -> None:
    """The operator's decision on the incident (the first one stands; later ones are on the proposals)."""
    await conn.execute(
        update(incidents)
        .where(incidents.c.incident_id == incident_id, incidents.c.decided_at.is_(None))
        .values(decided_at=at, decision=decision)
    )


async def mark_proposed(conn: AsyncConnection, incident_id: str) -> None:
    await conn.execute(update(incidents).where(incidents.c.incident_id == incident_id).values(proposed=True))


def _check_id(incident_id: str) -> str:
    try:
        return str(uuid.UUID(incident_id))
    except ValueError:
        raise NotFound(
            f"incident {incident_id[:80]!r} does not exist: pass an id from the incidents query"
        ) from None


async def get_incident(conn: AsyncConnection, incident_id: str) -> Incident:
    row = (
        (await conn.execute(select(incidents).where(incidents.c.incident_id == _check_id(incident_id))))
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"incident {incident_id} does not exist: pass an id from the incidents query")
    return Incident.from_row(row)


def encode_cursor(incident: Incident) -> str:
    raw = json.dumps([incident.opened_at.isoformat(), incident.incident_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        opened, incident_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        moment = datetime.fromisoformat(opened)
        if moment.tzinfo is None:
            # The cursors this gateway issues carry a zone; a naive time would fail in the UTC column.
            raise ValueError("a cursor's time carries its zone")
        return moment, str(incident_id)
    except (ValueError, TypeError) as exc:
        raise Invalid(
            "invalid cursor: pass the endCursor of a previous page of incidents unchanged",
            [("after", "not a cursor this gateway issued")],
        ) from exc


async def list_incidents(
    conn: AsyncConnection,
    first: int,
    after: str | None = None,
    kind: IncidentKind | None = None,
    run_id: str | None = None,
) -> tuple[list[Incident], bool]:
    """Newest first, keyset-paginated on (opened_at, id)."""
    clause: list[Any] = []
    if kind is not None:
        clause.append(incidents.c.kind == kind.value)
    if run_id is not None:
        clause.append(incidents.c.run_id == run_id)
    if after:
        opened, incident_id = _decode_cursor(after)
        clause.append(
            or_(
                incidents.c.opened_at < opened,
                and_(incidents.c.opened_at == opened, incidents.c.incident_id < incident_id),
            )
        )
    query = (
        select(incidents)
        .where(*clause)
        .order_by(incidents.c.opened_at.desc(), incidents.c.incident_id.desc())
        .limit(first + 1)
    )
    rows = [Incident.from_row(r) for r in (await conn.execute(query)).mappings()]
    return rows[:first], len(rows) > first


async def count_incidents(conn: AsyncConnection, kind: IncidentKind | None = None) -> int:
    query = select(func.count()).select_from(incidents)
    if kind is not None:
        query = query.where(incidents.c.kind == kind.value)
    return int((await conn.execute(query)).scalar_one())
