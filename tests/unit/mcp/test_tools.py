"""The tool list is decided from the catalogue and the caller's role alone."""

from __future__ import annotations

from typing import Any

from kinshasa.client.operations import Operation
from kinshasa.mcp.tools import OPERATOR_TOOL_NAMES, tools_for, write_tool


def _operation(mutation: str = "renameDocument", *, egress: bool = False, allowed: bool = True,
               arguments: list[dict[str, str]] | None = None, **schema: Any) -> Operation:
    input_schema = schema or {
        "type": "object",
        "properties": {"document_id": {"type": "string"}, "title": {"type": "string", "minLength": 1}},
        "required": ["document_id", "title"],
        "additionalProperties": False,
        "title": "RenameDocument",
    }
    return Operation.from_graphql({
        "service": "documents", "operation": "documents.rename", "mutation": mutation,
        "description": "Give a document a new title.", "egress": egress, "creates": False,
        "entityType": "document", "entityIdField": "document_id", "inputSchema": input_schema,
        "inputObject": False, "allowed": allowed,
        "arguments": arguments if arguments is not None else [{"name": "documentId", "type": "ID!"},
                                                               {"name": "title", "type": "String!"}],
    })


def test_a_write_tool_is_named_as_its_mutation_in_snake_case_and_keeps_the_declared_schema() -> None:
    tool = write_tool(_operation(), bound=False)
    assert tool.name == "rename_document"
    schema = tool.input_schema
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["properties"]["title"] == {"type": "string", "minLength": 1}
    assert schema["required"] == ["run_id", "document_id", "title"]
    assert set(schema["properties"]) == {"document_id", "title", "run_id", "idempotency_key"}
    assert "title" not in schema  # the schema's own title is the operation's, not the tool's


def test_a_bound_session_needs_no_run_id() -> None:
    tool = write_tool(_operation(), bound=True)
    assert tool.input_schema["required"] == ["document_id", "title"]
    assert "run_id" in tool.input_schema["properties"]
    assert "session's own run" in tool.description


def test_the_description_says_what_the_operation_does_and_that_the_write_may_be_held() -> None:
    plain = write_tool(_operation(), bound=False).description
    assert plain.startswith("Give a document a new title.")
    assert "HELD" in plain and "quarantine" in plain and "get_command" in plain
    egress = write_tool(_operation("sendEmail", egress=True), bound=False).description
    assert "AWAITING_APPROVAL" in egress and "operator" in egress


def test_a_payload_field_named_idempotency_key_is_left_as_the_operation_declares_it() -> None:
    op = _operation(
        arguments=[{"name": "idempotencyKey", "type": "String!"}],
        type="object", properties={"idempotency_key": {"type": "string", "description": "theirs"}},
        required=["idempotency_key"])
    tool = write_tool(op, bound=False)
    assert tool.input_schema["properties"]["idempotency_key"] == {"type": "string", "description": "theirs"}


def test_an_agent_gets_runs_writes_and_reads_and_never_an_operator_tool() -> None:
    names = [t.name for t in tools_for("agent", [_operation(), _operation("archiveDocument")], bound=False)]
    assert names == ["start_run", "finish_run", "archive_document", "rename_document",
                     "get_command", "get_run", "get_entity"]
    assert not OPERATOR_TOOL_NAMES & set(names)


def test_an_agent_is_not_offered_an_operation_its_scopes_refuse() -> None:
    names = {t.name for t in tools_for("agent", [_operation(allowed=False)], bound=False)}
    assert "rename_document" not in names


def test_an_operator_gets_reads_and_operator_tools_and_no_writes() -> None:
    names = {t.name for t in tools_for("operator", [_operation()], bound=False)}
    assert names == {"get_command", "get_run", "get_entity", *OPERATOR_TOOL_NAMES}
    assert {"list_alerts", "revert_run", "release_run", "discard_run", "approve_egress", "deny_egress",
            "dlq_count", "dlq_inspect", "dlq_reprocess", "outbox_status"} == OPERATOR_TOOL_NAMES


def test_a_service_operation_cannot_take_the_name_of_a_fixed_tool() -> None:
    tools = tools_for("agent", [_operation("startRun"), _operation("dlqReprocess")], bound=False)
    assert [t.name for t in tools].count("start_run") == 1
    assert all(t.operation is None for t in tools if t.name == "start_run")
    assert "dlq_reprocess" not in {t.name for t in tools}
