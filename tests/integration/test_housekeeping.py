"""The housekeeper prunes only published outbox rows older than the policy keeps, in chunks."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.kernel.housekeeping import Housekeeper, HousekeepingPolicy, housekeeping_policy
from kinshasa.kernel.outbox import DEAD, PENDING, PUBLISHED, FailedAttempt, SqlOutboxStore, outbox
from kinshasa.schemas.envelope import utcnow
from kinshasa.settings import ServiceSettings

TOPIC = "kinshasa.events.documents"


async def _published(engine: AsyncEngine, count: int, at: datetime) -> None:
    store = SqlOutboxStore()
    async with engine.begin() as conn:
        for i in range(count):
            await store.append(conn, TOPIC, f"k{i}", b"v", uuid.uuid4())
        rows = await store.claim(conn, limit=count, now=utcnow())
        assert len(rows) == count
        await store.mark_published(conn, [r.seq for r in rows], now=at, relay_id="relay-test")


async def _statuses(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(outbox.c.status).order_by(outbox.c.seq))).scalars())


async def test_prunes_old_published_rows_in_chunks_and_keeps_everything_else(engine: AsyncEngine) -> None:
    now = utcnow()
    store = SqlOutboxStore()
    await _published(engine, 23, now - timedelta(days=2))  # old enough to go
    await _published(engine, 4, now - timedelta(hours=1))  # published recently: kept
    async with engine.begin() as conn:
        await store.append(conn, TOPIC, "pending", b"v", uuid.uuid4())
        dead = uuid.uuid4()
        await store.append(conn, TOPIC, "dead", b"v", dead)
        claimed = await store.claim(conn, limit=10, now=utcnow())
        [dead_row] = [r for r in claimed if r.message_id == dead]
        await store.record_failures(conn, [FailedAttempt(dead_row.seq, 10, now, "unknown topic", dead=True)],
                                    relay_id="relay-test")
    keeper = Housekeeper(engine, HousekeepingPolicy(keep_published=timedelta(days=1), chunk=5),
                         clock=lambda: now)
    assert await keeper.prune_once() == 23
    assert await _statuses(engine) == [PUBLISHED] * 4 + [PENDING, DEAD]
    assert await keeper.prune_once() == 0


async def test_runs_on_its_schedule_until_stopped(engine: AsyncEngine) -> None:
    await _published(engine, 3, utcnow() - timedelta(minutes=5))
    keeper = Housekeeper(engine, HousekeepingPolicy(keep_published=timedelta(minutes=1),
                                                    every=timedelta(milliseconds=50)))
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    for _ in range(200):
        if not await _statuses(engine):
            break
        await asyncio.sleep(0.05)
    assert await _statuses(engine) == []
    stop.set()
    await asyncio.wait_for(task, 5)


def test_policy_comes_from_the_component_settings_and_refuses_nonsense() -> None:
    settings = ServiceSettings(outbox_keep_published_hours=6)
    assert housekeeping_policy(settings).keep_published == timedelta(hours=6)
    with pytest.raises(ValueError, match="every must be positive"):
        HousekeepingPolicy(every=timedelta(0))
    with pytest.raises(ValueError, match="chunk"):
        HousekeepingPolicy(chunk=0)
