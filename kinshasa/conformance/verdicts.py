"""Pure decisions of the conformance checks: the payloads they send, and whether an answer keeps the contract.

Nothing here touches Kafka or HTTP, so every rule a check applies can be unit-tested on plain values.
Each `*_problems` function returns what is wrong in words, an empty list when the contract is kept.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeGuard
from uuid import UUID

from kinshasa.conformance.errors import CheckFailed
from kinshasa.schemas.declaration import OperationDeclaration
from kinshasa.schemas.envelope import Envelope, deterministic_id

# Who wrote a version and when, not what the entity is: a compensation restores the domain fields but
# necessarily writes a new version with its own provenance. Past the section 8 fields come the names a
# hand-written read model most often gives its own provenance.
PROVENANCE_FIELDS = frozenset({
    "version", "run_id", "command_id", "actor", "recorded_at", "operation",
    "causation_id", "updated_at", "updated_by",
})
# What section 8 says each entry of `/versions` carries.
VERSION_FIELDS = ("version", "run_id", "command_id", "actor", "recorded_at")
ORDER_COUNT = 5
_UNEXPECTED_FIELD = "conformance_unexpected_field"
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
_SHORT = 80


# --- payloads -------------------------------------------------------------------------------------


def example_payload(op: OperationDeclaration) -> dict[str, Any]:
    """A copy of `payload_schema.examples[0]`, the payload the contract says the kit sends."""
    examples = op.payload_schema.get("examples")
    if not isinstance(examples, list) or not examples or not isinstance(examples[0], dict):
        raise CheckFailed(
            f"operation {op.name} has no payload_schema.examples[0] object: declare an example payload "
            "the conformance kit can send")
    return copy.deepcopy(examples[0])


def forward_payload(op: OperationDeclaration, entity_id: str) -> dict[str, Any]:
    """The example payload aimed at `entity_id` (put in the entity id field; a create has none)."""
    payload = example_payload(op)
    if op.entity_id_field is not None:
        payload[op.entity_id_field] = entity_id
    return payload


def malformed_payload(op: OperationDeclaration, entity_id: str) -> tuple[dict[str, Any], str]:
    """A payload the operation's schema refuses, and what breaks it (for the report)."""
    payload = forward_payload(op, entity_id)
    schema = op.payload_schema
    properties = schema.get("properties") or {}
    if schema.get("additionalProperties") is False:
        name = _UNEXPECTED_FIELD
        while name in properties:
            name += "_"
        payload[name] = True
        return payload, f"an undeclared field {name!r}"
    required = [f for f in schema.get("required") or [] if f != op.entity_id_field]
    if required:
        del payload[required[0]]
        return payload, f"no required field {required[0]!r}"
    raise CheckFailed(
        f"operation {op.name}'s payload_schema refuses nothing the kit can send: the contract asks for "
        "additionalProperties: false")


def numbered_payload(op: OperationDeclaration, entity_id: str, tag: str) -> dict[str, Any] | None:
    """The example aimed at `entity_id` with each string field it can vary marked `tag`; None if none can.

    Marked payloads keep the kit's commands apart where a service refuses a repeat: a second identical
    rename is a no-op, a second link between the same two ends a duplicate. A field varies when it is a
    string without enum, const, format or not, and a marked value still fits its length and pattern;
    the entity id field never does. Give each payload its own `tag` of digits, which most patterns take.
    """
    payload = forward_payload(op, entity_id)
    properties = op.payload_schema.get("properties") or {}
    varied = False
    for name, value in payload.items():
        schema = properties.get(name)
        if name == op.entity_id_field or not isinstance(value, str) or not _free_string(schema):
            continue
        marked = _marked(value, tag, schema)
        if marked is not None:
            payload[name], varied = marked, True
    return payload if varied else None


def replay_payloads(op: OperationDeclaration, entity_id: str,
                    tags: Sequence[str]) -> tuple[list[dict[str, Any]], bool]:
    """One payload per tag for back-to-back commands of one entity, and whether they differ.

    Each is `numbered_payload`; if the example has nothing to vary, it is repeated as it is.
    """
    numbered = [numbered_payload(op, entity_id, tag) for tag in tags]
    if all(p is not None for p in numbered):
        return [p for p in numbered if p is not None], True
    return [forward_payload(op, entity_id) for _ in tags], False


