"""Kernel: `receipt_chains`, one row per component that keeps a receipt chain (opened at its start).

It tells "keeps a chain, has emitted nothing yet" (a valid chain of length 0) from "keeps none" (refused
by `kinshasa receipts verify`). A database from before this revision keeps its receipts; the component
opens its chain on its next start.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kinshasa.migrations.ops import has_table

revision = 'kernel_0002'
down_revision = 'kernel_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if has_table('receipt_chains'):  # made by a development build between the two revisions
        return
    op.create_table('receipt_chains',
    sa.Column('component', sa.String(length=64), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('component', name=op.f('pk_receipt_chains'))
    )
