"""Prometheus metrics of one component: outbox backlog, publish failures, DLQ size, handler latency, lag,
the state and restarts of each supervised role, and the component's own domain figures.

Each component owns a `ComponentMetrics` with its own `CollectorRegistry`, so two components in one
process (tests, the dev stack) never collide and `/metrics` shows exactly one component. Values
that live in the database (outbox backlog, oldest unpublished row, DLQ size, a component's domain
figures) are not pushed by the code that changes them; they are read through callbacks right before
each scrape (`refresh`), so the numbers are true even after a crash or a restart. A domain figure that
needs more than an index lookup is read through a `CachedReading`, so a scrape costs at most one such
query per TTL however often it comes.

Labels are bounded: a label takes its values from a closed set (role names, states, enum values,
catalogue topics and operations, consumer groups), never from run ids, agent ids or entity ids, which
grow without end and would make every scrape and the time-series database grow with them. A value
outside its set is reported as `other` (`bounded_label`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

OutboxCallback = Callable[[], Awaitable[tuple[int, float | None]]]
DlqCallback = Callable[[], Awaitable[int]]
Refresher = Callable[[], Awaitable[None]]
T = TypeVar("T")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Metric names, exported so dashboards, alerts and tests refer to one spelling.
OUTBOX_BACKLOG = "kinshasa_outbox_backlog"
OUTBOX_OLDEST_AGE = "kinshasa_outbox_oldest_unpublished_age_seconds"
PUBLISH_FAILURES = "kinshasa_outbox_publish_failures_total"
DLQ_SIZE = "kinshasa_dlq_size"
DLQ_RECORDED = "kinshasa_dlq_recorded_total"
HANDLER_LATENCY = "kinshasa_handler_latency_seconds"
CONSUMER_LAG = "kinshasa_consumer_lag"
ROLE_UP = "kinshasa_role_up"
ROLE_STATE = "kinshasa_role_state"
ROLE_RESTARTS = "kinshasa_role_restarts"  # a counter: exposed as kinshasa_role_restarts_total

# The supervisor's role states (kernel/supervisor.py's RoleState), each a series of ROLE_STATE.
ROLE_STATES = ("starting", "running", "restarting", "failed", "stopping", "stopped")
# What a label value outside its closed set is reported as.
OTHER = "other"

# Handlers span a cached inbox hit (~1 ms) to a slow database transaction; the tail matters most.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def bounded_label(value: object, allowed: Collection[str]) -> str:
    """`value` as a label if it is one of `allowed`, else `other`: a label never takes an open-ended value."""
    text = str(getattr(value, "value", value))
    return text if text in allowed else OTHER


class RoleFigures(Protocol):
    """What the role metrics read of a supervised role (kernel/supervisor.py's RoleHealth)."""

    @property
    def state(self) -> str: ...

    @property
    def restarts(self) -> int: ...

    @property
    def up(self) -> bool: ...


class _RoleCollector:
    """Role state, up and restarts, read from the supervisor at each scrape (never stale, never pushed)."""

    def __init__(self, component: str, roles: Callable[[], Mapping[str, RoleFigures]]) -> None:
        self._component = component
        self._roles = roles

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        return self._families(self._roles())

    def _families(self, roles: Mapping[str, RoleFigures]) -> list[Metric]:
        up = GaugeMetricFamily(ROLE_UP, "1 while the supervised role is up (running, starting or stopping), "
                               "0 while it waits to restart or has failed.", labels=["component", "role"])
        state = GaugeMetricFamily(ROLE_STATE, "1 for the state the supervised role is in, 0 for the others.",
                                  labels=["component", "role", "state"])
        restarts = CounterMetricFamily(ROLE_RESTARTS, "Times the supervisor restarted the role after it died "
                                       "(since the process started).", labels=["component", "role"])
        for name, role in roles.items():
            up.add_metric([self._component, name], 1.0 if role.up else 0.0)
            for candidate in ROLE_STATES:
                state.add_metric([self._component, name, candidate], 1.0 if role.state == candidate else 0.0)
            restarts.add_metric([self._component, name], float(role.restarts))
        return [up, state, restarts]


class CachedReading(Generic[T]):
    """An async database reading kept for `ttl_s`: scrapes within the TTL reuse it, and scrapes that
    come together while it is being read wait for that one read instead of starting their own.

    A read is bounded by `timeout_s` (a scrape must answer even when the database is locked or the pool
    busy), and a failed read is not tried again before the TTL has passed either: in between, `get`
    answers the last good value, or raises the failure when there is none yet.
    """

    def __init__(self, read: Callable[[], Awaitable[T]], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = 5.0) -> None:
        if ttl_s < 0:
            raise ValueError(f"a reading's TTL is {ttl_s}s: give zero or more seconds")
        self._read = read
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._value: T | None = None
        self._failure: Exception | None = None
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        async with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self.ttl_s:
                try:
                    self._value = await asyncio.wait_for(self._read(), self.timeout_s)
                    self._failure = None
                except Exception as exc:
                    self._failure = exc
                    self._read_at = self._clock()
                    raise
                self._read_at = self._clock()
            if self._value is None:
                assert self._failure is not None
                raise self._failure
            return self._value


class ComponentMetrics:
    """All metrics of one component, on a registry of its own."""

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        self.component = component
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.outbox_backlog = Gauge(OUTBOX_BACKLOG, "Outbox rows committed but not yet published.",
                                    ["component"], registry=r)
        self.outbox_oldest_age = Gauge(OUTBOX_OLDEST_AGE,
                                       "Age in seconds of the oldest unpublished outbox row (0 when none).",
                                       ["component"], registry=r)
        self.publish_failures = Counter(PUBLISH_FAILURES, "Outbox publish attempts that failed.",
                                        ["component", "topic"], registry=r)
        self.dlq_size = Gauge(DLQ_SIZE, "Dead letters waiting for an operator (status open).",
                              ["component"], registry=r)
        self.dlq_recorded = Counter(DLQ_RECORDED, "Messages moved to the dead-letter queue.",
                                    ["component", "group", "reason"], registry=r)
        self.handler_latency = Histogram(HANDLER_LATENCY, "Time a message handler took, by operation.",
                                         ["component", "operation", "outcome"], registry=r,
                                         buckets=_LATENCY_BUCKETS)
        self.consumer_lag = Gauge(CONSUMER_LAG, "Messages between a partition's high watermark and "
                                  "the group's position.", ["component", "group", "topic", "partition"],
                                  registry=r)
        self._outbox_callback: OutboxCallback | None = None
        self._dlq_callback: DlqCallback | None = None
        self._refreshers: list[tuple[str, Refresher]] = []
        self._roles: Callable[[], Mapping[str, RoleFigures]] = dict
        r.register(_RoleCollector(component, lambda: self._roles()))
        # Created at zero so the series exist (and alert rules match) before the first event.
        self.outbox_backlog.labels(component=component).set(0)
        self.outbox_oldest_age.labels(component=component).set(0)
        self.dlq_size.labels(component=component).set(0)

    def set_outbox_callback(self, callback: OutboxCallback) -> None:
        """`callback()` returns (backlog, age in seconds of the oldest unpublished row or None)."""
        self._outbox_callback = callback

    def set_dlq_callback(self, callback: DlqCallback) -> None:
        """`callback()` returns the number of open dead letters."""
        self._dlq_callback = callback

    def watch_roles(self, roles: Callable[[], Mapping[str, RoleFigures]]) -> None:
        """Report the roles `roles()` returns (a supervisor's `health`) as ROLE_UP, ROLE_STATE and
        ROLE_RESTARTS; read at each scrape, so a runtime that builds a new supervisor passes a callable
        that finds the current one."""
        self._roles = roles

    def add_refresher(self, name: str, refresher: Refresher) -> None:
        """Run `refresher()` before each scrape, after the kernel's own callbacks: a component's domain
        figures (gateway/domain_metrics.py, coordinator/revert_metrics.py) set their gauges there."""
        self._refreshers.append((name, refresher))

    async def refresh(self) -> None:
        """Re-read the database-backed gauges; called right before each scrape.

        A failing callback leaves the last value in place and is logged: a scrape must still
        answer when the database is briefly unavailable, and the gap shows in the logs.
        """
        if self._outbox_callback is not None:
            try:
                backlog, oldest_age = await self._outbox_callback()
            except Exception:
                logger.exception("outbox metrics callback failed; keeping the previous values")
            else:
                self.outbox_backlog.labels(component=self.component).set(backlog)
                self.outbox_oldest_age.labels(component=self.component).set(oldest_age or 0.0)
        if self._dlq_callback is not None:
            try:
                size = await self._dlq_callback()
            except Exception:
                logger.exception("DLQ metrics callback failed; keeping the previous value")
            else:
                self.set_dlq_size(size)
        for name, refresher in self._refreshers:
            try:
                await refresher()
            except Exception:
                logger.exception("%s metrics could not be read; keeping the previous values", name)

    def publish_failed(self, topic: str, count: int = 1) -> None:
        self.publish_failures.labels(component=self.component, topic=topic).inc(count)

    def set_dlq_size(self, size: int) -> None:
        self.dlq_size.labels(component=self.component).set(size)

    def dead_lettered(self, group: str, reason: str) -> None:
        self.dlq_recorded.labels(component=self.component, group=group, reason=reason).inc()

    def observe_handler(self, operation: str, seconds: float, outcome: str = "ok") -> None:
        self.handler_latency.labels(component=self.component, operation=operation,
                                    outcome=outcome).observe(seconds)

    @contextmanager
    def time_handler(self, operation: str) -> Iterator[None]:
        """Time a block as one handler call; outcome is 'error' when it raises."""
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.observe_handler(operation, time.perf_counter() - started, outcome)

    def set_consumer_lag(self, group: str, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(component=self.component, group=group, topic=topic,
                                 partition=str(partition)).set(max(lag, 0))

    def set_consumer_lags(self, group: str, lags: Mapping[tuple[str, int], int]) -> None:
        """Record `AsyncConsumer.lag()`'s answer: lag per (topic, partition) this member owns."""
        for (topic, partition), lag in lags.items():
            self.set_consumer_lag(group, topic, partition, lag)

    async def render(self) -> bytes:
        """The Prometheus text exposition of this component, refreshed first."""
        await self.refresh()
        return generate_latest(self.registry)
