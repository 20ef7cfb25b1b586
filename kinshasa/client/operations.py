"""The operation catalogue as the SDK sees it: one Operation per agent mutation, and how to call it.

Everything here is pure: an Operation is built from one entry of the gateway's `operations` query, and
turns snake_case payload fields into the GraphQL document and variables of its mutation, refusing
unknown or missing fields before anything is sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kinshasa.client.errors import UnknownOperation, Validation

# What every write and `command(id)` answer, in the SDK's Receipt.
RECEIPT_FIELDS = (
    "commandId runId operation mutation entityId status releaseAt acceptedAt result reason "
    "appliedAt rejectedReason compensatedAt"
)

OPERATIONS_QUERY = """query { operations { service operation mutation description egress creates entityType
  entityIdField inputSchema inputObject allowed arguments { name type } } }"""

IDEMPOTENCY_KEY = "idempotencyKey"


def camel(name: str) -> str:
    """`document_id` -> `documentId`, as the gateway's schema (Strawberry's auto camel case) names it."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() if part else "_" for part in rest)


_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake(name: str) -> str:
    """`renameDocument` -> `rename_document`: the Python name of a mutation or a field."""
    return _BOUNDARY.sub("_", name).lower()


@dataclass(frozen=True)
class Argument:
    """One GraphQL argument of a mutation besides runId and idempotencyKey, e.g. `documentId: ID!`."""

    name: str
    type: str