def _free_string(schema: Any) -> TypeGuard[dict[str, Any]]:
    if not isinstance(schema, dict):
        return False
    types = schema.get("type")
    text = types == "string" or (isinstance(types, list) and "string" in types)
    return text and not any(k in schema for k in ("enum", "const", "format", "not"))


def _marked(value: str, tag: str, schema: Mapping[str, Any]) -> str | None:
    max_length = schema.get("maxLength")
    for suffix in (f" #{tag}", f"-{tag}", tag):
        head = value if max_length is None else value[: max(0, int(max_length) - len(suffix))]
        marked = head + suffix
        if _fits(marked, schema):
            return marked
    return None


def _fits(value: str, schema: Mapping[str, Any]) -> bool:
    if len(value) < int(schema.get("minLength", 0)):
        return False
    if "maxLength" in schema and len(value) > int(schema["maxLength"]):
        return False
    pattern = schema.get("pattern")
    if pattern is None:
        return True
    try:
        # JSON Schema patterns are ECMA-262 regexes, searched not anchored; Python's `re` reads the
        # common subset the same way, and a pattern it cannot read leaves the field as it is.
        return re.search(str(pattern), value) is not None
    except re.error:
        return False


# --- states ---------------------------------------------------------------------------------------


def state_differences(expected: Mapping[str, Any] | None, actual: Mapping[str, Any] | None,
                      ignore: Iterable[str] = PROVENANCE_FIELDS,
                      only: Iterable[str] | None = None) -> list[str]:
    """How `actual` differs from `expected`, field by field, leaving provenance fields out.

    None is "no entity" (a 404 from the read API, a `before: null`). Timestamps compare as instants, so
    `...Z` and `...+00:00` are the same value. `only` limits the comparison to some fields: an event's
    before/after may be a snapshot carrying part of what the read API answers (section 3).
    """
    if expected is None or actual is None:
        if expected is None and actual is None:
            return []
        return [f"expected {_presence(expected)}, found {_presence(actual)}"]
    skipped = set(ignore)
    keys = (set(expected) | set(actual)) if only is None else set(only)
    differences = []
    for key in sorted(keys - skipped):
        if key not in actual:
            differences.append(f"{key} missing (expected {_short(expected[key])})")
        elif key not in expected:
            differences.append(f"{key} unexpected ({_short(actual[key])})")
        elif _normal(expected[key]) != _normal(actual[key]):
            differences.append(f"{key} is {_short(actual[key])}, expected {_short(expected[key])}")
    return differences


def _presence(state: Mapping[str, Any] | None) -> str:
    return "no entity (404 / null)" if state is None else f"an entity ({_short(dict(state))})"


def _normal(value: Any) -> Any:
    if isinstance(value, str) and _TIMESTAMP.match(value):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def version_of(state: Mapping[str, Any] | None) -> Any:
    """The `version` of a read API state, None for no entity."""
    return None if state is None else state.get("version")


# --- answers --------------------------------------------------------------------------------------


def expected_id(suffix: str, cause: UUID | str) -> UUID:
    """The deterministic id the contract gives an event: `uuid5(NS, '["<suffix>","<cause>"]')`."""
    return deterministic_id(suffix, str(cause))


