"""The replay of a recorded run through a policy, and the proposals drafted from replays: pure, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kinshasa.gateway.backtest import Candidate, Governing, HistoricRun, PolicyHistory, compare, summarise
from kinshasa.gateway.incidents import Incident, IncidentKind
from kinshasa.gateway.policy import (
    EffectivePolicy,
    Layer,
    PolicyDocument,
    PolicyScope,
    PolicyVersion,
    resolve,
)
from kinshasa.gateway.proposals import Proposer, merge
from kinshasa.gateway.replay import RecordedRun, RecordedWrite, RefusedWrite, replay
from kinshasa.gateway.runs import RunRecord

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def write(i: float, operation: str = "documents.create", window: float = 0.0, **kw: Any) -> RecordedWrite:
    accepted = at(i)
    release = accepted + timedelta(seconds=window) if window else None
    published = kw.pop("published_at", release or accepted)
    return RecordedWrite(
        command_id=f"c{i:g}",
        operation=operation,
        service=operation.split(".")[0],
        accepted_at=accepted,
        release_at=release,
        published_at=published,
        **kw,
    )


def policy(**fields: object) -> EffectivePolicy:
    return resolve([Layer(PolicyDocument.model_validate(fields), replaces=True)], 1)


def test_a_velocity_trip_is_met_at_the_write_that_exceeds_the_window() -> None:
    run = RecordedRun("r", "a", "e", tuple(write(i * 0.1) for i in range(10)))
    outcome = replay(run, policy(max_velocity=4, velocity_window_s=1.0, quarantine_window_s=0))
    assert outcome.trip is not None and outcome.trip.threshold == "velocity"
    assert outcome.write_index == 5 and outcome.tripped_at == at(0.4)
    assert outcome.escaped == ("c0", "c0.1", "c0.2", "c0.3") and outcome.held == ()


def test_writes_that_slid_out_of_the_velocity_window_no_longer_count() -> None:
    run = RecordedRun("r", "a", "e", tuple(write(i) for i in range(10)))
    assert not replay(run, policy(max_velocity=2, velocity_window_s=1.0)).tripped


def test_a_held_write_escapes_only_if_its_window_elapsed_before_the_trip() -> None:
    writes = (write(0, window=5), write(1, window=5), write(6, window=5, published_at=None))
    refused = RefusedWrite("documents.create", "documents", at(7))
    run = RecordedRun("r", "a", "e", writes, refused, closed_at=at(7))
    outcome = replay(run, policy(max_writes=3, quarantine_window_s=5))
    assert outcome.write_index == 4 and outcome.escaped == ("c0", "c1") and outcome.held == ("c6",)
    # A longer window for the operation holds them all until the trip.
    longer = policy(max_writes=3, quarantine_window_s=5, operation_windows={"documents.create": 10})
    assert replay(run, longer).escaped == ()
    # A lower limit trips at the third write, before the second left.
    lower = replay(run, policy(max_writes=2, quarantine_window_s=5))
    assert lower.write_index == 3 and lower.escaped == ("c0",) and lower.held == ("c1",)


def test_rejections_arrive_as_long_after_the_publish_as_they_did_and_trip_on_errors() -> None:
    writes = tuple(write(i, rejected_at=at(i + 0.5)) for i in range(4))
    run = RecordedRun("r", "a", "e", writes)
    outcome = replay(run, policy(max_errors=1, quarantine_window_s=0))
    assert outcome.trip is not None and outcome.trip.threshold == "errors"
    assert outcome.tripped_at == at(1.5) and outcome.write_index == 3
    # Under a ten-minute window the writes leave, and are rejected, ten minutes later: every write is in
    # before the trip.
    later = replay(run, policy(max_errors=1, quarantine_window_s=600))
    assert later.tripped_at == at(601.5) and later.write_index == 5


def test_a_gated_operation_leaves_only_with_a_recorded_approval() -> None:
    approved = write(0, "notifier.send", egress=True, awaited_approval=True, published_at=at(3))
    never = write(1, "documents.archive")
    run = RecordedRun("r", "a", "e", (approved, never), RefusedWrite("x.y", "x", at(2)), closed_at=at(2))
    gated = policy(max_writes=2, quarantine_window_s=0, operation_gates=["documents.archive"])
    outcome = replay(run, gated)
    assert outcome.escaped == () and set(outcome.held) == {"c0", "c1"}


def test_merge_only_tightens() -> None:
    base = PolicyDocument(max_velocity=10, operation_windows={"a.b": 30}, operation_gates=["x.y"])
    merged = merge(base, PolicyDocument(max_velocity=20, operation_windows={"a.b": 5, "c.d": 9},
                                        operation_gates=["c.d"]))
    assert merged.max_velocity == 10 and merged.operation_windows == {"a.b": 30, "c.d": 9}
    assert merged.operation_gates == ["c.d", "x.y"]


def _record(run_id: str, status: str, trip_count: int = 0, reverted: bool = False) -> RunRecord:
    return RunRecord(
        run_id=run_id, agent_id="a", entry_point="e", purpose=None, status=status, started_at=T0,
        finished_at=None, breaker_state="CLOSED", writes=0, errors=0, services=(), probes_left=0,
        tripped_reason=None, tripped_at=None, trip_count=trip_count, on_hold=False, published=0, applied=0,
        compensated=0, revert_reason=None, revert_requested_at=at(100) if reverted else None,
        policy_version=1,
    )


def test_a_trip_proposal_lowers_the_limit_to_stop_the_run_before_its_first_escape_sparing_good_runs() -> None:
    history = PolicyHistory((
        PolicyVersion(1, PolicyScope.DEFAULT, "", PolicyDocument(max_velocity=10, velocity_window_s=1.0,
                      quarantine_window_s=0.5), "op", "start", T0),
    ))
    # The rogue run tried 11 writes in a second; each left after its half-second window.
    rogue_writes = tuple(write(i * 0.09, window=0.5) for i in range(10))
    refused = RefusedWrite("documents.create", "documents", at(0.95))
    rogue = RecordedRun("rogue", "a", "e", rogue_writes, refused, closed_at=at(0.95), policy_version=1)
    goods = [
        HistoricRun(_record(f"g{n}", "FINISHED"),
                    RecordedRun(f"g{n}", "a", "e", tuple(write(i * 0.3, window=0.5) for i in range(4)),
                                policy_version=1), False)
        for n in range(100)
    ]
    runs = [HistoricRun(_record("rogue", "REVERTED", 1, True), rogue, True), *goods]
    incident = Incident(str(uuid.uuid4()), IncidentKind.TRIP, "rogue", "a", "e", 1, "velocity", 11, 10, 11,
                        (("documents.create", 5),), 5, ("documents",), at(1))
    drafts = Proposer(history, runs, incident, T0 - timedelta(days=7)).drafts()
    threshold = next(d for d in drafts if d.key == "limit:max_velocity")
    # The good runs write four times in 0.9 s: a limit of 3 would trip them all. A limit of 5 stops the
    # rogue at its sixth write (0.45 s), before its first write left (0.5 s); 6 would not.
    assert threshold.settings.max_velocity == 5
    assert threshold.backtest.good_runs_tripped == 0 and threshold.backtest.good_runs_replayed == 100
    assert threshold.backtest.escaped_writes_after == 0
    assert threshold.backtest.incident_runs_caught_earlier == 1
    assert threshold.rationale.startswith(
        "velocity 10 → 5 would have tripped this run at write 6 with 0 writes escaped instead of 5; "
        "0 of 100 good runs since"
    )
    windows = [d for d in drafts if d.key.startswith("window:")]
    assert windows and windows[0].settings.operation_windows == {"documents.create": 2.0}
    back = summarise(compare(runs, Governing(history), Candidate(history, PolicyScope.ENTRY_POINT, "e",
                                                                   PolicyDocument(max_velocity=5))))
    assert back == threshold.backtest
