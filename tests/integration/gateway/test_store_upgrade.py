"""A gateway start against a database that has everything runs no DDL. (Upgrades of older gateway
databases, from release 0.1.0 on, are tested in tests/integration/migrations.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from kinshasa.gateway.store import install_gateway_tables
from kinshasa.kernel.database import create_engine


async def test_a_start_against_an_installed_database_runs_no_ddl(database_url: str) -> None:
    """DDL locks whole tables: a replica starting beside one that writes deadlocked with it (CREATE INDEX
    waiting on a writer waiting on the index's table). A start that finds everything runs none."""
    engine = create_engine(database_url)
    try:
        await install_gateway_tables(engine)
        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement.strip())

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        await install_gateway_tables(engine)
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        assert statements, "the second start looked nothing up"
        ddl = [s for s in statements if s.split()[0].upper() in {"CREATE", "ALTER", "DROP"}]
        assert ddl == []
    finally:
        await engine.dispose()
