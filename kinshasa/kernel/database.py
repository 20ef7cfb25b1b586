"""Async database engines for every component store: SQLite (embedded default) or PostgreSQL, by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

SUPPORTED = ("sqlite+aiosqlite", "postgresql+asyncpg")
# Execution option for a connection that only reads: on SQLite its transactions begin DEFERRED, so they
# never take (or wait for) the write lock; WAL gives them a consistent snapshot. Ignored on PostgreSQL.
READ_ONLY = "kinshasa_read_only"


class DatabaseUrlError(ValueError):
    """A database URL names a driver Kinshasa does not run on."""


def normalise_url(url: str) -> str:
    """Accept the plain forms users paste (`postgresql://`, `sqlite:///`) and pick the async driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise DatabaseUrlError(
            f"unsupported database URL scheme {parsed.drivername!r}: use "
            "'sqlite+aiosqlite:///path/to/file.sqlite3' or "
            "'postgresql+asyncpg://user@host:port/database'")
    return parsed.render_as_string(hide_password=False)


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


# FULL: a commit is on disk when it returns. Every store holds an outbox or an inbox, so a transaction whose
# offset was stored or whose event was published must survive a power loss; NORMAL in WAL mode may lose the
# last commits. Not a setting: only the relay and gateway benchmarks set NORMAL, in their own processes, to
# state what FULL costs (`bench/bench_relay.py`, `bench/bench_gateway.py`).
SQLITE_SYNCHRONOUS = "FULL"


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Build the async engine for a component's store, with settings each backend needs.

    SQLite runs in WAL mode with a busy timeout so a reader (the relay) and a writer (a handler)
    in the same process do not fail on each other; `BEGIN IMMEDIATE` makes every transaction take
    the write lock up front, which is what makes check-then-write atomic on SQLite. A connection with
    the `READ_ONLY` execution option begins plain (deferred) transactions instead: a reader that took the
    write lock would make every writer wait for it.
    """
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, own transaction boundaries.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get(READ_ONLY)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
