# ruff: noqa: E501  (the create_table calls are written out as alembic renders them, one line per index)
"""Gateway tables (runs, commands, alerts, policy versions) as release 0.1.0 created them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'gateway_0001'
down_revision = None
branch_labels = ('gateway',)
depends_on = None


def upgrade() -> None:
    op.create_table('gw_alerts',
    sa.Column('alert_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('webhook_status', sa.String(length=20), nullable=True),
    sa.Column('webhook_attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('alert_id', name=op.f('pk_gw_alerts'))
    )
    op.create_index('ix_gw_alerts_created', 'gw_alerts', ['created_at'], unique=False)
    op.create_table('gw_commands',
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('command_type', sa.String(length=200), nullable=False),
    sa.Column('graphql_name', sa.String(length=200), nullable=False),
    sa.Column('service', sa.String(length=64), nullable=False),
    sa.Column('entity_id', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('egress', sa.Boolean(), nullable=False),
    sa.Column('probe', sa.Boolean(), nullable=False),
    sa.Column('manual_hold', sa.Boolean(), nullable=False),
    sa.Column('release_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('discard_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_by', sa.String(length=256), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('result', sa.String(length=20), nullable=True),
    sa.Column('envelope', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('command_id', name=op.f('pk_gw_commands'))
    )
    op.create_index('ix_gw_commands_run_accepted', 'gw_commands', ['run_id', 'accepted_at'], unique=False)
    op.create_index('ix_gw_commands_status_release', 'gw_commands', ['status', 'release_at'], unique=False)
    op.create_table('gw_policy_versions',
    sa.Column('version', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('subject', sa.String(length=256), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=256), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_gw_policy_versions'))
    )
    op.create_table('gw_runs',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=256), nullable=False),
    sa.Column('entry_point', sa.String(length=256), nullable=False),
    sa.Column('purpose', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('breaker_state', sa.String(length=10), nullable=False),
    sa.Column('writes', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('services', sa.Text(), nullable=False),
    sa.Column('probes_left', sa.Integer(), nullable=False),
    sa.Column('tripped_reason', sa.Text(), nullable=True),
    sa.Column('tripped_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('trip_count', sa.Integer(), nullable=False),
    sa.Column('on_hold', sa.Boolean(), nullable=False),
    sa.Column('published', sa.Integer(), nullable=False),
    sa.Column('applied', sa.Integer(), nullable=False),
    sa.Column('compensated', sa.Integer(), nullable=False),
    sa.Column('revert_reason', sa.Text(), nullable=True),
    sa.Column('revert_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revert_requested_by', sa.String(length=256), nullable=True),
    sa.Column('revert_detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_gw_runs'))
    )
    op.create_index('ix_gw_runs_agent_started', 'gw_runs', ['agent_id', 'started_at'], unique=False)
    op.create_index('ix_gw_runs_entry_started', 'gw_runs', ['entry_point', 'started_at'], unique=False)
    op.create_index('ix_gw_runs_started', 'gw_runs', ['started_at', 'run_id'], unique=False)
    # Release 0.1.0's own triggers for the policy history (not kernel/appendonly.py's: kept as they were).
    if op.get_bind().dialect.name == "sqlite":
        for operation in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER gw_policy_versions_no_{operation.lower()} BEFORE {operation} "
                       "ON gw_policy_versions BEGIN SELECT RAISE(ABORT, 'gw_policy_versions is append-only'); END")
    else:
        op.execute("CREATE OR REPLACE FUNCTION gw_policy_versions_append_only() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'gw_policy_versions is append-only'; END $$ LANGUAGE plpgsql")
        op.execute("CREATE TRIGGER gw_policy_versions_no_change BEFORE UPDATE OR DELETE ON gw_policy_versions "
                   "FOR EACH ROW EXECUTE FUNCTION gw_policy_versions_append_only()")
