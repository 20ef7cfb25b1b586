"""The coordinator's own tables: the per-run ledger (run index, steps, rejections, run facts)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    event,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.database import READ_ONLY, create_engine
from kinshasa.kernel.tables import component_metadata
from kinshasa.migrations import upgrade_component
from kinshasa.schemas.envelope import RunEventKind

# Its own MetaData: the coordinator's ledger is not a kernel table and must not be created by services.
ledger_metadata = component_metadata()

ID = String(256)
MESSAGE_ID = String(36)
STAMP = DateTime(timezone=True)


class StepStatus(StrEnum):
    """Where one applied forward step stands on the way back."""

    APPLIED = "applied"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    IRREVERSIBLE = "irreversible"


# Steps nothing more can be done about: undone, or egress that has no inverse.
SETTLED = (StepStatus.COMPENSATED, StepStatus.IRREVERSIBLE)

runs = Table(
    "ledger_runs",
    ledger_metadata,
    Column("run_id", ID, nullable=False),
    Column("agent_id", ID, nullable=True),
    Column("entry_point", ID, nullable=True),
    Column("purpose", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("started_at", STAMP, nullable=True),
    Column("finished_at", STAMP, nullable=True),
    # Highest published-command count any run fact reported.
    Column("published_count", Integer, nullable=False, default=0),
    # The count from `revert_requested` / `tripped`: the gateway publishes no more after it.
    Column("final_count", Integer, nullable=True),
    Column("next_step_id", Integer, nullable=False, default=1),
    # Counts settlements (compensated / compensation_failed) so a pass reads only what is new.
    Column("settle_counter", Integer, nullable=False, default=0),
    Column("revert_reason", Text, nullable=True),
    Column("revert_requested_by", ID, nullable=True),
    Column("revert_requested_at", STAMP, nullable=True),
    Column("reverted_at", STAMP, nullable=True),
    Column("revert_failure", JSON, nullable=True),
    Column("trip_reason", Text, nullable=True),
    Column("first_seen_at", STAMP, nullable=False),
    Column("last_event_at", STAMP, nullable=False),
    PrimaryKeyConstraint("run_id"),
    Index("ix_ledger_runs_agent_started", "agent_id", "started_at"),
    Index("ix_ledger_runs_entry_started", "entry_point", "started_at"),
    Index("ix_ledger_runs_started_at", "started_at"),
    Index("ix_ledger_runs_status", "status"),
)

steps = Table(
    "ledger_steps",
    ledger_metadata,
    Column("run_id", ID, nullable=False),
    # Monotonic per run in the order the ledger applied the forward events; one entity's events
    # arrive on one partition in order, so per entity this is the services' own apply order.
    Column("step_id", Integer, nullable=False, autoincrement=False),
    Column("forward_event_id", MESSAGE_ID, nullable=False, unique=True),
    Column("command_id", MESSAGE_ID, nullable=True),
    Column("forward_type", String(200), nullable=False),
    Column("service", String(64), nullable=False),
    Column("entity_type", String(64), nullable=False),
    Column("entity_id", ID, nullable=False),
    Column("entity_key", String(330), nullable=False),
    Column("actor_kind", String(16), nullable=False),
    Column("actor_id", ID, nullable=False),
    Column("applied_at", STAMP, nullable=False),
    Column("status", String(24), nullable=False),
    # False only for a step first learnt from its `.compensated` (delivered before its `.applied`).
    Column("forward_seen", Boolean, nullable=False, default=True),
    # The compensate emission attempt last made; part of the compensate command's message id.
    Column("attempt", Integer, nullable=False, default=0),
    # Which revert pass made that attempt: a retried activity of the same pass re-sends the same id.
    Column("pass_token", String(128), nullable=True),
    Column("emitted_at", STAMP, nullable=True),
    Column("resolved_at", STAMP, nullable=True),
    Column("outcome_event_id", MESSAGE_ID, nullable=True),
    Column("failure_reason", Text, nullable=True),
    # The run's settle_counter when this step last settled: "what settled since" is one index range.
    Column("settle_seq", Integer, nullable=True),
    # The entity as the service showed it on the `.applied` event, before and after the step: what the
    # operator reads as the step's diff. Never used to compensate (the owning service does that).
    Column("before_state", JSON, nullable=True),
    Column("after_state", JSON, nullable=True),
    PrimaryKeyConstraint("run_id", "step_id"),
    Index("ix_ledger_steps_run_entity", "run_id", "entity_key", "step_id"),
    Index("ix_ledger_steps_run_status", "run_id", "status"),
    Index("ix_ledger_steps_run_settle", "run_id", "settle_seq"),
)

rejections = Table(
    "ledger_rejections",
    ledger_metadata,
    Column("event_id", MESSAGE_ID, nullable=False),
    Column("run_id", ID, nullable=False),
    Column("command_id", MESSAGE_ID, nullable=True),
    Column("command_type", String(200), nullable=False),
    Column("entity_key", String(330), nullable=True),
    Column("actor_kind", String(16), nullable=False),
    Column("actor_id", ID, nullable=False),
    Column("code", String(100), nullable=True),
    Column("reason", Text, nullable=True),
    Column("rejected_at", STAMP, nullable=False),
    PrimaryKeyConstraint("event_id"),
    Index("ix_ledger_rejections_run_id", "run_id"),
)

run_events = Table(
    "ledger_run_events",
    ledger_metadata,
    Column("message_id", MESSAGE_ID, nullable=False),
    Column("run_id", ID, nullable=False),
    Column("type", String(64), nullable=False),
    Column("actor_kind", String(16), nullable=False),
    Column("actor_id", ID, nullable=False),
    Column("occurred_at", STAMP, nullable=False),
    Column("payload", JSON, nullable=False),
    # For facts that start a revert: when the workflow was started (or joined) for it.
    Column("handled_at", STAMP, nullable=True),
    PrimaryKeyConstraint("message_id"),
    Index("ix_ledger_run_events_run_id", "run_id", "occurred_at"),
)

# The sweeper's every-few-seconds question, "which revert triggers are not handled yet?", reads only the
# few rows it is about, however many run facts the ledger holds.
_UNHANDLED = and_(run_events.c.type == RunEventKind.REVERT_REQUESTED.type, run_events.c.handled_at.is_(None))
unhandled_triggers_index = Index("ix_ledger_run_events_unhandled", run_events.c.occurred_at,
                                 sqlite_where=_UNHANDLED, postgresql_where=_UNHANDLED)


def reader_for(engine: AsyncEngine) -> AsyncEngine:
    """An engine for read-only queries on the same database.

    The kernel's SQLite engines begin every transaction with BEGIN IMMEDIATE (the write lock), which is
    right for writers but makes every ledger read queue behind the projector and the relay. Reads here
    use plain deferred transactions on the same WAL database (the kernel's `READ_ONLY` option, on its
    driver: one trip per statement), so they never take the write lock, and the statements of one read
    see one snapshot. PostgreSQL needs nothing special: the engine is returned as it is.
    """
    if engine.dialect.name != "sqlite":
        return engine
    reader = create_engine(engine.url.render_as_string(hide_password=False),
                           execution_options={READ_ONLY: True})

    @event.listens_for(reader.sync_engine, "connect")
    def _query_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return reader


async def install_ledger(engine: AsyncEngine) -> None:
    """Migrate the coordinator's database (kernel and ledger tables) to this build; safe on every start."""
    await upgrade_component(engine, "coordinator")
