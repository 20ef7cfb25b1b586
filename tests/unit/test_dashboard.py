"""The Grafana dashboard in deploy/ queries only metrics and labels the components expose: it cannot rot."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from kinshasa.coordinator.revert_metrics import CoordinatorMetrics
from kinshasa.gateway.domain_metrics import GatewayMetrics
from kinshasa.kernel.metrics import ComponentMetrics
from kinshasa.kernel.supervisor import RoleHealth

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kinshasa-dashboard.json"
METRIC = re.compile(r"\b(kinshasa_[a-z_]+)")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
# Labels every Prometheus series has or a query may make up.
AMBIENT_LABELS = {"job", "instance", "le", "__name__"}


def _exercised(metrics: ComponentMetrics) -> None:
    """Give every labelled kernel metric a sample, as a running component would."""
    metrics.publish_failed("kinshasa.events.documents")
    metrics.dead_lettered("kinshasa.svc.documents", "poison")
    metrics.observe_handler("documents.create", 0.01)
    metrics.set_consumer_lag("kinshasa.svc.documents", "kinshasa.commands.documents", 0, 3)
    metrics.watch_roles(lambda: {"relay": RoleHealth("relay", "running", datetime(2026, 1, 1, tzinfo=UTC))})


@pytest.fixture
def engine() -> AsyncEngine:
    return create_async_engine("sqlite+aiosqlite://")


def exposed(engine: AsyncEngine) -> dict[str, set[str]]:
    """Every sample name the gateway, the coordinator and a service expose, with its label names."""
    gateway, coordinator, service = (ComponentMetrics(name)
                                     for name in ("gateway", "coordinator", "documents"))
    GatewayMetrics(gateway, engine)
    CoordinatorMetrics(coordinator)
    names: dict[str, set[str]] = {}
    for metrics in (gateway, coordinator, service):
        _exercised(metrics)
        for family in metrics.registry.collect():
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(target["expr"])
    return found


def test_the_dashboard_is_a_grafana_dashboard_with_panels_for_the_domain_and_the_plumbing() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = {name for expr in expressions() for name in METRIC.findall(expr)}
    for wanted in ("kinshasa_trips_total", "kinshasa_held_commands", "kinshasa_awaiting_approval_commands",
                   "kinshasa_incidents_total", "kinshasa_agent_budget_refusals_total", "kinshasa_reverts",
                   "kinshasa_compensations", "kinshasa_dlq_size", "kinshasa_role_up",
                   "kinshasa_role_restarts_total", "kinshasa_outbox_backlog"):
        assert wanted in queried, f"no panel shows {wanted}"


def test_every_metric_the_dashboard_queries_is_exposed_by_a_component(engine: AsyncEngine) -> None:
    names = exposed(engine)
    for expr in expressions():
        for name in METRIC.findall(expr):
            assert name in names, f"the dashboard queries {name}, which no component exposes: {expr}"


def test_every_label_the_dashboard_groups_or_filters_by_is_on_the_metrics_it_queries(
    engine: AsyncEngine,
) -> None:
    names = exposed(engine)
    for expr in expressions():
        available = set(AMBIENT_LABELS)
        for name in METRIC.findall(expr):
            available |= names.get(name, set())
        used = {label.strip() for group in GROUPING.findall(expr)
                for label in group.split(",") if label.strip()}
        used |= {matcher.split("=")[0].strip().rstrip("!~") for selector in SELECTOR.findall(expr)
                 for matcher in selector.split(",") if matcher.strip()}
        assert used <= available, f"{expr} uses label(s) {sorted(used - available)} its metrics do not carry"


def test_the_check_would_catch_a_misspelt_metric(engine: AsyncEngine) -> None:
    assert "kinshasa_trip_total" not in exposed(engine)
