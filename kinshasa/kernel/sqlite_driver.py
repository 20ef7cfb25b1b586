"""SQLite for asyncio with at most one thread hop per statement: the DBAPI for `sqlite+aiosqlite` URLs.

SQLAlchemy's aiosqlite adapter makes four trips to aiosqlite's thread for every statement (open a cursor,
execute, fetch the rows, close the cursor), and each trip costs the event loop a wake-up, a hand-over of
the GIL and a pass of the loop: about 100 µs of CPU. A write transaction of the gateway runs some twenty
statements, so at a low rate, where no other write shares its transaction, the trips were most of what a
write cost (`bench_latency` measured the gateway at 11 ms of CPU per write at 50/s, against 1.4 ms per
write under load). Here a statement is one trip: it is executed, its rows fetched and its cursor closed
together on the connection's own thread, and the cursor SQLAlchemy holds reads the rows from memory. A
transaction's BEGIN rides on the trip of its first statement (`begin_with_next`), and a commit or rollback
with no transaction open (the pool's reset of every connection handed back) makes no trip: a lone write of
the gateway went from 20 trips (its own transaction and the relay's two) to 13.

A write transaction's statements after its first make no trip at all (`begin_with_next(..., on_loop=True)`):
once BEGIN IMMEDIATE has taken SQLite's write lock, a statement waits for no other connection and the disk
is synced only at the commit, so the short statements of a write (tens of microseconds each) run on the
loop's own thread in less time than the trip alone would cost. A lone gateway write went from 7.1 to 8.2 ms
of CPU to 3.9 to 6.1. What may take long still goes to the connection's thread: a transaction's first
statement (which may wait for the lock), its commit (which syncs the disk), every statement of a read-only
transaction (which may scan much of a table) and of a write transaction with the kernel's `OFF_LOOP`
option (migrations, a revert's closing counts, the pruning of idempotency keys). A statement that held the
loop `ON_LOOP_SLICE_S` or more sends the rest of its transaction there too, and a transaction whose
statements have held the loop that long in all lets the loop's other tasks run before its next. A
statement on the loop cannot be cancelled while it runs: a cancel that fell due meanwhile is delivered
before the commit is queued (`commit`), so the transaction rolls back as it would have during a trip.

Everything else is as with aiosqlite: each connection has one thread of its own that runs its calls in
order (SQLite is never entered by two threads at once on one connection), the errors are sqlite3's, and
the dialect is SQLAlchemy's aiosqlite dialect, handed this module in place of its own
(`create_engine(..., module=dbapi())`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

__all__ = ["OneHopConnection", "OneHopCursor", "dbapi"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a write transaction's statements may hold the event loop before it lets the loop's other tasks
# run; one statement that long sends the rest of its transaction to the connection's thread.
ON_LOOP_SLICE_S = 0.005

_STOP = object()


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return  # the caller gave up; the call still ran, in order, on the connection's thread
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class _Thread:
    """One connection's thread: runs the calls given to it one at a time, in the order given."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="kinshasa-sqlite", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is _STOP:
                return
            call, loop, future = item
            try:
                value, ok = call(), True
            except BaseException as exc:
                value, ok = exc, False
            if future is None:
                continue
            try:
                loop.call_soon_threadsafe(_settle, future, ok, value)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    async def run(self, call: Callable[[], T]) -> T:
        if self._stopped:
            # What sqlite3 says of a closed connection, which the dialect takes for a disconnect.
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((call, loop, future))
        return await future

    def run_detached(self, call: Callable[[], Any]) -> None:
        """Queue a call nobody waits for (closing a connection outside the event loop)."""
        self._calls.put((call, None, None))

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._calls.put(_STOP)


