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
    load; meanwhile a neighbour wants the loop all the time. Returns its longest wait, and the most
    resolvers that ran between two of its turns."""
    arrived = asyncio.Event()
    waits: list[float] = []
    ran = 0
    between: list[int] = []  # at each of the neighbour's turns, the resolvers run since its last one
    done = False

    async def resolver() -> None:
        nonlocal ran
        await arrived.wait()
        if pacer is not None:
            await pacer.pace()
        busy(work_s)
        ran += 1

    async def neighbour() -> None:
        seen = 0
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0)
            waits.append(time.perf_counter() - started)
            between.append(ran - seen)
            seen = ran

    watching = asyncio.create_task(neighbour())
    tasks = [asyncio.create_task(resolver()) for _ in range(resolvers)]
    await asyncio.sleep(0.01)
    arrived.set()
    await asyncio.gather(*tasks)
    done = True
    await watching
    return max(waits), max(between)


async def test_a_batch_holds_the_loop_for_one_slice_at_a_time_not_for_all_of_it() -> None:
    unpaced_wait, unpaced_run = await a_neighbour_during_a_batch(None)
    _paced_wait, paced_run = await a_neighbour_during_a_batch(Pacer(slice_s=0.002))
    assert unpaced_wait >= 0.09 and unpaced_run == 100  # all 100 ms of it in one pass
    # A slice's worth of resolvers at a time (2 ms, then the one in hand): counted, not timed. A machine
    # that stops this process for a while makes one wait long, but a slice then ends sooner, not later.
    assert paced_run <= 3


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
