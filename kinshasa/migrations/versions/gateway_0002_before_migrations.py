# ruff: noqa: E501  (the create_table calls are written out as alembic renders them)
"""Gateway: everything added between release 0.1.0 and the first migration (budgets, idempotency keys,
incidents and proposals, service versions, durability alarms, command outcome columns).

Gateways before migrations created these tables and added these columns on start, so a database made
then may hold any part of them: each step looks first and creates only what is missing. Later revisions
are plain: they run on databases whose version table says exactly what they hold.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kinshasa.migrations.ops import add_column_if_missing, create_index_if_missing, has_table, has_trigger

revision = 'gateway_0002'
down_revision = 'gateway_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not has_table('gw_agent_budgets'):
        op.create_table('gw_agent_budgets',
        sa.Column('agent_id', sa.String(length=256), nullable=False),
        sa.Column('concurrent_alerted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('runs_alerted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('writes_alerted_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('agent_id', name=op.f('pk_gw_agent_budgets'))
        )
    if not has_table('gw_agent_writes'):
        op.create_table('gw_agent_writes',
        sa.Column('agent_id', sa.String(length=256), nullable=False),
        sa.Column('minute', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('writes', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('agent_id', 'minute', name=op.f('pk_gw_agent_writes'))
        )
    if not has_table('gw_idempotency_keys'):
        op.create_table('gw_idempotency_keys',
        sa.Column('principal_id', sa.String(length=256), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('request_digest', sa.String(length=64), nullable=False),
        sa.Column('answer', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('principal_id', 'key', name=op.f('pk_gw_idempotency_keys'))
        )
        op.create_index('ix_gw_idempotency_keys_created', 'gw_idempotency_keys', ['created_at'], unique=False)
    if not has_table('gw_incidents'):
        op.create_table('gw_incidents',
        sa.Column('incident_id', sa.String(length=36), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('run_id', sa.String(length=64), nullable=True),
        sa.Column('agent_id', sa.String(length=256), nullable=True),
        sa.Column('entry_point', sa.String(length=256), nullable=True),
        sa.Column('policy_version', sa.Integer(), nullable=True),
        sa.Column('threshold', sa.String(length=32), nullable=True),
        sa.Column('count', sa.Float(), nullable=True),
        sa.Column('limit', sa.Float(), nullable=True),
        sa.Column('write_index', sa.Integer(), nullable=True),
        sa.Column('escaped', sa.Text(), nullable=False),
        sa.Column('held', sa.Integer(), nullable=False),
        sa.Column('services', sa.Text(), nullable=False),
        sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('decision', sa.Text(), nullable=True),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('proposed', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('incident_id', name=op.f('pk_gw_incidents'))
        )
        op.create_index('ix_gw_incidents_opened', 'gw_incidents', ['opened_at', 'incident_id'], unique=False)
        op.create_index('ix_gw_incidents_run', 'gw_incidents', ['run_id'], unique=False)
    if not has_table('gw_proposals'):
        op.create_table('gw_proposals',
        sa.Column('proposal_id', sa.String(length=36), nullable=False),
        sa.Column('incident_id', sa.String(length=36), nullable=False),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('subject', sa.String(length=256), nullable=False),
        sa.Column('settings', sa.Text(), nullable=False),
        sa.Column('rationale', sa.Text(), nullable=False),
        sa.Column('backtest', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=10), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('decided_by', sa.String(length=256), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('policy_version', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('proposal_id', name=op.f('pk_gw_proposals'))
        )
        op.create_index('ix_gw_proposals_incident', 'gw_proposals', ['incident_id'], unique=False)
    if not has_table('gw_service_versions'):
        op.create_table('gw_service_versions',
        sa.Column('service', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('digest', sa.String(length=80), nullable=False),
        sa.Column('declaration', sa.Text(), nullable=False),
        sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('service', 'version', name=op.f('pk_gw_service_versions'))
        )
    if not has_table('gw_durability_alarms'):
        op.create_table('gw_durability_alarms',
        sa.Column('component', sa.String(length=255), nullable=False),
        sa.Column('over', sa.Boolean(), nullable=False),
        sa.Column('crossings', sa.Integer(), nullable=False),
        sa.Column('alert_id', sa.String(length=36), nullable=True),
        sa.Column('changed_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('component', name=op.f('pk_gw_durability_alarms'))
        )
    for name in ("applied_at", "compensated_at", "rejected_at"):
        add_column_if_missing("gw_commands", sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    add_column_if_missing("gw_commands", sa.Column("applied_event_id", sa.String(length=36), nullable=True))
    add_column_if_missing("gw_runs", sa.Column("policy_version", sa.Integer(), nullable=True))
    create_index_if_missing("ix_gw_runs_agent_status", "gw_runs", ["agent_id", "status"])
    create_index_if_missing("ix_gw_commands_applied_event", "gw_commands", ["applied_event_id"])
    _service_versions_append_only()


def _service_versions_append_only() -> None:
    """The same triggers as the policy history's (gateway_0001), for the service declarations."""
    if op.get_bind().dialect.name == "sqlite":
        for operation in ("UPDATE", "DELETE"):
            if not has_trigger(f"gw_service_versions_no_{operation.lower()}"):
                op.execute(f"CREATE TRIGGER gw_service_versions_no_{operation.lower()} BEFORE {operation} "
                           "ON gw_service_versions BEGIN SELECT RAISE(ABORT, 'gw_service_versions is append-only'); END")
    elif not has_trigger("gw_service_versions_no_change"):
        op.execute("CREATE OR REPLACE FUNCTION gw_service_versions_append_only() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'gw_service_versions is append-only'; END $$ LANGUAGE plpgsql")
        op.execute("CREATE TRIGGER gw_service_versions_no_change BEFORE UPDATE OR DELETE ON gw_service_versions "
                   "FOR EACH ROW EXECUTE FUNCTION gw_service_versions_append_only()")
