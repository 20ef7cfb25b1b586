"""A backtest loads a bounded history: more than one replay may hold is a VALIDATION error."""

from __future__ import annotations

import pytest

from kinshasa.gateway import backtest
from kinshasa.schemas.envelope import utcnow
from tests.integration.gateway.conftest import OPERATOR_KEY, Harness

BACKTEST = """query($s: PolicyInput!, $t: DateTime!) { backtestPolicy(scope: DEFAULT, settings: $s, since: $t)
  { runsReplayed } }"""


async def _policy_versions(harness: Harness) -> int:
    data = await harness.client.data("{ policy { history { version } } }", key=OPERATOR_KEY)
    return len(data["policy"]["history"])


async def test_a_backtest_over_more_history_than_a_replay_may_hold_is_refused_with_what_to_narrow(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    for _ in range(3):
        run_id = await c.start_run()
        await c.create_document(run_id)
    monkeypatch.setattr(backtest, "MAX_RUNS", 2)
    versions = await _policy_versions(harness)

    long_ago = "1970-01-01T00:00:00Z"
    too_many = await c.error(BACKTEST, {"s": {"maxWrites": 1}, "t": long_ago}, OPERATOR_KEY)
    assert too_many["extensions"]["code"] == "VALIDATION"
    assert "more than 2 runs" in too_many["message"] and "later `since`" in too_many["message"]
    assert too_many["extensions"]["fields"][0]["path"] == "since"

    monkeypatch.setattr(backtest, "MAX_RUNS", 10)
    monkeypatch.setattr(backtest, "MAX_COMMANDS", 2)
    too_long = await c.error(BACKTEST, {"s": {"maxWrites": 1}, "t": long_ago}, OPERATOR_KEY)
    assert too_long["extensions"]["code"] == "VALIDATION"
    assert "more than 2 recorded writes" in too_long["message"]

    monkeypatch.setattr(backtest, "MAX_COMMANDS", 3)
    fits = await c.data(BACKTEST, {"s": {"maxWrites": 1}, "t": long_ago}, OPERATOR_KEY)
    assert fits["backtestPolicy"]["runsReplayed"] == 3
    assert await _policy_versions(harness) == versions  # a backtest changes nothing


async def test_history_for_a_proposal_keeps_the_newest_runs_that_fit(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0})
    started = []
    for _ in range(4):
        started.append(await c.start_run())
        await c.create_document(started[-1])
    monkeypatch.setattr(backtest, "MAX_RUNS", 2)
    async with harness.gateway.engine.connect() as conn:
        since = utcnow().replace(year=1970)
        kept = await backtest.load_history(conn, {}, since, newest_only=True)
        await conn.rollback()
    assert [h.record.run_id for h in kept] == started[2:]
