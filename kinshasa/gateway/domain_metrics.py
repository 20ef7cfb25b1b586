"""The gateway's domain figures on /metrics: trips, held and awaiting-approval commands, incidents, refusals.

Trips, incidents and the two command gauges live in the gateway's database, so they are read from it, not
counted in memory: they stay true across restarts, a rolled-back transaction never counts, and no code
path that trips a run or holds a command needs to know about metrics. They are read through one
`CachedReading` (default TTL `FIGURES_TTL_S`), so a scrape costs at most two small queries per TTL: the
command gauges count one status through `ix_gw_commands_status_release`, and the incident counts group
`gw_incidents`, one row per incident (rare by nature: a trip, a revert, a breach).

These are the stack's totals, the same on every gateway replica: a dashboard takes `max` of them across
replicas, not `sum`. Budget refusals are the exception: a refusal stores nothing, so each replica counts
its own in memory (`refused`), and those add up.

Every label is bounded: the trip reason is the breaker threshold that fired (`TRIP_REASONS`), the
incident kind an `IncidentKind` value, the budget a `Budget` value; anything else is `other`. Never a
run id, agent id or entity id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.gateway import store
from kinshasa.gateway.budgets import Budget
from kinshasa.gateway.incidents import IncidentKind
from kinshasa.gateway.store import commands, incidents
from kinshasa.kernel.metrics import CachedReading, ComponentMetrics, bounded_label

TRIPS = "kinshasa_trips"  # counters: exposed with a _total suffix
INCIDENTS = "kinshasa_incidents"
BUDGET_REFUSALS = "kinshasa_agent_budget_refusals"
OFFLOADED_READS = "kinshasa_offloaded_reads"
HELD_COMMANDS = "kinshasa_held_commands"
AWAITING_APPROVAL_COMMANDS = "kinshasa_awaiting_approval_commands"

# The breaker thresholds a trip names as its reason (`Trip.threshold` in gateway/breaker.py and
# gateway/listener.py): the write-time checks, an operator's OPEN, and a failed half-open probe.
TRIP_REASONS = ("errors", "writes", "velocity", "services", "operator", "probe")
INCIDENT_KINDS = tuple(kind.value for kind in IncidentKind)
BUDGETS = tuple(budget.value for budget in Budget)
# Seconds a reading of the database figures is reused: well under a scrape interval's worth of staleness
# on a dashboard, and at most two queries per TTL whatever the number of scrapers.
FIGURES_TTL_S = 5.0


@dataclass(frozen=True)
class GatewayFigures:
    """One reading of the database-backed figures."""

    held: int = 0
    awaiting_approval: int = 0
    # (kind, trip reason or "" for other kinds) -> incidents opened.
    incidents: dict[tuple[str, str], int] = field(default_factory=dict)

    def incidents_by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(INCIDENT_KINDS, 0)
        for (kind, _reason), count in self.incidents.items():
            label = bounded_label(kind, INCIDENT_KINDS)
            counts[label] = counts.get(label, 0) + count
        return counts

    def trips_by_reason(self) -> dict[str, int]:
        counts = dict.fromkeys(TRIP_REASONS, 0)
        for (kind, reason), count in self.incidents.items():
            if kind == IncidentKind.TRIP.value:
                label = bounded_label(reason, TRIP_REASONS)
                counts[label] = counts.get(label, 0) + count
        return counts


async def read_figures(engine: AsyncEngine) -> GatewayFigures:
    """Count held and awaiting-approval commands, and incidents by kind and trip reason."""
    async with engine.connect() as conn:
        statuses = (await conn.execute(
            select(commands.c.status, func.count())
            .where(commands.c.status.in_([store.HELD, store.AWAITING_APPROVAL]))
            .group_by(commands.c.status))).all()
        opened = (await conn.execute(
            select(incidents.c.kind, incidents.c.threshold, func.count())
            .group_by(incidents.c.kind, incidents.c.threshold))).all()
    by_status = {status: int(count) for status, count in statuses}
    return GatewayFigures(
        held=by_status.get(store.HELD, 0),
        awaiting_approval=by_status.get(store.AWAITING_APPROVAL, 0),
        incidents={(str(kind), str(threshold or "")): int(count) for kind, threshold, count in opened},
    )


class GatewayMetrics:
    """The gateway's domain metrics on its `ComponentMetrics` registry; see the module docstring."""

    def __init__(self, metrics: ComponentMetrics, engine: AsyncEngine, ttl_s: float = FIGURES_TTL_S) -> None:
        self.component = metrics.component
        self.figures = GatewayFigures()
        self._reading = CachedReading(lambda: read_figures(engine), ttl_s)
        self.budget_refusals = Counter(BUDGET_REFUSALS, "Requests refused because the agent was over one of "
                                       "its budgets (this replica's count), by budget.",
                                       ["component", "budget"], registry=metrics.registry)
        for budget in BUDGETS:
            self.budget_refusals.labels(component=self.component, budget=budget)
        self.offloaded_reads = Counter(OFFLOADED_READS, "Costly reads this replica had one of its readers "
                                       "run (kinshasa/gateway/readers.py).", ["component"],
                                       registry=metrics.registry)
        self.offloaded_reads.labels(component=self.component)
        metrics.registry.register(_FiguresCollector(self))
        metrics.add_refresher("gateway domain", self.refresh)

    async def refresh(self) -> None:
        self.figures = await self._reading.get()

    def offloaded(self) -> None:
        """Count one read answered by a reader."""
        self.offloaded_reads.labels(component=self.component).inc()

    def refused(self, budget: object) -> None:
        """Count one request refused on `budget` (a `Budget`)."""
        self.budget_refusals.labels(component=self.component, budget=bounded_label(budget, BUDGETS)).inc()


class _FiguresCollector:
    """Renders the last reading (`GatewayMetrics.refresh` runs before each scrape)."""

    def __init__(self, owner: GatewayMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return render_figures(self._owner.component, GatewayFigures())

    def collect(self) -> Iterable[Metric]:
        return render_figures(self._owner.component, self._owner.figures)


def render_figures(component: str, figures: GatewayFigures) -> list[Metric]:
    """The metric families of one reading: every bounded label value appears, at zero if need be."""
    trips = CounterMetricFamily(TRIPS, "Runs whose breaker tripped (stack total, from gw_incidents), by the "
                                "threshold that fired.", labels=["component", "reason"])
    for reason, count in figures.trips_by_reason().items():
        trips.add_metric([component, reason], float(count))
    opened = CounterMetricFamily(INCIDENTS, "Incidents opened (stack total, from gw_incidents), by kind.",
                                 labels=["component", "kind"])
    for kind, count in figures.incidents_by_kind().items():
        opened.add_metric([component, kind], float(count))
    held = GaugeMetricFamily(HELD_COMMANDS, "Commands held by the gateway, not yet published (stack total).",
                             labels=["component"])
    held.add_metric([component], float(figures.held))
    awaiting = GaugeMetricFamily(AWAITING_APPROVAL_COMMANDS, "Egress commands waiting for an operator's "
                                 "approval (stack total).", labels=["component"])
    awaiting.add_metric([component], float(figures.awaiting_approval))
    return [trips, opened, held, awaiting]

