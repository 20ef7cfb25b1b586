"""The tool list, decided purely: fixed run and read tools, one write tool per catalogued operation, and
the operator's tools for an operator key only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kinshasa.client.operations import Operation

Role = Literal["agent", "operator"]

@dataclass(frozen=True)
class ToolSpec:
    """A tool as listed: `kind` says how a call is served ("write" tools carry their operation)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    kind: Literal["run", "read", "write", "operator"]
    read_only: bool = False
    operation: Operation | None = field(default=None, compare=False)


def _object(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def _text(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


RUN_ID = _text("the run this write belongs to (from start_run)")
IDEMPOTENCY_KEY = _text(
    "optional: a key of your choosing; a retry with the same key and the same arguments gets the first "
    "answer and writes nothing twice"
)

START_RUN = ToolSpec(
    "start_run",
    "Start a run: every write belongs to one. Returns run_id; pass it to the write tools and to "
    "finish_run when the task is done. The gateway's breaker watches each run: if the run writes too "
    "much, too fast or across too many services, its writes are refused with BREAKER_OPEN.",
    _object({"entry_point": _text("what task this run serves, e.g. support-bot; selects the policy"),
             "purpose": _text("optional: one line saying why, for the operator reading the run")},
            ["entry_point"]),
    "run",
)
FINISH_RUN = ToolSpec(
    "finish_run",
    "Finish a run when its task is done. Writes still held in quarantine wait out their window.",
    _object({"run_id": _text("the run to finish")}, ["run_id"]),
    "run",
)
GET_COMMAND = ToolSpec(
    "get_command",
    "Read a write's receipt by command_id: its status follows the write (HELD or AWAITING_APPROVAL, then "
    "PUBLISHED, then APPLIED or REJECTED with rejected_reason; COMPENSATED if reverted; DISCARDED if "
    "never sent). Poll it to know when a write took effect before reading the entity back.",
    _object({"command_id": _text("the command_id a write tool returned")}, ["command_id"]),
    "read",
    read_only=True,
)
GET_RUN = ToolSpec(
    "get_run",
    "Read a run: its status, its breaker (state, writes, errors, services touched) and its command counts.",
    _object({"run_id": _text("the run to read")}, ["run_id"]),
    "read",
    read_only=True,
)
GET_ENTITY = ToolSpec(
    "get_entity",
    "Read one entity of a service as the service holds it now, e.g. service documents, type document.",
    _object({"service": _text("the service that owns it, e.g. documents"),
             "type": _text("the entity type, e.g. document"),
             "id": _text("the entity id")}, ["service", "type", "id"]),
    "read",
    read_only=True,
)

RUN_ID_REQUIRED = _text("the run to act on")
OPERATOR_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec("list_alerts", "Operator: alerts newest first (breaker trips, agent budgets, failed reverts, "
             "dead-letter thresholds), optionally for one run or of one kind.",
             _object({"run_id": _text("optional: only this run's alerts"),
                      "kind": _text("optional: only this kind, e.g. run_tripped or dlq_threshold"),
                      "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}}),
             "operator", read_only=True),
    ToolSpec("revert_run", "Operator: undo every applied write of a run with its inverse, newest first.",
             _object({"run_id": RUN_ID_REQUIRED, "reason": _text("why, for the run's record")},
                     ["run_id", "reason"]), "operator"),
    ToolSpec("release_run", "Operator: publish the run's held (quarantined) writes now.",
             _object({"run_id": RUN_ID_REQUIRED}, ["run_id"]), "operator"),
    ToolSpec("discard_run", "Operator: discard the run's writes that were not published yet.",
             _object({"run_id": RUN_ID_REQUIRED}, ["run_id"]), "operator"),
    ToolSpec("approve_egress", "Operator: publish an egress write (e.g. an email) that awaits approval.",
             _object({"command_id": _text("the command awaiting approval")}, ["command_id"]), "operator"),
    ToolSpec("deny_egress", "Operator: discard an egress write that awaits approval, with the reason.",
             _object({"command_id": _text("the command awaiting approval"),
                      "reason": _text("why it must not leave")}, ["command_id", "reason"]), "operator"),
    ToolSpec("dlq_count", "Operator: dead letters waiting in each component (gateway, services, "
             "coordinator), and the total.", _object({}), "operator", read_only=True),
    ToolSpec("dlq_inspect", "Operator: one component's oldest dead letters, with payload, error and "
             "attempts; pass their message_id to dlq_reprocess.",
             _object({"component": _text("the component, as dlq_count names it"),
                      "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 20}},
                     ["component"]), "operator", read_only=True),
    ToolSpec("dlq_reprocess", "Operator: run a component's handler again on these dead letters (or requeue "
             "dead outbox rows); one outcome per message.",
             _object({"component": _text("the component holding them"),
                      "message_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                      "maxItems": 1000, "description": "message ids from dlq_inspect"}},
                     ["component", "message_ids"]), "operator"),
    ToolSpec("outbox_status", "Operator: each component's outbox: messages pending, the age of the oldest "
             "pending one, and dead letters.", _object({}), "operator", read_only=True),
)
OPERATOR_TOOL_NAMES = frozenset(t.name for t in OPERATOR_TOOLS)


def write_description(entry: Operation, bound: bool) -> str:
    """What the operation does, and what happens to the write after the call returns."""
    head = entry.description.strip().rstrip(".") or f"{entry.operation} on {entry.service}"
    target = f" It creates a {entry.entity_type}." if entry.creates and entry.entity_type else ""
    if entry.egress:
        held = ("It leaves the system for good, so it is held AWAITING_APPROVAL until an operator "
                "approves it (approve_egress) or denies it.")
    else:
        held = ("The write may be held in quarantine (status HELD) for the run's window before it is "
                "published, and operators can revert it.")
    run = (" run_id is optional: the session's own run is used (started on the first write)."
           if bound else " Pass the run_id from start_run.")
    return (f"{head}.{target} Service {entry.service}, operation {entry.operation}. {held} Returns a "
            f"receipt with command_id and status; poll get_command until APPLIED (or REJECTED, with the "
            f"reason) before relying on the effect.{run}")


def write_tool(entry: Operation, bound: bool) -> ToolSpec:
    """The operation's own JSON Schema, plus run_id (required unless the session binds a run) and an
    optional idempotency_key (unless the payload already has a field of that name)."""
    declared = dict(entry.input_schema)
    properties = dict(declared.get("properties") or {})
    required = [name for name in declared.get("required") or [] if isinstance(name, str)]
    properties["run_id"] = RUN_ID
    if entry.keyed and "idempotency_key" not in properties:
        properties["idempotency_key"] = IDEMPOTENCY_KEY
    schema = {key: value for key, value in declared.items() if key not in ("$schema", "$id", "title")}
    schema["type"] = "object"
    schema["properties"] = properties
    schema["required"] = required if bound else ["run_id", *required]
    return ToolSpec(entry.method_name, write_description(entry, bound), schema, "write", operation=entry)


def tools_for(role: Role, catalogue: Iterable[Operation], *, bound: bool) -> list[ToolSpec]:
    """An agent's tools: runs, one write per operation it may call, reads. An operator's: reads and its
    own tools, never a write (operators act on runs, they do not write into them)."""
    reads = [GET_COMMAND, GET_RUN, GET_ENTITY]
    if role == "operator":
        return [*reads, *OPERATOR_TOOLS]
    taken = {START_RUN.name, FINISH_RUN.name, *(t.name for t in reads), *OPERATOR_TOOL_NAMES}
    writes = [write_tool(e, bound) for e in catalogue if e.allowed and e.method_name not in taken]
    return [START_RUN, FINISH_RUN, *sorted(writes, key=lambda t: t.name), *reads]
