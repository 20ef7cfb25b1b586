"""The wire envelope every Kinshasa message travels in, and the message-type vocabulary around it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from kinshasa.schemas.clock import utcnow as utcnow

# Never change this value: every deterministic message id ever emitted derives from it, and a retry
# after an upgrade must still collide with the original emission so the inbox absorbs it.
KINSHASA_NAMESPACE = UUID("296c86a6-1483-5b7a-a87e-dd0e1594f7cc")

_SEGMENT = r"[a-z][a-z0-9_]*"
SEGMENT_RE = re.compile(rf"^{_SEGMENT}$")
# Two segments for commands and run events (`documents.archive`, `run.tripped`), three for what a
# service emits about a command (`documents.archive.applied`) and for compensate commands.
TYPE_RE = re.compile(rf"^{_SEGMENT}(?:\.{_SEGMENT}){{1,2}}$")
# No named groups: the pattern is also exported into JSON Schema, whose regex dialect lacks them.
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

RUN_SERVICE = "run"
COMPENSATE = "compensate"

NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class EventSuffix(StrEnum):
    """What a service reports about one command, appended to the command type."""

    APPLIED = "applied"
    REJECTED = "rejected"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


APPLIED = EventSuffix.APPLIED
REJECTED = EventSuffix.REJECTED
COMPENSATED = EventSuffix.COMPENSATED
COMPENSATION_FAILED = EventSuffix.COMPENSATION_FAILED
KNOWN_SUFFIXES: frozenset[str] = frozenset({*EventSuffix, COMPENSATE})


class RunEventKind(StrEnum):
    """Run lifecycle facts on `kinshasa.runs`, keyed by run id rather than by entity."""

    STARTED = "started"
    FINISHED = "finished"
    TRIPPED = "tripped"
    REVERT_REQUESTED = "revert_requested"
    REVERTED = "reverted"
    REVERT_FAILED = "revert_failed"
    RELEASED = "released"
    DISCARDED = "discarded"

    @property
    def type(self) -> str:
        """The envelope type for this kind, e.g. `run.tripped`."""
        return f"{RUN_SERVICE}.{self.value}"

    @classmethod
    def from_type(cls, message_type: str) -> RunEventKind:
        """The kind named by a `run.<kind>` type; ValueError for anything else."""
        prefix, _, kind = message_type.partition(".")
        if prefix != RUN_SERVICE or kind not in cls._value2member_map_:
            known = ", ".join(k.type for k in cls)
            raise ValueError(f"{message_type!r} is not a run lifecycle type: use one of {known}")
        return cls(kind)


def run_event_type(kind: RunEventKind | str) -> str:
    """`run.<kind>`, checking the kind is one the coordinator and gateway understand."""
    return RunEventKind(kind).type


def split_type(message_type: str) -> tuple[str, str, str | None]:
    """Split a message type into (service, operation, suffix); suffix is None for commands.

    `run.<kind>` splits like a command into ("run", kind, None); use RunEventKind.from_type
    to tell run lifecycle messages apart.
    """
    if not TYPE_RE.match(message_type):
        raise ValueError(
            f"malformed message type {message_type!r}: use lowercase dotted names such as "
            "'documents.archive' or 'documents.archive.applied'"
        )
    service, operation, *rest = message_type.split(".")
    suffix = rest[0] if rest else None
    if suffix is not None and suffix not in KNOWN_SUFFIXES:
        raise ValueError(
            f"unknown suffix {suffix!r} in message type {message_type!r}: "
            f"use one of {', '.join(sorted(KNOWN_SUFFIXES))}"
        )
    return service, operation, suffix


def command_type_of(message_type: str) -> str:
    """The command a message is about: `documents.archive.applied` -> `documents.archive`."""
    service, operation, _ = split_type(message_type)
    return f"{service}.{operation}"


def _require_command_type(command_type: str) -> None:
    service, _, suffix = split_type(command_type)
    if suffix is not None:
        raise ValueError(
            f"{command_type!r} is not a command type: pass 'service.operation', e.g. 'documents.archive'"
        )
    if service == RUN_SERVICE:
        raise ValueError(f"{command_type!r} is a run lifecycle type, not a command type")


def event_type(command_type: str, suffix: EventSuffix | str) -> str:
    """The event a service emits about a command: ('documents.archive', 'applied') -> `...applied`."""
    _require_command_type(command_type)
    try:
        checked = EventSuffix(suffix)
    except ValueError:
        known = ", ".join(s.value for s in EventSuffix)
        raise ValueError(f"unknown event suffix {suffix!r}: use one of {known}") from None
    return f"{command_type}.{checked.value}"


def compensate_type(command_type: str) -> str:
    """The compensate command for a forward command: `documents.archive.compensate`."""
    _require_command_type(command_type)
    return f"{command_type}.{COMPENSATE}"


def is_command(message_type: str) -> bool:
    """True for forward commands (`documents.archive`); False for events, compensates and run events."""
    service, _, suffix = split_type(message_type)
    return suffix is None and service != RUN_SERVICE


def is_compensate(message_type: str) -> bool:
    """True for `<command>.compensate`."""
    return split_type(message_type)[2] == COMPENSATE


def deterministic_id(*parts: str) -> UUID:
    """A UUID that depends only on `parts`, so a retried emission carries the same message id.

    Parts are encoded as a JSON list so ("a.b", "c") and ("a", "b.c") never collide.
    """
    if not parts:
        raise ValueError(
            "deterministic_id needs at least one part, e.g. deterministic_id('compensate', event_id)"
        )
    for part in parts:
        if not isinstance(part, str):
            # Silently str()-ing would let UUID('..') and '..' collide or differ by accident of formatting.
            raise TypeError(f"deterministic_id parts must be str, got {type(part).__name__}: pass str(value)")
    return uuid.uuid5(KINSHASA_NAMESPACE, json.dumps(list(parts), separators=(",", ":")))


def new_id() -> UUID:
    """A fresh random message id, for messages that no retry will ever re-emit."""
    return uuid.uuid4()


def _check_message_type(value: str) -> str:
    service, _, _ = split_type(value)
    if service == RUN_SERVICE:
        RunEventKind.from_type(value)
    return value


# The pattern goes to JSON Schema only: the validator gives a readable message instead of a regex.
MessageType = Annotated[
    str,
    StringConstraints(max_length=200),
    AfterValidator(_check_message_type),
    Field(json_schema_extra={"pattern": TYPE_RE.pattern}),
]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Actor(_Contract):
    """Who caused a message: an agent, an operator, a service or Kinshasa itself."""

    kind: Literal["agent", "operator", "service", "system"]
    id: NonEmpty


class EntityRef(_Contract):
    """The entity a message is about; its key keeps one entity's messages on one partition, in order."""

    service: NonEmpty
    type: NonEmpty
    id: NonEmpty

    @property
    def key(self) -> str:
        """The Kafka key, `service:id`."""
        return f"{self.service}:{self.id}"


