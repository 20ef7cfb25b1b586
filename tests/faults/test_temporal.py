"""Temporal down or crashed around a revert: the run still ends REVERTED, nothing is undone twice.

Each test runs its own Temporal dev server (SQLite file under the test's directory), the real example
services and the real coordinator, and stops or SIGKILLs that server the way an outage or a crash would.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from kinshasa.coordinator.store import run_events
from kinshasa.coordinator.worker import WORKFLOWS
from kinshasa.coordinator.workflows import revert_workflow_id
from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.infra.temporal import TemporalServer
from kinshasa.schemas.envelope import RunEventKind
from kinshasa.schemas.run_status import RunStatus
from tests.integration.coordinator.harness import (
    KILL_POLICY,
    ServiceFleet,
    Stack,
    Workload,
    compare,
    coordinator_stack,
    run_fact,
    service_fleet,
    wait_for,
)


@pytest.fixture(scope="module")
def fleet(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceFleet]:
    """documents, ledger and links as processes on topics of their own, shared by this module's tests."""
    root = tmp_path_factory.mktemp("fleet")
    with service_fleet(kafka.bootstrap, root, f"f{uuid.uuid4().hex[:8]}") as running:
        yield running


@pytest.fixture
def own_temporal(tmp_path: Path) -> Iterator[TemporalServer]:
    """A Temporal dev server of this test's own, so stopping or killing it disturbs no other test.

    Its SQLite file is under the test's directory: `start` after `stop` or `kill` resumes where it was.
    """
    server = TemporalServer(root=tmp_path / "temporal", port=free_port())
    server.start(attached=True)
    try:
        yield server
    finally:
        server.stop()


async def _unhandled_triggers(stack: Stack, run_id: str) -> int:
    async with stack.ledger.engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(run_events).where(
                run_events.c.run_id == run_id, run_events.c.type == RunEventKind.REVERT_REQUESTED.type,
                run_events.c.handled_at.is_(None)))).scalar_one())


async def _dead_letters(stack: Stack) -> int:
    async with stack.ledger.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM dead_letters"))).scalar_one())


async def test_a_revert_requested_while_temporal_is_down_ends_reverted_once_it_is_back(
        fleet: ServiceFleet, own_temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, own_temporal.address, tmp_path, unique) as stack:
        assert stack.coordinator is not None
        sweeper = stack.coordinator[0].sweeper
        assert sweeper is not None
        work = Workload(random.Random(13))
        setup_run, run_id = f"setup-{unique}", f"run-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=10, accounts=3, links=3)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()
        await stack.start_run(run_id, "agent-t")
        commands = work.run(run_id, "agent-t", 60)
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))

        await asyncio.to_thread(own_temporal.stop)
        await stack.request_revert(run_id, len(commands))

        async def start_failed() -> bool:
            return sweeper.failed_attempts >= 1

        await wait_for(start_failed, 90, "a start of the revert to fail while Temporal is down")
        # The partition moves on: a later fact of the same run (same key, same partition) is projected
        # while the trigger waits, and nothing was dead-lettered.
        await stack.publish([run_fact(run_id, RunEventKind.FINISHED, {"published_count": len(commands)})])

        async def later_fact_projected() -> bool:
            return any(f["type"] == RunEventKind.FINISHED.type for f in await stack.ledger.run_facts(run_id))

        await wait_for(later_fact_projected, 60, "the fact after the revert request to reach the ledger")
        summary = await stack.ledger.summary(run_id)
        assert summary is not None and summary.status == RunStatus.REVERTING.value
        assert await _unhandled_triggers(stack, run_id) == 1
        assert await _dead_letters(stack) == 0

        # Temporal comes back; nobody does anything else.
        await asyncio.to_thread(own_temporal.start, True)
        outcome = await stack.revert_result(run_id, within=180)
        assert outcome.status == "REVERTED", outcome
        assert outcome.compensated == len(commands)

        async def handled() -> bool:
            return await _unhandled_triggers(stack, run_id) == 0

        await wait_for(handled, 30, "the trigger to be marked handled")
        summary = await stack.ledger.summary(run_id)
        assert summary is not None and summary.status == RunStatus.REVERTED.value
        assert compare(before, await stack.snapshot()) == []
        assert await fleet.compensation_records(run_id) == len(commands)
        assert await fleet.compensation_writes(run_id) == len(commands)
        assert await _dead_letters(stack) == 0


async def test_temporal_killed_mid_revert_ends_reverted_with_each_compensation_applied_once_and_replays(
        fleet: ServiceFleet, own_temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, own_temporal.address, tmp_path, unique,
                                 policy=KILL_POLICY) as stack:
        work = Workload(random.Random(34))
        setup_run, run_id = f"setup-{unique}", f"run-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=40, accounts=10, links=10)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()
        await stack.start_run(run_id, "agent-k")
        commands = work.run(run_id, "agent-k", 700)
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))

        await stack.request_revert(run_id, len(commands))

        async def underway() -> bool:
            return (await stack.ledger.counts(run_id)).compensated >= 100

        await wait_for(underway, 120, "the revert to be under way")
        await asyncio.to_thread(own_temporal.kill)
        killed_at = (await stack.ledger.counts(run_id)).compensated
        assert killed_at < len(commands), "the revert finished before the kill: make the run bigger"
        await asyncio.to_thread(own_temporal.start, True)

        outcome = await stack.revert_result(run_id, within=240)
        assert outcome.status == "REVERTED", outcome
        assert outcome.compensated == len(commands)
        summary = await stack.ledger.summary(run_id)
        assert summary is not None and summary.status == RunStatus.REVERTED.value
        assert summary.counts.compensated == len(commands)
        assert compare(before, await stack.snapshot()) == []
        # Each step undone exactly once: one record and one domain write per step in the services' stores,
        # whatever the crash made the worker re-send.
        assert await fleet.compensation_records(run_id) == len(commands)
        assert await fleet.compensation_writes(run_id) == len(commands)

        history = await stack.client.get_workflow_handle(revert_workflow_id(run_id)).fetch_history()
        replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter)
        result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
        assert result.replay_failure is None
