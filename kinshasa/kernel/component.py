"""Wiring every consuming component (a service, the coordinator) shares: DLQ guard, metrics, health checks.

`wire_dead_letters` puts the DLQ guard around a component's record handler and builds the dead-letter
queue its admin API serves, and points the component's metrics at its outbox backlog and DLQ count.
`database_check` and `task_check` are the health checks `/healthz` runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.admin import HealthCheck
from kinshasa.kernel.dlq import (
    DeadLetterPolicy,
    DeadLetterQueue,
    DlqProducer,
    OutboxDeadLetters,
    SqlDeadLetterStore,
    guarded_handler,
)
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.outbox import SqlOutboxStore
from kinshasa.topics.consumer import Handler


@dataclass(frozen=True)
class DeadLetterWiring:
    """The guarded handler to give the consumer, and the queue operators inspect and reprocess."""

    guarded: Handler
    queue: DeadLetterQueue


def wire_dead_letters(component: str, engine: AsyncEngine, handler: Handler, *, producer: DlqProducer,
                      group: str, policy: DeadLetterPolicy, metrics: ComponentMetrics) -> DeadLetterWiring:
    """Guard `handler` with the DLQ (its letters in `engine`, copies on `<group>.dlq`) and report the
    outbox backlog and DLQ count through `metrics`."""
    letters = SqlDeadLetterStore(engine)
    guarded = guarded_handler(handler, store=letters, producer=producer, group=group, backoff=policy,
                              metrics=metrics)
    queue = DeadLetterQueue(component, letters, handlers=handler, metrics=metrics,
                            outbox=OutboxDeadLetters(engine))
    outbox = SqlOutboxStore()

    async def outbox_numbers() -> tuple[int, float | None]:
        async with engine.connect() as conn:
            backlog = await outbox.backlog(conn)
        return backlog.pending, backlog.oldest_age_s

    metrics.set_outbox_callback(outbox_numbers)
    metrics.set_dlq_callback(queue.dlq_count)
    return DeadLetterWiring(guarded, queue)


def database_check(engine: AsyncEngine) -> HealthCheck:
    """Healthy while the component's database answers a query."""

    async def check() -> bool:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    return check


def task_check(tasks: Mapping[str, asyncio.Task[Any]], name: str) -> HealthCheck:
    """Healthy while the task registered under `name` in `tasks` (filled in later) is running."""

    async def check() -> bool:
        task = tasks.get(name)
        return task is not None and not task.done()

    return check
