"""Async database engines for every component store: SQLite (embedded default) or PostgreSQL, by URL."""

from __future__ import annotations

import asyncio
import logging
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from kinshasa.kernel import sqlite_driver

log = logging.getLogger(__name__)

SUPPORTED = ("sqlite+aiosqlite", "postgresql+asyncpg")
# Execution option for a connection that only reads: on SQLite its transactions begin DEFERRED, so they
# never take (or wait for) the write lock; WAL gives them a consistent snapshot. Ignored on PostgreSQL.
READ_ONLY = "kinshasa_read_only"
# Execution option for a connection whose write transactions may run long statements (migrations, a revert's
# closing counts, chunks of pruning): on SQLite each of their statements runs on the connection's thread, as
# a read's do, where a write transaction's statements after its first otherwise run on the event loop's
# thread (`kinshasa.kernel.sqlite_driver`). Ignored on PostgreSQL.
OFF_LOOP = "kinshasa_off_loop"


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
# How long a transaction waits for SQLite's write lock before failing. A writer of this process first waits
# up to as long for its turn (WriteTurns), so one behind a stuck holder fails after at most twice this.
SQLITE_BUSY_TIMEOUT_S = 30.0


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
        # At most one trip to the connection's thread per statement, where aiosqlite makes four
        # (`kinshasa.kernel.sqlite_driver`).
        kwargs.setdefault("module", sqlite_driver.dbapi())
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, own transaction boundaries.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.close()

        turns = WriteTurns()

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            dbapi_connection = conn.connection.dbapi_connection

            def begin(statement: str, *, on_loop: bool = False) -> None:
                if isinstance(dbapi_connection, sqlite_driver.OneHopConnection):
                    # Run with the transaction's first statement, on its trip to the connection's thread.
                    dbapi_connection.begin_with_next(statement, on_loop=on_loop)
                else:
                    conn.exec_driver_sql(statement)

            options = conn.get_execution_options()
            if options.get(READ_ONLY):
                begin("BEGIN")
                return
            turns.take(dbapi_connection)
            try:
                # Holding the write lock, the transaction's later statements wait for nobody: unless told
                # they run long, they skip the trip to the connection's thread.
                begin("BEGIN IMMEDIATE", on_loop=not options.get(OFF_LOOP))
            except BaseException:
                turns.give_back(dbapi_connection)
                raise

        turns.wrap(engine.sync_engine.dialect)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


class WriteTurns:
    """The order in which this process's SQLite write transactions take the database's write lock.

    SQLite lets one transaction write at a time; one that finds the lock taken sleeps in SQLite's busy
    handler, in steps that grow to 100 ms, and tries again. Under load (a hostile reader slowing every
    transaction of the gateway) a write that arrived just after the lock was taken could sleep a hundred
    milliseconds past its release: `bench_isolation` measured BEGIN IMMEDIATE p99 at 236 ms. So the
    process's writers queue here first, in arrival order, and each is woken the moment the one before it
    commits or rolls back; SQLite's lock is then almost always free when BEGIN IMMEDIATE asks for it.

    Only an order: SQLite's lock still decides who writes (another process, `kinshasa db upgrade`, still
    waits in its busy handler), so a queue that lost track of a holder would cost latency, never
    correctness; a writer waits here at most `patience_s` (SQLite's own busy timeout), then takes the queue
    for lost, starts a new one and goes to SQLite's lock as before. One queue per event loop (an engine
    used from two loops queues each loop's writers apart).
    """

    def __init__(self, patience_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
        self.patience_s = patience_s
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        # The turn each DBAPI connection holds (and its loop), by the connection's id (the driver's objects
        # have slots).
        self._held: dict[int, tuple[asyncio.Lock, asyncio.AbstractEventLoop]] = {}

    def take(self, dbapi_connection: Any) -> None:
        """Wait for this connection's turn to write (called in SQLAlchemy's greenlet, on the loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not under asyncio (a synchronous tool): SQLite's own lock alone
        if not in_greenlet():
            return
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        if await_only(self._acquire(lock)):
            self._held[_raw_id(dbapi_connection)] = (lock, loop)
        elif self._locks.get(loop) is lock:
            self._locks[loop] = asyncio.Lock()  # its holder was lost: later writers queue afresh

    async def _acquire(self, lock: asyncio.Lock) -> bool:
        try:
            async with asyncio.timeout(self.patience_s):
                await lock.acquire()
        except TimeoutError:
            log.warning("no write turn within %g s (the writer before is stuck, or its turn was lost): "
                        "starting a fresh queue and waiting for SQLite's lock directly", self.patience_s)
            return False
        return True

    def give_back(self, dbapi_connection: Any) -> None:
        held = self._held.pop(_raw_id(dbapi_connection), None)
        if held is None:
            return
        lock, loop = held
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            _release(lock)
        elif not loop.is_closed():
            # A connection collected off the loop's thread (the garbage collector runs where it runs):
            # an asyncio lock is released on its own loop.
            loop.call_soon_threadsafe(_release, lock)

    def wrap(self, dialect: Any) -> None:
        """Give the turn back once the transaction has ended: after its COMMIT or ROLLBACK has run, or
        when its connection is closed (a transaction never outlives its connection)."""
        for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
            ending = getattr(dialect, name)

            def ended(dbapi_connection: Any, _ending: Any = ending) -> None:
                try:
                    _ending(dbapi_connection)
                finally:
                    self.give_back(dbapi_connection)

            setattr(dialect, name, ended)


def _release(lock: asyncio.Lock) -> None:
    if lock.locked():
        lock.release()


def _raw_id(connection: Any) -> int:
    # The dialect is handed the pool's proxy (commit, the pool's rollback) or the driver's connection
    # (close, terminate): both name the same driver connection.
    return id(getattr(connection, "dbapi_connection", None) or connection)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
