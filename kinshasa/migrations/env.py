"""Alembic's entry point for Kinshasa's migrations: runs them on the connection `upgrade` hands over."""

from __future__ import annotations

from alembic import context

from kinshasa.migrations import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("Kinshasa's migrations run through `kinshasa db upgrade --component NAME`, "
                     "which opens the component's database and takes its install lock")
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
