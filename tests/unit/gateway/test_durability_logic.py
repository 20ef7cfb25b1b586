"""The dlq_threshold decisions: which threshold a reading is over, and what a poll does with a crossing."""

from __future__ import annotations

from datetime import UTC, datetime

from kinshasa.gateway.durability import (
    Breach,
    ComponentDurability,
    Limits,
    alert_envelope,
    assess,
    dlq_threshold_alert,
    from_admin,
    transition,
)

LIMITS = Limits(dlq_count=1, age_s=300.0)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
ALERT_ID = "7d0c3f5e-6a43-4a8e-9a43-0f6f3b6e2a11"


def reading(dlq: int | None = 0, age: float | None = None, pending: int = 0) -> ComponentDurability:
    return ComponentDurability("documents", pending=pending, oldest_pending_age_s=age, dead=0, dlq_count=dlq)


def test_a_component_with_no_dead_letters_and_a_fresh_outbox_is_under() -> None:
    assert assess(reading(dlq=0, age=12.0, pending=3), LIMITS) is None
    assert assess(reading(dlq=0, age=None), LIMITS) is None


def test_reaching_the_dlq_threshold_is_over_it() -> None:
    assert assess(reading(dlq=1), LIMITS) == Breach("dlq_count", 1, 1)
    assert assess(reading(dlq=4), Limits(dlq_count=5, age_s=300)) is None
    assert assess(reading(dlq=5), Limits(dlq_count=5, age_s=300)) == Breach("dlq_count", 5, 5)


def test_an_outbox_row_older_than_the_limit_is_over_it() -> None:
    assert assess(reading(age=300.0, pending=1), LIMITS) is None
    assert assess(reading(age=300.04, pending=1), LIMITS) == Breach("outbox_age_s", 300.0, 300.0)


def test_dead_letters_are_named_first_when_both_are_over() -> None:
    breach = assess(reading(dlq=2, age=900.0, pending=7), LIMITS)
    assert breach is not None and breach.name == "dlq_count"


def test_a_component_that_did_not_answer_is_over_nothing() -> None:
    silent = ComponentDurability("documents", error="documents did not answer (ConnectError)")
    assert not silent.answered
    assert assess(silent, LIMITS) is None


def test_one_alert_per_crossing_and_re_armed_only_back_under() -> None:
    assert transition(was_over=False, over=True) == "raise"
    assert transition(was_over=True, over=True) == "stay"  # still over: no second alert
    assert transition(was_over=True, over=False) == "rearm"
    assert transition(was_over=False, over=False) == "stay"


def test_a_sequence_of_polls_raises_once_per_crossing() -> None:
    over_by_poll = [False, True, True, True, False, False, True, True, False, True]
    state, raised = False, 0
    for over in over_by_poll:
        step = transition(state, over)
        raised += step == "raise"
        state = {"raise": True, "rearm": False, "stay": state}[step]
    assert raised == 3


def test_the_alert_names_the_component_its_numbers_and_what_to_do() -> None:
    r = reading(dlq=3, age=42.0, pending=2)
    alert = dlq_threshold_alert(r, Breach("dlq_count", 3, 1), 2, LIMITS, NOW, ALERT_ID)
    assert alert.kind == "dlq_threshold" and alert.run_id == "" and alert.source == "gateway"
    assert alert.alert_id == ALERT_ID and alert.payload["crossing"] == 2
    assert "documents has 3 dead letter(s)" in alert.summary and "reprocessDlq" in alert.summary
    body = alert.to_json()
    assert body["component"] == "documents" and body["dlq_count"] == 3
    assert body["oldest_pending_age_s"] == 42.0
    assert body["threshold"] == {"name": "dlq_count", "count": 3, "limit": 1}

    envelope = alert_envelope(alert, "documents")
    assert envelope.type == "alert.dlq_threshold" and envelope.run_id is None
    assert envelope.kafka_key() == b"kinshasa:documents"
    assert str(envelope.message_id) == alert.alert_id


def test_a_stale_outbox_alert_says_the_relay_is_not_publishing() -> None:
    r = reading(dlq=0, age=901.0, pending=5)
    alert = dlq_threshold_alert(r, Breach("outbox_age_s", 901.0, 300.0), 1, LIMITS, NOW, ALERT_ID)
    assert "901 s old (limit 300 s)" in alert.summary and "5 waiting" in alert.summary


def test_an_admin_answer_is_read_or_reported_as_unreadable() -> None:
    ok = from_admin("ledger", {"component": "ledger", "pending": 2, "oldest_pending_age_s": 1.5, "dead": 1,
                               "dlq_count": 4})
    assert ok == ComponentDurability("ledger", 2, 1.5, 1, 4)
    assert from_admin("ledger", {"pending": 0, "oldest_pending_age_s": None, "dead": 0}).dlq_count is None
    bad = from_admin("ledger", {"count": 3})
    assert bad.error is not None and "same version" in bad.error
