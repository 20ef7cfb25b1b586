"""Typed stubs: JSON Schema property types become Python annotations, and the module compiles."""

from __future__ import annotations

import json

import pytest

from kinshasa.client import Operation
from kinshasa.client.stubs import annotation, render


@pytest.mark.parametrize(("schema", "text"), [
    ({"type": "string"}, "str"),
    ({"type": "integer"}, "int"),
    ({"type": "array", "items": {"type": "number"}}, "list[float]"),
    ({"type": "object"}, "dict[str, Any]"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "str | None"),
    ({"enum": ["debit", "credit"]}, "Literal['debit', 'credit']"),
    ({}, "Any"),
])
def test_schema_types_become_annotations(schema: dict[str, object], text: str) -> None:
    assert annotation(schema) == text


def _op(mutation: str, creates: bool, properties: dict[str, object], required: list[str]) -> Operation:
    return Operation.from_graphql({
        "service": "documents", "operation": f"documents.{mutation}", "mutation": mutation,
        "description": "Does a thing.", "egress": False, "creates": creates, "entityType": "document",
        "entityIdField": None if creates else "document_id",
        "inputSchema": json.dumps({"properties": properties, "required": required}),
        "inputObject": creates, "allowed": True, "arguments": [],
    })


def test_the_module_has_a_typed_method_per_operation_in_both_flavours() -> None:
    ops = [
        _op("renameDocument", False, {"document_id": {"type": "string"}, "title": {"type": "string"}},
            ["document_id", "title"]),
        _op("createDocument", True, {"title": {"type": "string"}, "body": {"type": "string"}}, ["title"]),
        _op("call", False, {"document_id": {"type": "string"}}, ["document_id"]),  # shadowed by Run.call
    ]
    source = render(ops, source="http://gw/graphql")
    compile(source, "agent_ops.py", "exec")
    assert ("    async def rename_document(self, document_id: str, *, title: str, "
            "idempotency_key: str | None = None) -> Receipt:") in source
    assert ("    def create_document(self, *, title: str, body: str | None = None, "
            "idempotency_key: str | None = None) -> SyncReceipt:") in source
    assert source.count("def call(") == 2  # only Run's own, once per Protocol
