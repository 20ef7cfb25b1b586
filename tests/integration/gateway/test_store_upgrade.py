"""A gateway database from before receipts followed their writes gains the new columns on start, keeps
its rows, and a second start changes nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect, text

from kinshasa.gateway.store import install_gateway_tables
from kinshasa.kernel.database import create_engine

# gw_commands as the previous release created it.
OLD_COMMANDS = """CREATE TABLE gw_commands (
    command_id VARCHAR(36) PRIMARY KEY, run_id VARCHAR(64) NOT NULL, command_type VARCHAR(200) NOT NULL,
    graphql_name VARCHAR(200) NOT NULL, service VARCHAR(64) NOT NULL, entity_id VARCHAR(200) NOT NULL,
    status VARCHAR(20) NOT NULL, egress BOOLEAN NOT NULL, probe BOOLEAN NOT NULL,
    manual_hold BOOLEAN NOT NULL,
    release_at TIMESTAMP, discard_at TIMESTAMP, accepted_at TIMESTAMP NOT NULL, published_at TIMESTAMP,
    decided_by VARCHAR(256), reason TEXT, result VARCHAR(20), envelope TEXT NOT NULL)"""
ROW = """INSERT INTO gw_commands (command_id, run_id, command_type, graphql_name, service, entity_id, status,
    egress, probe, manual_hold, accepted_at, result, envelope) VALUES ('c1', 'r1', 'documents.rename',
    'renameDocument', 'documents', 'd1', 'PUBLISHED', false, false, false, '2026-12-01 10:00:00', 'APPLIED',
    '{}')"""


async def test_an_old_commands_table_gains_the_receipt_columns_and_keeps_its_rows(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(OLD_COMMANDS))
            await conn.execute(text(ROW))
        await install_gateway_tables(engine)
        await install_gateway_tables(engine)  # a second start finds them present and adds nothing

        async with engine.connect() as conn:
            columns = await conn.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns("gw_commands")})
            indexes = await conn.run_sync(
                lambda sync: {i["name"] for i in inspect(sync).get_indexes("gw_commands")})
            row = (await conn.execute(text(
                "SELECT command_id, status, applied_at, applied_event_id, compensated_at FROM gw_commands"
            ))).one()
        assert {"applied_at", "applied_event_id", "compensated_at"} <= columns
        assert "ix_gw_commands_applied_event" in indexes
        assert tuple(row) == ("c1", "PUBLISHED", None, None, None)
    finally:
        await engine.dispose()


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
