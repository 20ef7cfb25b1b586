"""Query cost and fairness against the real gateway: costly queries, rates, in-flight caps, backend failures.

Each test runs an in-process gateway on a real database and broker. Limits are per principal and per
replica, kept in memory, so one gateway shows them; tests that need their own limits or backends start a
gateway with those settings.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event

from kinshasa.gateway import runs as runs_mod
from kinshasa.gateway.cost import CostWeights
from kinshasa.gateway.settings import PrincipalLimits
from kinshasa.infra.process import free_port
from tests.integration.gateway.conftest import OTHER_AGENT_KEY, Harness

ISSUE_QUERY = (
    "{ "
    + " ".join(
        f"a{i}: runs(first: 200) {{ nodes {{ steps(first: 200) {{ nodes {{ stepId }} }} "
        "commands(first: 200) { commandId } } }"
        for i in range(10)
    )
    + " }"
)
RUNS_PAGE = "{ runs(first: 20) { nodes { id } } }"
# What no message to an agent may contain: a URL, an address, a host name.
WHERE = re.compile(r"[a-z][a-z0-9+.-]*://|\b\d{1,3}(\.\d{1,3}){3}\b|localhost", re.IGNORECASE)


@dataclass
class Held:
    """`runs` made to wait for `release`, noting each call, to hold requests in flight."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[str] = field(default_factory=list)
    called: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until_called(self, times: int) -> None:
        async with self.called:
            await self.called.wait_for(lambda: len(self.calls) >= times)


def held(monkeypatch: pytest.MonkeyPatch) -> Held:
    holding = Held()
    real = runs_mod.list_runs

    async def waiting(*args: Any, **kwargs: Any) -> Any:
        async with holding.called:
            holding.calls.append("runs")
            holding.called.notify_all()
        await holding.release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(runs_mod, "list_runs", waiting)
    return holding


async def test_the_issues_query_is_refused_before_any_resolver_runs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    holding = held(monkeypatch)
    holding.release.set()
    body = await harness.client.gql(ISSUE_QUERY)

    assert body["data"] is None and len(body["errors"]) == 1
    error = body["errors"][0]
    limit = harness.gateway.settings.max_query_cost
    assert error["extensions"]["code"] == "QUERY_TOO_COSTLY"
    assert error["extensions"]["limit"] == limit
    assert error["extensions"]["cost"] > 50 * limit
    assert "smaller `first`" in error["message"]
    assert holding.calls == []  # not one resolver ran
    # A page an operator or an agent really asks for is served.
    assert (await harness.client.data(RUNS_PAGE))["runs"]["nodes"] == []
    assert holding.calls == ["runs"]


async def test_a_principal_over_its_rate_is_refused_while_another_is_served(serve: Any) -> None:
    weights = CostWeights()
    page = weights.call + weights.query + 1 + 20  # what RUNS_PAGE costs
    # Room for two pages; then the bucket holds 0.5 of one, refilled by a page every 0.1 s.
    limits = {"agent-1": PrincipalLimits(rate_per_s=10 * page, rate_burst=2.5 * page)}
    async with serve(principal_limits=limits) as h:
        # The buckets' own clock, moved by the test: three pages in 50 ms of a real clock is a race on a
        # loaded machine, where the bucket refills meanwhile.
        now = [1000.0]
        h.gateway.fairness.clock = lambda: now[0]
        c = h.client
        await c.data(RUNS_PAGE)
        await c.data(RUNS_PAGE)
        error = await c.error(RUNS_PAGE)
        assert error["extensions"]["code"] == "RATE_LIMITED"
        assert error["extensions"]["reason"] == "rate"
        assert error["extensions"]["cost"] == page
        retry = error["extensions"]["retryAfterS"]
        assert 0 < retry <= 0.06
        assert "retry after" in error["message"]
        # Another principal is served meanwhile, at the default limits.
        for _ in range(5):
            await c.data(RUNS_PAGE, key=OTHER_AGENT_KEY)
        now[0] += retry
        await c.data(RUNS_PAGE)


