"""Coordinator: what was added to the ledger between release 0.1.0 and the first migration (the steps'
before and after states, the sweeper's index of unhandled revert triggers).

Coordinators before migrations added these on start, so a ledger made then may hold either: each step
looks first and adds only what is missing.
"""

from __future__ import annotations

import sqlalchemy as sa

from kinshasa.migrations.ops import add_column_if_missing, create_index_if_missing

revision = 'coordinator_0002'
down_revision = 'coordinator_0001'
branch_labels = None
depends_on = None

_UNHANDLED = "type = 'run.revert_requested' AND handled_at IS NULL"


def upgrade() -> None:
    add_column_if_missing("ledger_steps", sa.Column("before_state", sa.JSON(), nullable=True))
    add_column_if_missing("ledger_steps", sa.Column("after_state", sa.JSON(), nullable=True))
    create_index_if_missing("ix_ledger_run_events_unhandled", "ledger_run_events", ["occurred_at"],
                            sqlite_where=sa.text(_UNHANDLED), postgresql_where=sa.text(_UNHANDLED))
