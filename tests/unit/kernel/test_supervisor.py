"""The supervisor's restart policy (pure, over an injected clock) and its handling of roles that die."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from kinshasa.kernel.admin_api import CheckFailed
from kinshasa.kernel.supervisor import (
    NEVER_RESTART,
    GaveUp,
    GiveUp,
    Restart,
    RestartBook,
    RestartPolicy,
    Supervisor,
)

FAST = RestartPolicy(initial_backoff_s=0.01, max_backoff_s=0.02, max_restarts=3, window_s=60)


def test_backoff_doubles_from_the_first_death_and_is_capped() -> None:
    book = RestartBook(RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4, factor=2, max_restarts=10))
    delays = [book.on_death(now=float(t)) for t in range(6)]
    assert delays == [Restart(0.5), Restart(1.0), Restart(2.0), Restart(4.0), Restart(4.0), Restart(4.0)]


def test_too_many_deaths_within_the_window_give_up() -> None:
    book = RestartBook(RestartPolicy(initial_backoff_s=1, max_backoff_s=8, max_restarts=2, window_s=100))
    assert book.on_death(now=0) == Restart(1)
    assert book.on_death(now=10) == Restart(2)
    decision = book.on_death(now=20)
    assert isinstance(decision, GiveUp) and "3 times within 100 s" in decision.reason


def test_deaths_older_than_the_window_are_forgotten_and_the_backoff_starts_over() -> None:
    book = RestartBook(RestartPolicy(initial_backoff_s=1, max_backoff_s=8, max_restarts=2, window_s=100))
    assert book.on_death(now=0) == Restart(1)
    assert book.on_death(now=50) == Restart(2)
    # The death at 0 is out of the window by now: two recent deaths, not three.
    assert book.on_death(now=120) == Restart(2)
    assert book.on_death(now=300) == Restart(1)


def test_a_role_that_must_not_be_restarted_gives_up_at_its_first_death() -> None:
    decision = RestartBook(NEVER_RESTART).on_death(now=0)
    assert isinstance(decision, GiveUp) and "not restarted" in decision.reason


def test_a_long_dying_role_waits_the_cap_without_overflowing() -> None:
    assert RestartPolicy(max_backoff_s=30).backoff_s(10_000) == 30


def test_nonsense_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial_backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError):
        RestartPolicy(window_s=0)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_role_that_dies_reports_restarting_then_runs_again() -> None:
    allowed = asyncio.Event()
    started: list[int] = []

    async def role(stop: asyncio.Event) -> None:
        started.append(len(started))
        if len(started) == 1:
            raise ConnectionError("broker gone")
        await allowed.wait()  # the second attempt stays up until the test has looked
        await stop.wait()

    policy = RestartPolicy(initial_backoff_s=0.01, max_backoff_s=0.01)
    supervisor = Supervisor("test", wall=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    seen: list[str] = []
    supervisor.add("listener", role, policy)
    try:
        while len(started) < 2:
            state = supervisor.health()["listener"]
            seen.append(state.state)
            if state.state == "restarting":
                assert state.last_error == "ConnectionError: broker gone" and state.restarts == 1
                with pytest.raises(CheckFailed, match="listener is down, restarting since 2026-01-01"):
                    await supervisor.health_checks()["listener"]()
            await asyncio.sleep(0)
        allowed.set()
        assert "restarting" in seen
        assert supervisor.health()["listener"].state == "running"
        assert await supervisor.health_checks()["listener"]() is True
    finally:
        await supervisor.stop()
    assert supervisor.health()["listener"].state == "stopped" and not supervisor.failed.is_set()


async def test_give_up_after_max_restarts_calls_back_and_fails_health() -> None:
    clock = Clock()
    calls: list[GaveUp] = []

    async def always_dies(stop: asyncio.Event) -> None:
        clock.now += 1  # every death a second after the last: all within the window
        raise RuntimeError("poisoned")

    supervisor = Supervisor("test", on_give_up=calls.append, clock=clock)
    supervisor.add("relay", always_dies, FAST)
    failure = await asyncio.wait_for(supervisor.wait_failed(), 10)
    assert failure.role == "relay" and "4 times within 60 s" in str(failure) and calls == [failure]
    health = supervisor.health()["relay"]
    assert health.state == "failed" and health.restarts == 3
    with pytest.raises(CheckFailed, match=r"relay failed at .* not restarted"):
        await supervisor.health_checks()["relay"]()
    await supervisor.stop()


async def test_returning_or_being_cancelled_without_a_stop_request_is_a_death() -> None:
    clock = Clock()
    runs: list[str] = []

    async def returns(stop: asyncio.Event) -> None:
        runs.append("returned")

    supervisor = Supervisor("test", clock=clock)
    supervisor.add("server", returns, NEVER_RESTART)
    failure = await asyncio.wait_for(supervisor.wait_failed(), 10)
    assert "returned without a stop request" in str(failure) and runs == ["returned"]

    hang = asyncio.Event()

    async def waits(stop: asyncio.Event) -> None:
        await hang.wait()

    other = Supervisor("test", clock=clock)
    other.add("worker", waits, NEVER_RESTART)
    await asyncio.sleep(0)
    attempt = other.attempt("worker")
    assert attempt is not None
    attempt.cancel()
    assert "it was cancelled" in str(await asyncio.wait_for(other.wait_failed(), 10))


async def test_stop_waits_for_a_role_to_finish_then_cancels_one_that_hangs() -> None:
    finished: list[str] = []

    async def polite(stop: asyncio.Event) -> None:
        await stop.wait()
        finished.append("polite")

    async def stubborn(stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            finished.append("stubborn cancelled")
            raise

    supervisor = Supervisor("test")
    supervisor.add("polite", polite)
    supervisor.add("stubborn", stubborn)
    await asyncio.sleep(0)
    await supervisor.stop(timeout_s=0.05)
    assert sorted(finished) == ["polite", "stubborn cancelled"]
    assert {h.state for h in supervisor.health().values()} == {"stopped"}
    assert not supervisor.failed.is_set()


async def test_stop_of_some_roles_leaves_the_others_running() -> None:
    async def role(stop: asyncio.Event) -> None:
        await stop.wait()

    supervisor = Supervisor("test")
    supervisor.add("consumer", role)
    supervisor.add("relay", role)
    await asyncio.sleep(0)
    await supervisor.stop(["consumer"])
    assert supervisor.health()["consumer"].state == "stopped"
    assert supervisor.health()["relay"].state == "running"
    await supervisor.stop()
    assert supervisor.health()["relay"].state == "stopped"


async def test_wait_returns_nothing_when_the_stop_is_requested() -> None:
    supervisor = Supervisor("test")

    async def forever(stop: asyncio.Event) -> None:
        await stop.wait()

    supervisor.add("relay", forever, FAST)
    stop = asyncio.Event()
    waiting = asyncio.create_task(supervisor.wait(stop))
    stop.set()
    try:
        assert await asyncio.wait_for(waiting, 5) is None
    finally:
        await supervisor.stop(timeout_s=1)


async def test_wait_returns_the_failure_when_the_supervisor_gives_up_first() -> None:
    supervisor = Supervisor("test")

    async def dies(_stop: asyncio.Event) -> None:
        raise ConnectionError("broker gone")

    supervisor.add("consumer", dies, NEVER_RESTART)
    try:
        failure = await asyncio.wait_for(supervisor.wait(asyncio.Event()), 5)
        assert isinstance(failure, GaveUp) and failure.role == "consumer"
        assert "ConnectionError: broker gone" in str(failure)
    finally:
        await supervisor.stop(timeout_s=1)
