"""The command writer: one agent write, checked by the breaker and stored (held or published) in one tx."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.gateway import store
from kinshasa.gateway.alerts import WebhookSender
from kinshasa.gateway.breaker import check_write, refusal, services_after, trip
from kinshasa.gateway.errors import NotFound, RunClosed
from kinshasa.gateway.policy import PolicyBook
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.runs import check_owner, load_run_for_write, velocity
from kinshasa.gateway.store import commands, runs
from kinshasa.gateway.uow import transaction
from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, utcnow
from kinshasa.schemas.operations import OperationSpec
from kinshasa.topics.catalogue import commands_topic

CLOSED_STATUSES = (store.FINISHED, store.REVERTING, store.REVERTED, store.REVERT_FAILED)


@dataclass(frozen=True)
class Receipt:
    """CommandReceipt: what the agent gets back at once, before anything downstream ran."""

    command_id: str
    run_id: str
    operation: str
    mutation: str
    entity_id: str
    status: str
    release_at: datetime | None
    accepted_at: datetime | None = None
    result: str | None = None
    reason: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Receipt:
        return cls(
            command_id=row["command_id"],
            run_id=row["run_id"],
            operation=row["command_type"],
            mutation=row["graphql_name"],
            entity_id=row["entity_id"],
            status=row["status"],
            release_at=row["release_at"],
            accepted_at=row["accepted_at"],
            result=row["result"],
            reason=row["reason"],
        )


class CommandWriter:
    """Accepts agent writes. The only I/O on this path is the gateway's database."""

    def __init__(
        self,
        engine: AsyncEngine,
        policies: PolicyBook,
        webhook: WebhookSender,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._policies = policies
        self._webhook = webhook
        # Called after a commit that put rows in the outbox, to wake the relay without waiting for its poll.
        self._on_commit = on_commit

    async def submit(
        self, principal: Principal, spec: OperationSpec, run_id: str, payload: BaseModel
    ) -> Receipt:
        """Check and count the write against the run's breaker, store it, commit: one transaction.

        On PostgreSQL the run's row is locked FOR UPDATE first, so concurrent writers to one run (on any
        number of gateway replicas) are serialised on it and the threshold admits exactly its limit.
        """
        async with transaction(self._engine, self._on_commit) as tx:
            run, policy_version = await load_run_for_write(tx.conn, run_id)
            check_owner(run, principal)
            if run.status in CLOSED_STATUSES:
                raise RunClosed(f"run {run_id} is {run.status}: it accepts no more writes; start a new run")
            policy = await self._policies.effective(tx.conn, run.agent_id, run.entry_point, policy_version)
            now = utcnow()
            recent = await velocity(tx.conn, run_id, now - timedelta(seconds=policy.velocity_window_s))
            verdict = check_write(run, policy, spec.service, recent)
            if not verdict.accept:
                if verdict.trip is None:
                    raise refusal(run, recent)
                actor = Actor(kind="system", id="gateway")
                tripped, alert = await trip(
                    tx, run, verdict.trip, policy, actor, self._webhook.url is not None
                )
                await tx.commit()
                self._webhook.send_later(alert)
                raise refusal(tripped, recent)

            command_id = str(uuid.uuid4())
            entity_id = spec.entity_id(payload) or str(uuid.uuid4())
            envelope = Envelope(
                message_id=uuid.UUID(command_id),
                type=spec.command_type,
                run_id=run_id,
                actor=Actor(kind="agent", id=principal.id),
                correlation_id=run_id,
                entity=EntityRef(service=spec.service, type=spec.entity_type, id=entity_id),
                occurred_at=now,
                payload=payload.model_dump(mode="json"),
            )
            window = policy.window_for(spec.command_type)
            release_at: datetime | None = None
            if spec.egress:
                status = store.AWAITING_APPROVAL
            elif window <= 0 and not run.on_hold:
                status = store.PUBLISHED
            else:
                status = store.HELD
                release_at = now + timedelta(seconds=window)
            await tx.conn.execute(
                insert(commands).values(
                    command_id=command_id,
                    run_id=run_id,
                    command_type=spec.command_type,
                    graphql_name=spec.graphql_name,
                    service=spec.service,
                    entity_id=entity_id,
                    status=status,
                    egress=spec.egress,
                    probe=verdict.probe,
                    manual_hold=run.on_hold and status == store.HELD,
                    release_at=release_at,
                    accepted_at=now,
                    published_at=now if status == store.PUBLISHED else None,
                    envelope=envelope.model_dump_json(),
                )
            )
            if status == store.PUBLISHED:
                await tx.emit(commands_topic(spec.service), envelope)
            values: dict[str, Any] = {"writes": runs.c.writes + 1}
            if spec.service not in run.services:
                values["services"] = services_after(run, spec.service)
            if verdict.probe:
                values["probes_left"] = runs.c.probes_left - 1
            if status == store.PUBLISHED:
                values["published"] = runs.c.published + 1
            await tx.conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))
            await tx.commit()
        return Receipt(
            command_id=command_id,
            run_id=run_id,
            operation=spec.command_type,
            mutation=spec.graphql_name,
            entity_id=entity_id,
            status=status,
            release_at=release_at,
            accepted_at=now,
        )


async def get_command(conn: AsyncConnection, command_id: str) -> Any:
    try:
        uuid.UUID(command_id)
    except ValueError:
        raise NotFound(
            f"command {command_id[:80]!r} does not exist: pass a commandId from a CommandReceipt"
        ) from None
    row = (await conn.execute(select(commands).where(commands.c.command_id == command_id))).mappings().first()
    if row is None:
        raise NotFound(f"command {command_id} does not exist: pass a commandId from a CommandReceipt")
    return row


async def list_commands(conn: AsyncConnection, run_id: str, status: str | None, limit: int) -> list[Receipt]:
    query = select(commands).where(commands.c.run_id == run_id)
    if status is not None:
        query = query.where(commands.c.status == status)
    rows = await conn.execute(query.order_by(commands.c.accepted_at, commands.c.command_id).limit(limit))
    return [Receipt.from_row(r) for r in rows.mappings()]


def stored_payload(row: Any) -> dict[str, Any]:
    return dict(json.loads(row["envelope"])["payload"])
