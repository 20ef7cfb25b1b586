"""The kernel's supervisor: a component's long-running tasks as named roles, restarted, reported and drained.

A component declares its roles (`Supervisor.add(name, run, policy)`), each an async callable taking the
role's own stop event, and the supervisor runs them side by side:

* a role that dies (raises, is cancelled by anyone but the supervisor, or returns before its stop was
  requested) is restarted after a capped exponential backoff (`RestartPolicy`);
* a role that died more than `max_restarts` times within `window_s`, or one whose policy says it must
  not be restarted (`restart=False`), makes the supervisor give up: `failed` is set and `on_give_up` is
  called, and the component then stops and exits non-zero so an orchestrator starts a fresh process;
* `health()` says each role's state (running, restarting since T after error E, failed, stopped) and
  `health_checks()` turns that into the kernel admin app's `/healthz` checks, so a role that is down
  answers 503 naming it; `ComponentMetrics.watch_roles(supervisor.health)` puts the same states and
  each role's restart count on `/metrics`;
* `wait(stop)` is a component's main loop: it returns when the stop is requested, or with the failure
  when the supervisor gave up first. Every component (gateway, services, coordinator) follows this one
  rule; none decides on its own what counts as a failure;
* `stop(names)` requests the roles' stop, waits up to a timeout for them to finish what they hold, then
  cancels them; a component stops its roles in the order its guarantees need (consumer before relay).

The restart decision is pure (`RestartBook.on_death` over an injected `now`), so it is unit-tested
without waiting; the supervisor itself takes its clocks and its backoff sleep as parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from kinshasa.kernel.admin_api import CheckFailed, HealthCheck
from kinshasa.schemas.clock import utcnow

log = logging.getLogger(__name__)

RoleRun = Callable[[asyncio.Event], Awaitable[object]]
RoleState = Literal["starting", "running", "restarting", "failed", "stopping", "stopped"]
# How long `stop` waits for a role to finish on its own before cancelling it.
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RestartPolicy:
    """When a role that died is started again.

    The n-th death within `window_s` waits `initial_backoff_s * factor**(n-1)`, capped at
    `max_backoff_s`; the death after `max_restarts` of them gives up. The defaults ride out a broker or
    database outage of a minute or two (0.5, 1, 2, ... 30 s) and give up on a role that keeps dying
    for five minutes, where a fresh process is the better bet.
    """

    restart: bool = True
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    factor: float = 2.0
    max_restarts: int = 20
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s or self.factor < 1:
            raise ValueError("RestartPolicy needs 0 <= initial_backoff_s <= max_backoff_s and factor >= 1")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("RestartPolicy needs max_restarts >= 0 and window_s > 0")

    def backoff_s(self, deaths_in_window: int) -> float:
        """The wait before restarting after the `deaths_in_window`-th recent death (1 for the first)."""
        exponent = max(deaths_in_window - 1, 0)
        # Capped before the power overflows a float for a long-dying role.
        if self.factor > 1 and exponent > 64:
            return self.max_backoff_s
        return float(min(self.max_backoff_s, self.initial_backoff_s * self.factor ** exponent))


# Never restarted: its death stops the process (a server that lost its socket, a worker whose
# shutdown cannot be repeated).
NEVER_RESTART = RestartPolicy(restart=False)


@dataclass(frozen=True)
class Restart:
    """Restart the role after `delay_s`."""

    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    """Do not restart: the process should exit non-zero, for the reason given."""

    reason: str


class RestartBook:
    """One role's recent deaths and the pure decision that follows each."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._deaths: deque[float] = deque()

    def on_death(self, now: float) -> Restart | GiveUp:
        """Record a death at `now` (a monotonic clock reading) and decide."""
        policy = self.policy
        if not policy.restart:
            return GiveUp("it is not restarted after a failure")
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - policy.window_s:
            self._deaths.popleft()
        count = len(self._deaths)
        if count > policy.max_restarts:
            return GiveUp(f"it died {count} times within {policy.window_s:.0f} s "
                          f"(at most {policy.max_restarts} restarts allowed)")
        return Restart(policy.backoff_s(count))


@dataclass(frozen=True)
class RoleHealth:
    """What `/healthz` says of one role."""

    name: str
    state: RoleState
    since: datetime
    restarts: int = 0
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.state in ("starting", "running", "stopping", "stopped")

    def describe(self) -> str:
        when = self.since.isoformat(timespec="seconds")
        after = f" after {self.last_error}" if self.last_error else ""
        if self.state == "restarting":
            return f"{self.name} is down, restarting since {when}{after} ({self.restarts} restart(s) so far)"
        if self.state == "failed":
            return f"{self.name} failed at {when}{after} and is not restarted: the process is exiting"
        return f"{self.name} is {self.state} since {when}"


class GaveUp(RuntimeError):
    """A role died and is not restarted; the component must stop and exit non-zero."""

    def __init__(self, role: str, reason: str, error: str | None) -> None:
        super().__init__(f"role {role} is not restarted: {reason}; last error: {error}")
        self.role = role


@dataclass
class _Role:
    name: str
    run: RoleRun
    book: RestartBook
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    health: RoleHealth | None = None
    keeper: asyncio.Task[None] | None = None
    attempt: asyncio.Task[object] | None = None
    restarts: int = 0


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "it returned without a stop request"
    if isinstance(exc, asyncio.CancelledError):
        return "it was cancelled"
    return f"{type(exc).__name__}: {exc}"


async def _call(run: RoleRun, stop: asyncio.Event) -> object:
    return await run(stop)


