"""The public GraphQL contract: the schema built for the example catalogue matches the committed SDL.

Any change to a type, field, argument, default or description shows up here; when the change is meant,
regenerate the file (see REGENERATE) and review the diff like any contract change.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from kinshasa.gateway.graphql import build_schema
from kinshasa.gateway.graphql.schema import static_type_names
from kinshasa.services.registry import example_catalogue, example_declarations

GOLDEN = Path(__file__).with_name("schema.graphql")
REGENERATE = (
    "the GraphQL schema changed: if that is meant, regenerate the contract with "
    "`.venv/bin/python -m tests.unit.gateway.test_graphql_contract` and review its diff"
)


def current_sdl() -> str:
    declarations = {d.service: d for d in example_declarations()}
    schema = build_schema(example_catalogue(), dev_mode=False, extensions=[], declarations=declarations)
    return str(schema) + "\n"


def test_the_schema_matches_the_committed_contract() -> None:
    built, golden = current_sdl(), GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(golden.splitlines(True), built.splitlines(True), "golden", "built"))
    assert built == golden, f"{REGENERATE}\n{diff}"


def test_dev_mode_does_not_change_the_contract() -> None:
    declarations = {d.service: d for d in example_declarations()}
    dev = build_schema(example_catalogue(), dev_mode=True, extensions=[], declarations=declarations)
    assert str(dev) + "\n" == GOLDEN.read_text()


if __name__ == "__main__":
    GOLDEN.write_text(current_sdl())


def test_the_names_read_model_types_may_not_take_are_the_schemas_own() -> None:
    # A type generated from a service's read model is renamed when it would take one of these names.
    assert static_type_names() == {
        "Actor", "Alert", "AlertFailingStep", "AlertThreshold", "Approval", "ApprovalConnection",
        "ApprovalEdge", "Breaker", "BreakerState", "CommandReceipt", "CommandStatus", "DlqComponent",
        "DlqReprocessResult", "Entity", "EntityRef", "EntityVersion", "Incident", "IncidentConnection",
        "IncidentKind", "JSON", "Long", "Me", "Mutation", "Operation", "OperationArgument",
        "OperatorMutations", "PageInfo", "PolicyBacktest", "PolicyInput", "PolicyProposal", "PolicyScope",
        "PolicySettings", "PolicyVersion", "PolicyView", "Query", "ReceiptChainReport", "RevertProgress",
        "RevertRunsResult", "Run",
        "RunActionResult", "RunConnection", "RunCounts", "RunEdge", "RunFilter", "RunSelector", "RunStatus",
        "RunStep", "RunStepConnection", "RunStepEdge", "StepStatus", "Subscription",
    }
