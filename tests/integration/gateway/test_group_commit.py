"""Group commit: writes queued together share one transaction, yet each is checked and counted in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select

from kinshasa.gateway.commands import CommandWriter, Receipt
from kinshasa.gateway.errors import BreakerOpen, Forbidden, RunNotFound
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.store import alerts, commands, runs
from kinshasa.kernel.outbox import outbox
from kinshasa.schemas.operations import OperationSpec
from tests.integration.gateway.conftest import AGENT_KEY, OTHER_AGENT_KEY, Harness


def _parts(harness: Harness) -> tuple[CommandWriter, Principal, OperationSpec]:
    gateway = harness.gateway
    principal = gateway.registry.authenticate(AGENT_KEY)
    assert principal is not None
    return gateway.services.writer, principal, gateway.catalogue.by_graphql_name("createDocument")


def _record_batches(writer: CommandWriter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the writer to remember the size of every transaction it runs."""
    sizes: list[int] = []
    transact: Callable[[list[Any]], Awaitable[Any]] = writer._transact

    async def recording(writes: list[Any]) -> Any:
        sizes.append(len(writes))
        return await transact(writes)

    monkeypatch.setattr(writer, "_transact", recording)
    return sizes


async def test_one_batch_checks_and_counts_each_run_exactly(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"maxWrites": 5, "quarantineWindowS": 30, "autoRevert": False})
    run_ids = [await c.start_run(entry_point=f"batch-{i}") for i in range(3)]
    foreign = await c.start_run(key=OTHER_AGENT_KEY)
    writer, principal, spec = _parts(harness)
    sizes = _record_batches(writer, monkeypatch)

    # Queued in one go, interleaved across runs, plus a missing run and another agent's run.
    targets = [run_id for _ in range(8) for run_id in run_ids] + ["no-such-run", foreign]
    payloads = [spec.payload_model(title=f"t{i}") for i in range(len(targets))]
    results = await asyncio.gather(
        *(writer.submit(principal, spec, r, p) for r, p in zip(targets, payloads, strict=True)),
        return_exceptions=True,
    )
    assert sizes == [len(targets)], "every write must have gone into one transaction"

    by_run: dict[str, list[Any]] = {r: [] for r in run_ids}
    for target, result in zip(targets, results, strict=True):
        if target in by_run:
            by_run[target].append(result)
    for answers in by_run.values():
        # In arrival order: the first five admitted, the sixth trips, the rest are refused.
        assert all(isinstance(a, Receipt) and a.status == "HELD" for a in answers[:5]), answers
        assert all(isinstance(a, BreakerOpen) for a in answers[5:]), answers
        accepted = [a.accepted_at for a in answers[:5]]
        assert accepted == sorted(accepted) and len(set(accepted)) == 5
        assert answers[5].extensions["breaker"]["state"] == "OPEN"
    assert isinstance(results[-2], RunNotFound) and isinstance(results[-1], Forbidden)

    async with harness.gateway.engine.connect() as conn:
        rows = {r.run_id: r for r in await conn.execute(select(runs).where(runs.c.run_id.in_(run_ids)))}
        held = (
            await conn.execute(
                select(commands.c.run_id, commands.c.manual_hold).where(commands.c.run_id.in_(run_ids))
            )
        ).all()
        alert_runs = [a[0] for a in await conn.execute(select(alerts.c.run_id))]
        foreign_writes = (
            await conn.execute(select(runs.c.writes).where(runs.c.run_id == foreign))
        ).scalar_one()
    for run_id in run_ids:
        row = rows[run_id]
        assert (row.writes, row.breaker_state, row.trip_count) == (5, "OPEN", 1)
        assert row.services == '["documents"]'
        assert sorted(alert_runs).count(run_id) == 1
    # The trip in the middle of the batch moved the batch's own held commands to the manual hold.
    assert len(held) == 15 and all(manual for _run, manual in held)
    assert foreign_writes == 0


async def test_a_batch_publishes_in_arrival_order(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    run_id = await c.start_run()
    writer, principal, spec = _parts(harness)
    sizes = _record_batches(writer, monkeypatch)
    receipts = await asyncio.gather(
        *(writer.submit(principal, spec, run_id, spec.payload_model(title=f"t{i}")) for i in range(20))
    )
    assert sizes == [20] and {r.status for r in receipts} == {"PUBLISHED"}
    async with harness.gateway.engine.connect() as conn:
        queued = [
            str(m)
            for m in (
                await conn.execute(
                    select(outbox.c.message_id)
                    .where(outbox.c.topic == "kinshasa.commands.documents")
                    .order_by(outbox.c.seq)
                )
            ).scalars()
        ]
        writes, published = (
            await conn.execute(select(runs.c.writes, runs.c.published).where(runs.c.run_id == run_id))
        ).one()
    assert queued == [r.command_id for r in receipts]
    assert (writes, published) == (20, 20)


async def test_a_failed_batch_is_retried_one_write_at_a_time(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    run_id = await c.start_run()
    writer, principal, spec = _parts(harness)
    sizes: list[int] = []
    transact = writer._transact

    async def poisoned(writes: list[Any]) -> Any:
        # A database failure caused by one write (here: a title) fails whichever transaction holds it.
        sizes.append(len(writes))
        if any(w.payload["title"] == "poison" for w in writes):
            raise RuntimeError("simulated database failure")
        return await transact(writes)

    monkeypatch.setattr(writer, "_transact", poisoned)
    titles = ["a", "b", "poison", "c"]
    results = await asyncio.gather(
        *(writer.submit(principal, spec, run_id, spec.payload_model(title=t)) for t in titles),
        return_exceptions=True,
    )
    assert sizes == [4, 1, 1, 1, 1]
    assert isinstance(results[2], RuntimeError)
    assert [isinstance(r, Receipt) for r in results] == [True, True, False, True]
    async with harness.gateway.engine.connect() as conn:
        writes = (await conn.execute(select(runs.c.writes).where(runs.c.run_id == run_id))).scalar_one()
    assert writes == 3


async def test_a_write_cancelled_while_queued_is_not_written(harness: Harness) -> None:
    c = harness.client
    run_id = await c.start_run()
    writer, principal, spec = _parts(harness)
    task = asyncio.create_task(writer.submit(principal, spec, run_id, spec.payload_model(title="gone")))
    await asyncio.sleep(0)  # the write is queued; the drain that would write it has not run yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.drain()
    kept = await writer.submit(principal, spec, run_id, spec.payload_model(title="kept"))
    async with harness.gateway.engine.connect() as conn:
        stored = (await conn.execute(select(commands.c.command_id).where(commands.c.run_id == run_id))).all()
        writes = (await conn.execute(select(runs.c.writes).where(runs.c.run_id == run_id))).scalar_one()
    assert [s[0] for s in stored] == [kept.command_id] and writes == 1