class OneHopCursor:
    """A DBAPI cursor whose `execute` runs, fetches and closes sqlite3's cursor in one trip."""

    server_side = False

    def __init__(self, connection: OneHopConnection) -> None:
        self._connection = connection
        self._rows: collections.deque[Any] = collections.deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1

    def execute(self, operation: str, parameters: Sequence[Any] | None = None) -> OneHopCursor:
        self._take(self._connection.run_statement(_execute, operation, parameters))
        return self

    def executemany(self, operation: str, seq_of_parameters: Sequence[Sequence[Any]]) -> OneHopCursor:
        self._take(self._connection.run_statement(_execute_many, operation, seq_of_parameters))
        return self

    def _take(self, outcome: tuple[Any, list[Any], int, int | None]) -> None:
        self.description, rows, self.rowcount, self.lastrowid = outcome
        self._rows = collections.deque(rows)

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        return [self._rows.popleft() for _ in range(min(count, len(self._rows)))]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._rows:
            yield self._rows.popleft()

    def close(self) -> None:
        self._rows.clear()

    async def _async_soft_close(self) -> None:
        """What SQLAlchemy's asyncio results call before handing rows over: sqlite3's cursor is closed
        already, and the rows are in memory."""

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass


def _begin(driver: sqlite3.Connection, begin: str | None) -> None:
    if begin is None:
        return
    try:
        driver.execute(begin)
    except sqlite3.Error as exc:
        exc.add_note(f"raised by {begin}, which began the transaction before this statement")
        raise


def _execute(driver: sqlite3.Connection, begin: str | None, operation: str,
             parameters: Sequence[Any] | None) -> tuple[Any, list[Any], int, int | None]:
    _begin(driver, begin)
    cursor = driver.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _execute_many(driver: sqlite3.Connection, begin: str | None, operation: str,
                  seq_of_parameters: Sequence[Sequence[Any]]) -> tuple[Any, list[Any], int, int | None]:
    _begin(driver, begin)
    cursor = driver.cursor()
    try:
        cursor.executemany(operation, seq_of_parameters)
        return cursor.description, [], cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


async def _at_once(work: Callable[[], T]) -> T:
    return work()