@dataclass(frozen=True)
class Operation:
    """One write an agent may ask for, as the gateway's `operations` query describes it."""

    service: str
    operation: str  # the command type, e.g. documents.rename
    mutation: str  # the GraphQL mutation, e.g. renameDocument
    description: str
    egress: bool
    creates: bool
    entity_type: str
    entity_id_field: str | None  # the snake_case payload field holding the target id; None for creates
    input_schema: dict[str, Any] = field(hash=False, compare=False)
    input_object: bool
    allowed: bool
    arguments: tuple[Argument, ...]

    @classmethod
    def from_graphql(cls, entry: Mapping[str, Any]) -> Operation:
        raw = entry.get("inputSchema")
        schema = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        return cls(
            service=str(entry["service"]),
            operation=str(entry["operation"]),
            mutation=str(entry["mutation"]),
            description=str(entry.get("description") or ""),
            egress=bool(entry.get("egress")),
            creates=bool(entry.get("creates")),
            entity_type=str(entry.get("entityType") or ""),
            entity_id_field=entry.get("entityIdField") or None,
            input_schema=schema if isinstance(schema, dict) else {},
            input_object=bool(entry.get("inputObject")),
            allowed=entry.get("allowed") is not False,
            arguments=tuple(Argument(str(a["name"]), str(a["type"])) for a in entry.get("arguments") or []),
        )

    @property
    def method_name(self) -> str:
        """The Python name of this operation on a Run: the mutation in snake_case (`rename_document`)."""
        return snake(self.mutation)

    @property
    def properties(self) -> dict[str, Any]:
        found = self.input_schema.get("properties")
        return dict(found) if isinstance(found, Mapping) else {}

    @property
    def required(self) -> list[str]:
        found = self.input_schema.get("required")
        return [str(name) for name in found] if isinstance(found, list) else []

    @property
    def keyed(self) -> bool:
        """Does the mutation take an idempotencyKey? Every write does, unless a payload field has the name."""
        return all(a.name != IDEMPOTENCY_KEY for a in self.arguments)

    def check(self, fields: Mapping[str, Any]) -> None:
        """Refuse unknown and missing payload fields, naming each, before anything reaches the gateway.

        Values are the gateway's to check (it runs the service's own payload model); the names are
        checked here because a misspelt field would otherwise come back as a GraphQL parse error.
        """
        known = self.properties
        by_camel = {camel(name): name for name in known}
        problems: list[tuple[str, str]] = []
        for name in fields:
            if name in known:
                continue
            hint = by_camel.get(name)
            if hint is not None:
                problems.append((name, f"unknown field; did you mean {hint!r}? fields are snake_case"))
            else:
                expected = ", ".join(sorted(known)) or "none"
                problems.append((name, f"unknown field of {self.operation}; it takes: {expected}"))
        for name in self.required:
            if name not in fields or fields[name] is None:
                problems.append((name, "required"))
        if problems:
            summary = "; ".join(f"{path}: {problem}" for path, problem in problems)
            raise Validation(
                "VALIDATION",
                f"invalid input for {self.mutation} (checked before sending): {summary}",
                {
                    "code": "VALIDATION",
                    "fields": [{"path": path, "message": problem} for path, problem in problems],
                    "clientSide": True,
                },
            )

    def document(self) -> str:
        """The mutation's GraphQL document: `mutation($runId: ID!, $v0: T, ...) { m(runId: $runId, ...) }`."""
        declarations = ["$runId: ID!"]
        passed = ["runId: $runId"]
        for index, argument in enumerate(self.arguments):
            declarations.append(f"$v{index}: {argument.type}")
            passed.append(f"{argument.name}: $v{index}")
        if self.keyed:
            declarations.append(f"${IDEMPOTENCY_KEY}: String")
            passed.append(f"{IDEMPOTENCY_KEY}: ${IDEMPOTENCY_KEY}")
        return (
            f"mutation {_pascal(self.mutation)}({', '.join(declarations)}) "
            f"{{ {self.mutation}({', '.join(passed)}) {{ {RECEIPT_FIELDS} }} }}"
        )

    def variables(
        self, run_id: str, fields: Mapping[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """The document's variables for snake_case payload `fields` (checked first).

        Only the top level is renamed: a nested value is one JSON argument to the gateway, which hands
        it to the service's payload model as it is (snake_case inside).
        """
        self.check(fields)
        given = {camel(name): value for name, value in fields.items() if value is not None}
        variables: dict[str, Any] = {"runId": run_id}
        if self.input_object:
            # The one argument (`input`) takes every payload field as a key.
            for index, _ in enumerate(self.arguments):
                variables[f"v{index}"] = given
        else:
            for index, argument in enumerate(self.arguments):
                if argument.name in given:
                    variables[f"v{index}"] = given[argument.name]
        if self.keyed and idempotency_key is not None:
            variables[IDEMPOTENCY_KEY] = idempotency_key
        return variables

    def describe(self) -> str:
        """What this operation does and how to call it from a Run, for help() and generated stubs."""
        lines = [self.description or self.operation, ""]
        if self.entity_id_field:
            lines.append(f"First positional argument: {self.entity_id_field}, the {self.entity_type} id.")
        for name, schema in self.properties.items():
            kind = schema.get("type", "any") if isinstance(schema, Mapping) else "any"
            need = "required" if name in self.required else "optional"
            about = schema.get("description", "") if isinstance(schema, Mapping) else ""
            lines.append(f"  {name} ({kind}, {need}){': ' + about if about else ''}")
        if self.egress:
            lines.append("Irreversible egress: it waits for an operator's approval before it is sent.")
        lines.append(
            f"Sends {self.mutation}; answers a Receipt at once (the write may be held a while before it is "
            "published): await receipt.applied() to wait until the service applied it."
        )
        return "\n".join(lines)


def _pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


def find(operations: Iterable[Operation], name: str) -> Operation:
    """The operation called `name`: its command type, its mutation or the mutation in snake_case."""
    listed = list(operations)
    for op in listed:
        if name in (op.operation, op.mutation, op.method_name):
            return op
    known = ", ".join(sorted(op.method_name for op in listed)) or "none"
    raise UnknownOperation(
        "UNKNOWN_OPERATION",
        f"no operation {name!r} in the gateway's catalogue (known: {known}); a service registered since "
        "the catalogue was read appears after client.operations(refresh=True)",
        {"code": "UNKNOWN_OPERATION", "operation": name},
    )
