"""Brings a service's database up to date at start: kernel, domain and step tables, append-only triggers."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.appendonly import install_append_only
from kinshasa.kernel.receipts import open_chain
from kinshasa.migrations import KERNEL, owns_tables_of, upgrade, upgrade_own
from kinshasa.services.kit.declarations import Service

# Distinct from the kernel's install lock: two replicas of one service starting together on one
# PostgreSQL database must not both run CREATE TABLE.
_INSTALL_LOCK = 0x4B4E0101


async def install_service(engine: AsyncEngine, service: Service) -> None:
    """Migrate what Kinshasa's migrations own, create the rest if missing; safe on every start.

    The kernel tables always migrate. Kinshasa's example services' tables have migrations of their own
    (a branch named after the service). A service author's tables migrate with the service's own script
    directory when it names one (`Service(..., migrations="package:folder")`, version table
    `<service>_schema_version`); otherwise they are created when missing, as before migrations. The
    kit's step tables of such a service are created when missing.
    Afterwards UPDATE and DELETE on the append-only tables fail, and the service's receipt chain is open.
    """
    await _install_tables(engine, service)
    await open_chain(engine, service.name)


async def _install_tables(engine: AsyncEngine, service: Service) -> None:
    if owns_tables_of(service.name, set(service.metadata.tables)):
        await upgrade(engine, (KERNEL, service.name))
        return
    await upgrade(engine, (KERNEL,))
    if service.migrations is not None:
        # The author's migrations own the domain tables; the kit's step tables stay the kit's to create.
        await upgrade_own(engine, service.migrations, f"{service.name}_schema_version",
                          {table.name for table in service.domain_tables})
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INSTALL_LOCK})
        created = service.store.tables if service.migrations is not None else None
        await conn.run_sync(lambda sync: service.metadata.create_all(sync, tables=created))
        # Idempotent, so the author's migrations need not write the trigger DDL either.
        await install_append_only(conn, service.append_only_tables)