class OneHopConnection(AdaptedConnection):
    """A DBAPI connection over sqlite3 whose calls run on the connection's own thread (but for a write
    transaction's statements after its first, which run on the caller's)."""

    __slots__ = ("__weakref__", "_begin", "_closed", "_driver", "_on_loop", "_thread", "_unyielded", "dbapi")

    def __init__(self, module: Any, driver: sqlite3.Connection, thread: _Thread) -> None:
        self.dbapi = module
        self._driver = driver
        self._connection = driver  # type: ignore[assignment]  # what SQLAlchemy hands out as the driver's
        self._thread = thread
        self._closed = False
        self._begin: str | None = None
        self._on_loop = False  # this transaction's statements after its first run on the loop's thread
        self._unyielded = 0.0  # seconds they have held the loop since it last yielded
        # A connection dropped without being closed (its pool collected) still ends its thread; the
        # thread holds no reference back to the connection, so it can be collected.
        weakref.finalize(self, thread.stop)

    @property
    def driver(self) -> sqlite3.Connection:
        return self._driver

    def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the connection's thread and wait for it (in SQLAlchemy's greenlet)."""
        return await_only(self._thread.run(work))

    @staticmethod
    def call_at_once(work: Callable[[], T]) -> T:
        """Run `work` here, on the loop's thread, as an awaited call (in SQLAlchemy's greenlet)."""
        return await_only(_at_once(work))

    @property
    def isolation_level(self) -> str | None:
        return self.driver.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self.call(partial(setattr, self.driver, "isolation_level", value))

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self.call(partial(self.driver.create_function, *args, **kwargs))

    def cursor(self, server_side: bool = False) -> OneHopCursor:
        return OneHopCursor(self)

    def execute(self, operation: str, parameters: Sequence[Any] | None = None) -> OneHopCursor:
        return self.cursor().execute(operation, parameters)

    def begin_with_next(self, statement: str, *, on_loop: bool = False) -> None:
        """Begin a transaction with `statement` (BEGIN, BEGIN IMMEDIATE) on the trip of the next statement.

        Nothing can tell the two apart: the BEGIN runs first on the connection's thread, and if it fails
        (the write lock not free within the busy timeout) the statement fails with its error (noted as the
        BEGIN's), unrun, and the BEGIN waits for the next one. A transaction that ends before any statement
        ran never began: its commit and rollback make no trip.

        With `on_loop` (for BEGIN IMMEDIATE: the transaction holds the write lock once it has begun), the
        statements after the one that began it run on the calling thread, with no trip.
        """
        self._begin = statement
        self._on_loop = on_loop
        self._unyielded = 0.0

    def run_statement(self, execute: Callable[..., T], operation: str, parameters: Any) -> T:
        """`execute(driver, begin, operation, parameters)`, with the pending BEGIN if there is one: on the
        connection's thread, or on this one for a write transaction's later statements."""
        begin, self._begin = self._begin, None
        if begin is None and self._on_loop and self.driver.in_transaction:
            return self._run_on_loop(partial(execute, self.driver, None, operation, parameters), operation)
        try:
            return self.call(partial(execute, self.driver, begin, operation, parameters))
        except Exception:
            # The BEGIN itself failed (no transaction is open): the next statement tries it again, as the
            # begin event would have. The trip has ended, so sqlite3 is idle and may be asked.
            if begin is not None and not self.driver.in_transaction:
                self._begin = begin
            raise

    def _run_on_loop(self, work: Callable[[], T], operation: str) -> T:
        # Through a coroutine that awaits nothing: SQLAlchemy's asyncio layer refuses a statement that never
        # awaited, and this costs a greenlet switch, not a pass of the loop.
        started = time.perf_counter()
        try:
            return self.call_at_once(work)
        finally:
            took = time.perf_counter() - started
            self._unyielded += took
            if took >= ON_LOOP_SLICE_S:
                # A long statement: the transaction's next ones may be too, so they go to the thread.
                self._on_loop = False
                log.debug("a statement held the event loop %.1f ms; the rest of its transaction runs on "
                          "the connection's thread: %.200s", took * 1000, operation)
            if self._unyielded >= ON_LOOP_SLICE_S:
                # Many short ones: let the loop's other tasks run before the next.
                self._unyielded = 0.0
                await_only(asyncio.sleep(0))

    # No trip for a commit or rollback when no transaction is open (one that never ran a statement, or
    # the pool's reset of a connection whose transaction already ended): sqlite3 would do nothing there.
    # `in_transaction` is read from the loop's thread, only ever between calls (SQLAlchemy waits for each).

    def commit(self) -> None:
        self._begin, self._on_loop, self._unyielded = None, False, 0.0
        if self.driver.in_transaction:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Statements on the loop do not yield, so a cancel (a timeout) that fell due while they ran
                # may still be pending: it is delivered here, before the COMMIT is queued, and the
                # transaction rolls back as it would have had the cancel come during a trip. (A cancel
                # already delivered and handled makes this one pass of the loop, nothing more.)
                await_only(asyncio.sleep(0))
            self.call(self.driver.commit)

    def rollback(self) -> None:
        self._begin, self._on_loop, self._unyielded = None, False, 0.0
        if self.driver.in_transaction:
            self.call(self.driver.rollback)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if in_greenlet():
            try:
                self.call(self.driver.close)
            finally:
                self._thread.stop()
        else:
            # Outside the loop's greenlet (the pool collecting a connection): close it on its thread,
            # after whatever it is still running, without waiting.
            self._thread.run_detached(self.driver.close)
            self._thread.stop()

    def terminate(self) -> None:
        """Close at once (the pool giving a connection up): whatever statement its thread is still running
        is interrupted, then the connection is closed."""
        if not self._closed:
            self._driver.interrupt()  # sqlite3 allows this from any thread
        self.close()


class _OneHopModule(AsyncAdapt_aiosqlite_dbapi):
    """The aiosqlite dialect's DBAPI module, connecting through `OneHopConnection`."""

    def connect(self, *args: Any, **kwargs: Any) -> OneHopConnection:  # type: ignore[override]
        kwargs.pop("async_creator_fn", None)
        kwargs["check_same_thread"] = False
        thread = _Thread()
        try:
            driver = await_only(thread.run(partial(sqlite3.connect, *args, **kwargs)))
        except BaseException:
            thread.stop()
            raise
        return OneHopConnection(self, driver, thread)


def dbapi() -> Any:
    """The module to hand SQLAlchemy's aiosqlite dialect (`create_async_engine(..., module=dbapi())`)."""
    import aiosqlite

    return _OneHopModule(aiosqlite, sqlite3)
