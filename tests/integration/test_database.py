"""The database module opens SQLite and PostgreSQL engines and round-trips a row on each."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from kinshasa.kernel.database import DatabaseUrlError, create_engine, is_postgres, normalise_url

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True),
              Column("text", String(200), nullable=False))


async def test_engine_round_trips_a_row(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(insert(notes).values(id=1, text="héllo, kinshasa"))
        async with engine.connect() as conn:
            rows = (await conn.execute(select(notes.c.id, notes.c.text))).all()
        assert rows == [(1, "héllo, kinshasa")]
        assert is_postgres(engine) == database_url.startswith("postgresql")
    finally:
        await engine.dispose()


async def test_rolled_back_transaction_leaves_nothing(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        with pytest.raises(RuntimeError, match="boom"):
            async with engine.begin() as conn:
                await conn.execute(insert(notes).values(id=2, text="never"))
                raise RuntimeError("boom")
        async with engine.connect() as conn:
            assert (await conn.execute(select(notes))).all() == []
    finally:
        await engine.dispose()


def test_plain_urls_get_the_async_driver() -> None:
    assert normalise_url("postgresql://u@h:5/db") == "postgresql+asyncpg://u@h:5/db"
    assert normalise_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"


def test_unsupported_url_names_the_fix() -> None:
    with pytest.raises(DatabaseUrlError, match="postgresql\\+asyncpg"):
        normalise_url("mysql://root@localhost/db")


async def test_sqlite_commits_are_durable_when_they_return(tmp_path: Path) -> None:
    # WAL with synchronous=FULL: every store holds an outbox or an inbox, so a commit that returned
    # (an offset stored, an event published after it) must survive a power loss.
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'durable.sqlite3'}")
    try:
        async with engine.connect() as conn:
            journal = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
            synchronous = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        assert (journal, synchronous) == ("wal", 2)  # 2 is FULL
    finally:
        await engine.dispose()
