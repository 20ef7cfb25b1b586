# ruff: noqa: E501  (the create_table calls are written out as alembic renders them, one line per index)
"""The coordinator's ledger tables as release 0.1.0 created them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'coordinator_0001'
down_revision = None
branch_labels = ('coordinator',)
depends_on = None


def upgrade() -> None:
    op.create_table('ledger_rejections',
    sa.Column('event_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=False),
    sa.Column('command_id', sa.String(length=36), nullable=True),
    sa.Column('command_type', sa.String(length=200), nullable=False),
    sa.Column('entity_key', sa.String(length=330), nullable=True),
    sa.Column('actor_kind', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.String(length=256), nullable=False),
    sa.Column('code', sa.String(length=100), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('rejected_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id', name=op.f('pk_ledger_rejections'))
    )
    op.create_index('ix_ledger_rejections_run_id', 'ledger_rejections', ['run_id'], unique=False)
    op.create_table('ledger_run_events',
    sa.Column('message_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('actor_kind', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.String(length=256), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('message_id', name=op.f('pk_ledger_run_events'))
    )
    op.create_index('ix_ledger_run_events_run_id', 'ledger_run_events', ['run_id', 'occurred_at'], unique=False)
    op.create_table('ledger_runs',
    sa.Column('run_id', sa.String(length=256), nullable=False),
    sa.Column('agent_id', sa.String(length=256), nullable=True),
    sa.Column('entry_point', sa.String(length=256), nullable=True),
    sa.Column('purpose', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_count', sa.Integer(), nullable=False),
    sa.Column('final_count', sa.Integer(), nullable=True),
    sa.Column('next_step_id', sa.Integer(), nullable=False),
    sa.Column('settle_counter', sa.Integer(), nullable=False),
    sa.Column('revert_reason', sa.Text(), nullable=True),
    sa.Column('revert_requested_by', sa.String(length=256), nullable=True),
    sa.Column('revert_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reverted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revert_failure', sa.JSON(), nullable=True),
    sa.Column('trip_reason', sa.Text(), nullable=True),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_event_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_ledger_runs'))
    )
    op.create_index('ix_ledger_runs_agent_started', 'ledger_runs', ['agent_id', 'started_at'], unique=False)
    op.create_index('ix_ledger_runs_entry_started', 'ledger_runs', ['entry_point', 'started_at'], unique=False)
    op.create_index('ix_ledger_runs_started_at', 'ledger_runs', ['started_at'], unique=False)
    op.create_index('ix_ledger_runs_status', 'ledger_runs', ['status'], unique=False)
    op.create_table('ledger_steps',
    sa.Column('run_id', sa.String(length=256), nullable=False),
    sa.Column('step_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('forward_event_id', sa.String(length=36), nullable=False),
    sa.Column('command_id', sa.String(length=36), nullable=True),
    sa.Column('forward_type', sa.String(length=200), nullable=False),
    sa.Column('service', sa.String(length=64), nullable=False),
    sa.Column('entity_type', sa.String(length=64), nullable=False),
    sa.Column('entity_id', sa.String(length=256), nullable=False),
    sa.Column('entity_key', sa.String(length=330), nullable=False),
    sa.Column('actor_kind', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.String(length=256), nullable=False),
    sa.Column('applied_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('forward_seen', sa.Boolean(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('pass_token', sa.String(length=128), nullable=True),
    sa.Column('emitted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome_event_id', sa.String(length=36), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('settle_seq', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('run_id', 'step_id', name=op.f('pk_ledger_steps')),
    sa.UniqueConstraint('forward_event_id', name=op.f('uq_ledger_steps_forward_event_id'))
    )
    op.create_index('ix_ledger_steps_run_entity', 'ledger_steps', ['run_id', 'entity_key', 'step_id'], unique=False)
    op.create_index('ix_ledger_steps_run_settle', 'ledger_steps', ['run_id', 'settle_seq'], unique=False)
    op.create_index('ix_ledger_steps_run_status', 'ledger_steps', ['run_id', 'status'], unique=False)
