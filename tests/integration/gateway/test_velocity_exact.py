"""Near its velocity limit a write is counted at its own time, as a replay of the run counts it.

The batch's count is taken when the batch starts; a write that slid out of the window between that start
and the write's own acceptance must not count against it, and one still inside must.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta

import pytest

from kinshasa.gateway import commands
from kinshasa.schemas.envelope import utcnow
from tests.integration.gateway.conftest import Harness


class Clock:
    """The writer's clock: each call takes the next time queued, the last one once the queue is empty."""

    def __init__(self, start: datetime) -> None:
        self.last = start
        self.queue: deque[datetime] = deque()

    def __call__(self) -> datetime:
        if self.queue:
            self.last = self.queue.popleft()
        return self.last

    def next_batch(self, start: datetime, write: datetime) -> None:
        # A batch reads the clock when it is made (its budgets), when it starts, then once per write.
        self.queue.extend([start, start, write])


async def test_a_write_near_the_velocity_limit_counts_only_writes_still_in_its_window(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"maxVelocity": 2, "velocityWindowS": 1.0, "quarantineWindowS": 0, "maxWrites": 100})
    run_id = await c.start_run()
    base = utcnow()
    clock = Clock(base)
    monkeypatch.setattr(commands, "utcnow", clock)

    def at(seconds: float) -> datetime:
        return base + timedelta(seconds=seconds)

    for when in (0.0, 0.5):
        clock.next_batch(at(when), at(when))
        assert (await c.create_document(run_id))["data"]["createDocument"]["status"] == "PUBLISHED"
    # The batch starts at 0.9 (both earlier writes in its window), its write is accepted at 1.05: the
    # write of 0.0 has slid out by then, so the write is the second in (0.05, 1.05] and is admitted.
    clock.next_batch(at(0.9), at(1.05))
    admitted = await c.create_document(run_id)
    assert admitted.get("errors") is None, admitted
    # At 1.2 the writes of 0.5 and 1.05 are both in (0.2, 1.2]: a third is over the limit.
    clock.next_batch(at(1.1), at(1.2))
    refused = await c.create_document(run_id)
    assert refused["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"
    assert refused["errors"][0]["extensions"]["breaker"]["velocity"] == 2
