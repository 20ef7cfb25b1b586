"""Every process of a real stack reports its outbox and dead letters, aggregated by the gateway."""

from __future__ import annotations

from typing import Any

from kinshasa.settings import SERVICE_NAMES
from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

STATUS = "{ outboxStatus { component pending oldestPendingAgeS dead dlqCount error } }"


def test_every_process_reports_its_outbox_and_dead_letters_to_operators_only(
    stack: Stack, operator: Api, agent: Api
) -> None:
    expected = {"gateway", "coordinator", *SERVICE_NAMES}

    def all_answered() -> dict[str, dict[str, Any]] | None:
        found = {c["component"]: c for c in operator.call(STATUS)["outboxStatus"]}
        answered = set(found) == expected and all(c["error"] is None for c in found.values())
        return found if answered else None

    found = wait_for("every component's outbox status", all_answered)
    for name, entry in found.items():
        assert all(isinstance(entry[k], int) and entry[k] >= 0 for k in ("pending", "dead", "dlqCount")), name
        # One answer, one query: an age exactly when something is pending.
        assert (entry["oldestPendingAgeS"] is None) == (entry["pending"] == 0), entry

    assert agent.error_code(STATUS) == "FORBIDDEN"
