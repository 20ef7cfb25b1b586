"""The gateway's timers under an injectable clock: a quarantine window of an hour and a hold timeout of
two are proven to elapse, and not before, by releaser passes at chosen times, with no waiting."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from kinshasa.gateway.releaser import Releaser
from kinshasa.schemas.envelope import utcnow
from tests.integration.gateway.conftest import Harness

HOUR = 3600.0


def releaser_at(h: Harness, when: datetime) -> Releaser:
    """A releaser pass at `when`: the gateway's own, on its database, with the clock set."""
    return Releaser(h.gateway.engine, interval_s=1.0, batch=100, clock=lambda: when)


async def _status(h: Harness, command_id: str) -> Any:
    return (await h.client.data(f'{{ command(id: "{command_id}") {{ status reason }} }}'))["command"]


async def test_a_quarantine_window_of_an_hour_releases_after_the_hour_not_before(harness: Harness) -> None:
    h = harness
    await h.client.set_policy({"quarantineWindowS": HOUR, "autoRevert": False})
    run_id = await h.client.start_run(entry_point="timers")
    accepted = utcnow()
    held = (await h.client.create_document(run_id))["data"]["createDocument"]
    assert held["status"] == "HELD"

    early = await releaser_at(h, accepted + timedelta(minutes=59)).run_once()
    assert (early.released, early.discarded) == (0, 0)
    assert (await _status(h, held["commandId"]))["status"] == "HELD"
    due = await releaser_at(h, accepted + timedelta(minutes=61)).run_once()
    assert (due.released, due.discarded) == (1, 0)
    assert (await _status(h, held["commandId"]))["status"] == "PUBLISHED"


async def test_a_tripped_runs_held_commands_are_discarded_at_the_hold_timeout_never_released(
        harness: Harness) -> None:
    h = harness
    await h.client.set_policy({"quarantineWindowS": HOUR, "maxWrites": 1, "holdTimeoutS": 2 * HOUR,
                               "autoRevert": False})
    run_id = await h.client.start_run(entry_point="timers-hold")
    tripped_at = utcnow()
    held = (await h.client.create_document(run_id))["data"]["createDocument"]
    refused = await h.client.create_document(run_id)
    assert refused["errors"][0]["extensions"]["code"] == "BREAKER_OPEN"

    # Past its quarantine window but inside the hold timeout: a tripped run's command is not released.
    waiting = await releaser_at(h, tripped_at + timedelta(minutes=119)).run_once()
    assert (waiting.released, waiting.discarded) == (0, 0)
    assert (await _status(h, held["commandId"]))["status"] == "HELD"
    timed_out = await releaser_at(h, tripped_at + timedelta(minutes=121)).run_once()
    assert (timed_out.released, timed_out.discarded) == (0, 1)
    assert await _status(h, held["commandId"]) == {
        "status": "DISCARDED", "reason": "hold timeout elapsed: discarded, never released"}
