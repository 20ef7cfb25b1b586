"""Which requests a gateway sends to its readers (kinshasa/gateway/readers.py), without a process."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from graphql import GraphQLSchema

from kinshasa.gateway.errors import RateLimited
from kinshasa.gateway.fairness import Fairness, Limits
from kinshasa.gateway.hardening import DocumentCache, document_cache
from kinshasa.gateway.principals import Principal
from kinshasa.gateway.readers import (
    PRINCIPAL_HEADER,
    SECRET_HEADER,
    Offload,
    ReadPool,
    costly_read,
    is_one_query,
    principal_from_header,
    principal_header,
    serve_graphql,
    trusted_principal,
)
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.settings import StackSettings

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
    headers = {PRINCIPAL_HEADER: principal_header(agent), SECRET_HEADER: "token"}
    assert trusted_principal(headers, "token") == agent
    assert trusted_principal(headers, "another") is None
    assert trusted_principal({PRINCIPAL_HEADER: principal_header(agent)}, "token") is None
    assert trusted_principal({SECRET_HEADER: "token"}, "token") is None


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


def test_only_one_query_passes_a_readers_door(documents: DocumentCache) -> None:
    assert is_one_query(documents, {"query": COSTLY})
    assert is_one_query(documents, {"query": "{ nosuchfield }"})  # invalid, but a query: the reader says why
    for refused in ({"query": 'mutation { startRun(entryPoint: "x") { id } }'},
                    {"query": "subscription { alertRaised { alertId } }"},
                    {"query": "query A { runs { nodes { id } } } mutation B { x }", "operationName": "B"},
                    {"query": "{ runs(first: "}, {"query": COSTLY, "operationName": 1}, [], None):
        assert not is_one_query(documents, refused)


class _Supervisor:
    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, name: str, run: Any, policy: Any = None) -> None:
        self.added.append(name)


def test_readers_start_at_the_first_ask_and_take_reads_in_turn_when_up() -> None:
    supervisor = _Supervisor()
    host = SimpleNamespace(settings=GatewayConfig(readers=3), stack=StackSettings(), internal_token="t",
                           supervisor=supervisor, restart_policy=None)
    pool = ReadPool(host)  # type: ignore[arg-type]
    assert supervisor.added == []
    assert pool.ready() is None  # the first ask starts them; none is up yet
    assert supervisor.added == ["reader-1", "reader-2", "reader-3"]
    for index, reader in enumerate(pool.readers, start=1):
        reader.url = f"http://127.0.0.1:{index}"
    assert [pool.ready() for _ in range(6)] == [f"http://127.0.0.1:{i}" for i in (1, 2, 3, 1, 2, 3)]
    pool.readers[1].url = None  # reader-2 restarting
    assert [pool.ready() for _ in range(4)] == [f"http://127.0.0.1:{i}" for i in (1, 3, 1, 3)]
    for reader in pool.readers:
        reader.url = None
    assert pool.ready() is None
    assert supervisor.added == ["reader-1", "reader-2", "reader-3"]  # started once
    # Every reader of a pool takes the pool's own secret, never the stack's token.
    assert len(pool.secret) >= 32 and all(r.secret == pool.secret != "t" for r in pool.readers)


class _Pool:
    """A pool whose reader does what each test says, noting how each offloaded read was finished."""

    readers = ["reader-1"]

    def __init__(self, forward: Any) -> None:
        self._forward = forward
        self.finished: list[bool] = []

    def route(self, headers: Any, body: bytes) -> Offload:
        return Offload(Principal("agent-1", "agent"), 5_000, "http://127.0.0.1:1")

    async def forward(self, headers: Any, body: bytes, offload: Offload) -> Any:
        return await self._forward()

    def finish(self, offload: Offload, refund: bool = False) -> None:
        self.finished.append(refund)


async def _serve(pool: _Pool) -> tuple[list[dict[str, Any]], list[str]]:
    sent: list[dict[str, Any]] = []
    ran_here: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"query": "{ runs { nodes { id } } }"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def local(scope: Any, replayed: Any, send: Any) -> None:
        ran_here.append((await replayed())["body"].decode())

    await serve_graphql(pool, local, {"type": "http", "method": "POST", "headers": []},  # type: ignore[arg-type]
                        receive, send)
    return sent, ran_here


async def test_an_offloaded_read_cancelled_mid_way_is_released_once_and_stays_charged() -> None:
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    pool = _Pool(hangs)
    task = asyncio.create_task(_serve(pool))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.finished == [False]


async def test_a_read_no_reader_took_is_refunded_and_runs_in_the_gateway_with_its_body() -> None:
    async def not_taken() -> None:
        return None

    pool = _Pool(not_taken)
    sent, ran_here = await _serve(pool)
    assert pool.finished == [True]
    assert ran_here == ['{"query": "{ runs { nodes { id } } }"}'] and sent == []


async def test_a_read_the_reader_took_too_long_over_is_a_504_without_a_url_and_stays_charged() -> None:
    async def too_long() -> None:
        raise httpx.ReadTimeout("read timed out")

    pool = _Pool(too_long)
    sent, ran_here = await _serve(pool)
    assert pool.finished == [False] and ran_here == []
    assert sent[0]["status"] == 504
    error = json.loads(sent[1]["body"])["errors"][0]
    assert error["extensions"]["code"] == "BACKEND_UNAVAILABLE" and "127.0.0.1" not in error["message"]
