"""Schema migrations of every component's database, run at start and by `kinshasa db upgrade`.

One alembic script directory ships inside the package (this folder) with one branch per part of a
schema: `kernel` (outbox, inbox, dead letters, receipts), which every component's database holds, and
one for the component's own tables (`gateway`, `coordinator`, or an example service's name). A database
is upgraded along `kernel` and its component's branch; its version table (`kinshasa_schema_version`)
holds one row per branch. A service author's own tables are not Kinshasa's to migrate: see
`services/kit/install.py`.

A database made before migrations (by release 0.1.0 or a later `create_all`) has the branch's first
table but no version for the branch: it is stamped at the branch's first revision, which is release
0.1.0's schema, and upgraded from there (the `*_0002` catch-up revisions look before they create).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel.database import OFF_LOOP, READ_ONLY

VERSION_TABLE = "kinshasa_schema_version"
SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
KERNEL = "kernel"
# PostgreSQL advisory lock held while a database is migrated: replicas starting together take turns, and
# the second finds nothing left to do. The kernel's install lock, which guarded create_all before.
INSTALL_LOCK = 0x4B4E0004
# The table each branch's first revision creates: a database holding it without a version for the branch
# was made before migrations.
_FIRST_TABLES = {
    "kernel": "outbox",
    "gateway": "gw_runs",
    "coordinator": "ledger_runs",
    "documents": "document_versions",
    "ledger": "account_versions",
    "links": "link_versions",
    "notifier": "email_versions",
}


class MigrationError(Exception):
    """A database cannot be migrated as asked (an unknown component, a version this build does not know)."""


@dataclass(frozen=True)
class BranchState:
    """Where one branch of a database stands: its revision (None: never migrated) and the newest one."""

    branch: str
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _config(connection: Connection | None = None, location: str = SCRIPT_LOCATION,
            version_table: str = VERSION_TABLE) -> Config:
    config = Config()
    config.set_main_option("script_location", location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    return config


def run_env() -> None:
    """The whole of an `env.py`: run the migrations on the connection that `upgrade` hands over.

    A service author's own script directory uses it too (its env.py is `from kinshasa.migrations import
    run_env; run_env()`), so their migrations run at start in the same transaction and lock.
    """
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        raise SystemExit("these migrations run through `kinshasa db upgrade --component NAME` or the "
                         "component's start, which open its database and take its install lock")
    context.configure(connection=connection,
                      version_table=context.config.attributes.get("version_table", VERSION_TABLE))
    with context.begin_transaction():
        context.run_migrations()


@functools.cache
def script() -> ScriptDirectory:
    """Kinshasa's script directory, read once per process (every component start and test asks)."""
    return ScriptDirectory.from_config(_config())


def branches_for(component: str) -> tuple[str, ...]:
    """The branches a component's database follows: the kernel's, and its own when Kinshasa ships one.

    A service with no branch here (one a service author wrote) gets the kernel's tables only.
    """
    if component == KERNEL:
        raise MigrationError("'kernel' is a branch, not a component: name the gateway, the coordinator "
                             "or a service")
    return (KERNEL, component) if component in _labels() else (KERNEL,)


@functools.cache
def _labels() -> frozenset[str]:
    labels: set[str] = set()
    for revision in script().walk_revisions():
        labels |= set(revision.branch_labels)
    return frozenset(labels)


def _branch_revisions(directory: ScriptDirectory, branch: str) -> list[str]:
    """The branch's revisions, newest first."""
    return [r.revision for r in directory.iterate_revisions(f"{branch}@head", "base")]


def _states(conn: Connection, branches: tuple[str, ...]) -> list[BranchState]:
    directory = script()
    heads = set(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads())
    states = []
    for branch in branches:
        revisions = _branch_revisions(directory, branch)
        current = next((r for r in revisions if r in heads), None)
        states.append(BranchState(branch, current, revisions[0]))
    unknown = heads - {r.revision for r in directory.walk_revisions()}
    if unknown:
        raise MigrationError(f"the database is at revision {', '.join(sorted(unknown))}, which this build of "
                             "Kinshasa does not know: run the newer Kinshasa that migrated it")
    return states


def _upgrade_sync(conn: Connection, branches: tuple[str, ...]) -> list[str]:
    pending = [s for s in _states(conn, branches) if not s.up_to_date]
    if not pending:
        return []
    config = _config(conn)
    directory = script()
    applied: list[str] = []
    for state in pending:
        if state.current is None and inspect(conn).has_table(_FIRST_TABLES.get(state.branch, "")):
            # Made before migrations: its first revision's tables are there already.
            command.stamp(config, _branch_revisions(directory, state.branch)[-1])
        command.upgrade(config, f"{state.branch}@head")
        applied.append(state.branch)
    return applied


async def _locked(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": INSTALL_LOCK})


async def upgrade(engine: AsyncEngine, branches: tuple[str, ...]) -> list[str]:
    """Bring the branches of the database to their newest revision; returns the branches that moved.

    One transaction, so a failed migration leaves the database as it was. A database already up to date
    runs no DDL and takes no lock: DDL locks whole tables, and a replica starting beside one that is
    writing would otherwise deadlock with it.
    """
    async with engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        states = await conn.run_sync(_states, branches)
    if all(state.up_to_date for state in states):
        return []
    # DDL (an index built over a full table) may run long: on SQLite, off the event loop's thread.
    async with engine.execution_options(**{OFF_LOOP: True}).begin() as conn:
        await _locked(conn)
        # Checked again under the lock: a replica that waited finds the work done.
        applied: list[str] = await conn.run_sync(_upgrade_sync, branches)
    return applied


async def upgrade_component(engine: AsyncEngine, component: str) -> list[str]:
    return await upgrade(engine, branches_for(component))


async def current(engine: AsyncEngine, component: str) -> list[BranchState]:
    async with engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        result: list[BranchState] = await conn.run_sync(_states, branches_for(component))
    return result


def _own_heads(conn: Connection, location: str, version_table: str) -> tuple[set[str], set[str]]:
    """The database's revisions of a service's own script directory, and the directory's newest."""
    directory = ScriptDirectory.from_config(_config(location=location))
    current = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_heads()
    return set(current), set(directory.get_heads())


def _upgrade_own_sync(conn: Connection, location: str, version_table: str, tables: set[str]) -> bool:
    current, heads = _own_heads(conn, location, version_table)
    if current == heads:
        return False
    config = _config(conn, location, version_table)
    if not current and any(inspect(conn).has_table(table) for table in tables):
        # Its tables were created before it had migrations: its first revisions are what is there.
        command.stamp(config, list(ScriptDirectory.from_config(config).get_bases()))
    command.upgrade(config, "heads")
    return True


async def upgrade_own(engine: AsyncEngine, location: str, version_table: str, tables: set[str]) -> bool:
    """Run a service author's own script directory (`package:folder`) to its newest revisions.

    The same rules as Kinshasa's: no DDL and no lock when up to date, one transaction under the install
    lock otherwise; a database with the service's tables and no version is stamped at the first
    revisions. Returns whether anything ran.
    """
    async with engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        current, heads = await conn.run_sync(_own_heads, location, version_table)
    if current == heads:
        return False
    async with engine.execution_options(**{OFF_LOOP: True}).begin() as conn:
        await _locked(conn)
        moved: bool = await conn.run_sync(_upgrade_own_sync, location, version_table, tables)
    return moved


def owns_tables_of(service: str, table_names: set[str]) -> bool:
    """Whether a service's tables are migrated here: it has a branch and declares the branch's first table
    (so a service author's service that happens to share an example's name is not taken for it)."""
    return service in _labels() and _FIRST_TABLES.get(service) in table_names


def known_components() -> tuple[str, ...]:
    return tuple(label for label in sorted(_labels()) if label != KERNEL)


__all__ = ["BranchState", "MigrationError", "branches_for", "current", "known_components", "owns_tables_of",
           "run_env", "upgrade", "upgrade_component",
           "upgrade_own"]

