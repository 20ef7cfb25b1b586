"""Unit tests for the wire envelope: round trips, rejection of bad messages, ids, keys and type names."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from kinshasa.schemas.envelope import (
    COMPENSATE,
    KINSHASA_NAMESPACE,
    Actor,
    CompensatePayload,
    EntityRef,
    Envelope,
    EventSuffix,
    InvalidMessage,
    RejectedPayload,
    RunEventKind,
    command_type_of,
    compensate_type,
    deterministic_id,
    event_type,
    is_command,
    is_compensate,
    new_id,
    parse_envelope,
    run_event_type,
    split_type,
    utcnow,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def wire(**overrides: Any) -> dict[str, Any]:
    """A valid command envelope as decoded JSON, with some fields replaced."""
    message: dict[str, Any] = {
        "message_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "type": "documents.archive",
        "run_id": "run-1",
        "actor": {"kind": "agent", "id": "agent-7"},
        "causation_id": None,
        "correlation_id": "corr-1",
        "entity": {"service": "documents", "type": "document", "id": "doc-1"},
        "occurred_at": "2024-05-01T12:00:00Z",
        "payload": {"document_id": "doc-1"},
        "traceparent": TRACEPARENT,
        "schema_version": 1,
    }
    message.update(overrides)
    return message


def invalid(message: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(message if isinstance(message, bytes | str) else json.dumps(message))
    return str(caught.value)


def test_round_trip_through_bytes_is_lossless() -> None:
    original = Envelope(
        message_id=new_id(),
        type="documents.rename.applied",
        run_id="run-1",
        actor=Actor(kind="service", id="documents"),
        causation_id=new_id(),
        correlation_id="corr",
        entity=EntityRef(service="documents", type="document", id="doc-1"),
        occurred_at=utcnow(),
        payload={"old_title": "a", "new_title": "b", "nested": {"n": [1, 2.5, None]}},
        traceparent=TRACEPARENT,
        schema_version=2,
    )
    data = original.to_bytes()
    assert b", " not in data and b": " not in data  # compact separators
    assert Envelope.from_bytes(data) == original
    assert parse_envelope(data.decode()) == original
    assert parse_envelope(json.loads(data)) == original


def test_defaults_for_optional_fields() -> None:
    envelope = parse_envelope(
        json.dumps({
            "message_id": str(new_id()),
            "type": "documents.archive",
            "actor": {"kind": "operator", "id": "op"},
            "occurred_at": "2024-05-01T12:00:00+00:00",
            "entity": {"service": "documents", "type": "document", "id": "d"},
        })
    )
    assert envelope.payload == {}
    assert envelope.schema_version == 1
    assert envelope.run_id is None and envelope.causation_id is None and envelope.traceparent is None


def test_occurred_at_is_normalised_to_utc() -> None:
    envelope = parse_envelope(json.dumps(wire(occurred_at="2024-05-01T14:00:00+02:00")))
    assert envelope.occurred_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert envelope.occurred_at.utcoffset() == timedelta(0)
    assert b'"occurred_at":"2024-05-01T12:00:00Z"' in envelope.to_bytes()
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert Envelope(**{**wire(), "occurred_at": local}).occurred_at.tzinfo == UTC


def test_envelope_is_frozen() -> None:
    envelope = parse_envelope(json.dumps(wire()))
    with pytest.raises(ValidationError):
        envelope.type = "documents.edit"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (wire(entity={"service": "documents", "type": "document"}), "entity.id"),
        ({k: v for k, v in wire().items() if k != "message_id"}, "message_id"),
        ({k: v for k, v in wire().items() if k != "occurred_at"}, "occurred_at"),
        (wire(actor={"kind": "robot", "id": "x"}), "actor.kind"),
        (wire(actor={"kind": "agent", "id": ""}), "actor.id"),
        (wire(occurred_at="2024-05-01T12:00:00"), "occurred_at"),
        (wire(type="Documents.Archive"), "type"),
        (wire(type="documents"), "type"),
        (wire(type="documents.archive.applied.twice"), "type"),
        (wire(type="documents.archive.aplied"), "type"),
        (wire(type="run.exploded", entity=None), "type"),
        (wire(traceparent="00-abc-def-01"), "traceparent"),
        (wire(traceparent=TRACEPARENT.upper()), "traceparent"),
        (wire(traceparent="00-" + "0" * 32 + "-00f067aa0ba902b7-01"), "traceparent"),
        (wire(surprise=1), "surprise"),
        (wire(entity={"service": "documents", "type": "document", "id": "d", "rev": 2}), "entity.rev"),
        (wire(schema_version=0), "schema_version"),
        (wire(message_id="not-a-uuid"), "message_id"),
        (wire(type="run.tripped"), "entity"),
        (wire(type="run.tripped", entity=None, run_id=None), "run_id"),
        ({k: v for k, v in wire(type="run.tripped", entity=None).items() if k != "run_id"}, "run_id"),
    ],
)
def test_invalid_envelope_names_the_field(message: dict[str, Any], field: str) -> None:
    text = invalid(message)
    assert text.startswith("invalid envelope: ")
    assert f"{field}: " in text


def test_every_failing_field_is_reported() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(wire(actor={"kind": "robot", "id": "x"}, occurred_at="2024-05-01T12:00:00", extra=1))
    fields = [path for path, _ in caught.value.errors]
    assert fields == ["actor.kind", "occurred_at", "extra"]
    assert "; " in str(caught.value)


def test_naive_datetime_message_says_what_to_send() -> None:
    assert "2024-05-01T12:00:00Z" in invalid(wire(occurred_at="2024-05-01T12:00:00"))
    with pytest.raises(ValidationError, match="timezone"):
        Envelope(**{**wire(), "occurred_at": datetime(2024, 5, 1, 12, 0)})


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00", "{'single': 'quotes'}"])
def test_malformed_json_is_an_invalid_message(raw: bytes | str) -> None:
    text = invalid(raw)
    assert "malformed JSON" in text
    assert "JSON object" in text


def test_non_object_json_is_an_invalid_message() -> None:
    assert "invalid envelope: (message): " in invalid(b"[1, 2]")


def test_invalid_message_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid envelope"):
        Envelope.from_bytes(b"{}")


def test_deterministic_id_is_stable_and_distinct() -> None:
    first = deterministic_id("compensate", "run-1", "evt-1")
    assert first == deterministic_id("compensate", "run-1", "evt-1")
    assert isinstance(first, UUID) and first.version == 5
    assert first != deterministic_id("compensate", "run-1", "evt-2")
    assert first != deterministic_id("compensate", "run-1")
    # Joining parts naively would make these collide.
    assert deterministic_id("a.b", "c") != deterministic_id("a", "b.c")
    assert deterministic_id("ab", "") != deterministic_id("a", "b")


def test_deterministic_id_never_changes_across_releases() -> None:
    # A retry after an upgrade must produce the id the first attempt used, or the inbox cannot dedupe it.
    assert KINSHASA_NAMESPACE == UUID("296c86a6-1483-5b7a-a87e-dd0e1594f7cc")
    assert deterministic_id("x") == uuid.uuid5(KINSHASA_NAMESPACE, '["x"]')


def test_deterministic_id_refuses_bad_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        deterministic_id()
    with pytest.raises(TypeError, match=r"str\(value\)"):
        deterministic_id("a", new_id())  # type: ignore[arg-type]


def test_new_id_and_utcnow() -> None:
    assert new_id() != new_id()
    now = utcnow()
    assert now.tzinfo == UTC
    assert abs(datetime.now(UTC) - now) < timedelta(seconds=5)


def test_kafka_key_prefers_the_entity() -> None:
    envelope = parse_envelope(json.dumps(wire()))
    assert envelope.entity is not None and envelope.entity.key == "documents:doc-1"
    assert envelope.kafka_key() == b"documents:doc-1"


def test_kafka_key_of_run_message_is_the_run_id() -> None:
    envelope = parse_envelope(json.dumps(wire(type=RunEventKind.TRIPPED.type, entity=None, run_id="run-9")))
    assert envelope.kafka_key() == b"run-9"


def test_kafka_key_needs_entity_or_run() -> None:
    envelope = parse_envelope(json.dumps(wire(type="documents.archive", entity=None, run_id=None)))
    with pytest.raises(ValueError, match="neither entity nor run_id"):
        envelope.kafka_key()


def test_derive_carries_run_entity_and_trace() -> None:
    command = parse_envelope(json.dumps(wire()))
    event_id = deterministic_id("applied", str(command.message_id))
    event = command.derive(
        type=event_type(command.type, EventSuffix.APPLIED),
        actor=Actor(kind="service", id="documents"),
        message_id=event_id,
        payload={"archived": True},
    )
    assert event.type == "documents.archive.applied"
    assert event.causation_id == command.message_id
    assert (event.run_id, event.entity, event.correlation_id, event.traceparent) == (
        command.run_id, command.entity, command.correlation_id, command.traceparent,
    )
    assert event.message_id == event_id
    assert event.occurred_at.tzinfo == UTC


def test_event_type_helpers() -> None:
    assert event_type("documents.archive", "applied") == "documents.archive.applied"
    assert event_type("documents.archive", EventSuffix.COMPENSATION_FAILED) == (
        "documents.archive.compensation_failed"
    )
    assert compensate_type("documents.archive") == "documents.archive.compensate"
    assert COMPENSATE == "compensate"
    with pytest.raises(ValueError, match="unknown event suffix"):
        event_type("documents.archive", "done")
    with pytest.raises(ValueError, match="not a command type"):
        event_type("documents.archive.applied", "applied")
    with pytest.raises(ValueError, match="run lifecycle"):
        compensate_type("run.tripped")


def test_split_type() -> None:
    assert split_type("documents.archive") == ("documents", "archive", None)
    assert split_type("documents.archive.applied") == ("documents", "archive", "applied")
    assert split_type("ledger.post_entry.compensate") == ("ledger", "post_entry", "compensate")
    assert split_type("run.revert_requested") == ("run", "revert_requested", None)
    for bad in ("documents", "documents.archive.applied.x", "Documents.archive", "documents..archive", ""):
        with pytest.raises(ValueError, match="malformed message type"):
            split_type(bad)
    with pytest.raises(ValueError, match="unknown suffix"):
        split_type("documents.archive.done")
    assert command_type_of("documents.archive.compensated") == "documents.archive"
    assert is_command("documents.archive")
    assert not is_command("documents.archive.applied")
    assert not is_command("run.started")
    assert is_compensate("documents.archive.compensate")
    assert not is_compensate("documents.archive.compensated")


def test_run_event_types() -> None:
    assert [kind.type for kind in RunEventKind] == [
        "run.started", "run.finished", "run.tripped", "run.revert_requested",
        "run.reverted", "run.revert_failed", "run.released", "run.discarded",
    ]
    assert run_event_type("tripped") == "run.tripped"
    assert RunEventKind.from_type("run.revert_failed") is RunEventKind.REVERT_FAILED
    with pytest.raises(ValueError, match="not a run lifecycle type"):
        RunEventKind.from_type("documents.archive")
    with pytest.raises(ValueError):
        run_event_type("exploded")


def test_compensate_payload() -> None:
    event_id = new_id()
    payload = CompensatePayload(forward_event_id=event_id, forward_type="documents.archive.applied")
    assert CompensatePayload.model_validate_json(payload.model_dump_json()) == payload
    with pytest.raises(ValidationError, match="forward_type"):
        CompensatePayload(forward_event_id=event_id, forward_type="documents.archive.rejected")
    with pytest.raises(ValidationError, match="forward_event_id"):
        CompensatePayload.model_validate(
            {"forward_event_id": "nope", "forward_type": "documents.archive.applied"}
        )
    with pytest.raises(ValidationError, match="table"):
        CompensatePayload.model_validate(
            {"forward_event_id": str(event_id), "forward_type": "documents.archive.applied", "table": "docs"}
        )


def test_rejected_payload() -> None:
    payload = RejectedPayload(reason="document is archived: unarchive it first", code="DOCUMENT_ARCHIVED")
    assert RejectedPayload.model_validate_json(payload.model_dump_json()) == payload
    with pytest.raises(ValidationError, match="reason"):
        RejectedPayload(reason="", code="X")
    with pytest.raises(ValidationError, match="code"):
        RejectedPayload(reason="r", code="has spaces")
