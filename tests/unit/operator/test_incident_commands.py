"""The operator CLI's incident lines, incident detail and `--set` parsing."""

from __future__ import annotations

import pytest

from kinshasa.operator.gateway_client import GatewayError
from kinshasa.operator.incident_commands import incident_detail, incident_line, parse_settings

TRIP = {
    "id": "i-1", "kind": "TRIP", "runId": "run-1", "agentId": "agent-7", "entryPoint": "support",
    "policyVersion": 4, "trigger": {"threshold": "velocity", "count": 11.0, "limit": 10.0},
    "writeIndexAtTrip": 11, "escaped": [{"operation": "documents.create", "count": 6}], "held": 4,
    "servicesTouched": ["documents"], "openedAt": "2026-12-01T09:00:00+00:00", "decidedAt": None,
    "decision": None,
    "proposals": [{
        "id": "p-1", "scope": "ENTRY_POINT", "subject": "support", "status": "PROPOSED", "reason": None,
        "rationale": "velocity 10 → 6 would have tripped this run at write 7 with 2 writes escaped "
                     "instead of 6",
        "settings": {"maxVelocity": 6, "maxWrites": None},
        "backtest": {"runsReplayed": 213, "incidentRunsReplayed": 1, "incidentRunsCaught": 1,
                     "incidentRunsCaughtEarlier": 1, "escapedWritesBefore": 6, "escapedWritesAfter": 2,
                     "goodRunsReplayed": 212, "goodRunsTripped": 0},
    }],
}


def test_an_incident_line_says_what_tripped_where_and_what_escaped() -> None:
    line = incident_line(TRIP)
    assert line.startswith("i-1") and "TRIP" in line and "2026-12-01 09:00:00" in line
    assert line.endswith("velocity 11 > 10 at write 11: 6 escaped, 4 held")
    budget = {**TRIP, "kind": "AGENT_BUDGET", "trigger": {"threshold": "maxRunsPerHour", "count": 5.0,
                                                           "limit": 4.0}, "escaped": [], "runId": None}
    assert incident_line(budget).endswith("maxRunsPerHour 5 > 4")


def test_the_incident_detail_shows_each_proposal_with_its_backtest() -> None:
    text = "\n".join(incident_detail(TRIP))
    assert "escaped: 6 x documents.create" in text
    assert 'p-1  PROPOSED  ENTRY_POINT support  {"maxVelocity": 6}' in text
    assert TRIP["proposals"][0]["rationale"] in text  # type: ignore[index]
    assert "escaped 6 -> 2; good runs tripped 0/212" in text


def test_set_reads_json_values_and_refuses_what_is_not_field_equals_value() -> None:
    assert parse_settings(["maxVelocity=6", 'operationWindows={"a.b": 3}', "autoRevert=false"]) == {
        "maxVelocity": 6, "operationWindows": {"a.b": 3}, "autoRevert": False}
    with pytest.raises(GatewayError, match="field=value"):
        parse_settings(["maxVelocity"])
    with pytest.raises(GatewayError, match="say what to try"):
        parse_settings([])
