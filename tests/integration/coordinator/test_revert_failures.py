"""Reverts that meet trouble: a killed worker, a refused compensation, a service that is down for a while."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

from sqlalchemy import func, select

from kinshasa.coordinator.store import steps as ledger_steps
from kinshasa.infra.temporal import TemporalServer
from kinshasa.schemas.envelope import deterministic_id
from kinshasa.schemas.run_status import RunStatus
from tests.integration.coordinator.harness import (
    FAST_POLICY,
    KILL_POLICY,
    ServiceFleet,
    WorkerProcess,
    Workload,
    compare,
    coordinator_stack,
    forward,
    read_topics,
    record_history,
    wait_for,
)


async def test_a_worker_killed_mid_revert_finishes_after_restart_and_applies_nothing_twice(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    # The projector and API run here; the worker (with the relay that publishes its emissions) is a
    # child process, so it can be SIGKILLed: no shutdown hook, no flush, no outbox drain.
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique, policy=KILL_POLICY,
                                 roles=("projector", "api")) as stack:
        worker = WorkerProcess(stack, tmp_path / "worker.log")
        worker.start()
        try:
            work = Workload(random.Random(21))
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
            worker.kill()
            killed_at = (await stack.ledger.counts(run_id)).compensated
            assert killed_at < len(commands), "the revert finished before the kill: make the run bigger"
            await asyncio.sleep(2.0)
            worker.start()
            outcome = await stack.revert_result(run_id)
        finally:
            worker.stop()
        assert outcome.status == "REVERTED", outcome
        assert outcome.compensated == len(commands)
        assert compare(before, await stack.snapshot()) == []
        # Each step undone exactly once: one compensation record and one domain write per step, even
        # though the retried activity re-sent what the killed one had in flight.
        assert await fleet.compensation_records(run_id) == len(commands)
        assert await fleet.compensation_writes(run_id) == len(commands)


async def test_a_compensation_that_keeps_failing_ends_revert_failed_and_succeeds_once_resolved(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        work = Workload(random.Random(8))
        setup_run, run_id, other_run = f"setup-{unique}", f"run-{uuid.uuid4()}", f"other-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=5, accounts=2, links=2)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()
        doc = next(iter(work.docs))

        await stack.start_run(run_id, "agent-f")
        rename = forward("documents", "rename", {"document_id": doc, "title": "by the agent"}, doc, run_id,
                         "agent-f")
        commands = [*work.run(run_id, "agent-f", 20), rename]
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))
        # Someone else changes the document after the run: undoing the rename would overwrite their title.
        meddle = forward("documents", "rename", {"document_id": doc, "title": "by someone else"}, doc,
                         other_run, "someone-else")
        await stack.publish([meddle])
        await stack.wait_results(other_run, 1)

        await stack.request_revert(run_id, len(commands))
        failed = await stack.revert_result(run_id)
        await record_history(stack, run_id, "revert_failed")
        step_event = str(deterministic_id("applied", str(rename.message_id)))
        assert failed.status == "REVERT_FAILED", failed
        assert failed.failing_steps[0].forward_event_id == step_event
        assert failed.failing_steps[0].forward_type == "documents.rename.applied"
        assert "refused by documents" in failed.failing_steps[0].reason
        summary = await stack.ledger.summary(run_id)
        assert summary is not None and summary.status == RunStatus.REVERT_FAILED.value
        # The outcome is on kinshasa.runs for the gateway, and an alert names the step for the operator.
        facts = await asyncio.to_thread(read_topics, stack.kafka_bootstrap, [stack.topics.runs], run_id,
                                        until=lambda got: any(e.type == "run.revert_failed" for e in got))
        revert_failed = next(e for e in facts if e.type == "run.revert_failed")
        assert revert_failed.payload["failing_steps"][0]["forward_event_id"] == step_event
        alerts = await asyncio.to_thread(read_topics, stack.kafka_bootstrap, [stack.topics.alerts], run_id,
                                         until=lambda got: bool(got))
        assert alerts[0].type == "alert.revert_failed"
        assert step_event in str(alerts[0].payload["failing_steps"])
        assert "revert the run again" in alerts[0].payload["summary"]

        # Resolved: the other party puts the title back the way the run left it. Reverting again works.
        resolve = forward("documents", "rename", {"document_id": doc, "title": "by the agent"}, doc,
                          other_run, "someone-else")
        await stack.publish([resolve])
        await stack.wait_results(other_run, 2)
        first_run = await stack.workflow_run_id(run_id)
        await stack.request_revert(run_id, len(commands), reason="conflict resolved")
        outcome = await stack.revert_result(run_id, after_run=first_run)
        assert outcome.status == "REVERTED", outcome
        assert outcome.compensated == len(commands)
        assert compare(before, await stack.snapshot()) == []
        assert await fleet.compensation_writes(run_id) == len(commands)


async def test_stragglers_of_a_service_that_was_down_are_re_emitted_until_acknowledged(
        fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str) -> None:
    # Passes enough that restarting links (a process start, a group join) fits in what is left once the
    # second pass is seen, on a loaded machine too: five left it about 18 s.
    policy = FAST_POLICY.model_copy(update={"straggler_timeout_s": 3.0, "attempts": 20, "backoff_s": 1.0})
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique, policy=policy) as stack:
        work = Workload(random.Random(13))
        setup_run, run_id = f"setup-{unique}", f"run-{uuid.uuid4()}"
        world = work.world(setup_run, "setup-agent", docs=10, accounts=4, links=4)
        await stack.publish(world)
        await stack.wait_results(setup_run, len(world))
        before = await stack.snapshot()
        await stack.start_run(run_id, "agent-s")
        commands = work.run(run_id, "agent-s", 80)
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))

        fleet.stop("links")  # its compensations go unanswered until it is back
        try:
            await stack.request_revert(run_id, len(commands))

            async def stuck_on_links() -> bool:
                counts = await stack.ledger.counts(run_id)
                return counts.compensating > 0 and counts.applied == 0 and \
                    counts.compensated + counts.compensating == counts.steps

            await wait_for(stuck_on_links, 60, "every other service's compensations to settle")

            async def re_emitted() -> bool:
                # A step claimed by a later pass carries attempt 2: the first pass gave up on it.
                async with stack.ledger.engine.connect() as conn:
                    highest = await conn.scalar(
                        select(func.max(ledger_steps.c.attempt)).where(ledger_steps.c.run_id == run_id))
                return (highest or 0) >= 2

            await wait_for(re_emitted, 120, "a later pass to re-emit the unanswered compensations")
        finally:
            await asyncio.to_thread(fleet.start, "links")
            await asyncio.to_thread(fleet.wait_ready, "links")
        outcome = await stack.revert_result(run_id)
        await record_history(stack, run_id, "revert_straggler_retry")
        assert outcome.status == "REVERTED", outcome
        assert outcome.passes >= 2
        assert compare(before, await stack.snapshot()) == []
        assert await fleet.compensation_writes(run_id) == len(commands)
