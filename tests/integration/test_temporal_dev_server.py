"""The Temporal dev server started by the project runs a workflow with an activity."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from kinshasa.infra.temporal import TemporalServer


@activity.defn
async def shout(word: str) -> str:
    return word.upper() + "!"


@workflow.defn
class ShoutTwice:
    @workflow.run
    async def run(self, word: str) -> list[str]:
        first = await workflow.execute_activity(
            shout, word, start_to_close_timeout=timedelta(seconds=10))
        second = await workflow.execute_activity(
            shout, first, start_to_close_timeout=timedelta(seconds=10))
        return [first, second]


async def test_workflow_with_activities_runs_on_dev_server(temporal: TemporalServer,
                                                           unique: str) -> None:
    client = await Client.connect(temporal.address, data_converter=pydantic_data_converter)
    queue = f"q-{unique}"
    async with Worker(client, task_queue=queue, workflows=[ShoutTwice], activities=[shout]):
        result = await client.execute_workflow(ShoutTwice.run, "kin", id=f"wf-{unique}",
                                               task_queue=queue)
    assert result == ["KIN!", "KIN!!"]
    history = await client.get_workflow_handle(f"wf-{unique}").fetch_history()
    completed = [e for e in history.events if e.HasField("activity_task_completed_event_attributes")]
    assert len(completed) == 2
