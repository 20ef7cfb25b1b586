"""The gateway's domain metrics: bounded labels, every known value shown at zero, where labels come from."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

import kinshasa.gateway
from kinshasa.gateway.budgets import Budget
from kinshasa.gateway.domain_metrics import (
    BUDGET_REFUSALS,
    HELD_COMMANDS,
    INCIDENTS,
    TRIP_REASONS,
    TRIPS,
    GatewayFigures,
    GatewayMetrics,
    render_figures,
)
from kinshasa.gateway.incidents import IncidentKind
from kinshasa.kernel.metrics import OTHER, ComponentMetrics

RUN_ID = "3f2a9c1e-0b7d-4b8e-9c55-2d1f0e6a7b44"


def _samples(metrics: ComponentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_trips_are_counted_by_the_threshold_that_fired_and_an_unknown_one_is_other() -> None:
    figures = GatewayFigures(incidents={("TRIP", "writes"): 3, ("TRIP", "velocity"): 1,
                                        ("TRIP", RUN_ID): 2, ("REVERT", ""): 5})
    trips = figures.trips_by_reason()
    assert trips["writes"] == 3 and trips["velocity"] == 1 and trips["errors"] == 0
    assert trips[OTHER] == 2
    assert RUN_ID not in trips
    assert sum(trips.values()) == 6, "only TRIP incidents are trips"


def test_incidents_are_counted_by_kind_with_every_kind_present_and_nothing_else() -> None:
    figures = GatewayFigures(incidents={("TRIP", "writes"): 3, ("TRIP", "errors"): 1, ("DEAD_LETTER", ""): 2,
                                        ("agent-42", ""): 1})
    by_kind = figures.incidents_by_kind()
    assert set(by_kind) == {kind.value for kind in IncidentKind} | {OTHER}
    assert by_kind["TRIP"] == 4 and by_kind["DEAD_LETTER"] == 2 and by_kind["EGRESS_DENIED"] == 0
    assert by_kind[OTHER] == 1


def test_a_reading_renders_as_counters_and_gauges_labelled_by_component_and_bounded_values() -> None:
    families = {family.name: family for family in render_figures(
        "gateway", GatewayFigures(held=4, awaiting_approval=2, incidents={("TRIP", "writes"): 3}))}
    trips = {sample.labels["reason"]: sample.value for sample in families[TRIPS].samples}
    assert trips == {**dict.fromkeys(TRIP_REASONS, 0.0), "writes": 3.0}
    assert families[TRIPS].type == "counter" and families[INCIDENTS].type == "counter"
    assert [(s.labels, s.value) for s in families[HELD_COMMANDS].samples] == [({"component": "gateway"}, 4.0)]


def test_budget_refusals_are_labelled_by_budget_and_never_by_agent() -> None:
    metrics = ComponentMetrics("gateway")
    domain = GatewayMetrics(metrics, create_async_engine("sqlite+aiosqlite://"))
    domain.refused(Budget.WRITES_PER_HOUR)
    domain.refused("maxAgentWritesPerHour")
    domain.refused("agent-42")
    samples = _samples(metrics)
    name = f"{BUDGET_REFUSALS}_total"
    assert samples[(name, (("budget", "maxAgentWritesPerHour"), ("component", "gateway")))] == 2
    assert samples[(name, (("budget", "maxConcurrentRuns"), ("component", "gateway")))] == 0
    assert samples[(name, (("budget", OTHER), ("component", "gateway")))] == 1
    assert not any("agent-42" in dict(labels).values() for _, labels in samples)


def test_every_trip_threshold_the_gateway_can_name_is_a_known_reason() -> None:
    source = Path(kinshasa.gateway.__file__).parent
    named = {match for path in source.glob("*.py")
             for match in re.findall(r'\bTrip\(\s*"([a-z_]+)"', path.read_text(encoding="utf-8"))}
    assert named, "no Trip(...) found: the scan is out of date"
    assert named <= set(TRIP_REASONS), f"add {sorted(named - set(TRIP_REASONS))} to TRIP_REASONS"
