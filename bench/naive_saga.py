"""The naive saga, kept only as the benchmark's baseline: one Temporal activity per compensation, in sequence.

This is how a revert is usually first written with a workflow engine: for each step, newest first over
the whole run, an activity sends the compensate command and waits for its acknowledgement, then the next
one starts. It is correct and simple, and it pays one activity round trip plus one service round trip
per step. `bench/bench_revert.py` runs it beside `RevertRun` on the same stack. It lives with the
benchmarks, outside the product package: production never uses it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from kinshasa.coordinator.activities import compensate_command
    from kinshasa.coordinator.run_ledger import ClaimedStep, Ledger
    from kinshasa.coordinator.store import StepStatus, steps
    from kinshasa.coordinator.topic_names import CoordinatorTopics
    from kinshasa.schemas.clock import utcnow
    from kinshasa.topics.producer import AsyncProducer, envelope_message

NAIVE_REVERT = "NaiveRevert"
# Continue-as-new well before Temporal's 50k-event history limit (about six events per step).
STEPS_PER_RUN = 2000


class NaiveInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    limit: int | None = None  # revert only the newest `limit` steps (a benchmark sample)
    done: int = 0


class NaiveStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    step_id: int


class NaiveResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    compensated: int


class NaiveActivities:
    """Lists the steps and compensates one step per call: send it, then poll the ledger for its ack."""

    def __init__(self, ledger: Ledger, producer: AsyncProducer, topics: CoordinatorTopics,
                 poll_s: float = 0.02, ack_timeout_s: float = 60.0) -> None:
        self.ledger = ledger
        self.producer = producer
        self.topics = topics
        self.poll_s = poll_s
        self.ack_timeout_s = ack_timeout_s

    @activity.defn(name="naive_list_steps")
    async def list_steps(self, params: NaiveInput) -> list[int]:
        """Every unsettled step of the run, newest first over the whole run."""
        return [s.step_id for s in await self.ledger.open_steps(params.run_id)]

    @activity.defn(name="naive_compensate_one")
    async def compensate_one(self, params: NaiveStep) -> None:
        async with self.ledger.reader.connect() as conn:
            row = (await conn.execute(select(steps).where(steps.c.run_id == params.run_id,
                                                          steps.c.step_id == params.step_id))).first()
        if row is None:
            raise ApplicationError(f"no step {params.step_id} in run {params.run_id}", non_retryable=True)
        if row.status == StepStatus.COMPENSATED.value:
            return
        attempt = activity.info().attempt + 1000  # never collides with RevertRun's attempt numbers
        step = ClaimedStep(row.step_id, attempt, row.forward_event_id, row.forward_type, row.service,
                           row.entity_type, row.entity_id)
        envelope = compensate_command(params.run_id, step, None, utcnow())
        await self.producer.send_batch([envelope_message(self.topics.commands(row.service), envelope)])
        deadline = time.monotonic() + self.ack_timeout_s
        while time.monotonic() < deadline:
            async with self.ledger.reader.connect() as conn:
                status = (await conn.execute(select(steps.c.status).where(
                    steps.c.run_id == params.run_id, steps.c.step_id == params.step_id))).scalar()
            if status == StepStatus.COMPENSATED.value:
                return
            if status == StepStatus.COMPENSATION_FAILED.value:
                raise ApplicationError(f"step {params.step_id} refused", non_retryable=True)
            await asyncio.sleep(self.poll_s)
        raise TimeoutError(f"no ack for step {params.step_id} in {self.ack_timeout_s}s")


@workflow.defn(name=NAIVE_REVERT)
class NaiveRevert:
    """Newest first, one step at a time, one activity each."""

    @workflow.run
    async def run(self, params: NaiveInput) -> NaiveResult:
        ids: list[int] = await workflow.execute_activity_method(
            NaiveActivities.list_steps, params, start_to_close_timeout=timedelta(minutes=1))
        if params.limit is not None:
            ids = ids[:max(0, params.limit - params.done)]
        done = params.done
        for count, step_id in enumerate(ids):
            if count and count % STEPS_PER_RUN == 0:
                workflow.continue_as_new(NaiveInput(run_id=params.run_id, limit=params.limit, done=done))
            await workflow.execute_activity_method(
                NaiveActivities.compensate_one, NaiveStep(run_id=params.run_id, step_id=step_id),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)))
            done += 1
        return NaiveResult(run_id=params.run_id, compensated=done)
