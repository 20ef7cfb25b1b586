"""A policy layer as operators send it: subject, operations and budgets checked before it is used."""

from __future__ import annotations

from typing import Any

import pytest

from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.policy import PolicyScope
from kinshasa.gateway.policy_input import check_layer

CATALOGUE = {"documents.rename", "orders.cancel"}


def _paths(exc: pytest.ExceptionInfo[Invalid]) -> list[str]:
    return [f["path"] for f in exc.value.extensions["fields"]]


def test_a_default_layer_needs_no_subject_and_keeps_its_settings() -> None:
    scope, subject, document = check_layer(CATALOGUE, "DEFAULT", None, {"max_writes": 5})
    assert (scope, subject, document.max_writes, document.max_errors) == (PolicyScope.DEFAULT, "", 5, None)


def test_an_agent_layer_names_its_agent_and_the_subject_is_trimmed() -> None:
    _, subject, _ = check_layer(CATALOGUE, PolicyScope.AGENT, "  agent-7 ", {})
    assert subject == "agent-7"
    for missing in (None, "", "   "):
        with pytest.raises(Invalid, match="scope AGENT needs a subject") as exc:
            check_layer(CATALOGUE, PolicyScope.AGENT, missing, {})
        assert _paths(exc) == ["subject"]


def test_a_subject_longer_than_an_id_is_refused() -> None:
    with pytest.raises(Invalid, match="subject is longer than 256"):
        check_layer(CATALOGUE, PolicyScope.AGENT, "a" * 257, {})


def test_windows_and_gates_name_catalogued_operations_only() -> None:
    settings: dict[str, Any] = {
        "operation_windows": {"orders.cancel": 60}, "operation_gates": ["orders.cancel"]}
    _, _, document = check_layer(CATALOGUE, "DEFAULT", None, settings)
    assert document.operation_gates == ["orders.cancel"]
    with pytest.raises(Invalid, match=r"operationWindows names unknown operations: orders\.refund") as exc:
        check_layer(CATALOGUE, "DEFAULT", None, {"operation_windows": {"orders.refund": 60}})
    assert _paths(exc) == ["settings.operationWindows"]
    with pytest.raises(Invalid, match=r"operationWindows names unknown operations: \(not an object\)"):
        check_layer(CATALOGUE, "DEFAULT", None, {"operation_windows": [1, 2]})
    gates = r"operationGates names unknown operations: orders\.refund: name command types"
    with pytest.raises(Invalid, match=gates) as exc:
        check_layer(CATALOGUE, "DEFAULT", None, {"operation_gates": ["orders.refund"]})
    assert _paths(exc) == ["settings.operationGates"]


def test_a_setting_out_of_range_is_named_under_settings() -> None:
    with pytest.raises(Invalid) as exc:
        check_layer(CATALOGUE, "DEFAULT", None, {"max_writes": 0})
    assert _paths(exc) == ["settings.maxWrites"]


def test_agent_budgets_are_refused_per_entry_point() -> None:
    check_layer(CATALOGUE, PolicyScope.AGENT, "a1", {"max_runs_per_hour": 3})
    with pytest.raises(Invalid, match="set them at scope DEFAULT or AGENT, not ENTRY_POINT") as exc:
        check_layer(CATALOGUE, PolicyScope.ENTRY_POINT, "web", {"max_runs_per_hour": 3})
    assert _paths(exc) == ["settings.maxRunsPerHour"]
