"""Which requests a gateway sends to its readers (kinshasa/gateway/readers.py), without a process."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import GraphQLSchema

from kinshasa.gateway.errors import RateLimited
from kinshasa.gateway.fairness import Fairness, Limits
from kinshasa.gateway.hardening import DocumentCache, document_cache
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.readers import (
    INTERNAL_HEADER,
    PRINCIPAL_HEADER,
    costly_read,
    principal_from_header,
    principal_header,
    trusted_principal,
)
from kinshasa.gateway.settings import GatewayConfig

COSTLY = "{ runs(first: 50) { nodes { id commands(first: 20) { commandId } } } }"


@pytest.fixture
def documents() -> DocumentCache:
    return document_cache(GatewayConfig())


def routed(documents: DocumentCache, schema: GraphQLSchema, body: Any,
           threshold: float = 1_000) -> float | None:
    return costly_read(documents, schema, body, threshold)


def test_a_query_at_or_over_the_threshold_is_offloaded_with_its_cost(
        documents: DocumentCache, schema: GraphQLSchema) -> None:
    cost = documents.cost(schema, COSTLY, None, None)
    assert cost >= 1_000
    assert routed(documents, schema, {"query": COSTLY}) == cost
    assert routed(documents, schema, {"query": COSTLY}, threshold=cost) == cost
    assert routed(documents, schema, {"query": COSTLY}, threshold=cost + 1) is None


def test_the_operation_named_is_the_one_weighed(documents: DocumentCache, schema: GraphQLSchema) -> None:
    two = f"query Big {COSTLY} query Small {{ runs(first: 1) {{ nodes {{ id }} }} }}"
    assert routed(documents, schema, {"query": two, "operationName": "Big"}) is not None
    assert routed(documents, schema, {"query": two, "operationName": "Small"}) is None
    # Two operations and no name: not one operation, so the gateway answers (its error says why).
    assert routed(documents, schema, {"query": two}) is None


def test_writes_subscriptions_and_cheap_reads_stay_in_the_gateway(
        documents: DocumentCache, schema: GraphQLSchema) -> None:
    write = ('mutation { createDocument(runId: "r", input: {title: "t", body: "b"}) { commandId } }')
    assert routed(documents, schema, {"query": write}, threshold=1) is None
    watch = "subscription { alertRaised { alertId } }"
    assert routed(documents, schema, {"query": watch}, threshold=1) is None
    assert routed(documents, schema, {"query": "{ runs(first: 1) { nodes { id } } }"}) is None


def test_a_read_over_the_cost_limit_is_refused_by_the_gateway_not_sent(
        documents: DocumentCache, schema: GraphQLSchema) -> None:
    huge = "{ " + " ".join(f"a{i}: {COSTLY[2:-2]}" for i in range(20)) + " }"
    assert documents.cost(schema, huge, None, None) > documents.max_cost
    assert routed(documents, schema, {"query": huge}) is None


@pytest.mark.parametrize("body", [
    None, [], "text", {"query": 1}, {"query": COSTLY, "variables": []}, {"query": COSTLY, "operationName": 3},
    {"query": "{ runs(first: "}, {"query": ""},
])
def test_what_is_not_one_well_formed_request_stays_in_the_gateway(
        documents: DocumentCache, schema: GraphQLSchema, body: Any) -> None:
    assert routed(documents, schema, body) is None


def test_the_principal_crosses_to_the_reader_whole_and_only_with_the_token() -> None:
    operator = Principal("op-1", "operator")
    agent = Principal("agent-3", "agent", frozenset({"documents.*", "documents:read"}), frozenset({"bot"}))
    for principal in (operator, agent):
        assert principal_from_header(principal_header(principal)) == principal
    headers = {PRINCIPAL_HEADER: principal_header(agent), INTERNAL_HEADER: "token"}
    assert trusted_principal(headers, "token") == agent
    assert trusted_principal(headers, "another") is None
    assert trusted_principal({PRINCIPAL_HEADER: principal_header(agent)}, "token") is None
    assert trusted_principal({INTERNAL_HEADER: "token"}, "token") is None


def test_a_refund_gives_back_a_charge_up_to_a_full_bucket() -> None:
    now = [0.0]
    fairness = Fairness(Limits(rate_per_s=1, burst=100, max_in_flight=4), clock=lambda: now[0])
    fairness.admit("a", 80)
    fairness.release("a")
    with pytest.raises(RateLimited, match="over its rate"):
        fairness.admit("a", 80)
    fairness.refund("a", 80)
    fairness.admit("a", 80)  # the refunded charge pays for it
    fairness.release("a")
    fairness.refund("a", 80)
    fairness.refund("a", 80)  # never more than the burst
    fairness.admit("a", 100)
    with pytest.raises(RateLimited, match="over its rate"):
        fairness.admit("a", 1)
    fairness.refund("nobody", 5)  # a principal never charged has nothing to refund
    assert fairness.in_flight("nobody") == 0
