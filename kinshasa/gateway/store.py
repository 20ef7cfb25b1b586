"""The gateway's own tables: runs with their breaker row, commands, alerts, the policy versions, agent
budgets, idempotency keys, incidents and the policy proposals made for them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.tables import component_metadata
from kinshasa.migrations import upgrade_component
from kinshasa.schemas.run_status import RunStatus

gateway_metadata = component_metadata()


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite would otherwise hand back naive datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column: pass an aware datetime")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text; storing them naive keeps one comparable format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Run status: the one vocabulary in kinshasa.schemas.run_status, stored as its plain text.
RUNNING = RunStatus.RUNNING.value
FINISHED = RunStatus.FINISHED.value
TRIPPED = RunStatus.TRIPPED.value
REVERTING = RunStatus.REVERTING.value
REVERTED = RunStatus.REVERTED.value
REVERT_FAILED = RunStatus.REVERT_FAILED.value
# Breaker state.
CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"
# Command status (CommandReceipt.status): HELD or AWAITING_APPROVAL -> PUBLISHED -> APPLIED or REJECTED (what
# the service did, from its events); APPLIED -> COMPENSATED when a revert undid it; unpublished -> DISCARDED.
HELD, PUBLISHED, AWAITING_APPROVAL, DISCARDED, REJECTED, APPLIED, COMPENSATED = (
    "HELD",
    "PUBLISHED",
    "AWAITING_APPROVAL",
    "DISCARDED",
    "REJECTED",
    "APPLIED",
    "COMPENSATED",
)

_RUNS_AGENT_STATUS = "ix_gw_runs_agent_status"
_COMMANDS_APPLIED_EVENT = "ix_gw_commands_applied_event"

runs = Table(
    "gw_runs",
    gateway_metadata,
    Column("run_id", String(64), primary_key=True),
    Column("agent_id", String(256), nullable=False),
    Column("entry_point", String(256), nullable=False),
    Column("purpose", Text),
    Column("status", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    # The breaker row: locked (FOR UPDATE) by every write so check and count are one atomic step.
    Column("breaker_state", String(10), nullable=False, default=CLOSED),
    Column("writes", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("services", Text, nullable=False, default="[]"),
    Column("probes_left", Integer, nullable=False, default=0),
    Column("tripped_reason", Text),
    Column("tripped_at", UtcDateTime),
    Column("trip_count", Integer, nullable=False, default=0),
    # An operator's holdRun: nothing of this run leaves quarantine until releaseRun.
    Column("on_hold", Boolean, nullable=False, default=False),
    Column("published", Integer, nullable=False, default=0),
    Column("applied", Integer, nullable=False, default=0),
    Column("compensated", Integer, nullable=False, default=0),
    Column("revert_reason", Text),
    Column("revert_requested_at", UtcDateTime),
    Column("revert_requested_by", String(256)),
    Column("revert_detail", Text),
    # The policy version that governed the run's latest breaker decision (its writes, its trip).
    Column("policy_version", Integer),
    Index("ix_gw_runs_agent_started", "agent_id", "started_at"),
    Index("ix_gw_runs_entry_started", "entry_point", "started_at"),
    Index("ix_gw_runs_started", "started_at", "run_id"),
    # maxConcurrentRuns counts an agent's RUNNING runs at every startRun.
    Index(_RUNS_AGENT_STATUS, "agent_id", "status"),
)

commands = Table(
    "gw_commands",
    gateway_metadata,
    Column("command_id", String(36), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("command_type", String(200), nullable=False),
    Column("graphql_name", String(200), nullable=False),
    Column("service", String(64), nullable=False),
    Column("entity_id", String(200), nullable=False),
    Column("status", String(20), nullable=False),
    Column("egress", Boolean, nullable=False, default=False),
    Column("probe", Boolean, nullable=False, default=False),
    # Manual hold: set by a trip or holdRun; such a command is only ever released by an operator.
    Column("manual_hold", Boolean, nullable=False, default=False),
    Column("release_at", UtcDateTime),
    Column("discard_at", UtcDateTime),
    Column("accepted_at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime),
    Column("decided_by", String(256)),
    Column("reason", Text),
    # What the service did with it, from the events topic: APPLIED, REJECTED, COMPENSATED.
    Column("result", String(20)),
    # When the service applied it, the applied event's id (a compensated event names it) and when a
    # revert undid it: the receipt's appliedAt and compensatedAt.
    Column("applied_at", UtcDateTime),
    Column("applied_event_id", String(36)),
    Column("compensated_at", UtcDateTime),
    # When the service's rejection reached the gateway (the moment it counted as an error).
    Column("rejected_at", UtcDateTime),
    Column("envelope", Text, nullable=False),
    Index("ix_gw_commands_run_accepted", "run_id", "accepted_at"),
    Index("ix_gw_commands_status_release", "status", "release_at"),
    Index(_COMMANDS_APPLIED_EVENT, "applied_event_id"),
)

alerts = Table(
    "gw_alerts",
    gateway_metadata,
    Column("alert_id", String(36), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("summary", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("webhook_status", String(20)),
    Column("webhook_attempts", Integer, nullable=False, default=0),
    Index("ix_gw_alerts_created", "created_at"),
)

policy_versions = Table(
    "gw_policy_versions",
    gateway_metadata,
    Column("version", Integer, primary_key=True, autoincrement=True),
    Column("scope", String(16), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("document", Text, nullable=False),
    Column("author", String(256), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# Every version of a service declaration the gateway accepted; the newest per service is what it serves.
service_versions = Table(
    "gw_service_versions",
    gateway_metadata,
    Column("service", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("digest", String(80), nullable=False),
    Column("declaration", Text, nullable=False),
    Column("accepted_at", UtcDateTime, nullable=False),
)

# One row per agent that has a budget: locked (FOR UPDATE) by its startRun and by every write batch that
# admits its writes, so a budget's check and count are one atomic step across gateway replicas. It also
# remembers when each budget last raised an alert (one alert per breach; see gateway/budgets.py).
agent_budgets = Table(
    "gw_agent_budgets",
    gateway_metadata,
    Column("agent_id", String(256), primary_key=True),
    Column("concurrent_alerted_at", UtcDateTime),
    Column("runs_alerted_at", UtcDateTime),
    Column("writes_alerted_at", UtcDateTime),
)

# An agent's admitted writes per minute (Unix minute number), over all its runs: the sliding hour of
# maxAgentWritesPerHour is a sum over at most 61 rows, written under the agent's budget row lock.
agent_writes = Table(
    "gw_agent_writes",
    gateway_metadata,
    Column("agent_id", String(256), primary_key=True),
    Column("minute", Integer, primary_key=True, autoincrement=False),
    Column("writes", Integer, nullable=False),
)

IDEMPOTENCY_KEY_MAX = 255

# A principal's idempotency keys: the request each one was first used for and the answer it got, written
# in the transaction that created the run or command, so any replica answers a retry with the same.
idempotency_keys = Table(
    "gw_idempotency_keys",
    gateway_metadata,
    Column("principal_id", String(256), primary_key=True),
    Column("key", String(IDEMPOTENCY_KEY_MAX), primary_key=True),
    Column("request_digest", String(64), nullable=False),
    Column("answer", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_gw_idempotency_keys_created", "created_at"),
)

# What went wrong, one row per incident (gateway/incidents.py): a trip, a revert and its outcome, an agent
# over a budget, a denied egress, a dead-lettered command. `decided_at` and `decision` are filled once,
# when an operator accepts or rejects one of its proposals.
incidents = Table(
    "gw_incidents",
    gateway_metadata,
    Column("incident_id", String(36), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("run_id", String(64)),
    Column("agent_id", String(256)),
    Column("entry_point", String(256)),
    Column("policy_version", Integer),
    Column("threshold", String(32)),
    Column("count", Float),
    Column("limit", Float),
    Column("write_index", Integer),
    Column("escaped", Text, nullable=False, default="[]"),
    Column("held", Integer, nullable=False, default=0),
    Column("services", Text, nullable=False, default="[]"),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("decided_at", UtcDateTime),
    Column("decision", Text),
    # The facts a replay needs beyond the command rows (the refused write that tripped, the held and
    # escaped command ids, the failing steps of a revert), and whether proposals were computed.
    Column("detail", Text, nullable=False, default="{}"),
    Column("proposed", Boolean, nullable=False, default=False),
    Index("ix_gw_incidents_opened", "opened_at", "incident_id"),
    Index("ix_gw_incidents_run", "run_id"),
)

# Policy changes the system proposes for an incident, each with the backtest that justifies it.
proposals = Table(
    "gw_proposals",
    gateway_metadata,
    Column("proposal_id", String(36), primary_key=True),
    Column("incident_id", String(36), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("settings", Text, nullable=False),
    Column("rationale", Text, nullable=False),
    Column("backtest", Text, nullable=False),
    Column("status", String(10), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("decided_at", UtcDateTime),
    Column("decided_by", String(256)),
    Column("reason", Text),
    Column("policy_version", Integer),
    Index("ix_gw_proposals_incident", "incident_id"),
)

# One row per component the durability watcher follows (gateway/durability.py): whether it is over a
# threshold, so an alert is raised once per crossing and not on every poll.
durability_alarms = Table(
    "gw_durability_alarms",
    gateway_metadata,
    Column("component", String(255), primary_key=True),
    # Over a threshold as of the last poll that changed it; an alert was raised when it turned true.
    Column("over", Boolean, nullable=False, default=False),
    # How many times the component went over, and the alert of the latest crossing.
    Column("crossings", Integer, nullable=False, default=0),
    Column("alert_id", String(36), nullable=True),
    Column("changed_at", UtcDateTime, nullable=True),
)


async def install_gateway_tables(engine: AsyncEngine) -> None:
    """Migrate the gateway's database (kernel and gateway tables, append-only triggers) to this build.

    Safe on every start and from several replicas at once (kinshasa/migrations); a database already up to
    date runs no DDL.
    """
    await upgrade_component(engine, "gateway")


def as_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
