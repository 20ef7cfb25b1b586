"""The suite's databases: a fresh PostgreSQL database, and engines built with the schema a test names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.postgres import PostgresCluster
from kinshasa.kernel.database import create_engine

# One step of a test schema: a MetaData (all its tables), one Table, or an async function given the engine
# (an installer such as `install_kernel_tables`, or a test's own seeding).
SchemaStep = MetaData | Table | Callable[[AsyncEngine], Awaitable[object]]


async def create_database(cluster: PostgresCluster, name: str) -> str:
    """Create the empty database `name` on `cluster`; returns its SQLAlchemy URL."""
    conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="kinshasa", database="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://kinshasa@127.0.0.1:{cluster.port}/{name}"


async def prepared_engine(url: str, *steps: SchemaStep) -> AsyncEngine:
    """An engine on `url` after each step, in order; the caller disposes it."""
    engine = create_engine(url)
    try:
        for step in steps:
            if isinstance(step, MetaData):
                async with engine.begin() as conn:
                    await conn.run_sync(step.create_all)
            elif isinstance(step, Table):
                async with engine.begin() as conn:
                    await conn.run_sync(step.create, checkfirst=True)
            else:
                await step(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine
