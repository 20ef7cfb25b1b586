"""The revert workflow's own timers under Temporal's time-skipping test server: no test waits out a backoff.

The activities here are scripted stand-ins (what a pass leaves unsettled is the script), so what is under
test is the workflow's logic on a real Temporal server: how long it backs off after each pass that left
steps unsettled, that the backoff is capped, that it stops after `attempts` passes, and that a request
arriving while it backs off gets a round of its own. Each scenario skips minutes to hours of workflow time.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from kinshasa.coordinator.models import (
    FinishInput,
    ForwardStatus,
    ForwardWaitInput,
    PassInput,
    PassResult,
    RevertOutcome,
    RevertPolicy,
    RevertRequest,
    RevertRunInput,
)
from kinshasa.coordinator.workflows import REQUEST_SIGNAL, RevertRun, revert_workflow_id
from kinshasa.infra.temporal import time_skipping_server
from kinshasa.testing import PluginSettings

TASK_QUEUE = "timers"


class ScriptedActivities:
    """The revert's three activities, answering from a script and recording when the server ran them."""

    def __init__(self, remaining_after_pass: list[int]) -> None:
        self.script = list(remaining_after_pass)
        self.pass_times: list[datetime] = []
        self.forward_targets: list[int | None] = []
        self.finishes: list[FinishInput] = []
        self.last_remaining = 0

    @activity.defn(name="await_forward_results")
    async def await_forward_results(self, params: ForwardWaitInput) -> ForwardStatus:
        self.forward_targets.append(params.target)
        return ForwardStatus(results=params.target or 0, target=params.target, complete=True)

    @activity.defn(name="compensate_pass")
    async def compensate_pass(self, params: PassInput) -> PassResult:
        # The server's clock, which the test server moves forward past every timer nobody waits for.
        self.pass_times.append(activity.info().current_attempt_scheduled_time)
        remaining = self.last_remaining = self.script.pop(0)
        return PassResult(emitted=remaining, compensated=0, irreversible=0, remaining=remaining)

    @activity.defn(name="finish_revert")
    async def finish_revert(self, params: FinishInput) -> RevertOutcome:
        self.finishes.append(params)
        status = "REVERT_FAILED" if self.last_remaining else "REVERTED"
        return RevertOutcome(run_id=params.run_id, status=status, compensated=0, irreversible=0,
                             passes=params.passes)


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    server = await asyncio.to_thread(time_skipping_server, PluginSettings().cache_dir)
    async with await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=str(server), data_converter=pydantic_data_converter) as environment:
        yield environment


async def _start(env: WorkflowEnvironment, policy: RevertPolicy, published: int) -> WorkflowHandle:
    run_id = f"run-{uuid.uuid4()}"
    request = RevertRequest(run_id=run_id, published_count=published, request_id=f"req-{uuid.uuid4()}")
    return await env.client.start_workflow(RevertRun.run, RevertRunInput(request=request, policy=policy),
                                           id=revert_workflow_id(run_id), task_queue=TASK_QUEUE,
                                           result_type=RevertOutcome)


def _worker(env: WorkflowEnvironment, script: ScriptedActivities) -> Worker:
    return Worker(env.client, task_queue=TASK_QUEUE, workflows=[RevertRun],
                  activities=[script.await_forward_results, script.compensate_pass, script.finish_revert])


def _gaps(times: list[datetime]) -> list[float]:
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]


async def test_backoff_doubles_after_each_unsettled_pass_up_to_its_cap(env: WorkflowEnvironment) -> None:
    policy = RevertPolicy(attempts=5, backoff_s=60.0, max_backoff_s=150.0)
    script = ScriptedActivities([4, 3, 2, 1, 0])
    async with _worker(env, script):
        handle = await _start(env, policy, published=4)
        outcome = await handle.result()
        history = await handle.fetch_history()
    assert outcome.status == "REVERTED" and outcome.passes == 5
    expected = [policy.backoff(n) for n in range(1, 5)]
    assert expected == [60.0, 120.0, 150.0, 150.0]  # doubled, then held at the cap
    for gap, backoff in zip(_gaps(script.pass_times), expected, strict=True):
        assert backoff <= gap < backoff + 5, (gap, backoff)
    # Eight minutes of backoff passed on the server's clock; the history still replays deterministically.
    await Replayer(workflows=[RevertRun], data_converter=pydantic_data_converter).replay_workflow(history)


async def test_attempts_bound_the_passes_and_no_backoff_follows_the_last(env: WorkflowEnvironment) -> None:
    policy = RevertPolicy(attempts=3, backoff_s=600.0, max_backoff_s=3600.0)
    script = ScriptedActivities([5, 5, 5, 5])
    async with _worker(env, script):
        handle = await _start(env, policy, published=5)
        outcome = await handle.result()
    assert outcome.status == "REVERT_FAILED"
    assert len(script.pass_times) == 3 and [f.passes for f in script.finishes] == [3]
    assert script.script == [5]  # the fourth scripted pass never ran
    assert _gaps(script.pass_times)[0] >= 600 and _gaps(script.pass_times)[1] >= 1200


async def test_a_request_during_a_backoff_gets_its_own_round(env: WorkflowEnvironment) -> None:
    policy = RevertPolicy(attempts=4, backoff_s=3600.0, max_backoff_s=3600.0)
    script = ScriptedActivities([2, 0, 0])
    async with _worker(env, script):
        handle = await _start(env, policy, published=10)

        # The server only skips time while someone waits on a result, so the workflow stays in its
        # hour-long backoff while we look at it.
        async def backing_off() -> bool:
            progress = await handle.query(RevertRun.progress)
            return progress is not None and progress.phase == "backing_off"

        deadline = asyncio.get_running_loop().time() + 30
        while not await backing_off():
            assert asyncio.get_running_loop().time() < deadline, "the workflow never reached its backoff"
            await asyncio.sleep(0.05)
        run_id = handle.id.removeprefix("revert:")
        await handle.signal(REQUEST_SIGNAL, RevertRequest(run_id=run_id, published_count=25))
        outcome = await handle.result()
    assert outcome.status == "REVERTED"
    # The joined request raised the wait target and had the ledger checked once more before the outcome.
    assert script.forward_targets == [10, 25]
    assert len(script.pass_times) == 3 and len(script.finishes) == 1
    assert _gaps(script.pass_times)[0] >= timedelta(hours=1).total_seconds()
