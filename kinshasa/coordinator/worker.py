"""The coordinator's Temporal worker: the revert workflow and its activities on one task queue."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from kinshasa.coordinator.activities import RevertActivities
from kinshasa.coordinator.workflows import RevertRun
from kinshasa.kernel import tracing

WORKFLOWS = [RevertRun]


async def connect(address: str, namespace: str = "default") -> Client:
    """A Temporal client with the pydantic data converter every coordinator model travels through."""
    # The tracing interceptor (when exporting) also serves every worker built on this client.
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter,
                                interceptors=tracing.temporal_interceptors())


def activity_list(activities: RevertActivities) -> list[Callable[..., Any]]:
    return [activities.await_forward_results, activities.compensate_pass, activities.finish_revert]


def build_worker(client: Client, task_queue: str, activities: RevertActivities, *,
                 max_concurrent_activities: int = 100,
                 graceful_shutdown_timeout: timedelta = timedelta(seconds=10)) -> Worker:
    """A worker for `task_queue`; run it with `async with` or `await worker.run()`."""
    return Worker(client, task_queue=task_queue, workflows=WORKFLOWS, activities=activity_list(activities),
                  max_concurrent_activities=max_concurrent_activities,
                  graceful_shutdown_timeout=graceful_shutdown_timeout)
