"""Alerts of other components are foreign documents: an odd field reads as absent, never as an error."""

from __future__ import annotations

from kinshasa.gateway.alert_payloads import (
    FailingStep,
    Threshold,
    int_or,
    read_alert_payload,
)
from kinshasa.gateway.arguments import INT32


def test_a_revert_failed_alert_reads_its_failing_steps() -> None:
    fields = read_alert_payload({
        "agent_id": "a1",
        "entry_point": "web",
        "failing_steps": [
            {"step_id": 3, "forward_event_id": "e3", "forward_type": "orders.rename.applied",
             "reason": "gone"},
            {"step_id": "4", "forward_event_id": 4},
            "not a step",
        ],
        "failing_count": 12,
    })
    assert fields.agent_id == "a1" and fields.entry_point == "web"
    assert fields.failing_steps == [
        FailingStep(step_id=3, forward_event_id="e3", forward_type="orders.rename.applied", reason="gone"),
        FailingStep(step_id=None, forward_event_id=None, forward_type=None, reason=None),
    ]
    assert fields.failing_count == 12


def test_a_trip_alert_reads_its_threshold_and_counts() -> None:
    fields = read_alert_payload({
        "threshold": {"name": "max_writes", "count": 11, "limit": 10.0},
        "services_touched": ["orders", 7],
        "held": 2,
        "awaiting_approval": 1,
        "propagated": 5,
        "auto_revert": True,
    })
    assert fields.threshold == Threshold(name="max_writes", count=11.0, limit=10.0)
    assert fields.services_touched == ["orders", "7"]
    assert (fields.held, fields.awaiting_approval, fields.propagated, fields.auto_revert) == (2, 1, 5, True)


def test_an_empty_or_mistyped_payload_reads_as_absent_fields() -> None:
    for payload in ({}, {
        "agent_id": 5, "threshold": {"name": "x", "count": "11", "limit": 1},
        "services_touched": "orders",
        "held": True, "awaiting_approval": 2.5, "propagated": None, "auto_revert": "yes",
        "failing_steps": {"step_id": 1}, "failing_count": "3",
    }):
        fields = read_alert_payload(payload)
        assert fields.agent_id is None and fields.threshold is None and fields.failing_count is None
        assert fields.services_touched == [] and fields.failing_steps == []
        counts = (fields.held, fields.awaiting_approval, fields.propagated)
        assert counts == (0, 0, 0) and fields.auto_revert is False


def test_an_integer_a_graphql_int_cannot_carry_reads_as_the_default() -> None:
    assert int_or(INT32, None) == INT32
    assert int_or(-INT32, None) == -INT32
    assert int_or(INT32 + 1, 0) == 0
    assert int_or(False, None) is None
