"""A receipt follows its write: APPLIED once the service applied it, REJECTED with the service's reason,
COMPENSATED once a revert undid it; and the catalogue a client generates its calls from."""

from __future__ import annotations

import json
import uuid

from tests.e2e.api import Api
from tests.e2e.stack import Stack, wait_for

ENTRY_POINT = "e2e.receipts"
DOCUMENT = "query($id: ID!) { document(id: $id) { id title } }"


def test_a_receipt_says_applied_rejected_then_compensated(stack: Stack, agent: Api, operator: Api) -> None:
    operator.set_policy(ENTRY_POINT, quarantineWindowS=0.0)
    run_id = agent.start_run(ENTRY_POINT)
    created = agent.write(run_id, "createDocument", title="followed")
    assert created["status"] == "PUBLISHED" and created["appliedAt"] is None

    applied = wait_for("the create to be applied",
                       lambda: (c := agent.command(created["commandId"]))["status"] == "APPLIED" and c)
    assert applied["appliedAt"] is not None and applied["rejectedReason"] is None
    # Applied means a read sees it.
    assert agent.call(DOCUMENT, id=created["entityId"])["document"]["title"] == "followed"

    missing = str(uuid.uuid4())
    refused = agent.rename(run_id, missing, "nobody here")
    rejected = wait_for("the rename of a missing document to be rejected",
                        lambda: (c := agent.command(refused["commandId"]))["status"] == "REJECTED" and c)
    assert rejected["rejectedReason"] and missing in rejected["rejectedReason"]
    assert rejected["appliedAt"] is None and rejected["result"] == "REJECTED"

    operator.call('mutation($id: ID!) { revertRun(runId: $id, reason: "e2e receipts") { id } }', id=run_id)
    undone = wait_for("the create to be compensated",
                      lambda: (c := agent.command(created["commandId"]))["status"] == "COMPENSATED" and c)
    assert undone["compensatedAt"] is not None and undone["appliedAt"] == applied["appliedAt"]
    assert undone["compensatedAt"] >= undone["appliedAt"]
    # The rejected write was never applied, so there was nothing to undo: it stays REJECTED.
    assert agent.command(refused["commandId"])["status"] == "REJECTED"
    by_status = {c["commandId"]: c["status"] for c in operator.commands(run_id)}
    assert by_status == {created["commandId"]: "COMPENSATED", refused["commandId"]: "REJECTED"}


OPERATIONS = """{ operations { service operation mutation description egress creates entityType
    entityIdField inputSchema inputObject allowed arguments { name type } } }"""


def test_operations_lists_the_catalogue_as_the_schema_spells_it(agent: Api, operator: Api) -> None:
    listed = {o["mutation"]: o for o in agent.call(OPERATIONS)["operations"]}
    rename = listed["renameDocument"]
    assert rename["operation"] == "documents.rename" and rename["service"] == "documents"
    assert rename["entityIdField"] == "document_id" and not rename["creates"] and not rename["inputObject"]
    assert {a["name"]: a["type"] for a in rename["arguments"]} == {"documentId": "ID!", "title": "String!"}
    assert set(json.loads(rename["inputSchema"])["properties"]) == {"document_id", "title"}
    create = listed["createDocument"]
    assert create["creates"] and create["entityIdField"] is None and create["inputObject"]
    assert create["arguments"] == [{"name": "input", "type": "CreateDocumentInput!"}]
    assert listed["sendEmail"]["egress"] and not rename["egress"]
    assert rename["allowed"] and rename["description"]
    # An operator does not write: nothing is allowed, but the catalogue reads the same.
    as_operator = {o["mutation"]: o for o in operator.call(OPERATIONS)["operations"]}
    assert set(as_operator) == set(listed) and not any(o["allowed"] for o in as_operator.values())

    # The arguments are exactly what the mutation takes: a call built from them is accepted.
    run_id = agent.start_run("e2e.operations")
    args = ", ".join(f"${a['name']}: {a['type']}" for a in rename["arguments"])
    passed = ", ".join(f"{a['name']}: ${a['name']}" for a in rename["arguments"])
    created = agent.write(run_id, "createDocument", title="by the catalogue")
    query = (f"mutation($runId: ID!, {args}) {{ renameDocument(runId: $runId, {passed}) "
             "{ operation status } }")
    answer = agent.call(query, runId=run_id, documentId=created["entityId"], title="renamed")
    assert answer["renameDocument"]["operation"] == "documents.rename"
