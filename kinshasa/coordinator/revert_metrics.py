"""The coordinator's domain figures on `/metrics`: reverts by status, compensations by outcome (the ledger).

The ledger already records every revert (`ledger_runs`: when it was requested, whether it is running,
done or failed) and every compensation (`ledger_steps`: when its compensate command was emitted, and
whether the service acknowledged it or reported it failed), so the figures are read from it rather than
counted in memory: they are true across restarts and across coordinator processes, and a retried
activity that re-sends the same compensate command counts it once.

`ledger_steps` grows with every write of every run and has no index on its status alone, so the reading
is one aggregate query per table kept for `FIGURES_TTL_S` (`CachedReading`): however often `/metrics`
is scraped, the ledger is scanned at most once per TTL.

They are stack totals, the same on every coordinator process: a dashboard takes `max` across them.
Labels are closed sets (`REVERT_STATUSES`, `COMPENSATION_OUTCOMES`), never a run or entity id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.coordinator.store import StepStatus, runs, steps
from kinshasa.kernel.metrics import CachedReading, ComponentMetrics
from kinshasa.schemas.run_status import RunStatus

REVERTS = "kinshasa_reverts"
COMPENSATIONS = "kinshasa_compensations"

# requested: every run a revert was asked for; reverting: those in progress; reverted and failed: how
# they ended (a failed revert that is retried and succeeds moves from failed to reverted).
REVERT_STATUSES = ("requested", "reverting", "reverted", "failed")
# sent: steps whose compensate command was emitted at least once; pending: sent and not answered yet;
# acked: the service undid the step; failed: the service reported it could not.
COMPENSATION_OUTCOMES = ("sent", "pending", "acked", "failed")
# Seconds a reading is reused (see the module docstring for why there is one).
FIGURES_TTL_S = 15.0


@dataclass(frozen=True)
class CoordinatorFigures:
    """One reading of the ledger's figures."""

    reverts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REVERT_STATUSES, 0))
    compensations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPENSATION_OUTCOMES, 0))


def _count_where(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


async def read_figures(engine: AsyncEngine) -> CoordinatorFigures:
    """Count reverts by status and compensations by outcome, one aggregate query per ledger table."""
    async with engine.connect() as conn:
        revert_row = (await conn.execute(select(
            func.count(runs.c.revert_requested_at),
            _count_where(runs.c.status == RunStatus.REVERTING.value),
            _count_where(runs.c.status == RunStatus.REVERTED.value),
            _count_where(runs.c.status == RunStatus.REVERT_FAILED.value),
        ))).one()
        step_row = (await conn.execute(select(
            func.count(steps.c.emitted_at),
            _count_where(steps.c.status == StepStatus.COMPENSATING.value),
            _count_where(steps.c.status == StepStatus.COMPENSATED.value),
            _count_where(steps.c.status == StepStatus.COMPENSATION_FAILED.value),
        ))).one()
    return CoordinatorFigures(
        reverts=dict(zip(REVERT_STATUSES, (int(value) for value in revert_row), strict=True)),
        compensations=dict(zip(COMPENSATION_OUTCOMES, (int(value) for value in step_row), strict=True)),
    )


class CoordinatorMetrics:
    """The coordinator's domain metrics on its `ComponentMetrics` registry; see the module docstring."""

    def __init__(self, metrics: ComponentMetrics, ttl_s: float = FIGURES_TTL_S) -> None:
        self.component = metrics.component
        self.ttl_s = ttl_s
        self.figures = CoordinatorFigures()
        self._reading: CachedReading[CoordinatorFigures] | None = None
        metrics.registry.register(_FiguresCollector(self))
        metrics.add_refresher("coordinator domain", self.refresh)

    def read_from(self, engine: AsyncEngine) -> None:
        """Read the figures from this ledger from now on (each run of the process has its own engine)."""
        self._reading = CachedReading(lambda: read_figures(engine), self.ttl_s)

    async def refresh(self) -> None:
        if self._reading is not None:
            self.figures = await self._reading.get()


class _FiguresCollector:
    def __init__(self, owner: CoordinatorMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        return render_figures(self._owner.component, CoordinatorFigures())

    def collect(self) -> Iterable[Metric]:
        return render_figures(self._owner.component, self._owner.figures)


def render_figures(component: str, figures: CoordinatorFigures) -> list[Metric]:
    reverts = GaugeMetricFamily(REVERTS, "Runs by revert status (stack total, from the ledger): requested "
                                "counts every revert asked for.", labels=["component", "status"])
    for status in REVERT_STATUSES:
        reverts.add_metric([component, status], float(figures.reverts.get(status, 0)))
    compensations = GaugeMetricFamily(COMPENSATIONS, "Compensations by outcome (stack total, from the "
                                      "ledger): sent counts every step whose compensate command went out.",
                                      labels=["component", "outcome"])
    for outcome in COMPENSATION_OUTCOMES:
        compensations.add_metric([component, outcome], float(figures.compensations.get(outcome, 0)))
    return [reverts, compensations]
