"""The coordinator's domain metrics: every revert status and compensation outcome shown, bounded labels."""

from __future__ import annotations

from kinshasa.coordinator.revert_metrics import (
    COMPENSATION_OUTCOMES,
    COMPENSATIONS,
    REVERT_STATUSES,
    REVERTS,
    CoordinatorFigures,
    render_figures,
)


def test_a_reading_renders_every_status_and_outcome_even_at_zero() -> None:
    figures = CoordinatorFigures(reverts={"requested": 3, "reverted": 2, "failed": 1, "reverting": 0},
                                 compensations={"sent": 9, "acked": 7})
    families = {family.name: family for family in render_figures("coordinator", figures)}
    reverts = {s.labels["status"]: s.value for s in families[REVERTS].samples}
    assert reverts == {"requested": 3.0, "reverting": 0.0, "reverted": 2.0, "failed": 1.0}
    compensations = {s.labels["outcome"]: s.value for s in families[COMPENSATIONS].samples}
    assert compensations == {"sent": 9.0, "pending": 0.0, "acked": 7.0, "failed": 0.0}
    assert set(reverts) == set(REVERT_STATUSES) and set(compensations) == set(COMPENSATION_OUTCOMES)
    assert all(s.labels["component"] == "coordinator" for f in families.values() for s in f.samples)


def test_a_figure_outside_the_closed_sets_is_never_rendered() -> None:
    figures = CoordinatorFigures(reverts={"requested": 1, "run-123": 5}, compensations={"entity-9": 2})
    rendered = {s.labels.get("status") or s.labels.get("outcome")
                for family in render_figures("coordinator", figures) for s in family.samples}
    assert rendered == set(REVERT_STATUSES) | set(COMPENSATION_OUTCOMES)
