"""The SQLite driver under every SQLite engine (kernel/sqlite_driver.py): at most one trip to the connection's
thread per statement, none for a write transaction's statements after its first, with sqlite3's rows, counts
and errors, and the event loop free while a long statement works."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kinshasa.kernel import database, sqlite_driver
from kinshasa.kernel.database import OFF_LOOP, READ_ONLY, create_engine

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True), Column("name", String, unique=True))

# A statement that keeps SQLite busy for a while (a recursive count), to observe what happens meanwhile.
SLOW = text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :upto) "
            "SELECT count(*) FROM n")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.sqlite3'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


def _driver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kinshasa-sqlite"]


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of trips to a connection's thread so far, counted from here (one-element list)."""
    count = [0]
    run = sqlite_driver._Thread.run

    async def counted(self: sqlite_driver._Thread, call: object) -> object:
        count[0] += 1
        return await run(self, call)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_driver._Thread, "run", counted)
    return count


@pytest.fixture
def patient_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice of the loop no statement here comes near, for the tests that check where statements run:
    a machine that stops the process for 5 ms mid-statement would otherwise send the rest of a
    transaction to the connection's thread, as a long statement does."""
    monkeypatch.setattr(sqlite_driver, "ON_LOOP_SLICE_S", 1.0)


async def _thread_ids(conn: AsyncConnection, statements: int) -> list[int]:
    """Run `statements` statements, each answering with the thread SQLite ran it on."""
    raw = await conn.get_raw_connection()
    raw.driver_connection.create_function("thread_id", 0, threading.get_ident)
    return [(await conn.execute(text("SELECT thread_id()"))).scalar_one() for _ in range(statements)]


async def test_a_write_transaction_makes_a_trip_for_its_first_statement_and_its_commit_alone(
        engine: AsyncEngine, trips: list[int], patient_loop: None) -> None:
    loop_thread = threading.get_ident()
    async with engine.connect() as conn:
        trips[0] = 0
        async with conn.begin():
            await conn.execute(insert(items), [{"id": i, "name": f"n{i}"} for i in range(50)])
            threads = await _thread_ids(conn, 3)
            rows = (await conn.execute(select(items.c.id).order_by(items.c.id))).all()
    assert [r.id for r in rows] == list(range(50))
    # The INSERT began the transaction (BEGIN IMMEDIATE) on the connection's thread; holding the write lock,
    # the rest ran on the loop's thread; the commit synced the disk on the connection's thread.
    assert threads == [loop_thread] * 3
    assert trips[0] == 2


@pytest.mark.parametrize("options", [{READ_ONLY: True}, {OFF_LOOP: True}], ids=["read-only", "off-loop"])
async def test_a_read_or_an_off_loop_write_makes_one_trip_per_statement(
        engine: AsyncEngine, trips: list[int], options: dict[str, bool]) -> None:
    loop_thread = threading.get_ident()
    async with engine.connect() as conn:
        await conn.execution_options(**options)
        trips[0] = 0
        async with conn.begin():
            threads = await _thread_ids(conn, 3)
            rows = (await conn.execute(select(items.c.id))).all()
    assert rows == []
    assert loop_thread not in threads and len(set(threads)) == 1  # all on the connection's own thread
    # One trip per statement (aiosqlite's adapter made four: open a cursor, execute, fetch, close), and
    # the commit.
    assert trips[0] == 5


async def test_a_connection_back_from_a_write_runs_a_read_on_its_thread(
        engine: AsyncEngine, patient_loop: None) -> None:
    loop_thread = threading.get_ident()
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(insert(items).values(id=1, name="one"))
            assert await _thread_ids(conn, 1) == [loop_thread]
        await conn.execution_options(**{READ_ONLY: True})
        async with conn.begin():
            assert loop_thread not in await _thread_ids(conn, 2)


async def test_a_long_statement_sends_the_rest_of_its_transaction_to_the_thread(engine: AsyncEngine) -> None:
    loop_thread = threading.get_ident()
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=1, name="one"))
        before = await _thread_ids(conn, 1)
        await conn.execute(SLOW, {"upto": 300_000})  # well over ON_LOOP_SLICE_S, on the loop
        after = await _thread_ids(conn, 2)
    assert before == [loop_thread]
    assert loop_thread not in after


async def test_many_short_statements_on_the_loop_let_other_tasks_run_between_them(
        engine: AsyncEngine) -> None:
    turns = [0]
    done = asyncio.Event()

    async def other_task() -> None:
        while not done.is_set():
            turns[0] += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_task())
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(id=0, name="first"))  # the trip that began it
            threads = await _thread_ids(conn, 1)
            turns_before = turns[0]
            for i in range(1, 1001):
                await conn.execute(insert(items).values(id=i, name=f"n{i}"))
            turns_during = turns[0] - turns_before
    finally:
        done.set()
        await task
    assert threads == [threading.get_ident()]
    # Each statement alone is far under the slice: without the yields the other task would not have run
    # once between them.
    assert turns_during >= 1, turns_during


