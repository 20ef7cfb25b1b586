
"""The notifier example service's tables and append-only triggers as release 0.1.0 created them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kinshasa.migrations.ops import append_only

revision = 'notifier_0001'
down_revision = None
branch_labels = ('notifier',)
depends_on = None


def upgrade() -> None:
    op.create_table('email_versions',
    sa.Column('email_id', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('recipient', sa.String(length=254), nullable=False),
    sa.Column('subject', sa.String(length=300), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('smtp_message_id', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('email_id', 'version', name='pk_email_versions')
    )
    op.create_index('ix_email_versions_run_id', 'email_versions', ['run_id'], unique=False)
    op.create_table('notifier_applied_steps',
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
    op.create_index('ix_notifier_applied_steps_run_id', 'notifier_applied_steps', ['run_id'], unique=False)
    op.create_table('notifier_compensations',
    sa.Column('forward_event_id', sa.String(length=36), nullable=False),
    sa.Column('compensate_command_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('compensated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('forward_event_id')
    )
    append_only(['email_versions', 'notifier_applied_steps', 'notifier_compensations'])
