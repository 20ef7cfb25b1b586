
"""The links example service's tables and append-only triggers as release 0.1.0 created them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kinshasa.migrations.ops import append_only

revision = 'links_0001'
down_revision = None
branch_labels = ('links',)
depends_on = None


def upgrade() -> None:
    op.create_table('link_versions',
    sa.Column('link_id', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('from_id', sa.String(length=128), nullable=False),
    sa.Column('to_id', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('command_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('link_id', 'version', name='pk_link_versions')
    )
    op.create_index('ix_link_versions_ends', 'link_versions', ['from_id', 'to_id', 'kind'], unique=False)
    op.create_index('ix_link_versions_run_id', 'link_versions', ['run_id'], unique=False)
    op.create_table('links_applied_steps',
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
    op.create_index('ix_links_applied_steps_run_id', 'links_applied_steps', ['run_id'], unique=False)
    op.create_table('links_compensations',
    sa.Column('forward_event_id', sa.String(length=36), nullable=False),
    sa.Column('compensate_command_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=256), nullable=True),
    sa.Column('actor', sa.String(length=300), nullable=False),
    sa.Column('compensated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('forward_event_id')
    )
    append_only(['link_versions', 'links_applied_steps', 'links_compensations'])
