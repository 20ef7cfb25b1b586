"""Runs across documents, ledger and links, reverted by the coordinator, leave the world as it was.

Real Kafka, Temporal and SQLite; the services are real processes. The test publishes what the gateway
would (forward commands, run facts) and reads what the services and the coordinator actually did.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from kinshasa.coordinator.models import RevertRequest, RevertRunInput
from kinshasa.coordinator.workflows import RevertRun, revert_workflow_id
from kinshasa.infra.temporal import TemporalServer
from kinshasa.schemas.envelope import RunEventKind
from tests.integration.coordinator.harness import (
    SERVICES,
    ServiceFleet,
    Stack,
    Workload,
    compare,
    coordinator_stack,
    read_topics,
    record_history,
    run_fact,
    wait_for,
)


async def test_thousand_step_run_reverts_to_the_world_before(fleet: ServiceFleet, temporal: TemporalServer,
                                                             tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        work = Workload(random.Random(5))
        setup_run, run_id = f"setup-{unique}", f"run-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=60, accounts=15, links=20)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()

        await stack.start_run(run_id, "agent-a")
        commands = work.run(run_id, "agent-a", 1000)
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))
        counts = await stack.ledger.counts(run_id)
        assert (counts.steps, counts.rejected) == (1000, 0)
        assert {s.entity.service for s in commands if s.entity} == set(SERVICES)

        started = time.monotonic()
        await stack.request_revert(run_id, len(commands))
        outcome = await stack.revert_result(run_id)
        print(f"reverted 1000 steps in {time.monotonic() - started:.1f}s")
        await record_history(stack, run_id, "revert_normal")
        assert outcome.status == "REVERTED", outcome
        assert outcome.compensated == 1000
        assert compare(before, await stack.snapshot()) == []
        assert await fleet.compensation_records(run_id) == 1000
        assert await fleet.compensation_writes(run_id) == 1000

        # One `compensated` event per step, each naming its own forward event.
        events = [stack.topics.events(s) for s in SERVICES]
        seen = await asyncio.to_thread(
            read_topics, stack.kafka_bootstrap, events, run_id,
            until=lambda got: len({e.message_id for e in got if e.type.endswith(".compensated")}) >= 1000)
        compensated = [e for e in seen if e.type.endswith(".compensated")]
        forward_ids = {str(e.message_id) for e in seen if e.type.endswith(".applied")}
        assert len({e.message_id for e in compensated}) == 1000
        assert {e.payload["forward_event_id"] for e in compensated} == forward_ids

        # Reverting the reverted run again is a fresh workflow run that changes nothing.
        first_run = await stack.workflow_run_id(run_id)
        await stack.request_revert(run_id, len(commands), reason="again")
        second = await stack.revert_result(run_id, after_run=first_run)
        assert second.status == "REVERTED" and second.compensated == 1000
        assert await fleet.compensation_writes(run_id) == 1000
        assert compare(before, await stack.snapshot()) == []


async def test_a_revert_requested_while_the_run_writes_undoes_every_write(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        work = Workload(random.Random(11))
        setup_run, run_id = f"setup-{unique}", f"run-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=30, accounts=8, links=10)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()

        await stack.start_run(run_id, "agent-w")
        commands = work.run(run_id, "agent-w", 400)
        # The bell rings after 150 commands have left the gateway and before the services applied them;
        # the gateway's count (all 400: the rest were already on their way) comes with it, and the
        # last 250 reach Kafka only afterwards, while the revert is already waiting.
        await stack.publish(commands[:150])
        await stack.request_revert(run_id, len(commands))
        # The revert, running, says it waits for all 400 results, and still says so while the rest are
        # published (none of the last 50 exists before the last batch): nothing is compensated meanwhile.
        handle = stack.client.get_workflow_handle(revert_workflow_id(run_id))

        async def waiting_for_every_result() -> bool:
            try:
                progress = await handle.query(RevertRun.progress)
            except (RPCError, WorkflowQueryFailedError):  # not started yet
                return False
            return progress is not None and progress.phase == "waiting_for_results" and progress.target == 400

        await wait_for(waiting_for_every_result, 60, "the revert to wait for the run's 400 results")
        for start in range(150, 400, 50):
            assert await waiting_for_every_result(), f"the revert went on with {start} of 400 commands sent"
            assert (await stack.ledger.counts(run_id)).compensated == 0
            await stack.publish(commands[start:start + 50])
            await asyncio.sleep(0.2)
        outcome = await stack.revert_result(run_id)
        assert outcome.status == "REVERTED", outcome
        counts = await stack.ledger.counts(run_id)
        assert counts.results == 400 and counts.unsettled == 0 and outcome.compensated == counts.steps
        assert compare(before, await stack.snapshot()) == []
        assert await fleet.compensation_writes(run_id) == counts.steps


async def test_a_trip_starts_no_revert_the_revert_requested_recorded_with_it_does(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        work = Workload(random.Random(3))
        world = work.world(f"setup-{unique}", "setup-agent", docs=10, accounts=3, links=3)
        await stack.publish(world)
        await stack.wait_results(f"setup-{unique}", len(world))
        before = await stack.snapshot()

        run_id = f"run-{uuid.uuid4()}"
        await stack.start_run(run_id, "agent-t")
        await stack.publish(work.run(run_id, "agent-t", 60))
        # What the gateway records for a trip with auto-revert, in one transaction: the trip, then its
        # doorbell's request. Only the request may start the revert.
        tripped = run_fact(run_id, RunEventKind.TRIPPED, {
            "reason": "writes 61 exceeded the limit of 60", "counts": {"writes": 60},
            "thresholds": {"writes": 60}, "services_touched": list(SERVICES), "held": 7,
            "published_count": 60, "auto_revert": True})
        requested = run_fact(run_id, RunEventKind.REVERT_REQUESTED, {
            "reason": "automatic revert after a trip: writes 61 exceeded the limit of 60",
            "requested_by": "gateway", "published_count": 60})
        await stack.publish([tripped, requested])
        outcome = await stack.revert_result(run_id)
        assert outcome.status == "REVERTED" and outcome.compensated == 60, outcome
        assert compare(before, await stack.snapshot()) == []
        # The workflow was started by the request, not by the trip published before it on the same key.
        first = await _first_request(stack, run_id)
        assert first.request_id == str(requested.message_id) and first.requested_by == "gateway"
        facts = await asyncio.to_thread(
            read_topics, stack.kafka_bootstrap, [stack.topics.runs], run_id,
            until=lambda got: any(e.type == "run.reverted" for e in got))
        reverted = next(e for e in facts if e.type == "run.reverted")
        assert reverted.payload == {"compensated": 60, "irreversible": 0}
        assert reverted.actor.kind == "system" and reverted.actor.id == "coordinator"


async def _first_request(stack: Stack, run_id: str) -> RevertRequest:
    """The request `revert:<run_id>` was started with (its first workflow run's input)."""
    handle = stack.client.get_workflow_handle(revert_workflow_id(run_id))
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    (params,) = await stack.client.data_converter.decode(started.input.payloads, [RevertRunInput])
    assert isinstance(params, RevertRunInput)
    return params.request
