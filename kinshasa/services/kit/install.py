"""Creates a service's tables at start: kernel tables, domain and step tables, and append-only triggers."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.appendonly import install_append_only
from kinshasa.kernel.install import install_kernel_tables
from kinshasa.kernel.receipts import open_chain
from kinshasa.services.kit.declarations import Service

# Distinct from the kernel's install locks: two replicas of one service starting together on one
# PostgreSQL database must not both run CREATE TABLE.
_INSTALL_LOCK = 0x4B4E0101


async def install_service(engine: AsyncEngine, service: Service) -> None:
    """Create whatever is missing, safe on every start; afterwards UPDATE and DELETE on the tables fail."""
    await install_kernel_tables(engine)
    await open_chain(engine, service.name)
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INSTALL_LOCK})
        await conn.run_sync(service.metadata.create_all)
        await install_append_only(conn, service.append_only_tables)
