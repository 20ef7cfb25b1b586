"""The SDK's catalogue logic: names, mutation documents, variables and the client-side field check."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kinshasa.client import Operation, UnknownOperation, Validation
from kinshasa.client.operations import RECEIPT_FIELDS, camel, find, snake


def _rename(**overrides: Any) -> Operation:
    entry = {
        "service": "documents",
        "operation": "documents.rename",
        "mutation": "renameDocument",
        "description": "Give an existing document a new title.",
        "egress": False,
        "creates": False,
        "entityType": "document",
        "entityIdField": "document_id",
        "inputSchema": json.dumps({
            "type": "object",
            "properties": {"document_id": {"type": "string"}, "title": {"type": "string"}},
            "required": ["document_id", "title"],
        }),
        "inputObject": False,
        "allowed": True,
        "arguments": [{"name": "documentId", "type": "ID!"}, {"name": "title", "type": "String!"}],
    }
    return Operation.from_graphql({**entry, **overrides})


def _create() -> Operation:
    return _rename(
        operation="documents.create", mutation="createDocument", creates=True, entityIdField=None,
        inputSchema=json.dumps({
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"},
                           "extra_meta": {"type": "object"}},
            "required": ["title"],
        }),
        inputObject=True, arguments=[{"name": "input", "type": "CreateDocumentInput!"}],
    )


@pytest.mark.parametrize(("snake_name", "camel_name"), [
    ("document_id", "documentId"), ("title", "title"), ("velocity_window_s", "velocityWindowS"),
    ("rename_document", "renameDocument"),
])
def test_names_convert_both_ways_as_the_gateway_spells_them(snake_name: str, camel_name: str) -> None:
    assert camel(snake_name) == camel_name
    assert snake(camel_name) == snake_name


def test_a_digit_after_an_underscore_joins_the_word_before_it() -> None:
    assert camel("line_2") == "line2"


def test_a_flat_mutation_document_declares_each_argument_with_its_graphql_type() -> None:
    document = _rename().document()
    assert document == (
        "mutation RenameDocument($runId: ID!, $v0: ID!, $v1: String!, $idempotencyKey: String) "
        "{ renameDocument(runId: $runId, documentId: $v0, title: $v1, idempotencyKey: $idempotencyKey) "
        f"{{ {RECEIPT_FIELDS} }} }}"
    )


def test_flat_variables_are_the_camel_case_arguments_and_the_key() -> None:
    variables = _rename().variables("run-1", {"document_id": "doc-1", "title": "Q4"}, "key-1")
    assert variables == {"runId": "run-1", "v0": "doc-1", "v1": "Q4", "idempotencyKey": "key-1"}


def test_an_input_object_takes_every_field_camel_cased_at_the_top_level_only() -> None:
    op = _create()
    assert "$v0: CreateDocumentInput!" in op.document() and "input: $v0" in op.document()
    variables = op.variables("run-1", {"title": "Plan", "extra_meta": {"owner_id": "x"}}, None)
    # Nested values are one JSON argument the service's payload model reads as sent: snake_case.
    assert variables == {"runId": "run-1", "v0": {"title": "Plan", "extraMeta": {"owner_id": "x"}}}


def test_unknown_and_missing_fields_are_refused_before_sending_naming_each() -> None:
    with pytest.raises(Validation) as refused:
        _rename().variables("run-1", {"documentId": "doc-1", "titel": "Q4"})
    fields = {f.path: f.message for f in refused.value.fields}
    assert "did you mean 'document_id'" in fields["documentId"]
    assert "it takes: document_id, title" in fields["titel"]
    assert fields["document_id"] == "required" and fields["title"] == "required"
    assert refused.value.code == "VALIDATION" and refused.value.extensions["clientSide"] is True


def test_an_optional_field_left_out_or_none_is_not_sent() -> None:
    variables = _create().variables("run-1", {"title": "Plan", "body": None})
    assert variables["v0"] == {"title": "Plan"}


def test_an_operation_is_found_by_command_type_mutation_or_snake_case() -> None:
    ops = [_rename(), _create()]
    for name in ("documents.rename", "renameDocument", "rename_document"):
        assert find(ops, name).mutation == "renameDocument"
    with pytest.raises(UnknownOperation) as unknown:
        find(ops, "delete_document")
    assert "create_document, rename_document" in unknown.value.message


def test_a_payload_field_named_idempotency_key_leaves_the_mutation_without_one() -> None:
    op = _rename(arguments=[{"name": "documentId", "type": "ID!"},
                            {"name": "idempotencyKey", "type": "String!"}])
    assert not op.keyed
    assert "$idempotencyKey: String)" not in op.document()


def test_the_description_tells_how_to_call_it() -> None:
    text = _rename().describe()
    assert "First positional argument: document_id" in text
    assert "title (string, required)" in text and "receipt.applied()" in text
