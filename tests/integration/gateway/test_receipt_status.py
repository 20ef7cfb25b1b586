"""A receipt only moves forward (PUBLISHED -> APPLIED or REJECTED; APPLIED -> COMPENSATED), whatever
order its events reach the gateway in: a late applied event (a dead letter reprocessed after the revert)
never turns a COMPENSATED receipt back into APPLIED."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kinshasa.schemas.envelope import Actor, EntityRef, Envelope, EventSuffix, deterministic_id
from tests.integration.gateway.conftest import Harness

RECEIPT = "{ status result appliedAt rejectedReason compensatedAt }"
SERVICE = Actor(kind="system", id="documents")
COORDINATOR = Actor(kind="system", id="coordinator")
START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


async def _published(h: Harness, run_id: str, title: str) -> dict[str, Any]:
    body = await h.client.create_document(run_id, title)
    receipt: dict[str, Any] = body["data"]["createDocument"]
    assert receipt["status"] == "PUBLISHED"
    return receipt


def _entity(receipt: dict[str, Any]) -> EntityRef:
    return EntityRef(service="documents", type="document", id=receipt["entityId"])


def _applied(receipt: dict[str, Any], at: datetime) -> Envelope:
    return Envelope(
        message_id=deterministic_id(str(EventSuffix.APPLIED), receipt["commandId"]),
        type="documents.create.applied", run_id=receipt["runId"], actor=SERVICE,
        causation_id=receipt["commandId"], correlation_id=receipt["runId"], entity=_entity(receipt),
        occurred_at=at, payload={"title": "t"})


def _rejected(receipt: dict[str, Any], at: datetime) -> Envelope:
    return Envelope(
        message_id=deterministic_id(str(EventSuffix.REJECTED), receipt["commandId"]),
        type="documents.create.rejected", run_id=receipt["runId"], actor=SERVICE,
        causation_id=receipt["commandId"], correlation_id=receipt["runId"], entity=_entity(receipt),
        occurred_at=at, payload={"reason": "no room", "code": "REFUSED"})


def _compensated(receipt: dict[str, Any], at: datetime) -> Envelope:
    forward = str(deterministic_id(str(EventSuffix.APPLIED), receipt["commandId"]))
    return Envelope(
        message_id=deterministic_id(str(EventSuffix.COMPENSATED), forward),
        type="documents.create.compensated", run_id=receipt["runId"], actor=COORDINATOR,
        causation_id=deterministic_id("compensate", forward, "1"), correlation_id=receipt["runId"],
        entity=_entity(receipt), occurred_at=at,
        payload={"forward_event_id": forward, "forward_type": "documents.create.applied"})


async def _receipt(h: Harness, receipt: dict[str, Any]) -> dict[str, Any]:
    data = await h.client.data(f'{{ command(id: "{receipt["commandId"]}") {RECEIPT} }}')
    found: dict[str, Any] = data["command"]
    return found


async def test_a_receipt_moves_forward_whatever_order_its_events_arrive_in(harness: Harness) -> None:
    h = harness
    await h.client.set_policy({"quarantineWindowS": 0})
    run_id = await h.client.start_run()
    listener = h.gateway.listener
    in_order, compensated_first, refused = [
        await _published(h, run_id, title) for title in ("in order", "compensated first", "refused")]
    applied_at, undone_at = START, START + timedelta(seconds=5)

    # In order: applied, then compensated; a conflicting rejection afterwards changes nothing.
    await listener.handle_envelope(_applied(in_order, applied_at))
    assert (await _receipt(h, in_order))["status"] == "APPLIED"
    await listener.handle_envelope(_compensated(in_order, undone_at))
    await listener.handle_envelope(_rejected(in_order, undone_at))
    assert await _receipt(h, in_order) == {
        "status": "COMPENSATED", "result": "COMPENSATED", "appliedAt": applied_at.isoformat(),
        "rejectedReason": None, "compensatedAt": undone_at.isoformat()}

    # The applied event late (its dead letter reprocessed after the revert): COMPENSATED all the same,
    # and the late event only fills in when it was applied.
    await listener.handle_envelope(_compensated(compensated_first, undone_at))
    assert (await _receipt(h, compensated_first))["status"] == "COMPENSATED"
    await listener.handle_envelope(_applied(compensated_first, applied_at))
    assert await _receipt(h, compensated_first) == {
        "status": "COMPENSATED", "result": "COMPENSATED", "appliedAt": applied_at.isoformat(),
        "rejectedReason": None, "compensatedAt": undone_at.isoformat()}

    # Refused by the service: REJECTED with the reason; nothing to compensate, and it stays so.
    await listener.handle_envelope(_rejected(refused, applied_at))
    await listener.handle_envelope(_applied(refused, undone_at))
    await listener.handle_envelope(_compensated(refused, undone_at))
    assert await _receipt(h, refused) == {
        "status": "REJECTED", "result": "REJECTED", "appliedAt": None, "rejectedReason": "no room",
        "compensatedAt": None}