async def test_a_cancel_that_fell_due_on_the_loop_rolls_the_transaction_back(engine: AsyncEngine) -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(asyncio.CancelledError):
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(id=1, name="one"))
            await conn.execute(insert(items).values(id=2, name="two"))  # on the loop
            # A cancel falls due (a timeout's, say) with no await before the commit to deliver it.
            task.cancel()
    task.uncancel()
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.id))).scalars().all() == []


async def test_a_transaction_begins_on_its_first_statements_trip_and_the_pool_reset_makes_none(
        engine: AsyncEngine, trips: list[int]) -> None:
    async with engine.connect() as conn:  # the pool's connection is open: what follows is the transaction
        await conn.commit()
    for options in ({}, {READ_ONLY: True}):
        trips[0] = 0
        async with engine.connect() as conn:
            await conn.execution_options(**options)
            async with conn.begin():
                await conn.execute(select(items.c.id))
        # BEGIN with the SELECT, then COMMIT; the pool's rollback of the returned connection is skipped:
        # no transaction is open any more. Separately, BEGIN and the reset were two trips more.
        assert trips[0] == 2, options
    trips[0] = 0
    async with engine.begin():
        pass
    assert trips[0] == 0  # a transaction that ran no statement never began: nothing to commit


@pytest.fixture
async def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[tuple[sqlite3.Connection, AsyncEngine]]:
    """A database whose write lock another connection holds (BEGIN IMMEDIATE, not committed), and an
    engine on it that waits 0.2 s at most for the lock."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'locked.sqlite3'}"
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    await engine.dispose()
    holder = sqlite3.connect(tmp_path / "locked.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    impatient = create_engine(url)
    try:
        yield holder, impatient
    finally:
        holder.close()
        await impatient.dispose()


def commit_holders_row(holder: sqlite3.Connection) -> None:
    holder.execute("INSERT INTO items (id, name) VALUES (1, 'holder')")
    holder.execute("COMMIT")


async def names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(items.c.name).order_by(items.c.id))).scalars())


async def test_a_write_transaction_still_takes_the_write_lock_before_its_first_statement_runs(
        held: tuple[sqlite3.Connection, AsyncEngine]) -> None:
    holder, impatient = held
    with pytest.raises(OperationalError, match="database is locked") as failed:
        async with impatient.begin() as conn:
            # A read alone would not need the lock: it fails because BEGIN IMMEDIATE ran first.
            await conn.execute(select(items.c.id))
    assert "raised by BEGIN IMMEDIATE" in " ".join(getattr(failed.value.orig, "__notes__", []))
    commit_holders_row(holder)

    async def write_after() -> None:
        async with impatient.begin() as conn:
            await conn.execute(insert(items).values(id=2, name="after"))

    # The failed transaction gave its write turn back: the next one writes at once (a turn kept would
    # make it wait out the queue's patience, 30 s).
    await asyncio.wait_for(write_after(), 5)
    assert await names(impatient) == ["holder", "after"]


async def test_a_begin_that_failed_is_tried_again_by_the_transactions_next_statement(
        held: tuple[sqlite3.Connection, AsyncEngine]) -> None:
    holder, impatient = held
    async with impatient.connect() as conn:
        async with conn.begin():
            with pytest.raises(OperationalError, match="database is locked"):
                await conn.execute(select(items.c.id))
            commit_holders_row(holder)
            # The caller carries on in the same transaction: its next statement begins it first,
            # rather than running (and committing) on its own outside any transaction.
            await conn.execute(insert(items).values(id=2, name="inside"))
            raw = await conn.get_raw_connection()
            assert isinstance(raw.dbapi_connection, sqlite_driver.OneHopConnection)
            assert raw.dbapi_connection.driver.in_transaction
            holder_sees = holder.execute("SELECT count(*) FROM items").fetchone()[0]
            assert holder_sees == 1  # not committed yet
    assert await names(impatient) == ["holder", "inside"]


async def test_a_transaction_rolled_back_after_a_statement_still_undoes_it(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        async with conn.begin() as tx:
            await conn.execute(insert(items).values(id=1, name="undone"))
            await tx.rollback()
        async with conn.begin():
            await conn.execute(insert(items).values(id=2, name="kept"))
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.name))).scalars().all() == ["kept"]


async def test_rows_counts_returning_and_many_parameter_sets_are_sqlite3s(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items), [{"id": i, "name": f"n{i}"} for i in range(1, 6)])
        returned = (await conn.execute(insert(items).values(id=10, name="ten").returning(items.c.id))).all()
        changed = await conn.execute(update(items).where(items.c.id < 4).values(name=items.c.name + "!"))
        result = await conn.execute(text("INSERT INTO items (id, name) VALUES (20, 'twenty')"))
    assert returned == [(10,)]
    assert changed.rowcount == 3
    assert result.lastrowid == 20
    async with engine.connect() as conn:
        names = (await conn.execute(select(items.c.name).order_by(items.c.id))).scalars().all()
        first = (await conn.execute(select(items.c.name).order_by(items.c.id))).first()
        none = (await conn.execute(select(items.c.name).where(items.c.id == 99))).first()
    assert names == ["n1!", "n2!", "n3!", "n4", "n5", "ten", "twenty"]
    assert first == ("n1!",)
    assert none is None


async def test_an_error_is_sqlite3s_and_leaves_nothing_written(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=1, name="one"))
    with pytest.raises(IntegrityError) as raised:
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(id=2, name="two"))
            await conn.execute(insert(items).values(id=3, name="one"))  # the name is taken
    assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.id))).scalars().all() == [1]


@pytest.mark.parametrize("options", [{}, {READ_ONLY: True}, {OFF_LOOP: True}],
                         ids=["first-of-a-write", "read-only", "off-loop"])
async def test_the_loop_runs_while_sqlite_works(engine: AsyncEngine, options: dict[str, bool]) -> None:
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    async with engine.connect() as conn:
        await conn.execution_options(**options)
        if options:
            await conn.execute(text("SELECT 1"))  # the transaction's first statement: a trip in any case
        count = (await conn.execute(SLOW, {"upto": 3_000_000})).scalar_one()
    ended = time.perf_counter()
    done.set()
    await task
    assert count == 3_000_000
    # The ticker kept the loop all along: no gap between its ticks is anywhere near the statement's length
    # (a statement run on the loop's thread would leave one gap as long as itself).
    during = [t for t in ticks if started <= t <= ended]
    gaps = [b - a for a, b in zip([started, *during], [*during, ended], strict=True)]
    assert len(during) >= 3 and max(gaps) < (ended - started) / 2, (len(during), max(gaps), ended - started)


async def test_a_cancelled_statement_leaves_the_engine_usable(engine: AsyncEngine) -> None:
    running = asyncio.Event()

    async def slow() -> None:
        async with engine.connect() as conn:
            await conn.execution_options(**{OFF_LOOP: True})  # the slow statement is not the first
            await conn.execute(text("SELECT 1"))
            running.set()
            await conn.execute(SLOW, {"upto": 3_000_000})

    task = asyncio.create_task(slow())
    await running.wait()
    await asyncio.sleep(0.05)
    assert not task.done()  # cancelled while its statement runs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=7, name="seven"))
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.name))).scalars().all() == ["seven"]


async def test_a_savepoint_rolled_back_keeps_the_writes_around_it(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=1, name="kept"))
        with pytest.raises(IntegrityError):
            async with conn.begin_nested():
                await conn.execute(insert(items).values(id=2, name="undone"))
                await conn.execute(insert(items).values(id=3, name="kept"))  # taken: the savepoint rolls back
        await conn.execute(insert(items).values(id=4, name="after"))
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.id).order_by(items.c.id))).scalars().all() == [1, 4]


async def test_a_closed_connection_refuses_calls_instead_of_hanging(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'closed.sqlite3'}")
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            dbapi_connection = raw.dbapi_connection
            assert isinstance(dbapi_connection, sqlite_driver.OneHopConnection)

            def after_close() -> None:
                dbapi_connection.close()
                with pytest.raises(sqlite3.ProgrammingError, match="closed"):
                    dbapi_connection.cursor().execute("SELECT 1")

            await conn.run_sync(lambda _sync: after_close())
            await conn.invalidate()
    finally:
        await engine.dispose()


async def test_each_connection_has_a_thread_that_ends_with_it(tmp_path: Path) -> None:
    before = set(_driver_threads())
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'threads.sqlite3'}")
    async with engine.connect() as one, engine.connect() as two:
        for conn in (one, two):  # readers: two writers would wait for each other's turn
            await conn.execution_options(**{READ_ONLY: True})
        await one.execute(text("SELECT 1"))
        await two.execute(text("SELECT 1"))
        ours = set(_driver_threads()) - before
        assert len(ours) == 2
    await engine.dispose()
    for thread in ours:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in ours)


async def test_a_connection_dropped_without_closing_still_ends_its_thread(tmp_path: Path) -> None:
    before = set(_driver_threads())
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'dropped.sqlite3'}")
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    ours = set(_driver_threads()) - before
    assert ours
    del engine, conn  # never disposed: the pool and its connection are garbage
    gc.collect()
    for thread in ours:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in ours)
