"""The kernel's metrics: bounded labels, supervised roles on /metrics, cached readings, refreshers."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kinshasa.kernel.metrics import (
    OTHER,
    ROLE_RESTARTS,
    ROLE_STATE,
    ROLE_UP,
    CachedReading,
    ComponentMetrics,
    bounded_label,
)
from kinshasa.kernel.supervisor import RestartPolicy, Supervisor

FAST = RestartPolicy(initial_backoff_s=0.01, max_backoff_s=0.02, max_restarts=5, window_s=60)


class Colour(enum.Enum):
    RED = "red"


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never {what}")


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def test_a_label_outside_its_closed_set_is_reported_as_other() -> None:
    assert bounded_label("writes", ("writes", "errors")) == "writes"
    assert bounded_label(Colour.RED, ("red",)) == "red"
    assert bounded_label("run-3f2a9c1e-0b7d-4b8e-9c55-2d1f0e6a7b44", ("writes", "errors")) == OTHER
    assert bounded_label(None, ("writes",)) == OTHER


async def test_each_supervised_role_shows_its_state_and_a_restart_after_its_task_is_cancelled_from_outside(
) -> None:
    metrics = ComponentMetrics("svc")
    supervisor = Supervisor("svc")
    metrics.watch_roles(supervisor.health)

    async def forever(stop: asyncio.Event) -> None:
        await stop.wait()

    supervisor.add("consumer", forever, FAST)
    supervisor.add("relay", forever, FAST)
    try:
        before = samples(await metrics.render())
        assert before[(ROLE_UP, labels(component="svc", role="consumer"))] == 1
        assert before[(ROLE_STATE, labels(component="svc", role="consumer", state="running"))] == 1
        assert before[(ROLE_STATE, labels(component="svc", role="consumer", state="restarting"))] == 0
        assert before[(f"{ROLE_RESTARTS}_total", labels(component="svc", role="consumer"))] == 0

        first = supervisor.attempt("consumer")
        assert first is not None
        first.cancel()
        await until(lambda: supervisor.attempt("consumer") not in (None, first), "restarted the consumer")

        after = samples(await metrics.render())
        assert after[(f"{ROLE_RESTARTS}_total", labels(component="svc", role="consumer"))] == 1
        assert after[(f"{ROLE_RESTARTS}_total", labels(component="svc", role="relay"))] == 0
        assert after[(ROLE_STATE, labels(component="svc", role="consumer", state="running"))] == 1
    finally:
        await supervisor.stop(timeout_s=1)
    stopped = samples(await metrics.render())
    assert stopped[(ROLE_STATE, labels(component="svc", role="consumer", state="stopped"))] == 1


async def test_a_role_waiting_to_restart_is_down_on_metrics() -> None:
    metrics = ComponentMetrics("svc")
    supervisor = Supervisor("svc")
    metrics.watch_roles(supervisor.health)

    async def dies(_stop: asyncio.Event) -> None:
        raise RuntimeError("broker gone")

    supervisor.add("consumer", dies, RestartPolicy(initial_backoff_s=30, max_backoff_s=30))
    try:
        await until(lambda: supervisor.health()["consumer"].state == "restarting", "saw the consumer die")
        found = samples(await metrics.render())
        assert found[(ROLE_UP, labels(component="svc", role="consumer"))] == 0
        assert found[(ROLE_STATE, labels(component="svc", role="consumer", state="restarting"))] == 1
    finally:
        await supervisor.stop(timeout_s=1)


async def test_a_cached_reading_is_reused_within_its_ttl_and_read_again_after() -> None:
    now = [100.0]
    reads: list[int] = []

    async def read() -> int:
        reads.append(len(reads))
        return len(reads)

    reading = CachedReading(read, ttl_s=5, clock=lambda: now[0])
    assert await reading.get() == 1
    now[0] += 4.9
    assert await reading.get() == 1
    now[0] += 0.2
    assert await reading.get() == 2
    assert len(reads) == 2


async def test_scrapes_that_come_together_share_one_read() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    reads = 0

    async def slow_read() -> int:
        nonlocal reads
        reads += 1
        started.set()
        await release.wait()
        return 7

    reading = CachedReading(slow_read, ttl_s=5)
    first = asyncio.create_task(reading.get())
    await started.wait()
    second = asyncio.create_task(reading.get())
    release.set()
    assert await asyncio.gather(first, second) == [7, 7]
    assert reads == 1


async def test_a_failed_reading_waits_out_its_ttl_and_answers_the_last_good_value() -> None:
    now = [100.0]
    outcomes: list[object] = [3, RuntimeError("database is locked"), 4]
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, int)
        return outcome

    reading = CachedReading(read, ttl_s=5, clock=lambda: now[0])
    assert await reading.get() == 3
    now[0] += 5
    with pytest.raises(RuntimeError, match="locked"):
        await reading.get()  # the failed read itself is reported once
    now[0] += 1
    assert await reading.get() == 3  # within the TTL of the failure: the last good value, no new read
    assert reads == 2
    now[0] += 5
    assert await reading.get() == 4
    assert reads == 3


async def test_a_reading_that_hangs_is_cut_off_at_its_timeout() -> None:
    never = asyncio.Event()

    async def hung() -> int:
        await never.wait()
        return 0

    reading = CachedReading(hung, ttl_s=5, timeout_s=0.05)
    with pytest.raises(TimeoutError):
        await reading.get()


def test_a_negative_ttl_is_refused() -> None:
    async def read() -> int:
        return 0

    with pytest.raises(ValueError, match="zero or more seconds"):
        CachedReading(read, ttl_s=-1)


async def test_a_failing_refresher_keeps_the_scrape_answering() -> None:
    metrics = ComponentMetrics("svc")
    calls: list[str] = []

    async def broken() -> None:
        calls.append("broken")
        raise ConnectionError("database unavailable")

    async def fine() -> None:
        calls.append("fine")

    metrics.add_refresher("broken figures", broken)
    metrics.add_refresher("fine figures", fine)
    text = await metrics.render()
    assert calls == ["broken", "fine"]
    assert samples(text)[("kinshasa_dlq_size", labels(component="svc"))] == 0
