"""`revertRun` and `revertRuns` are one door: a run named alone is selected by the same rule as a list.

The gateway's revert module on a real database (no broker: the facts go to the outbox in the same
transaction). `revert_one` is what `revertRun` calls and `revert_selection` what `revertRuns` calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.gateway.errors import Invalid, RunNotFound
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.revert import revert_one, revert_selection
from kinshasa.gateway.runs import load_run, start_run
from kinshasa.gateway.store import install_gateway_tables
from kinshasa.gateway.uow import transaction
from kinshasa.kernel.database import create_engine
from kinshasa.migrations.install import install_kernel_tables
from kinshasa.schemas.envelope import Actor
from kinshasa.schemas.run_selection import RunSelection
from kinshasa.schemas.run_status import RunStatus

AGENT = Principal(id="agent-1", kind="agent")
OPERATOR = Actor(kind="operator", id="op-1")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await install_kernel_tables(engine)
    await install_gateway_tables(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _runs(engine: AsyncEngine, count: int) -> list[str]:
    async with transaction(engine) as tx:
        ids = []
        for _ in range(count):
            started = await start_run(tx, AGENT, "selection", None)
            assert started.run is not None
            ids.append(started.run.run_id)
        await tx.commit()
    return ids


async def _one(engine: AsyncEngine, run_id: str) -> tuple[list[str], list[str]]:
    async with transaction(engine) as tx:
        run, rung = await revert_one(tx, run_id, "rogue", OPERATOR)
        await tx.commit()
    return ([run.run_id], []) if rung else ([], [run.run_id])


async def _selection(engine: AsyncEngine, run_id: str) -> tuple[list[str], list[str]]:
    async with transaction(engine) as tx:
        requested, unchanged = await revert_selection(tx, RunSelection(run_ids=(run_id,)), "rogue", OPERATOR)
        await tx.commit()
    return [r.run_id for r in requested], [r.run_id for r in unchanged]


async def test_a_run_named_alone_is_selected_as_a_list_of_one_selects_it(engine: AsyncEngine) -> None:
    first, second = await _runs(engine, 2)
    assert await _one(engine, first) == ([first], [])
    assert await _selection(engine, second) == ([second], [])
    # Once reverting, both doors leave the run alone.
    assert await _one(engine, second) == ([], [second])
    assert await _selection(engine, first) == ([], [first])
    async with engine.connect() as conn:
        assert {(await load_run(conn, r)).status for r in (first, second)} == {RunStatus.REVERTING}


async def test_both_doors_refuse_an_unknown_run_alike_and_change_nothing(engine: AsyncEngine) -> None:
    (known,) = await _runs(engine, 1)
    messages = []
    for door in (_one, _selection):
        with pytest.raises(RunNotFound) as refused:
            await door(engine, "no-such-run")
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and "nothing was reverted" in messages[0]
    async with engine.connect() as conn:
        assert (await load_run(conn, known)).status == RunStatus.RUNNING


async def test_an_empty_selection_is_refused_before_anything_is_read(engine: AsyncEngine) -> None:
    async with transaction(engine) as tx:
        with pytest.raises(Invalid, match="the selector is empty"):
            await revert_selection(tx, RunSelection(), "rogue", OPERATOR)