def answer_problems(command: Envelope, event: Envelope, suffix: str, id_cause: UUID | str) -> list[str]:
    """What an event about `command` gets wrong in its envelope (section 3): type, id and copied fields.

    `id_cause` is what the event's deterministic id is derived from: the command's id, except for
    `compensated`, which is derived from the forward event's id.
    """
    problems = []
    wanted_type = f"{command.type.removesuffix('.compensate')}.{suffix}"
    if event.type != wanted_type:
        problems.append(f"type is {event.type}, expected {wanted_type}")
    wanted_id = expected_id(suffix, id_cause)
    if event.message_id != wanted_id:
        problems.append(f"message_id is {event.message_id}, expected {wanted_id} "
                        f"(uuid5 of [\"{suffix}\",\"{id_cause}\"])")
    if event.causation_id != command.message_id:
        problems.append(f"causation_id is {event.causation_id}, expected the command's id "
                        f"{command.message_id}")
    for field in ("run_id", "actor", "entity", "correlation_id", "traceparent"):
        sent, got = getattr(command, field), getattr(event, field)
        if field == "traceparent" and sent is not None and got is not None and got[3:35] == sent[3:35]:
            continue  # a service that traces puts its own span there, in the command's trace
        if sent != got:
            problems.append(f"{field} not copied from the command ({_short(_plain(got))} instead of "
                            f"{_short(_plain(sent))})")
    return problems


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def applied_payload_problems(op: OperationDeclaration, payload: Mapping[str, Any]) -> list[str]:
    """What an `*.applied` payload lacks: `before` and `after`, `irreversible: true` for egress."""
    problems = [f"payload has no {key!r}" for key in ("before", "after") if key not in payload]
    for key in ("before", "after"):
        if key in payload and payload[key] is not None and not isinstance(payload[key], dict):
            problems.append(f"payload {key!r} is {_short(payload[key])}, expected an object or null")
    if op.creates and payload.get("before") is not None:
        problems.append("a create's before must be null")
    if op.egress and payload.get("irreversible") is not True:
        problems.append("an egress operation's applied payload must carry \"irreversible\": true")
    return problems


def compensate_echo_problems(command: Envelope, event: Envelope) -> list[str]:
    """Whether a compensate's answer repeats its `forward_event_id` and `forward_type` (section 4)."""
    return [f"payload {key} is {_short(event.payload.get(key))}, expected {command.payload[key]!r}"
            for key in ("forward_event_id", "forward_type")
            if str(event.payload.get(key, "")).lower() != str(command.payload[key]).lower()]


def refusal_problems(payload: Mapping[str, Any], *, needs_code: bool) -> list[str]:
    """What a `rejected` or `compensation_failed` payload lacks: a non-empty reason (and code)."""
    problems = []
    if not isinstance(payload.get("reason"), str) or not payload["reason"].strip():
        problems.append("payload has no non-empty reason")
    if needs_code and (not isinstance(payload.get("code"), str) or not payload["code"]):
        problems.append("payload has no non-empty code")
    return problems


def order_problems(sent: Sequence[UUID], answered: Sequence[UUID | None]) -> list[str]:
    """Whether the answers' causation ids (in partition order) follow the order the commands were sent."""
    position = {command_id: n for n, command_id in enumerate(sent, start=1)}
    problems = []
    missing = [position[c] for c in sent if c not in set(answered)]
    if missing:
        problems.append(f"no answer to command(s) #{', #'.join(map(str, missing))}")
    seen = [position[c] for c in answered if c in position]
    if seen != sorted(seen):
        problems.append(f"answered in the order #{', #'.join(map(str, seen))}")
    return problems


def versions_problems(body: Any, entity_type: str, entity_id: str,
                      current: Mapping[str, Any]) -> list[str]:
    """What a `/versions` answer gets wrong (section 8): its shape, each entry's fields, the newest one."""
    if not isinstance(body, dict) or not isinstance(body.get("versions"), list):
        return [f"/versions answered {_short(body)}, expected {{entity_type, id, versions: [...]}}"]
    problems = []
    if body.get("entity_type") != entity_type or str(body.get("id")) != entity_id:
        problems.append(f"/versions names {body.get('entity_type')!r} {body.get('id')!r}, "
                        f"expected {entity_type!r} {entity_id!r}")
    versions = body["versions"]
    if not versions:
        return [*problems, "/versions lists no version of an entity that exists"]
    for n, entry in enumerate(versions, start=1):
        missing = [f for f in VERSION_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            problems.append(f"version entry #{n} lacks {', '.join(missing)}")
            break
    newest = versions[-1]
    if isinstance(newest, dict) and newest.get("version") != current.get("version"):
        problems.append(f"the newest entry is version {newest.get('version')!r} but the entity reads as "
                        f"version {current.get('version')!r} (versions go oldest first)")
    return problems


def count_command_versions(body: Any, command_id: UUID) -> int:
    """How many `/versions` entries name `command_id` as the command that wrote them."""
    versions = body.get("versions", []) if isinstance(body, dict) else []
    wanted = str(command_id).lower()
    return sum(1 for v in versions if isinstance(v, dict) and str(v.get("command_id", "")).lower() == wanted)
