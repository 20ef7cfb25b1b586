"""The gateway's own tables: runs with their breaker row, commands, alerts, the policy versions, agent
budgets, idempotency keys, incidents and the policy proposals made for them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    inspect,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.schemas.run_status import RunStatus

gateway_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


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

_APPEND_ONLY = ("gw_policy_versions", "gw_service_versions")

# Columns and indexes added to tables that existing databases already have (create_all creates only
# missing tables). Columns come first: an index may name one.
_ADDED_COLUMNS = {
    "gw_commands": ("applied_at", "applied_event_id", "compensated_at", "rejected_at"),
    "gw_runs": ("policy_version",),
}
_ADDED_INDEXES = (
    ("gw_runs", _RUNS_AGENT_STATUS, "agent_id, status"),
    ("gw_commands", _COMMANDS_APPLIED_EVENT, "applied_event_id"),
)


def _missing_columns(sync_conn: Any) -> list[str]:
    """ALTER TABLE statements for the added columns an existing database lacks."""
    inspector = inspect(sync_conn)
    statements: list[str] = []
    for table_name, names in _ADDED_COLUMNS.items():
        present = {column["name"] for column in inspector.get_columns(table_name)}
        table = gateway_metadata.tables[table_name]
        for name in names:
            if name not in present:
                column_type = table.c[name].type.compile(dialect=sync_conn.dialect)
                statements.append(f"ALTER TABLE {table_name} ADD COLUMN {name} {column_type}")
    return statements


def _missing_indexes(sync_conn: Any) -> list[str]:
    """CREATE INDEX statements for the added indexes an existing database lacks."""
    inspector = inspect(sync_conn)
    statements: list[str] = []
    for table_name, name, columns in _ADDED_INDEXES:
        if name not in {index["name"] for index in inspector.get_indexes(table_name)}:
            statements.append(f"CREATE INDEX IF NOT EXISTS {name} ON {table_name} ({columns})")
    return statements


async def _missing_append_only(conn: AsyncConnection) -> list[str]:
    """The append-only triggers' DDL for the tables that lack them (on PostgreSQL, by the catalogue)."""
    if conn.dialect.name == "sqlite":
        present = set((await conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")))
                      .scalars())
        return _append_only_ddl("sqlite", [t for t in _APPEND_ONLY
                                           if not {f"{t}_no_update", f"{t}_no_delete"} <= present])
    present = set((await conn.execute(
        text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname = ANY(:names)"),
        {"names": [f"{table}_no_change" for table in _APPEND_ONLY]})).scalars())
    return _append_only_ddl("postgresql", [t for t in _APPEND_ONLY if f"{t}_no_change" not in present])


def _append_only_ddl(dialect: str, tables: Sequence[str]) -> list[str]:
    """Triggers refusing UPDATE and DELETE, so the policy history cannot be rewritten, even by hand."""
    statements: list[str] = []
    for table in tables:
        if dialect == "sqlite":
            for op in ("UPDATE", "DELETE"):
                statements.append(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        else:
            statements.append(
                f"CREATE OR REPLACE FUNCTION {table}_append_only() RETURNS trigger AS $$ BEGIN "
                f"RAISE EXCEPTION '{table} is append-only'; END $$ LANGUAGE plpgsql"
            )
            statements.append(f"DROP TRIGGER IF EXISTS {table}_no_change ON {table}")
            statements.append(
                f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
            )
    return statements


async def install_gateway_tables(engine: AsyncEngine) -> None:
    """Create the gateway tables and their append-only triggers; safe to run on every start.

    Every piece is looked up before it is created, so a start against a database that has them all runs
    no DDL: DDL locks whole tables, and a replica starting beside one that is writing would otherwise
    deadlock with it (a CREATE INDEX on one table waiting for a writer that waits for another).
    """
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Two replicas starting together would race on CREATE TABLE; one advisory lock serialises them.
            await conn.execute(text("SELECT pg_advisory_xact_lock(724115)"))
        await conn.run_sync(gateway_metadata.create_all)
        for statement in await conn.run_sync(_missing_columns):
            await conn.execute(text(statement))
        for statement in await conn.run_sync(_missing_indexes):
            await conn.execute(text(statement))
        for statement in await _missing_append_only(conn):
            await conn.execute(text(statement))


def as_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
