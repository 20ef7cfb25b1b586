"""Operations Kinshasa's migrations share: the append-only triggers, and the look-before-you-create steps
of the catch-up revisions that bring a database made before migrations existed up to date."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from alembic import op

from kinshasa.kernel.appendonly import append_only_statements


def append_only(table_names: Iterable[str]) -> None:
    """Make the tables insert-only (kernel/appendonly.py's triggers, on either backend)."""
    for statement in append_only_statements(op.get_bind().dialect.name, table_names):
        op.execute(statement)


def _inspector() -> sa.Inspector:
    return sa.inspect(op.get_bind())


def has_table(name: str) -> bool:
    return _inspector().has_table(name)


def add_column_if_missing(table: str, column: sa.Column[object]) -> None:
    if column.name not in {c["name"] for c in _inspector().get_columns(table)}:
        op.add_column(table, column)


def create_index_if_missing(name: str, table: str, columns: list[str], **kwargs: Any) -> None:
    if name not in {index["name"] for index in _inspector().get_indexes(table)}:
        op.create_index(name, table, columns, **kwargs)


def has_trigger(name: str) -> bool:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        query = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = :name"
    else:
        query = "SELECT 1 FROM pg_trigger WHERE NOT tgisinternal AND tgname = :name"
    return bind.execute(sa.text(query), {"name": name}).first() is not None
