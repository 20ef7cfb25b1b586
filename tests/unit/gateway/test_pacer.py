"""The pacer cuts what a batch sets off into slices, so other work gets the event loop in between."""

from __future__ import annotations

import asyncio
import time

from kinshasa.gateway.loaders import Pacer


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def a_neighbour_during_a_batch(
    pacer: Pacer | None, resolvers: int = 100, work_s: float = 0.001
) -> tuple[float, int]:
    """`resolvers` become ready at once (as when a batch arrives), each doing `work_s` of CPU after its
    load; meanwhile a neighbour wants the loop all the time. Returns its longest wait and how many turns
    it had while the batch ran."""
    arrived = asyncio.Event()
    waits: list[float] = []
    done = False

    async def resolver() -> None:
        await arrived.wait()
        if pacer is not None:
            await pacer.pace()
        busy(work_s)

    async def neighbour() -> None:
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0)
            waits.append(time.perf_counter() - started)

    watching = asyncio.create_task(neighbour())
    tasks = [asyncio.create_task(resolver()) for _ in range(resolvers)]
    await asyncio.sleep(0.01)
    arrived.set()
    before = len(waits)
    await asyncio.gather(*tasks)
    turns = len(waits) - before
    done = True
    await watching
    return max(waits), turns


async def test_a_batch_holds_the_loop_for_one_slice_at_a_time_not_for_all_of_it() -> None:
    unpaced_wait, unpaced_turns = await a_neighbour_during_a_batch(None)
    _paced_wait, paced_turns = await a_neighbour_during_a_batch(Pacer(slice_s=0.002))
    # All 100 ms of it in one pass: a turn as the batch arrives, then none until it is over.
    assert unpaced_wait >= 0.09 and unpaced_turns <= 3
    # Turns all along (about 150 here): counted, not timed, since a machine that stops this process for a
    # while makes one wait long but leaves no fewer turns.
    assert paced_turns >= 50


async def test_every_paced_resolver_finishes_and_a_cancelled_one_is_skipped() -> None:
    pacer = Pacer(slice_s=0.0005)
    finished: list[int] = []

    async def resolver(index: int) -> None:
        await pacer.pace()
        busy(0.0002)
        finished.append(index)

    tasks = [asyncio.create_task(resolver(i)) for i in range(50)]
    await asyncio.sleep(0)
    tasks[10].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[10], asyncio.CancelledError)
    assert sorted(finished) == [i for i in range(50) if i != 10]
    # Idle again: a later pace waits for one pass at most.
    await asyncio.wait_for(pacer.pace(), 1)