async def test_requests_in_flight_are_capped_per_principal(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(principal_limits={"agent-1": PrincipalLimits(max_in_flight=2)}) as h:
        c = h.client
        holding = held(monkeypatch)
        slow = [asyncio.create_task(c.data(RUNS_PAGE)) for _ in range(2)]
        await asyncio.wait_for(holding.until_called(2), 10)
        assert h.gateway.fairness.in_flight("agent-1") == 2

        error = await c.error(RUNS_PAGE)
        assert error["extensions"]["code"] == "RATE_LIMITED"
        assert error["extensions"]["reason"] == "in_flight"
        assert error["extensions"]["maxInFlight"] == 2 and error["extensions"]["retryAfterS"] > 0
        assert "wait for an answer" in error["message"]
        assert (await c.data("{ me { id } }", key=OTHER_AGENT_KEY))["me"]["id"] == "agent-2"

        holding.release.set()
        await asyncio.gather(*slow)
        assert h.gateway.fairness.in_flight("agent-1") == 0
        await c.data(RUNS_PAGE)


async def test_a_backend_that_fails_is_named_without_where_it_lives(serve: Any) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with serve(coordinator_url=closed, service_urls={"documents": closed, "links": closed}) as h:
        c = h.client
        run_id = await c.start_run()
        steps = await c.gql(f'{{ run(id: "{run_id}") {{ id steps {{ nodes {{ stepId }} }} }} }}')
        document = await c.gql('{ document(id: "d1") { id title } }')
        links = await c.gql('{ links(entityId: "d1") { id } }')

    assert steps["data"]["run"] == {"id": run_id, "steps": None}
    for body, backend in ((steps, "coordinator"), (document, "documents"), (links, "links")):
        error = body["errors"][0]
        assert error["extensions"]["code"] == "BACKEND_UNAVAILABLE", body
        assert error["extensions"]["backend"] == backend
        assert backend in error["message"]
        assert not WHERE.search(str(body["errors"])), body


async def test_a_slow_backend_is_cut_at_the_request_deadline(serve: Any) -> None:
    # A coordinator that accepts connections and never answers.
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with serve(
            coordinator_url=f"http://127.0.0.1:{port}", backend_deadline_s=0.5, http_timeout_s=10
        ) as h:
            run_id = await h.client.start_run()
            started = time.monotonic()
            body = await h.client.gql(f'{{ run(id: "{run_id}") {{ steps {{ nodes {{ stepId }} }} }} }}')
            took = time.monotonic() - started
    finally:
        server.close()
    error = body["errors"][0]
    assert error["extensions"] == {"code": "BACKEND_UNAVAILABLE", "backend": "coordinator"}, body
    assert "0.5 s" in error["message"]
    assert took < 3
    assert not WHERE.search(error["message"])


async def test_an_empty_id_is_the_callers_mistake(harness: Harness) -> None:
    for query in (
        '{ links(entityId: "") { id } }',
        '{ document(id: "") { id } }',
        '{ entity(service: "documents", type: "document", id: "") { id } }',
        '{ emails(runId: "") { id } }',
    ):
        error = await harness.client.error(query)
        assert error["extensions"]["code"] == "VALIDATION", (query, error)
        assert not WHERE.search(error["message"]), error


async def test_many_runs_read_their_commands_and_counts_in_one_query_each(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.client
    await c.set_policy({"quarantineWindowS": 0, "maxWrites": 1000, "maxVelocity": 1000})
    run_ids = [await c.start_run(entry_point="batched") for _ in range(3)]
    for index, run_id in enumerate(run_ids):
        for n in range(index + 1):
            assert not (await c.create_document(run_id, title=f"t{n}")).get("errors")
    fields = (
        "id counts { held published } commands(first: 2) { commandId entityId status } "
        "breaker { writes velocity }"
    )
    one_by_one = {
        run_id: (await c.data(f'{{ run(id: "{run_id}") {{ {fields} }} }}'))["run"] for run_id in run_ids
    }

    statements: list[str] = []
    engine = harness.gateway.engine.sync_engine

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        listed = await c.data(
            f'{{ runs(first: 10, filter: {{entryPoint: "batched"}}) {{ nodes {{ {fields} }} }} }}'
        )
    finally:
        event.remove(engine, "before_cursor_execute", note)

    assert {run["id"]: run for run in listed["runs"]["nodes"]} == one_by_one
    assert [len(one_by_one[r]["commands"]) for r in run_ids] == [1, 2, 2]
    commands_queries = [s for s in statements if "row_number" in s.lower()]
    counts_queries = [s for s in statements if "count(*)" in s.lower() and "group by" in s.lower()]
    assert len(commands_queries) == 1
    assert 1 <= len(counts_queries) <= 2  # the counts, and the breakers' velocities
