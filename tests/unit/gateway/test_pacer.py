"""The pacer cuts what a batch sets off into slices, so other work gets the event loop in between."""

from __future__ import annotations

import asyncio
import time

from kinshasa.gateway.loaders import Pacer


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def longest_wait_of_a_neighbour(
    pacer: Pacer | None, resolvers: int = 100, work_s: float = 0.001
) -> float:
    """`resolvers` become ready at once (as when a batch arrives), each doing `work_s` of CPU after its
    load; meanwhile a neighbour wants the loop every millisecond. Returns its longest wait."""
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
    await asyncio.gather(*tasks)
    done = True
    await watching
    return max(waits)


async def test_a_batch_holds_the_loop_for_one_slice_at_a_time_not_for_all_of_it() -> None:
    unpaced = await longest_wait_of_a_neighbour(None)
    paced = await longest_wait_of_a_neighbour(Pacer(slice_s=0.002))
    assert unpaced >= 0.09  # all 100 ms of it in one pass
    assert paced < 0.03  # a slice and one resolver's work, with room for a busy machine


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
