"""The query cost estimate: lists weigh by `first`, nesting multiplies, backend fields weigh more."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import GraphQLSchema, parse

from kinshasa.gateway.cost import CostWeights, calls_backend, estimate, size_variables
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.operator import gateway_client as operator
from tests.e2e import api as e2e_api

W = CostWeights()
LIMIT = GatewayConfig().max_query_cost


def cost(schema: GraphQLSchema, query: str, variables: dict[str, Any] | None = None) -> float:
    return estimate(schema, parse(query), None, variables, W)


ISSUE_QUERY = "{ " + " ".join(
    f"a{i}: runs(first: 200) {{ nodes {{ steps(first: 200) {{ nodes {{ stepId }} }} "
    "commands(first: 200) { commandId } } }"
    for i in range(10)
) + " }"


def test_the_issues_query_costs_far_over_the_limit(schema: GraphQLSchema) -> None:
    # Per alias: runs (a call, a query) and its connection, 200 runs; 200 steps calls in one batch to the
    # coordinator with their connections and 200 x 200 steps; 200 commands calls in one batched query
    # with 200 x 200 receipts.
    runs = W.call + W.query + 1 + 200
    steps = 200 * W.call + W.backend + 200 + 200 * 200
    commands = 200 * W.call + W.query + 200 * 200
    assert cost(schema, ISSUE_QUERY) == 10 * (runs + steps + commands)
    assert cost(schema, ISSUE_QUERY) > 50 * LIMIT


def test_a_list_weighs_by_first_or_its_default(schema: GraphQLSchema) -> None:
    one = cost(schema, '{ run(id: "r") { commands(first: 1) { commandId } } }')
    hundred = cost(schema, '{ run(id: "r") { commands { commandId } } }')  # first defaults to 100
    assert hundred - one == 99 * W.object
    query = 'query($n: Int!) { run(id: "r") { commands(first: $n) { commandId } } }'
    by_variable = cost(schema, query, {"n": 1})
    assert by_variable == one


def test_nesting_multiplies(schema: GraphQLSchema) -> None:
    flat = cost(schema, "{ runs(first: 10) { nodes { id } } }")
    nested = cost(schema, "{ runs(first: 10) { nodes { commands(first: 10) { commandId } } } }")
    assert flat == W.call + W.query + 1 + 10
    assert nested == flat + 10 * W.call + W.query + 10 * 10 * W.object


def test_fields_that_ask_another_component_weigh_more(schema: GraphQLSchema) -> None:
    steps = cost(schema, '{ run(id: "r") { steps(first: 1) { nodes { stepId } } } }')
    commands = cost(schema, '{ run(id: "r") { commands(first: 1) { commandId } } }')
    assert steps - commands == W.backend - W.query + 1  # and the connection object
    # Every entity read is a call to its service: 20 of them cost 20 calls, not one batch.
    one = cost(schema, '{ document(id: "d") { id } }')
    assert one == W.call + W.backend + W.object
    twenty = "{ " + " ".join(f'd{i}: document(id: "d{i}") {{ id }}' for i in range(20)) + " }"
    assert cost(schema, twenty) == 20 * one
    # The generated entity reads are recognised by their resolver module, never by service name.
    fields = schema.query_type.fields  # type: ignore[union-attr]
    generated = [name for name in ("entity", "document", "account", "links", "emails") if name in fields]
    assert len(generated) == 5
    assert all(calls_backend(fields[name]) for name in generated)
    assert not calls_backend(fields["runs"]) and not calls_backend(fields["me"])
    assert calls_backend(fields["dlq"])


def test_fragments_and_aliases_count_every_time(schema: GraphQLSchema) -> None:
    plain = cost(schema, "{ runs(first: 5) { nodes { id } } }")
    aliased = cost(schema, "{ a: runs(first: 5) { nodes { id } } b: runs(first: 5) { nodes { id } } }")
    fragment = cost(schema, "query { runs(first: 5) { ...R } } fragment R on RunConnection { nodes { id } }")
    assert aliased == 2 * plain
    assert fragment == plain


def test_batched_fields_are_one_query_per_top_level_field(schema: GraphQLSchema) -> None:
    few = cost(schema, "{ runs(first: 2) { nodes { counts { held } } } }")
    many = cost(schema, "{ runs(first: 200) { nodes { counts { held } } } }")
    assert many - few == 198 * (1 + W.call + 1)  # a run, a call, its counts: no further query
    aliased = cost(schema, "{ a: runs(first: 2) { nodes { counts { held } } } b: runs(first: 2) "
                           "{ nodes { counts { held } } } }")
    assert aliased == 2 * few


def test_a_write_weighs_a_transaction(schema: GraphQLSchema) -> None:
    write = cost(schema, 'mutation { createDocument(runId: "r", input: {title: "t"}) { commandId status } }')
    assert write == W.mutation + W.call + W.object


def test_the_size_variables_are_those_given_to_first() -> None:
    document = parse("query($n: Int, $id: ID!) { run(id: $id) { commands(first: $n) { commandId } } }")
    assert size_variables(document) == frozenset({"n"})


def test_an_unknown_operation_costs_nothing(schema: GraphQLSchema) -> None:
    assert estimate(schema, parse("query A { me { id } } query B { me { id } }"), None) == 0
    assert estimate(schema, parse("query A { me { id } }"), "A") == W.object  # a plain resolver


def _in_use() -> dict[str, tuple[str, dict[str, Any]]]:
    receipt = "commandId runId operation entityId status"
    return {
        "operator runs page": (operator.RUNS, {"first": 100}),  # the CLI's largest page
        "operator run": (operator.RUN, {"id": "r", "first": operator.STEPS_PAGE}),
        "operator run steps": (operator.RUN_STEPS, {"id": "r", "first": operator.STEPS_PAGE}),
        "operator revert runs": (operator.REVERT_RUNS, {}),
        "operator run progress": (operator.RUN_PROGRESS, {"id": "r"}),
        "e2e run": (f"query($id: ID!) {{ run(id: $id) {{ {e2e_api.RUN_FIELDS} }} }}", {"id": "r"}),
        "e2e commands": (f"query($id: ID!) {{ run(id: $id) {{ commands(first: 200) {{ {receipt} }} }} }}",
                         {"id": "r"}),
        "demo steps": ("query($id: ID!) { run(id: $id) { steps(first: 12) { nodes { operation entityKey "
                       "status } } } }", {"id": "r"}),
        "agent write": ('mutation($r: ID!) { createDocument(runId: $r, input: {title: "t"}) { commandId } }',
                        {"r": "r"}),
    }


@pytest.mark.parametrize("name", list(_in_use()))
def test_the_queries_in_use_stay_well_under_the_limit(schema: GraphQLSchema, name: str) -> None:
    query, variables = _in_use()[name]
    assert cost(schema, query, variables) <= LIMIT / 10
