"""Pure parts of the revert doorbell: what an operator is told on a closed run, what a trip alert says."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kinshasa.gateway import store
from kinshasa.gateway.alerts import trip_alert
from kinshasa.gateway.errors import RUN_CLOSED
from kinshasa.gateway.quarantine import closed
from kinshasa.gateway.runs import RunRecord


def _run(status: str, revert_reason: str | None = "rogue rename loop") -> RunRecord:
    return RunRecord(
        run_id="run-1", agent_id="agent-1", entry_point="chat", purpose=None, status=status,
        started_at=datetime.now(UTC), finished_at=None, breaker_state=store.OPEN, writes=3, errors=0,
        services=("documents",), probes_left=0, tripped_reason="revert requested", tripped_at=None,
        trip_count=0, on_hold=False, published=1, applied=1, compensated=0, revert_reason=revert_reason,
        revert_requested_at=datetime.now(UTC),
    )


@pytest.mark.parametrize(
    ("status", "next_step"),
    [
        (store.REVERTING, "follow the revert with run(id)"),
        (store.REVERTED, "nothing of it is left to decide"),
        (store.REVERT_FAILED, "call revertRun again"),
    ],
)
def test_a_closed_run_says_what_happened_and_what_to_do(status: str, next_step: str) -> None:
    error = closed(_run(status), "released")
    assert error.code == RUN_CLOSED and error.extensions == {"code": RUN_CLOSED, "status": status}
    assert error.message.startswith(f"run run-1 is {status} (revert reason: rogue rename loop): its held")
    assert "awaiting-approval commands were discarded when the revert began" in error.message
    assert "nothing of it can be released any more" in error.message and next_step in error.message


def test_a_long_revert_reason_is_cut_in_the_message() -> None:
    error = closed(_run(store.REVERTING, "x" * 5000), "approved")
    assert "x" * 200 in error.message and "x" * 201 not in error.message


def _alert(auto_revert: bool) -> str:
    counts = {"held": 2, "awaiting_approval": 1, "published": 5}
    alert = trip_alert("run-1", "agent-1", "chat", "writes", 11, 10, "writes 11 exceeded the limit of 10",
                       ["documents"], counts, auto_revert)
    assert alert.payload["held"] == 2 and alert.payload["awaiting_approval"] == 1
    assert alert.payload["propagated"] == 5 and alert.payload["auto_revert"] is auto_revert
    return alert.summary


def test_an_auto_revert_trip_alert_says_the_unpublished_were_discarded_not_to_decide_on_them() -> None:
    summary = _alert(auto_revert=True)
    assert "2 held and 1 awaiting-approval command(s) were discarded" in summary
    assert "the 5 already propagated are being reverted" in summary
    assert "releaseRun" not in summary


def test_a_trip_alert_without_auto_revert_leaves_the_decision_to_the_operator() -> None:
    summary = _alert(auto_revert=False)
    assert "2 command(s) held in quarantine and 1 awaiting approval" in summary
    assert "Decide with releaseRun, discardRun or revertRun." in summary