class Supervisor:
    """Runs a component's roles; see the module docstring."""

    def __init__(self, component: str, *, on_give_up: Callable[[GaveUp], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = utcnow) -> None:
        self.component = component
        self.on_give_up = on_give_up
        self.failed = asyncio.Event()
        self.failure: GaveUp | None = None
        self._clock = clock
        self._wall = wall
        self._roles: dict[str, _Role] = {}

    def add(self, name: str, run: RoleRun, policy: RestartPolicy | None = None) -> None:
        """Declare a role and start it at once (the caller is inside the running loop)."""
        existing = self._roles.get(name)
        if existing is not None and existing.keeper is not None and not existing.keeper.done():
            raise ValueError(f"role {name} of {self.component} is already supervised: give it another name")
        role = _Role(name, run, RestartBook(policy or RestartPolicy()))
        self._start_attempt(role)
        role.keeper = asyncio.create_task(self._keep(role), name=f"{self.component}-{name}-supervisor")
        self._roles[name] = role

    @property
    def names(self) -> list[str]:
        return list(self._roles)

    def attempt(self, name: str) -> asyncio.Task[object] | None:
        """The task running role `name` now (None while it waits to restart)."""
        return self._roles[name].attempt

    def health(self) -> dict[str, RoleHealth]:
        return {name: role.health for name, role in self._roles.items() if role.health is not None}

    def health_checks(self, names: Iterable[str] | None = None) -> dict[str, HealthCheck]:
        """`/healthz` checks, one per role (or per role in `names`, which may be added later)."""
        return {name: self._check(name) for name in (self.names if names is None else names)}

    def _check(self, name: str) -> HealthCheck:
        async def check() -> bool:
            role = self._roles.get(name)
            if role is None or role.health is None:
                raise CheckFailed(f"{name} has not started")
            if not role.health.up:
                raise CheckFailed(role.health.describe())
            return True

        return check

    async def wait(self, stop: asyncio.Event) -> GaveUp | None:
        """Wait for `stop` or for the supervisor to give up on a role, whichever comes first: None when
        the stop was requested, else the failure (the component then stops and exits non-zero)."""
        stopping = asyncio.create_task(stop.wait())
        gave_up = asyncio.create_task(self.failed.wait())
        try:
            await asyncio.wait([stopping, gave_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            gave_up.cancel()
        return self.failure if self.failure is not None and not stop.is_set() else None

    async def wait_failed(self) -> GaveUp:
        await self.failed.wait()
        assert self.failure is not None
        return self.failure

    async def stop(self, names: Iterable[str] | None = None, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Request the stop of the roles (all by default) and wait for them; cancel what outlives
        `timeout_s`. A role's own error on the way out is logged, never raised."""
        roles = [self._roles[name] for name in (self.names if names is None else names)
                 if name in self._roles]
        for role in roles:
            role.stop.set()
            if role.health is not None and role.health.state in ("starting", "running"):
                self._set(role, "stopping")
        keepers = [role.keeper for role in roles if role.keeper is not None]
        if not keepers:
            return
        _, late = await asyncio.wait(keepers, timeout=timeout_s)
        for role in roles:
            if role.keeper in late:
                log.warning("%s: role %s did not stop within %.0f s; cancelling it", self.component,
                            role.name, timeout_s)
                if role.attempt is not None:
                    role.attempt.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout_s)
        for role in roles:
            if role.keeper is not None and not role.keeper.done():
                role.keeper.cancel()
                with contextlib.suppress(BaseException):
                    await role.keeper

    def _set(self, role: _Role, state: RoleState, error: str | None = None) -> None:
        previous = role.health
        keep_error = error if error is not None else (previous.last_error if previous else None)
        role.health = RoleHealth(role.name, state, self._wall(), role.restarts, keep_error)

    def _start_attempt(self, role: _Role) -> asyncio.Task[object]:
        attempt: asyncio.Task[object] = asyncio.create_task(_call(role.run, role.stop),
                                                            name=f"{self.component}-{role.name}")
        role.attempt = attempt
        self._set(role, "running")
        return attempt

    async def _keep(self, role: _Role) -> None:
        while not role.stop.is_set():
            if role.attempt is None:
                self._start_attempt(role)
            assert role.attempt is not None
            # wait(), not await: a cancellation of the attempt by someone else is a death to handle here,
            # not a cancellation of the supervisor.
            try:
                await asyncio.wait([role.attempt])
            except asyncio.CancelledError:
                role.attempt.cancel()
                raise
            attempt, role.attempt = role.attempt, None
            error = None if attempt.cancelled() else attempt.exception()
            if role.stop.is_set():
                if error is not None and not isinstance(error, asyncio.CancelledError):
                    log.warning("%s: role %s failed while stopping: %s", self.component, role.name,
                                _describe(error), exc_info=error)
                break
            why = _describe(asyncio.CancelledError() if attempt.cancelled() else error)
            decision = role.book.on_death(self._clock())
            if isinstance(decision, GiveUp):
                log.critical("%s: role %s died (%s) and %s; the process stops", self.component, role.name,
                             why, decision.reason, exc_info=error)
                self._set(role, "failed", why)
                self._give_up(GaveUp(role.name, decision.reason, why))
                return
            role.restarts += 1
            log.error("%s: role %s died (%s); restarting it in %.2f s", self.component, role.name, why,
                      decision.delay_s, exc_info=error)
            self._set(role, "restarting", why)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(role.stop.wait(), decision.delay_s)
        self._set(role, "stopped")

    def _give_up(self, failure: GaveUp) -> None:
        if self.failure is None:
            self.failure = failure
            self.failed.set()
        if self.on_give_up is not None:
            try:
                self.on_give_up(failure)
            except Exception:
                log.exception("%s: the give-up callback failed", self.component)
