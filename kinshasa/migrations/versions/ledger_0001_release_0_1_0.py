
"""The ledger example service's tables and append-only triggers as release 0.1.0 created them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kinshasa.migrations.ops import append_only

revision = 'ledger_0001'
down_revision = None
branch_labels = ('ledger',)
depends_on = None


def upgrade() -> None:
    op.create_table('account_versions',
    sa.Column('account_id', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('account_id', 'version', name='pk_account_versions')
    )
    op.create_index('ix_account_versions_run_id', 'account_versions', ['run_id'], unique=False)
    op.create_table('ledger_applied_steps',
    sa.Column('event_id', sa.String(length=36), nullable=False),
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('command_type', sa.String(length=200), nullable=False),
    sa.Column('entity_type', sa.String(length=256), nullable=False),
    sa.Column('entity_id', sa.String(length=256), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('applied_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id'),
    sa.UniqueConstraint('command_id')
    )
    op.create_index('ix_ledger_applied_steps_run_id', 'ledger_applied_steps', ['run_id'], unique=False)
    op.create_table('ledger_compensations',
    sa.Column('forward_event_id', sa.String(length=36), nullable=False),
    sa.Column('compensate_command_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('compensated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('forward_event_id')
    )
    op.create_table('ledger_entries',
    sa.Column('entry_id', sa.String(length=36), nullable=False),
    sa.Column('account_id', sa.String(length=128), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('memo', sa.String(length=600), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('reverses', sa.String(length=36), nullable=True),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('entry_id'),
    sa.UniqueConstraint('reverses')
    )
    op.create_index('ix_ledger_entries_account_id', 'ledger_entries', ['account_id'], unique=False)
    append_only(['account_versions', 'ledger_entries', 'ledger_applied_steps', 'ledger_compensations'])