class CompensatePayload(_Contract):
    """Payload of `<command>.compensate`: only the forward event to undo; the owning service does the rest."""

    forward_event_id: UUID = Field(description="message_id of the `*.applied` event being undone")
    forward_type: MessageType = Field(description="type of that event, e.g. `documents.archive.applied`")

    @field_validator("forward_type")
    @classmethod
    def _applied_only(cls, value: str) -> str:
        # Only applied steps changed anything; undoing a rejection or a compensation is a coordinator bug.
        if split_type(value)[2] != EventSuffix.APPLIED:
            raise ValueError(
                f"must be an applied event type such as 'documents.archive.applied', got {value!r}"
            )
        return value


class RejectedPayload(_Contract):
    """Payload of `*.rejected`: why the service refused the command, for operators and the breaker."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=2000)] = Field(
        description="human-readable explanation, saying what to do next where possible"
    )
    code: Annotated[
        str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    ] = Field(description="machine-readable reason, e.g. `DOCUMENT_ARCHIVED` or `VALIDATION`")


class Envelope(_Contract):
    """One message on any Kinshasa topic: a command, an event, or a run lifecycle fact."""

    # Frozen so a handler cannot alter what it received; `payload` is a plain dict and is not
    # deep-frozen, so treat it as read-only.

    message_id: UUID = Field(description="unique id; deterministic where a retried emission must dedupe")
    type: MessageType = Field(
        description="`service.operation` for a command, `service.operation.<suffix>` for an event or a "
        "compensate command, `run.<kind>` for run lifecycle"
    )
    run_id: NonEmpty | None = Field(
        default=None, validate_default=True, description="the agent run this message belongs to"
    )
    actor: Actor = Field(description="who caused this message")
    causation_id: UUID | None = Field(default=None, description="message_id of the message that caused it")
    correlation_id: NonEmpty | None = Field(default=None, description="groups related messages")
    entity: EntityRef | None = Field(
        default=None,
        validate_default=True,
        description="entity the message is about; absent for run lifecycle messages",
    )
    occurred_at: datetime = Field(description="when it happened, with a timezone; stored as UTC")
    payload: dict[str, Any] = Field(default_factory=dict, description="type-specific content")
    traceparent: str | None = Field(
        default=None,
        description="W3C trace context of the emitting span",
        json_schema_extra={"pattern": TRACEPARENT_RE.pattern},
    )
    schema_version: int = Field(default=1, ge=1, description="version of this envelope's payload schema")

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise PydanticCustomError(
                "timezone_required",
                "timestamp has no timezone: send UTC with an offset, e.g. 2024-05-01T12:00:00Z",
            )
        return value.astimezone(UTC)

    @field_validator("traceparent")
    @classmethod
    def _w3c_traceparent(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = TRACEPARENT_RE.match(value)
        if match is None:
            raise PydanticCustomError(
                "traceparent_format",
                "not a W3C traceparent: expected 00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>, "
                "or omit the field",
            )
        trace_id, parent_id = match.groups()
        if set(trace_id) == {"0"} or set(parent_id) == {"0"}:
            raise PydanticCustomError(
                "traceparent_zero", "W3C forbids an all-zero trace id or parent id: omit the field instead"
            )
        return value

    # Run lifecycle facts are keyed by run id so one run's history stays in order on kinshasa.runs.
    # Checked per field (default included) so the error names run_id or entity, not the whole message.
    @field_validator("run_id", "entity")
    @classmethod
    def _run_messages_keyed_by_run(cls, value: object, info: ValidationInfo) -> object:
        message_type = info.data.get("type")
        if not isinstance(message_type, str) or message_type.split(".", 1)[0] != RUN_SERVICE:
            return value
        if info.field_name == "run_id" and value is None:
            raise ValueError(f"{message_type} needs a run_id: run lifecycle messages are keyed by run id")
        if info.field_name == "entity" and value is not None:
            raise ValueError(f"must be null for {message_type}: run lifecycle messages are keyed by run_id")
        return value

    def kafka_key(self) -> bytes:
        """`service:id` of the entity, else the run id; one key's messages stay in order."""
        if self.entity is not None:
            return self.entity.key.encode()
        if self.run_id is not None:
            return self.run_id.encode()
        raise ValueError(
            f"message {self.message_id} ({self.type}) has neither entity nor run_id, so it has no Kafka key: "
            "set entity for commands and events, run_id for run lifecycle messages"
        )

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON, the wire form."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse the wire form; raises InvalidMessage naming every failing field."""
        return parse_envelope(data)

    def derive(
        self,
        *,
        type: str,
        actor: Actor,
        message_id: UUID,
        payload: Mapping[str, Any] | None = None,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """A message caused by this one: same run, entity, correlation and trace; causation is this message.

        Pass a `deterministic_id(...)` as message_id when a retry may emit the message again.
        """
        return Envelope(
            message_id=message_id,
            type=type,
            run_id=self.run_id,
            actor=actor,
            causation_id=self.message_id,
            correlation_id=self.correlation_id,
            entity=self.entity,
            occurred_at=occurred_at if occurred_at is not None else utcnow(),
            payload=dict(payload or {}),
            traceparent=self.traceparent,
        )


class InvalidMessage(ValueError):
    """A message that is not a valid envelope; `errors` holds (dotted field path, problem) pairs."""

    def __init__(self, errors: list[tuple[str, str]], what: str = "envelope") -> None:
        self.errors = errors
        detail = "; ".join(f"{path}: {problem}" for path, problem in errors)
        super().__init__(f"invalid {what}: {detail}")


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(message)"


def invalid_message(exc: ValidationError, what: str = "envelope") -> InvalidMessage:
    """Turn a pydantic ValidationError into an InvalidMessage naming each field by dotted path."""
    errors: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", error["msg"])
            errors.append(("(message)", f"malformed JSON ({reason}): send one UTF-8 JSON object per message"))
        else:
            # A ValueError from our validators already says what to do; pydantic's prefix adds nothing.
            problem = error["msg"].removeprefix("Value error, ")
            errors.append((_field_path(error["loc"]), problem))
    return InvalidMessage(errors, what)


def parse_envelope(data: bytes | str | Mapping[str, Any]) -> Envelope:
    """Validate raw bytes, text or a decoded mapping as an Envelope, or raise InvalidMessage."""
    try:
        if isinstance(data, bytes | str):
            return Envelope.model_validate_json(data)
        return Envelope.model_validate(data)
    except ValidationError as exc:
        raise invalid_message(exc) from exc


def valid_traceparent(traceparent: str | bytes | None) -> str | None:
    """`traceparent` if it is a well-formed W3C traceparent (as text), else None: bad ones are dropped."""
    if traceparent is None:
        return None
    text = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    match = TRACEPARENT_RE.match(text)
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return text


def continued(envelope: Envelope, header: bytes | None) -> Envelope:
    """The envelope as its consumer should see it, given the record's Kafka `traceparent` header: the
    header (the relay's publish span) over the body's (the emitting span), so handling is a child of the
    publish. A malformed header is ignored."""
    if header is None or (envelope.traceparent is not None and header == envelope.traceparent.encode()):
        return envelope
    traceparent = valid_traceparent(header)
    if traceparent is None:
        return envelope
    return envelope.model_copy(update={"traceparent": traceparent})
